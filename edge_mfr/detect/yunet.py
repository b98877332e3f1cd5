"""YuNet face detector (OpenCV Zoo, MIT) on ONNX Runtime, with our own decoding of its outputs.

The graph (`models/yunet_2026may.onnx`, licence and provenance beside it) takes float32 NCHW BGR in 0-255
(no normalisation) whose height and width are multiples of 32. For each stride s in (8, 16, 32) it gives,
per cell (row r, col c) of the (H/s, W/s) grid, in row-major order:

- cls_s, obj_s: class and objectness scores; the face score is sqrt(clip(cls) * clip(obj));
- bbox_s: (dx, dy, log w, log h): centre ((c + dx) s, (r + dy) s), size (exp(log w) s, exp(log h) s);
- kps_s: five (x, y) points as ((c + x) s, (r + y) s): image-left eye, image-right eye, nose tip,
  image-left mouth corner, image-right mouth corner, already the order of LANDMARK_NAMES
  (tests/test_detect.py checks that on real faces).

YuNet was trained on faces of about 10 to 300 px. A frame is searched at up to `max_side` pixels
(bounding time), and again at half that size whenever a face larger than `large_face_side` px could be
present at the first scale, so a phone held close still shows a face the model knows; the passes are
merged by NMS.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from edge_mfr.detect.base import Detection, as_bgr_uint8
from edge_mfr.detect.mtcnn import mtcnn_landmarks, nms
from edge_mfr.errors import InputError, ModelPackageError

MODEL_PATH = Path(__file__).resolve().parent / "models" / "yunet_2026may.onnx"
MODEL_SHA256 = "ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0"
STRIDES = (8, 16, 32)
ALIGNMENT = 32  # input sides must be multiples of the coarsest stride
LARGEST_TRAINED_FACE = 300  # px, upstream's stated training range is about 10-300 px
# Face side, in model input pixels, that a min_face_size face is shrunk to: well inside the trained range
# and above the 10 px floor, so faces somewhat smaller than min_face_size are still found.
MODEL_MIN_FACE = 24


@functools.lru_cache(maxsize=None)
def _session(threads: int | None) -> ort.InferenceSession:
    """One session per thread count per process; the model's digest is checked once, at load."""
    if not MODEL_PATH.is_file():
        raise ModelPackageError(f"YuNet model missing: {MODEL_PATH}")
    data = MODEL_PATH.read_bytes()
    if hashlib.sha256(data).hexdigest() != MODEL_SHA256:
        raise ModelPackageError(f"{MODEL_PATH}: sha256 differs from the shipped YuNet model (corrupt or replaced)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


def model_fingerprint() -> str:
    return MODEL_SHA256[:16]


class YuNetDetector:
    """Multi-face detector with five landmarks per face.

    score_threshold: minimum face score (sqrt of class x objectness). 0.5: on 1,000 masked LFW probes at the
        unlock setting it misses 1 face where 0.6 misses 6, and it fires on 1 of 200 CelebA photos with the
        faces blacked out (0.6: none, 0.4: 4).
    nms_threshold: IoU above which the lower-scoring of two boxes is dropped.
    max_side: the frame is downscaled so its longer side is at most this before the first pass; None keeps
        the frame's own size (cost grows with the area).
    upscale_to: frames whose longer side is below this are enlarged to it first (None: never), so faces of a
        few pixels in small photos reach the size YuNet finds reliably (on rmfd_sample's 256 px photos this
        finds 240 of 246 instead of 226 at score threshold 0.6).
    min_face_size: smallest face side (caller's pixels) that must be found, or None. When set, the frame is
        also downscaled (never upscaled) until such a face is MODEL_MIN_FACE px, the main speed knob for
        unlock frames, where faces smaller than the quality gate's minimum are refused anyway.
    fallback_pass: when min_face_size shrank the frame and that pass found no face of at least min_face_size,
        search again at the scale the frame would have without min_face_size. A cascade: frames with a usable
        face cost one cheap pass, while a masked face the shrunk pass misses, or a face too small to unlock,
        is still found (the quality gate can then say "too small" instead of "no face").
    large_face_pass: also search at half the first pass's scale when the frame could hold a face larger
        than LARGEST_TRAINED_FACE px at that scale; False makes one pass only.
    min_face_fraction: faces whose box's shorter side is below this fraction of the frame's shorter side
        are dropped (unlock frames show one near face; 0 keeps all).
    top_k: at most this many faces are returned (highest scores).
    landmarks: "yunet" (YuNet's own points) or "onet": MTCNN's R-Net and O-Net tighten each YuNet box as
        MTCNN's cascade would and O-Net marks the points (mtcnn_landmarks), the convention the bundled
        teacher's template was fitted to (faces smaller than min_face_size keep YuNet's points); on masked faces YuNet's own points sit 0.16-0.24 eye distances from
        MTCNN's, and with these the teacher's masked-probe accuracy is MTCNN's (docs/detectors.md).
    threads: ONNX Runtime intra-op threads (None = ORT default, all cores).
    """

    def __init__(self, score_threshold: float = 0.5, nms_threshold: float = 0.3, max_side: int | None = 640,
                 upscale_to: int | None = 512,
                 min_face_size: float | None = None, fallback_pass: bool = True, large_face_pass: bool = True,
                 min_face_fraction: float = 0.0,
                 top_k: int = 50, threads: int | None = 1, landmarks: str = "yunet"):
        if not 0.0 <= score_threshold <= 1.0:
            raise InputError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if not 0.0 < nms_threshold <= 1.0:
            raise InputError(f"nms_threshold must be in (0, 1], got {nms_threshold}")
        if max_side is not None and max_side < ALIGNMENT:
            raise InputError(f"max_side must be at least {ALIGNMENT}, got {max_side}")
        if upscale_to is not None and upscale_to < 1:
            raise InputError(f"upscale_to must be positive or None, got {upscale_to}")
        if min_face_size is not None and not min_face_size > 0:
            raise InputError(f"min_face_size must be positive or None, got {min_face_size}")
        if not 0.0 <= min_face_fraction <= 1.0:
            raise InputError(f"min_face_fraction must be in [0, 1], got {min_face_fraction}")
        if top_k < 1:
            raise InputError(f"top_k must be >= 1, got {top_k}")
        if threads is not None and threads < 1:
            raise InputError(f"threads must be >= 1 or None, got {threads}")
        if landmarks not in ("yunet", "onet"):
            raise InputError(f"landmarks must be 'yunet' or 'onet', got {landmarks!r}")
        self.landmarks = landmarks
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_side = max_side
        self.upscale_to = upscale_to
        self.min_face_size = None if min_face_size is None else float(min_face_size)
        self.fallback_pass = bool(fallback_pass)
        self.large_face_pass = bool(large_face_pass)
        self.min_face_fraction = float(min_face_fraction)
        self.top_k = int(top_k)
        self.threads = threads
        self._session = _session(threads)
        self._input_name = self._session.get_inputs()[0].name
        self._output_names = [o.name for o in self._session.get_outputs()]

    def config(self) -> dict:
        return {"score_threshold": self.score_threshold, "nms_threshold": self.nms_threshold,
                "max_side": self.max_side, "upscale_to": self.upscale_to, "min_face_size": self.min_face_size,
                "fallback_pass": self.fallback_pass,
                "large_face_pass": self.large_face_pass, "min_face_fraction": self.min_face_fraction,
                "top_k": self.top_k, "landmarks": self.landmarks}

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        """All faces in the image, highest score first (see as_bgr_uint8 for accepted inputs)."""
        image = as_bgr_uint8(image_bgr)
        height, width = image.shape[:2]
        longer = max(height, width)
        scale = 1.0
        if self.upscale_to is not None and longer < self.upscale_to:
            scale = self.upscale_to / longer
        if self.max_side is not None and longer * scale > self.max_side:
            scale = self.max_side / longer
        unlock_scale = scale if self.min_face_size is None else min(scale, MODEL_MIN_FACE / self.min_face_size)
        passes = {s: self._pass(image, s) for s in self._scales(image, unlock_scale)}
        if self.fallback_pass and unlock_scale < scale and not self._usable(
                np.concatenate([p[0] for p in passes.values()])).any():
            passes |= {s: self._pass(image, s) for s in self._scales(image, scale) if s not in passes}
        boxes = np.concatenate([p[0] for p in passes.values()])
        scores = np.concatenate([p[1] for p in passes.values()])
        landmarks = np.concatenate([p[2] for p in passes.values()])
        if self.min_face_fraction > 0 and len(boxes):
            sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
            big = sides >= self.min_face_fraction * min(height, width)
            boxes, scores, landmarks = boxes[big], scores[big], landmarks[big]
        if not len(boxes):
            return []
        keep = nms(boxes, scores, self.nms_threshold)[: self.top_k]
        boxes, scores, landmarks = boxes[keep], scores[keep], landmarks[keep]
        if self.landmarks == "onet":
            # About 2.4 ms per face: only faces large enough to be unlocked with are re-marked.
            remark = self._usable(boxes)
            if remark.any():
                landmarks[remark] = mtcnn_landmarks(image, boxes[remark], self.threads)
        return [Detection(box=b, score=float(c), landmarks=p) for b, c, p in zip(boxes, scores, landmarks)]

    def _scales(self, image: np.ndarray, scale: float) -> list[float]:
        """`scale`, and half of it when a face beyond YuNet's trained range could be present at `scale`."""
        if self.large_face_pass and min(image.shape[:2]) * scale > LARGEST_TRAINED_FACE:
            return [scale, scale / 2]
        return [scale]

    def _usable(self, boxes: np.ndarray) -> np.ndarray:
        """Which boxes (K, 4) are at least min_face_size on their shorter side (all, without a minimum)."""
        if self.min_face_size is None:
            return np.ones(len(boxes), bool)
        return np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= self.min_face_size

    def detect_largest(self, image_bgr: np.ndarray) -> Detection | None:
        """The face with the largest box (the person closest to the camera), or None."""
        faces = self.detect(image_bgr)
        return max(faces, key=lambda face: face.area) if faces else None

    def _pass(self, image: np.ndarray, scale: float):
        """One inference at `scale`: (boxes (K, 4), scores (K,), landmarks (K, 5, 2)) in the caller's pixels."""
        height, width = image.shape[:2]
        if scale != 1.0:
            size = (max(round(width * scale), 1), max(round(height * scale), 1))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        h, w = image.shape[:2]
        padded_h, padded_w = -(-h // ALIGNMENT) * ALIGNMENT, -(-w // ALIGNMENT) * ALIGNMENT
        blob = np.zeros((1, 3, padded_h, padded_w), np.float32)  # pad bottom/right with black, never stretch
        blob[0, :, :h, :w] = image.transpose(2, 0, 1)
        outputs = dict(zip(self._output_names, self._session.run(None, {self._input_name: blob})))
        boxes, scores, landmarks = [], [], []
        for stride in STRIDES:
            cols = padded_w // stride
            cls = np.clip(outputs[f"cls_{stride}"][0, :, 0], 0.0, 1.0)
            obj = np.clip(outputs[f"obj_{stride}"][0, :, 0], 0.0, 1.0)
            score = np.sqrt(cls * obj)
            hits = np.flatnonzero(score >= self.score_threshold)
            if not hits.size:
                continue
            cell = np.stack([hits % cols, hits // cols], axis=1).astype(np.float64)  # (col, row)
            bbox = outputs[f"bbox_{stride}"][0, hits].astype(np.float64)
            centre = (cell + bbox[:, :2]) * stride
            size = np.exp(np.minimum(bbox[:, 2:], 10.0)) * stride  # clamp: a broken anchor must not overflow
            boxes.append(np.concatenate([centre - size / 2, centre + size / 2], axis=1))
            kps = outputs[f"kps_{stride}"][0, hits].astype(np.float64).reshape(-1, 5, 2)
            landmarks.append((kps + cell[:, None, :]) * stride)
            scores.append(score[hits].astype(np.float64))
        if not boxes:
            return np.empty((0, 4)), np.empty((0,)), np.empty((0, 5, 2))
        return np.concatenate(boxes) / scale, np.concatenate(scores), np.concatenate(landmarks) / scale
