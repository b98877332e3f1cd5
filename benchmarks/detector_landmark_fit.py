"""How far a detector's five landmarks sit from MTCNN's on the same faces, in the aligned face frame.

The bundled teacher's alignment template was fitted to MTCNN's landmarks (benchmarks/teacher_template_fit.py),
so a detector that marks, say, the nose tip a little lower aligns faces a little differently from what the
template expects. This script measures, on unmasked CelebA photos (the training pool, never LFW), the mean
offset of each of the detector's points from MTCNN's, expressed in the 112 px ArcFace frame of the detector's
own landmarks. Measured: every mean offset is within about 1 px of the 112 px frame while the per-face spread
is 3-5 px, so YuNet's points follow MTCNN's convention and need no correction before the shared template.

    OMP_NUM_THREADS=1 python benchmarks/detector_landmark_fit.py --images 400

With --masked-lfw N it also measures, on the masked probes of the first N of a balanced 1,000-pair LFW subset
(template masks, the evaluation suite's seed, drawn at YuNet's points), the distance of YuNet's points and of
O-Net's points on YuNet's box (`yunet-onet`) from MTCNN's, in eye distances.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.align import ARCFACE_TEMPLATE_112, umeyama_reference  # noqa: E402
from edge_mfr.detect import MTCNNDetector, YuNetDetector  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def to_frame(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--masked-lfw", type=int, default=0)
    args = parser.parse_args()
    paths = sorted((args.data / "celeba299" / "images").glob("*.jpg"))
    picked = np.random.default_rng(args.seed).choice(len(paths), min(args.images, len(paths)), replace=False)
    reference, detector = MTCNNDetector(), YuNetDetector()
    deltas = []
    for index in sorted(picked):
        image = cv2.imread(str(paths[index]))
        ours, theirs = detector.detect_largest(image), reference.detect_largest(image)
        if ours is None or theirs is None:
            continue
        inter = max(min(ours.box[2], theirs.box[2]) - max(ours.box[0], theirs.box[0]), 0) * \
            max(min(ours.box[3], theirs.box[3]) - max(ours.box[1], theirs.box[1]), 0)
        if inter < 0.3 * min(ours.area, theirs.area):  # not the same face
            continue
        frame = umeyama_reference(ours.landmarks, ARCFACE_TEMPLATE_112)
        deltas.append(to_frame(frame, theirs.landmarks) - to_frame(frame, ours.landmarks))
    deltas = np.asarray(deltas)
    mean, spread = deltas.mean(0), deltas.std(0)
    print(f"{len(deltas)} faces found by both; offsets MTCNN - YuNet in the 112 px frame (mean, std):")
    for name, m, s in zip(("left_eye", "right_eye", "nose", "mouth_left", "mouth_right"), mean, spread):
        print(f"  {name:12s} dx {m[0]:+6.2f} (sd {s[0]:.2f})  dy {m[1]:+6.2f} (sd {s[1]:.2f})")
    if args.masked_lfw:
        masked_lfw(args.data / "lfw", args.masked_lfw, reference)
    return 0


def masked_lfw(lfw: Path, count: int, reference) -> None:
    from edge_mfr.eval.pairs import read_pairs
    from edge_mfr.eval.runner import FaceLocator, MaskPolicy
    from edge_mfr.unlock import unlock_detector

    pairs = read_pairs(lfw / "pairs.txt", lfw / "images", limit=1000)
    probes = sorted({(p.second, p.second_key) for p in pairs.pairs})[:count]
    yunet, onet = unlock_detector("yunet"), unlock_detector("yunet-onet")
    locator, policy = FaceLocator(detector=yunet, face="centre"), MaskPolicy("template", 0)
    errors = {"yunet": [], "yunet-onet": []}
    for path, key in probes:
        image = cv2.imread(str(path))
        landmarks, _ = locator.locate(image, path)
        if landmarks is None:
            continue
        masked = policy.apply(image, landmarks, key)
        truth = reference.detect_largest(masked)
        if truth is None:
            continue
        eye = np.linalg.norm(truth.landmarks[1] - truth.landmarks[0])
        for name, detector in (("yunet", yunet), ("yunet-onet", onet)):
            found = detector.detect_largest(masked)
            if found is not None:
                errors[name].append(np.linalg.norm(found.landmarks - truth.landmarks, axis=1) / eye)
    for name, values in errors.items():
        values = np.asarray(values)
        print(f"masked LFW, {name} vs MTCNN, {len(values)} faces: mean distance per point / eye distance "
              f"{np.round(values.mean(0), 3).tolist()}, median over all points {np.median(values):.3f}")


if __name__ == "__main__":
    sys.exit(main())
