"""Masked-face alignment refinement: where a masked face's own detected points put it, and where its clean points
would have.

A mask moves the detector's five points (median 5% of scale and 2 degrees, 3% larger on average; docs/detectors.md),
while the clean templates a masked probe meets were aligned with clean points. A refiner (a small CNN, ONNX) looks at
the masked face aligned by its own points and predicts that difference as a similarity in the teacher's 150 px
chip frame; the points are then moved back by it. Trained by `python -m edge_mfr.train refiner-fit` (docs/training.md,
"A masked-face alignment refiner").
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .align import estimate_similarity, warp_crops
from .errors import ModelPackageError
from .models.teacher import DLIB_CHIP_TEMPLATE_150

REFINERS_DIR = Path(__file__).resolve().parent / "models" / "refiners"
CHIP_SIDE = 150.0  # the frame the similarity is expressed in: the teacher's chip, DLIB_CHIP_TEMPLATE_150
# The largest move a refiner may make (shift x, shift y, log-scale, degrees): the 99.9th percentile of what a mask
# did to the points in the refiner's 22,083 training pairs, so a chip that is no face at all cannot send the points
# away (0.2% of those pairs' predictions reach it).
LARGEST_CORRECTION = np.array([0.25, 0.25, 0.55, 20.0])


def relative_similarity(clean_points: np.ndarray, masked_points: np.ndarray) -> tuple[float, float, float, float]:
    """(shift x, shift y, log-scale, angle in degrees) of the map from the chip the clean points align to the chip
    the masked points align to, in the teacher's chip frame; shifts as fractions of the side, at its centre."""
    to_clean = np.vstack([estimate_similarity(clean_points, DLIB_CHIP_TEMPLATE_150), [0, 0, 1]])
    to_masked = np.vstack([estimate_similarity(masked_points, DLIB_CHIP_TEMPLATE_150), [0, 0, 1]])
    relative = to_masked @ np.linalg.inv(to_clean)
    a, b = relative[0, 0], relative[1, 0]
    centre = np.full(2, CHIP_SIDE / 2)
    moved = relative[:2, :2] @ centre + relative[:2, 2] - centre
    return (float(moved[0] / CHIP_SIDE), float(moved[1] / CHIP_SIDE), float(np.log(np.hypot(a, b))),
            float(np.degrees(np.arctan2(b, a))))


def corrected_landmarks(landmarks: np.ndarray, similarity) -> np.ndarray:
    """Points that align the face as `landmarks` do, moved back by `similarity` (what `relative_similarity` of
    the clean and these points would be): the template carried by it into the chip these points align to, then
    back into the photo. The five points come out as an exact similarity image of the template."""
    dx, dy, log_scale, degrees = (float(v) for v in similarity)
    scale, angle = np.exp(log_scale), np.radians(degrees)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.full(2, CHIP_SIDE / 2)
    shift = centre + np.array([dx, dy]) * CHIP_SIDE - rotation @ centre
    in_chip = DLIB_CHIP_TEMPLATE_150 @ rotation.T + shift
    back = np.linalg.inv(np.vstack([estimate_similarity(landmarks, DLIB_CHIP_TEMPLATE_150), [0, 0, 1]]))
    return (in_chip @ back[:2, :2].T + back[:2, 2]).astype(np.float32)


def bundled_refiner(name: str) -> tuple[Path, Path]:
    """(NAME.onnx, NAME.json) of a bundled refiner; ModelPackageError where it is not bundled."""
    onnx_path, sidecar = REFINERS_DIR / f"{name}.onnx", REFINERS_DIR / f"{name}.json"
    if not onnx_path.is_file() or not sidecar.is_file():
        raise ModelPackageError(f"masked-face alignment refiner {name!r} is not bundled ({onnx_path})")
    return onnx_path, sidecar


class MaskedAlignmentRefiner:
    """A bundled refiner (NAME.onnx + NAME.json in edge_mfr/models/refiners), checked against its sha256."""

    def __init__(self, name: str, sha256: str | None = None, threads: int = 1):
        import onnxruntime as ort

        from .models.package import file_sha256

        onnx_path, sidecar = bundled_refiner(name)
        actual = file_sha256(onnx_path)
        if sha256 is not None and actual != sha256:
            raise ModelPackageError(f"masked-face alignment refiner {name!r}: graph sha256 {actual[:12]} is not the "
                                    f"{sha256[:12]} the model package was calibrated with")
        self.name, self.sha256 = name, actual
        self.meta = json.loads(sidecar.read_text())
        self.size = int(self.meta["input_size"])
        self.template = DLIB_CHIP_TEMPLATE_150 * (self.size / CHIP_SIDE)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """(K, 4) similarities (shift x, shift y, log-scale, degrees) of faces aligned by (K, 5, 2) points, each
        within LARGEST_CORRECTION."""
        chips = warp_crops(image, landmarks, self.template, self.size)
        x = (chips.astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 127.5
        return np.clip(self.session.run(None, {self.input_name: x})[0], -LARGEST_CORRECTION, LARGEST_CORRECTION)

    def refine(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """(K, 5, 2) points detected on masked faces -> points that align them as their clean points would."""
        landmarks = np.asarray(landmarks, np.float32)
        if len(landmarks) == 0:
            return landmarks
        return np.stack([corrected_landmarks(points, similarity)
                         for points, similarity in zip(landmarks, self.predict(image, landmarks))])
