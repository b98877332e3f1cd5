"""Would a second network for the masked route help at the deployed operating point?

Since a probe the quality gate judges unmasked meets only the unmasked templates (`match.route_rows`), the
masked templates and the masked-route probes could come from another network: one fine-tuned to map masked
faces onto the teacher's clean templates (squared-error KD, every training face masked), whose drift on
clean faces then does not matter. This simulates the unlock protocol of `edge-mfr calibrate` on
celeba_test `calib` (2 photos enrolled per identity plus synthetic masked copies, the rest probe unmasked
and masked, masked probes detected afresh, routed by the quality gate) for two designs:

- teacher: every template and probe embedded by the teacher (today's package);
- two networks: unmasked templates and unmasked-route probes by the teacher, masked templates and
  masked-route probes by STUDENT.

Each design is scored with plain cosine and, where the package that embeds its masked route has one, with
that package's masked-route metric on the masked route (as `FaceUnlock` scores it: the masked-route probe and
every template it meets through `match.scoring_space`). Per design, each route's threshold is set for FMR
1e-4 (and 1e-3) on its impostor attempts; FNMR per route and per what was drawn.

    OMP_NUM_THREADS=1 python benchmarks/masked_route_network.py STUDENT.onnx
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from route_template_rules import attempt_matrix, fnmr_by_route_and_drawn  # noqa: E402
from edge_mfr.embed import FaceEmbedder  # noqa: E402
from edge_mfr.eval.calibrate import read_labelled_images  # noqa: E402
from edge_mfr.eval.runner import deployed_detector, image_seed  # noqa: E402
from edge_mfr.io import load_image  # noqa: E402
from edge_mfr.masks import MASK_TYPES, apply_mask  # noqa: E402
from edge_mfr.match import scoring_space  # noqa: E402
from edge_mfr.models.package import load_package  # noqa: E402
from edge_mfr.quality import QualityPolicy, assess  # noqa: E402
from edge_mfr.unlock import synthesize_masked_copies  # noqa: E402

CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba_test"
DESIGNS = ("teacher", "two networks")


def largest(detector, frame):
    faces = detector.detect(frame)
    return max(faces, key=lambda d: d.area) if faces else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student")
    parser.add_argument("--teacher", default="dlib_resnet_v1")
    args = parser.parse_args()
    packages = {"teacher": load_package(args.teacher), "two networks": load_package(args.student)}
    teacher = FaceEmbedder(packages["teacher"], threads=1)
    student = FaceEmbedder(packages["two networks"], threads=1)
    detector, policy = deployed_detector(None), QualityPolicy.verify()
    images = read_labelled_images(CALIB / "images", CALIB / "identities.txt", split="calib")
    by_identity = defaultdict(list)
    for image in images:
        by_identity[image.identity].append(image)
    # templates[design][identity] = (rows, masked flags); probes: (identity, {design: embedding}, route, drawn)
    templates = {d: {} for d in DESIGNS}
    probes = []
    for identity, group in sorted(by_identity.items()):
        if len(group) <= 2:
            continue
        rows = {d: [] for d in DESIGNS}
        flags = []
        for k, image in enumerate(group):
            frame = load_image(image.path)
            face = largest(detector, frame)
            if face is None:
                continue
            rng = np.random.default_rng(image_seed(image.key, 0))
            points = face.landmarks[None]
            if k < 2:
                clean = teacher.embed_faces(frame, points)[0]
                rows["teacher"].append(clean)
                rows["two networks"].append(clean)
                flags.append(False)
                for _, masked in synthesize_masked_copies(frame, face.landmarks, rng):
                    rows["teacher"].append(teacher.embed_faces(masked, points)[0])
                    rows["two networks"].append(student.embed_faces(masked, points)[0])
                    flags.append(True)
                continue
            masked = apply_mask(frame, face.landmarks, MASK_TYPES[rng.integers(len(MASK_TYPES))], rng)
            for drawn, picture in (("unmasked", frame), ("masked", masked)):
                seen = face if drawn == "unmasked" else largest(detector, picture)
                if seen is None:
                    continue
                route = "masked" if assess(picture, seen, policy).masked else "unmasked"
                plain = teacher.embed_faces(picture, seen.landmarks[None])[0]
                routed = student.embed_faces(picture, seen.landmarks[None])[0] if route == "masked" else plain
                probes.append((identity, {"teacher": plain, "two networks": routed}, route, drawn))
        if flags:
            for d in DESIGNS:
                templates[d][identity] = (np.stack(rows[d]), np.array(flags))
    probes = [p for p in probes if p[0] in templates["teacher"]]
    identities = sorted(templates["teacher"])
    route = np.array([p[2] for p in probes])
    drawn = np.array([p[3] for p in probes])
    print(f"{len(identities)} identities, {len(probes)} probe attempts")
    print("| design | FMR | unmasked route FNMR | masked route FNMR | drawn unmasked FNMR | drawn masked FNMR |")
    print("|---|---|---|---|---|---|")
    for design in DESIGNS:
        # an infinite penalty on masked templates for unmasked-route probes is match.route_rows
        design_probes = [(p[0], p[1][design], p[2]) for p in probes]
        scores, genuine = attempt_matrix(templates[design], design_probes, np.inf)
        weight = packages[design].route_metric("masked")
        scorings = [("plain cosine", scores)]
        if weight is not None:
            in_space = {i: (scoring_space(rows, weight), flags) for i, (rows, flags) in templates[design].items()}
            masked_scores, _ = attempt_matrix(in_space, [(i, scoring_space(e[None], weight)[0], r)
                                                         for i, e, r in design_probes], np.inf)
            scorings.append(("masked-route metric", np.where((route == "masked")[:, None], masked_scores, scores)))
        for name, routed_scores in scorings:
            for fmr in (1e-3, 1e-4):
                cells = [f"{100 * f:.1f}%" for f in fnmr_by_route_and_drawn(routed_scores, genuine, route, drawn, fmr)]
                print(f"| {design}, {name} | {fmr:g} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
