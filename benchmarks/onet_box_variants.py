"""Which box MTCNN's O-Net should see when it marks the points on another detector's (YuNet's) faces.

O-Net's five points depend on the box it is shown. Variants, each run as a detector on the deployed path
(masks drawn at that variant's unmasked points, masked probes detected afresh), LFW U-U and U-M with
template-family masks, bundled teacher, a balanced 1,000-pair subset:

- `yunet`: YuNet's own points;
- `o`: O-Net on YuNet's squared box as it is;
- `r`: R-Net's box regression first, then O-Net;
- `o2`: O-Net's box regression, then O-Net again on the tightened box;
- `ro2`: R-Net's, then O-Net's box regression, then O-Net (what `edge_mfr.detect.mtcnn.mtcnn_landmarks`
  and the `yunet-onet` detector do);
- `mtcnn`: MTCNN's own cascade, for reference.

    OMP_NUM_THREADS=1 python benchmarks/onet_box_variants.py yunet o r o2 ro2 mtcnn
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from detector_table import UNLOCK_MIN_FACE, verification  # noqa: E402
from edge_mfr.detect import get_detector  # noqa: E402
from edge_mfr.detect import mtcnn  # noqa: E402
from edge_mfr.detect.base import Detection, as_bgr_uint8  # noqa: E402

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"


def remark(image: np.ndarray, boxes: np.ndarray, steps: str) -> np.ndarray:
    """Points from O-Net after the box regressions named in `steps` ('r': R-Net, 'o2': O-Net first)."""
    rgb = cv2.cvtColor(as_bgr_uint8(image), cv2.COLOR_BGR2RGB)
    rnet, onet = mtcnn._session("rnet", 1), mtcnn._session("onet", 1)
    squares = np.round(mtcnn._square(boxes))
    if "r" in steps:
        offsets = mtcnn._run_batched(rnet, rgb, squares, mtcnn.RNET_SIZE)[0]
        squares = np.round(mtcnn._square(mtcnn._regress(squares, offsets)))
    if "o2" in steps:
        offsets = mtcnn._run_batched(onet, rgb, squares, mtcnn.ONET_SIZE)[0]
        squares = np.round(mtcnn._square(mtcnn._regress(squares, offsets)))
    points = mtcnn._run_batched(onet, rgb, squares, mtcnn.ONET_SIZE)[1]
    sides = np.stack([squares[:, 2] - squares[:, 0], squares[:, 3] - squares[:, 1]], axis=1)
    return squares[:, None, :2] + np.stack([points[:, :5], points[:, 5:]], axis=2) * sides[:, None, :]


class RemarkedYuNet:
    """YuNet at the unlock setting, its points replaced by O-Net's after the given box regressions."""

    def __init__(self, steps: str):
        self.base = get_detector("yunet", min_face_size=UNLOCK_MIN_FACE, threads=1)
        self.steps = steps
        self.registry_name = f"yunet+{steps}"

    def config(self) -> dict:
        return {**self.base.config(), "onet_box": self.steps}

    def detect(self, image: np.ndarray) -> list[Detection]:
        faces = self.base.detect(image)
        if not faces:
            return []
        points = remark(image, np.stack([face.box for face in faces]), self.steps)
        return [Detection(box=face.box, score=face.score, landmarks=p) for face, p in zip(faces, points)]


def main() -> int:
    results = {}
    for variant in sys.argv[1:] or ["yunet", "o", "r", "o2", "ro2", "mtcnn"]:
        detector = get_detector(variant, min_face_size=UNLOCK_MIN_FACE, threads=1) \
            if variant in ("yunet", "mtcnn") else RemarkedYuNet(variant)
        results[variant] = verification(detector, LFW / "pairs.txt", LFW / "images", 1000, 0,
                                        Path(f"/tmp/edge_mfr_onet_box_{variant}"), families=("template",))
        row = results[variant]
        um = row["um_template"]
        counted = um["accuracy_misses_counted"] or um["accuracy"]
        print(f"{variant:6s} U-U {100 * row['uu']['accuracy']:.2f}%  U-M template {100 * counted:.2f}% misses counted, "
              f"{100 * um['accuracy']:.2f}% over the pairs found ({um['fte_pairs']} miss pairs)", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
