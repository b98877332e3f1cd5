"""End-to-end unlock on real LFW faces: enroll 3 unmasked photos of each of 20 identities, verify their
other photos with and without synthetic masks, and 200 impostor attempts; accept/reject rates at the
default threshold (FMR 1e-4 from the model package), for max and mean aggregation over templates.

The deployed path throughout: `FaceUnlock` with its default detector (or --detector), the mask drawn at the
unmasked photo's landmarks, and the masked frame handed to `verify`, which detects the face afresh. An
identity whose 3 photos are all refused (e.g. several similar-sized faces) is not enrolled and is reported.

Run: python benchmarks/e2e_lfw_unlock.py [--model NAME_OR_PATH] [--detector NAME] [--identities 20] [--probes 3]
     [--impostors 200] [--enrollment-masks TYPE ...]
`--enrollment-masks`: the synthetic masks enrollment draws (default `unlock.SYNTHETIC_MASK_TYPES`); a package's
thresholds hold for the ones it was calibrated with (`calibration.enrollment_mask_types`).
Needs ../shared/data/lfw. LFW is used for evaluation only.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import numpy as np

from edge_mfr.errors import QualityError
from edge_mfr.io import load_image
from edge_mfr.masks import MASK_TYPES, apply_mask
from edge_mfr.unlock import SYNTHETIC_MASK_TYPES, FaceUnlock, synthesize_masked_copies

LFW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lfw" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--detector", default=None, help="detector name (default: FaceUnlock's)")
    parser.add_argument("--identities", type=int, default=20)
    parser.add_argument("--probes", type=int, default=3, help="genuine probe photos per identity")
    parser.add_argument("--impostors", type=int, default=200)
    parser.add_argument("--fmr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enrollment-masks", nargs="+", choices=MASK_TYPES, default=list(SYNTHETIC_MASK_TYPES))
    args = parser.parse_args()
    synthesizer = synthesize_masked_copies if tuple(args.enrollment_masks) == SYNTHETIC_MASK_TYPES else \
        functools.partial(synthesize_masked_copies, mask_types=tuple(args.enrollment_masks))
    rng = np.random.default_rng(args.seed)
    people = sorted(d for d in LFW.iterdir() if len(list(d.glob("*.jpg"))) >= 3 + args.probes)
    people = [people[i] for i in sorted(rng.choice(len(people), args.identities, replace=False))]
    with tempfile.TemporaryDirectory() as tmp:
        systems = {agg: FaceUnlock(model=args.model, gallery=Path(tmp) / f"{agg}.emfr", passphrase="benchmark passphrase",
                                   fmr=args.fmr, aggregation=agg, detector=args.detector, mask_synthesizer=synthesizer)
                   for agg in ("max", "mean")}
        enroller = systems["max"]
        probes, enrolled = [], []
        for person in people:
            photos = sorted(person.glob("*.jpg"))
            try:
                report = enroller.enroll(person.name, [(str(p), load_image(p)) for p in photos[:3]])
            except QualityError as exc:  # every capture refused: this person cannot use the device
                print(f"{person.name}: not enrolled: {exc}")
                continue
            enrolled.append(person)
            templates = enroller.gallery().templates(person.name)
            info = enroller.gallery().user_info(person.name)["templates"]
            systems["mean"].gallery(create=True).add_user(person.name, templates, info)
            probes += [(person.name, p) for p in photos[3 : 3 + args.probes]]
            if report.refused:
                print(f"{person.name}: refused {report.refused}")
        people = enrolled
        names = [p.name for p in people]
        impostors = []
        while len(impostors) < args.impostors:
            claimed = names[rng.integers(len(names))]
            other = people[rng.integers(len(people))]
            photo = sorted(other.glob("*.jpg"))[rng.integers(3, 3 + args.probes)]
            if other.name != claimed:
                impostors.append((claimed, photo))
        rows = {agg: {"genuine unmasked": [], "genuine masked": [], "impostor unmasked": [], "impostor masked": []}
                for agg in systems}
        detector = enroller.detector
        false_matches = []
        for kind, attempts in (("genuine", probes), ("impostor", impostors)):
            for k, (claimed, photo) in enumerate(attempts):
                image = load_image(photo)
                face = detector.detect_largest(image)
                variants = {"unmasked": image}
                if face is not None:
                    mask_type = MASK_TYPES[k % len(MASK_TYPES)]
                    variants["masked"] = apply_mask(image, face.landmarks, mask_type, args.seed + k)
                for variant, frame in variants.items():
                    for agg, system in systems.items():
                        decision = system.verify(claimed, frame, str(photo))
                        rows[agg][f"{kind} {variant}"].append(decision)
                        if kind == "impostor" and decision.accepted:
                            false_matches.append((agg, variant, claimed, photo.name, decision.score))
    detector_name = getattr(enroller.detector, "registry_name", type(enroller.detector).__name__)
    print(f"model {enroller.package.name}, detector {detector_name}, at FMR {args.fmr:g}; "
          f"{len(people)} of {args.identities} identities enrolled from 3 photos each, "
          f"{len(probes)} genuine probes, {len(impostors)} impostor attempts (each unmasked and masked); "
          f"enrollment masks {', '.join(args.enrollment_masks)}")
    for agg, system in systems.items():
        print(f"  {agg} aggregation thresholds: " + ", ".join(f"{r} probes {t:.4f}" for r, t in system.thresholds.items()))
    print("| aggregation | attempts | n | accepted | rejected | no face / quality refusals |")
    print("|---|---|---|---|---|---|")
    for agg, groups in rows.items():
        for group, decisions in groups.items():
            n = len(decisions)
            accepted = sum(d.accepted for d in decisions)
            refused = sum(d.score is None for d in decisions)
            print(f"| {agg} | {group} | {n} | {accepted / n:.1%} | {(n - accepted) / n:.1%} | {refused} |")
    for agg, variant, claimed, photo, score in false_matches:
        print(f"impostor accepted ({agg}, {variant}): {photo} as {claimed}, score {score:.4f}")


if __name__ == "__main__":
    main()
