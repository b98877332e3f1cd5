"""Is a detector's U-M accuracy gap from where the synthetic mask is drawn, or from how it aligns faces?

LFW U-M (template-family masks, the evaluation suite's per-image mask seed), balanced pair subset, bundled
teacher: each combination of "mask drawn at detector A's unmasked landmarks" x "faces aligned with detector
B's unmasked landmarks" (no re-detection on the masked probe; the subject is the face nearest the centre),
10-fold accuracy. Pairs where either detector misses a face are left out for every combination alike.

    OMP_NUM_THREADS=1 python benchmarks/detector_mask_placement.py --pairs 1000
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.embed import FaceEmbedder  # noqa: E402
from edge_mfr.eval import metrics  # noqa: E402
from edge_mfr.eval.pairs import read_pairs  # noqa: E402
from edge_mfr.eval.runner import FaceLocator, MaskPolicy  # noqa: E402
from edge_mfr.unlock import unlock_detector  # noqa: E402

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"
DETECTORS = ("yunet", "mtcnn")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pair_set = read_pairs(LFW / "pairs.txt", LFW / "images", limit=args.pairs)
    locators = {name: FaceLocator(detector=unlock_detector(name), face="centre") for name in DETECTORS}
    policy = MaskPolicy("template", args.seed)
    embedder = FaceEmbedder(threads=1)
    landmarks: dict[str, dict[Path, np.ndarray | None]] = {name: {} for name in DETECTORS}
    images = {}
    for path in pair_set.unique_images():
        images[path] = cv2.imread(str(path))
        for name in DETECTORS:
            landmarks[name][path] = locators[name].locate(images[path], path)[0]
    usable = [p for p in pair_set.pairs
              if all(landmarks[n][p.first] is not None and landmarks[n][p.second] is not None for n in DETECTORS)]
    labels = np.array([p.genuine for p in usable])
    folds = np.array([p.fold for p in usable]) if pair_set.folds is not None else None
    print(f"{len(usable)} of {len(pair_set.pairs)} pairs with faces found by both detectors")
    references = {b: {} for b in DETECTORS}
    for b in DETECTORS:
        for p in usable:
            if p.first not in references[b]:
                references[b][p.first] = embedder.embed_faces(images[p.first], landmarks[b][p.first][None])[0]
    for a in DETECTORS:
        masked = {}
        for p in usable:
            if p.second not in masked:
                masked[p.second] = policy.apply(images[p.second], landmarks[a][p.second], p.second_key)
        for b in DETECTORS:
            scores = np.array([float(references[b][p.first] @ embedder.embed_faces(
                masked[p.second], landmarks[b][p.second][None])[0]) for p in usable])
            accuracy = metrics.kfold_accuracy(scores, labels, folds)["mean"]
            print(f"mask drawn at {a:5s} landmarks, aligned with {b:5s} landmarks: U-M accuracy {100 * accuracy:.2f}%",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
