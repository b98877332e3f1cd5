"""Faces in a frame -> embeddings: the package's alignment and normalisation, then a backend."""

from __future__ import annotations

import numpy as np

from . import align
from .detect import detector_name
from .errors import BackendUnavailableError, InputError
from .match import ROUTES
from .models.package import ModelPackage, default_model, load_package
from .runtime.base import l2_normalise

BACKENDS = ("ort", "tensorrt")


def make_backend(package: ModelPackage, backend: str = "ort", threads: int | None = None):
    if backend == "ort":
        from .runtime.ort import OrtEmbedder

        return OrtEmbedder(package, threads=threads)
    if backend == "tensorrt":
        from .runtime.tensorrt import TensorRTEmbedder

        return TensorRTEmbedder.from_package(package)
    raise BackendUnavailableError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


class FaceEmbedder:
    """Aligns faces with the model package's template and embeds them with the chosen backend."""

    def __init__(self, package: ModelPackage | str | None = None, backend: str = "ort", threads: int | None = None,
                 align_threads: int = 1):
        if package is None:
            package = default_model()
        elif not isinstance(package, ModelPackage):
            package = load_package(package)
        self.package = package
        self.backend = make_backend(package, backend, threads)
        # A two-network package embeds masked-route faces with its second graph (ModelPackage.masked_network).
        masked = package.masked_network()
        self.masked_backend = make_backend(masked, backend, threads) if masked is not None else self.backend
        self.align_threads = align_threads
        refiner = package.masked_alignment_refiner
        if refiner is None:
            self.refiner = None
        else:
            from .masked_alignment import MaskedAlignmentRefiner

            self.refiner = MaskedAlignmentRefiner(refiner["name"], refiner["graph_sha256"], threads or 1)

    def detector_conflicts(self, detector, thresholds: bool = True) -> list[str]:
        """What of this model was fitted to other points than `detector` finds: the package's unlock thresholds
        (where `thresholds`) and the masked-face alignment refiner; empty where nothing was."""
        used = detector_name(detector)
        fitted = {"its unlock thresholds were calibrated with": self.package.calibration_detector if thresholds
                  else None}
        if self.refiner is not None:
            fitted[f"its masked-face alignment refiner {self.refiner.name!r} learned the points of"] = \
                self.refiner.meta.get("detector")
        return [f"{what} {name!r}" for what, name in fitted.items() if name is not None and name != used]

    @property
    def fingerprint(self) -> str:
        return self.package.fingerprint

    def preprocess(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        p = self.package
        return align.align_faces(image, landmarks, template=p.template, size=p.input_size,
                                 channel_order=p.channel_order, mean=p.mean, std=p.std, threads=self.align_threads)

    def embed_batch(self, batch: np.ndarray, route: str = "unmasked") -> np.ndarray:
        """Preprocessed faces -> (N, D) L2-normalised embeddings; masked faces go through the package's
        masked-route network and map where it has them (ModelPackage.masked_network, ModelPackage.route_map)."""
        if route not in ROUTES:
            raise InputError(f"route must be one of {ROUTES}, got {route!r}")
        backend = self.masked_backend if route == "masked" else self.backend
        if self.package.test_time_flip:
            # each face and its mirror image in one run (NCHW: the mirror flips W), the two embeddings averaged
            both = backend.embed(np.concatenate([batch, batch[..., ::-1]]))
            embeddings = l2_normalise(both[: len(batch)] + both[len(batch):])
        else:
            embeddings = backend.embed(batch)
        mapping = self.package.route_map(route)
        if mapping is None:
            return embeddings
        from .models.route_map import apply_map

        return apply_map(embeddings, *mapping)

    def masked_landmarks(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """(K, 5, 2) points detected on masked faces, moved by the package's masked-face alignment refiner where it
        has one (ModelPackage.masked_alignment_refiner)."""
        return landmarks if self.refiner is None else self.refiner.refine(image, landmarks)

    def embed_faces(self, image: np.ndarray, landmarks: np.ndarray, route: str = "unmasked",
                    detected: bool = True) -> np.ndarray:
        """(K, 5, 2) landmarks of one BGR frame -> (K, D) L2-normalised embeddings (route: see embed_batch).
        Masked faces whose points were detected on them are first realigned (`masked_landmarks`); pass
        detected=False for points that came from elsewhere (a synthetic mask drawn at a clean photo's points)."""
        if route == "masked" and detected:
            landmarks = self.masked_landmarks(image, landmarks)
        return self.embed_batch(self.preprocess(image, landmarks), route)
