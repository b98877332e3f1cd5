"""Which synthetic masks should enrollment draw? Masked-route FNMR on the unlock protocol of `edge-mfr calibrate`
(celeba_test `calib`) for several sets of enrollment mask types.

`FaceUnlock.enroll` stores each capture and its copies with `unlock.SYNTHETIC_MASK_TYPES` drawn on it; a probe the
quality gate judges masked is scored against them (max over the user's templates, under the package's
`masked_probe_templates` rule). More mask types give a genuine masked probe more chances to meet a mask like its
own, and every impostor more chances too. Per identity the first 2 images are enrolled with a copy for every mask
type (each type's copy drawn from its own seed, so a type's copy is the same in every set); the other images probe,
each with one random mask, detected afresh and routed by the quality gate, as calibration does. For each set,
the masked route's threshold is set for the FMR on that set's impostor attempts and FNMR is reported over all
masked-route probes, and over those whose mask type the set does not contain (how the set does on masks it has
never seen: a user's real mask is none of ours).

    OMP_NUM_THREADS=1 python benchmarks/enrollment_mask_types.py [--model dlib_resnet_v1_masked_route] [--json OUT.json]

About 8 minutes of one core (the copies of all ten mask types are embedded once; each set is a rescoring).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.embed import FaceEmbedder  # noqa: E402
from edge_mfr.eval import metrics  # noqa: E402
from edge_mfr.eval.calibrate import read_labelled_images  # noqa: E402
from edge_mfr.eval.runner import deployed_detector, image_seed  # noqa: E402
from edge_mfr.eval.unlock_calibration import _largest  # noqa: E402
from edge_mfr.io import load_image  # noqa: E402
from edge_mfr.masks import FAMILIES, MASK_TYPES, apply_mask  # noqa: E402
from edge_mfr.match import route_rows  # noqa: E402
from edge_mfr.models.package import default_model, load_package  # noqa: E402
from edge_mfr.quality import QualityPolicy, assess  # noqa: E402
from edge_mfr.unlock import SYNTHETIC_MASK_TYPES  # noqa: E402

CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba_test"
ENROLL_PER_IDENTITY = 2
SETS = {
    "none (clean templates only)": (),
    "surgical": ("surgical",),
    "surgical, kn95, cloth (until December 2026)": ("surgical", "kn95", "cloth"),
    "template family (4)": FAMILIES["template"],
    "NIST family (6)": FAMILIES["nist"],
    "surgical + NIST family (7)": ("surgical", *FAMILIES["nist"]),
    "all ten": MASK_TYPES,
}
FMRS = (1e-3, 1e-4)


def embed(images, embedder, detector):
    """Per identity: clean template rows and, per mask type, masked template rows; masked-route probes as
    (identity, embedding, mask type)."""
    by_identity = defaultdict(list)
    for image in images:
        by_identity[image.identity].append(image)
    clean, masked, probes = defaultdict(list), defaultdict(lambda: defaultdict(list)), []
    policy = QualityPolicy.verify()
    for identity, group in sorted(by_identity.items()):
        if len(group) <= ENROLL_PER_IDENTITY:
            continue
        for k, image in enumerate(group):
            frame = load_image(image.path)
            face = _largest(detector, frame)
            if face is None:
                continue
            if k < ENROLL_PER_IDENTITY:
                clean[identity].append(embedder.embed_faces(frame, face.landmarks[None])[0])
                for mask_type in MASK_TYPES:
                    rng = np.random.default_rng(image_seed(f"{image.key}:{mask_type}", 0))
                    copy = apply_mask(frame, face.landmarks, mask_type, rng)
                    masked[identity][mask_type].append(
                        embedder.embed_faces(copy, face.landmarks[None], route="masked", detected=False)[0])
                continue
            rng = np.random.default_rng(image_seed(image.key, 0))
            mask_type = MASK_TYPES[rng.integers(len(MASK_TYPES))]
            picture = apply_mask(frame, face.landmarks, mask_type, rng)
            seen = _largest(detector, picture)
            if seen is not None and assess(picture, seen, policy).masked:
                probes.append((identity, embedder.embed_faces(picture, seen.landmarks[None], route="masked")[0],
                               mask_type))
    identities = sorted(clean)
    return identities, clean, masked, [p for p in probes if p[0] in clean]


def scores_for_set(package, identities, clean, masked, probes, mask_types) -> np.ndarray:
    """(probes, identities) max masked-route score over each user's templates under the package's rule."""
    scoring = package.route_scoring("masked")
    probe_matrix = np.stack([p[1] for p in probes])
    out = np.empty((len(probes), len(identities)))
    for j, identity in enumerate(identities):
        rows = list(clean[identity]) + [row for t in mask_types for row in masked[identity][t]]
        flags = np.array([False] * len(clean[identity]) + [True] * (len(rows) - len(clean[identity])))
        keep = route_rows(flags, "masked", package.masked_probe_templates)
        out[:, j] = scoring.scores(probe_matrix, np.stack(rows)[keep]).max(axis=1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="package (default: the default model)")
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()
    package = load_package(args.model) if args.model else default_model()
    images = read_labelled_images(CALIB / "images", CALIB / "identities.txt", split="calib")
    identities, clean, masked, probes = embed(images, FaceEmbedder(package, threads=1), deployed_detector(None))
    genuine = np.array([p[0] for p in probes])[:, None] == np.array(identities)[None]
    probe_types = np.array([p[2] for p in probes])
    print(f"{package.name} ({package.fingerprint}), rule {package.masked_probe_templates!r}: {len(identities)} "
          f"identities, {len(probes)} masked-route probes\n")
    print("| enrollment masks | FMR | FNMR, all masked-route probes | probes in template masks | probes in NIST masks | "
          "probes whose mask type is not enrolled |")
    print("|---|---|---|---|---|---|")
    rows = []
    for label, mask_types in SETS.items():
        label += " (in use)" if mask_types == SYNTHETIC_MASK_TYPES else ""
        scores = scores_for_set(package, identities, clean, masked, probes, mask_types)
        unseen = ~np.isin(probe_types, mask_types)
        for fmr in FMRS:
            threshold = metrics.threshold_for_fmr(scores[~genuine], fmr)
            refused = scores[genuine] < threshold
            by_family = {family: float(refused[np.isin(probe_types, types)].mean())
                         for family, types in FAMILIES.items()}
            row = {"set": label, "mask_types": list(mask_types), "fmr": fmr, "fnmr": float(refused.mean()),
                   "fnmr_by_probe_family": by_family, "n_unseen": int(unseen.sum()),
                   "fnmr_unseen": float(refused[unseen].mean()) if unseen.any() else None}
            rows.append(row)
            cell = f"{100 * row['fnmr_unseen']:.1f}% ({row['n_unseen']})" if unseen.any() else "-"
            print(f"| {label} | {fmr:g} | {100 * row['fnmr']:.1f}% | {100 * by_family['template']:.1f}% | "
                  f"{100 * by_family['nist']:.1f}% | {cell} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": package.name, "fingerprint": package.fingerprint,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
