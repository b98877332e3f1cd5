"""How differently a masked photo is aligned from the same photo unmasked, in the teacher's chip frame.

An unlock detects the face afresh on the masked photo, and the detector's five points move when the mouth and
nose are covered (docs/detectors.md). The teacher's clean templates come from well-aligned unmasked photos, so
a masked probe reaches the network slightly moved, scaled and turned. This script measures that similarity on
training-pool photos (celeba_test `train`, never `calib` or LFW), as `route-map` makes its pairs: detect on the
photo, draw a random synthetic mask at those points, detect again on the masked photo. For each face, the
similarity from the clean chip to the masked chip (the dlib chip template, as fractions of the chip side) is
split into shift, log-scale and angle; it prints their spread. `fit`'s `view_jitter` draws masked views from a
normal distribution of that spread.

    OMP_NUM_THREADS=1 python benchmarks/masked_alignment_error.py --faces 1000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.detect import DEFAULT_DETECTOR, get_detector  # noqa: E402
from edge_mfr.masked_alignment import MaskedAlignmentRefiner, relative_similarity  # noqa: E402
from edge_mfr.masks import apply_mask, jittered_points, random_mask_type  # noqa: E402
from edge_mfr.train.data import _celeba_items as celeba_items  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--faces", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detector", default=DEFAULT_DETECTOR)
    parser.add_argument("--split", default="train", choices=("train", "calib"), help="celeba_test split")
    parser.add_argument("--mask-jitter", type=float, default=0.0,
                        help="draw masks this far from the clean points (edge_mfr.masks.jittered_points)")
    parser.add_argument("--refiner", help="a bundled masked-face alignment refiner to measure")
    parser.add_argument("--rmfd", action="store_true", help="the refiner's predictions on rmfd_sample's real masks")
    args = parser.parse_args()
    if args.rmfd:
        return _real_masks(args)
    if not (args.data / "celeba_test").is_dir():
        print(f"no celeba_test under {args.data}", file=sys.stderr)
        return 2
    find = get_detector(args.detector, threads=1)
    items = list(celeba_items(args.data / "celeba_test", args.split, None, None))
    refiner = MaskedAlignmentRefiner(args.refiner) if args.refiner else None
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(len(items), min(args.faces, len(items)), replace=False))
    rows, refined, timings, misses = [], [], [], 0
    for index in chosen:
        image = cv2.imread(str(items[index][1]), cv2.IMREAD_COLOR)
        face = None if image is None else find.detect_largest(image)
        if face is None:
            continue
        worn_at = jittered_points(face.landmarks, args.mask_jitter, rng) if args.mask_jitter else face.landmarks
        covered = apply_mask(image, worn_at, random_mask_type(rng), rng)
        again = find.detect_largest(covered)
        if again is None:
            misses += 1
            continue
        rows.append(relative_similarity(face.landmarks, again.landmarks))
        if refiner is not None:
            started = time.perf_counter()
            moved = refiner.refine(covered, again.landmarks[None])[0]
            timings.append(time.perf_counter() - started)
            refined.append(relative_similarity(face.landmarks, moved))
    print(f"detector {args.detector}, celeba_test {args.split}, masks drawn {args.mask_jitter} from the clean points: "
          f"{len(rows)} masked faces re-detected, {misses} missed")
    _table("the masked face's own points", np.array(rows))
    if refiner is not None:
        _table(f"moved by the refiner {args.refiner}", np.array(refined))
        print(f"\nrefiner time per face (warp, network, points), one thread: median {1e3 * np.median(timings):.2f} ms, "
              f"90th percentile {1e3 * np.percentile(timings, 90):.2f} ms")
    return 0


def _real_masks(args) -> int:
    from edge_mfr.quality import QualityPolicy, assess

    folder = args.data / "rmfd_sample"
    if not folder.is_dir() or not args.refiner:
        print(f"--rmfd needs {folder} and --refiner", file=sys.stderr)
        return 2
    find = get_detector(args.detector, threads=1)
    refiner = MaskedAlignmentRefiner(args.refiner)
    policy = QualityPolicy.verify()
    predicted, photos = [], 0
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            continue
        photos += 1
        for face in find.detect(image):
            report = assess(image, face, policy)
            if report.masked and min(face.width, face.height) >= 48:
                predicted.append(refiner.predict(image, face.landmarks[None])[0])
    print(f"rmfd_sample: {photos} photos, {len(predicted)} faces of at least 48 px judged masked")
    _table(f"what {args.refiner} predicts on them",
           np.array(predicted))
    return 0


def _table(title: str, values: np.ndarray) -> None:
    print(f"\n{title}: similarity from the clean chip")
    print("| | std | median of abs | 90th pct of abs | mean |")
    print("|---|---|---|---|---|")
    for k, name in enumerate(("shift x (side)", "shift y (side)", "log-scale", "angle (deg)")):
        v = values[:, k]
        print(f"| {name} | {v.std():.4f} | {np.median(np.abs(v)):.4f} | {np.percentile(np.abs(v), 90):.4f} "
              f"| {v.mean():+.4f} |")


if __name__ == "__main__":
    raise SystemExit(main())
