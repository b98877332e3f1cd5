"""Where each detector puts the nose tip between the eye line and the mouth line (the quantity the quality
gate's pitch estimate reads), on unmasked celeba299 faces of at least 48 px (the training pool, never LFW)
and on rmfd_sample's real masked photos: median and interquartile range per detector at the unlock setting.

    OMP_NUM_THREADS=1 python benchmarks/detector_pose_spread.py [--images 300]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.unlock import unlock_detector  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
USABLE = 48


def nose_fraction(points: np.ndarray) -> float:
    """(nose - eye line) / (mouth line - eye line) along the face's vertical axis, roll removed."""
    left_eye, right_eye = points[0], points[1]
    angle = np.arctan2(right_eye[1] - left_eye[1], right_eye[0] - left_eye[0])
    c, s = np.cos(-angle), np.sin(-angle)
    level = (points - points[:2].mean(0)) @ np.array([[c, -s], [s, c]]).T
    eyes, mouth = level[:2, 1].mean(), level[3:, 1].mean()
    return float((level[2, 1] - eyes) / (mouth - eyes))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    celeba = sorted((DATA / "celeba299" / "images").glob("*.jpg"))
    celeba = [celeba[i] for i in np.random.default_rng(0).choice(len(celeba), args.images, replace=False)]
    sets = {"celeba299": celeba, "rmfd_sample": sorted((DATA / "rmfd_sample").glob("*/*.jpg"))}
    for name in ("yunet", "yunet-onet", "mtcnn"):
        detector = unlock_detector(name)
        for label, paths in sets.items():
            fractions = []
            for path in paths:
                faces = detector.detect(cv2.imread(str(path)))
                face = max(faces, key=lambda f: f.area) if faces else None
                if face is not None and min(face.width, face.height) >= USABLE:
                    fractions.append(nose_fraction(face.landmarks))
            q1, median, q3 = np.percentile(fractions, [25, 50, 75])
            print(f"{name:11s} {label:12s} faces {len(fractions):4d}  median {median:.3f}  IQR {q1:.3f}-{q3:.3f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
