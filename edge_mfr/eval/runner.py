"""Run verification benchmarks: images -> faces -> (masked) crops -> embeddings -> pair scores -> report.

Pipeline per unique image, shared by every model and scenario:
1. Read (OpenCV, BGR). Unreadable files are failures ("unreadable").
2. Locate five landmarks on the unmasked image with the detector (default: the one `FaceUnlock` builds,
   `deployed_detector`), taking the subject face by the face rule: "largest" (as `FaceUnlock` does with a
   camera frame) or "centre" (the detection nearest the image centre: LFW and similar sets centre their
   subject, and a larger face in the background is not the subject). Centred fallback: with `aligned=True`
   (no detection at all), or when detection fails on an image that looks like a pre-aligned crop the face
   fills (`looks_like_face_crop`), the image is taken to be aligned to the ArcFace 112 template and the
   landmarks are that template scaled to the image size. A failed detection on any other image is a
   detector miss ("no_face").
3. Masked variant: `edge_mfr.masks.apply_mask` draws a synthetic mask on the full image at the unmasked
   landmarks (where the person's face is). Then, by default (`landmarks="masked"`), the face is detected
   afresh on the masked image, as `FaceUnlock` does with a masked probe; a miss there is a detector miss
   ("masked_no_face"). `landmarks="unmasked"` keeps the unmasked landmarks (no second detection), so the
   scenarios differ only in the mask. The mask type and its random draw come from a per-image seed
   (`image_seed`: a hash of the image's key and the run seed), so every run, model and scenario sees the
   same mask on the same image.
4. Embed with each model (`edge_mfr.embed.FaceEmbedder`): the package's own template, size and
   normalisation, batched across images.

Detector misses are failures of the system, reported both ways: excluded (the pair is not scored), and
counted, with a fixed fallback as face_recognition-style evaluations do: the image is embedded at the mean
landmarks of the images located in the same pass (positions relative to the image size), so the pair is
scored and a miss usually costs a genuine pair. Unreadable images and failed masks are never scored.

Scenarios: "uu" unmasked vs unmasked, "um" the probe (second image of each pair) masked, "mm" both masked.

Embeddings are cached under `cache_dir` as one .npz per (model, image, variant); the key hashes the model
fingerprint and preprocessing, the image path, size and mtime, the variant (mask type and seed, how the face
was located, the fallback landmarks) and the source of the code that produces them, so any change recomputes.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from edge_mfr.align import ARCFACE_TEMPLATE_112
from edge_mfr.detect import detector_name
from edge_mfr.errors import InputError
from edge_mfr.eval import metrics
from edge_mfr.eval.pairs import PairSet
from edge_mfr.eval.report import REPORT_FORMAT
from edge_mfr.match import ROUTES

SCENARIOS = ("uu", "um", "mm")
# Which variant (masked or not) each side of a pair uses: (reference, probe).
SCENARIO_VARIANTS = {"uu": (False, False), "um": (False, True), "mm": (True, True)}
FACE_RULES = ("largest", "centre")
LANDMARK_SOURCES = ("masked", "unmasked")  # where a masked image's landmarks come from
# A pre-aligned crop: near-square and small (aligned face crops are 112-160 px; in-the-wild photos, including
# LFW's 250x250 frames with a face in the middle, are larger and must be detected).
CROP_MAX_SIDE = 160
CROP_MAX_ASPECT = 1.25
CACHE_VERSION = 2

DETECTED, CENTRED = "detected", "centred"
UNREADABLE, NO_FACE, MASKED_NO_FACE, MASK_FAILED = "unreadable", "no_face", "masked_no_face", "mask_failed"
MISSES = (NO_FACE, MASKED_NO_FACE)  # detector misses: scored at the fallback landmarks when counted
FALLBACK = "fallback"  # status of a cached fallback embedding


def deployed_detector(name: str | None = None):
    """The detector `FaceUnlock` builds for a detector name (None: its default), with its settings."""
    from edge_mfr.detect import DEFAULT_DETECTOR
    from edge_mfr.unlock import unlock_detector
    return unlock_detector(name or DEFAULT_DETECTOR)


def image_seed(key: str, seed: int) -> int:
    """A 64-bit seed for one image, stable across runs and machines (unlike Python's hash())."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()[:8], "little")


def looks_like_face_crop(shape) -> bool:
    height, width = shape[:2]
    return max(height, width) <= CROP_MAX_SIDE and max(height, width) / min(height, width) <= CROP_MAX_ASPECT


def centred_landmarks(shape) -> np.ndarray:
    """Landmarks of an image assumed aligned to the ArcFace template: the template scaled to its size."""
    height, width = shape[:2]
    return ARCFACE_TEMPLATE_112 * np.array([width / 112.0, height / 112.0])


def _source_digest(*objects) -> str:
    """Digest of code: files (their bytes, so compiled extensions count too), classes and functions (their
    source)."""
    digest = hashlib.sha256()
    for obj in objects:
        digest.update(obj.read_bytes() if isinstance(obj, Path) else inspect.getsource(obj).encode())
    return digest.hexdigest()[:16]


def _module_files(module) -> list[Path]:
    """A module's file, or every .py file of a package's folder: what is on disk, not what happens to be
    imported, so the digest is the same in every process."""
    if hasattr(module, "__path__"):
        return sorted(Path(module.__file__).parent.glob("*.py"))
    return [Path(module.__file__)]


class MaskPolicy:
    """Which mask each image gets: one fixed type, or a random one from a family, drawn from the image seed."""

    def __init__(self, family: str | None, seed: int):
        from edge_mfr import masks
        self._masks = masks
        self.family = family
        self.seed = int(seed)
        if family is not None and family not in masks.MASK_TYPES:
            masks.random_mask_type(np.random.default_rng(0), family=family)  # unknown families fail here

    def choose(self, key: str) -> tuple[str, np.random.Generator]:
        rng = np.random.default_rng(image_seed(key, self.seed))
        if self.family in self._masks.MASK_TYPES:
            return self.family, rng
        return self._masks.random_mask_type(rng, family=self.family), rng

    def variant(self, key: str) -> str:
        return f"mask={self.choose(key)[0]},family={self.family},seed={self.seed}"

    def apply(self, image: np.ndarray, landmarks: np.ndarray, key: str) -> np.ndarray:
        mask_type, rng = self.choose(key)
        return self._masks.apply_mask(image, landmarks, mask_type, rng)


def pick_face(faces, shape, rule: str):
    """The subject among detections: the largest box, or the box whose centre is nearest the image centre."""
    if not faces:
        return None
    if rule == "largest":
        return max(faces, key=lambda d: d.area)
    centre = np.array([shape[1], shape[0]], dtype=np.float64) / 2.0
    return min(faces, key=lambda d: float(np.hypot(*((d.box[:2] + d.box[2:]) / 2.0 - centre))))


class FaceLocator:
    """Five landmarks per image: a detector with a face rule, or the centred fallback (see the module
    docstring). `detector`: a detector object, a name (`edge_mfr.detect.available_detectors()`) or None for
    the one `FaceUnlock` uses."""

    def __init__(self, aligned: bool = False, detector=None, face: str = "largest"):
        if face not in FACE_RULES:
            raise InputError(f"face rule must be one of {FACE_RULES}, got {face!r}")
        self.aligned = aligned
        self.face = face
        self._detector = None
        self._found: dict[Path, tuple[np.ndarray | None, str]] = {}  # so a masked pass reuses the detections
        if not aligned:
            self._detector = deployed_detector(detector) if detector is None or isinstance(detector, str) \
                else detector

    @property
    def detector_name(self) -> str | None:
        if self._detector is None:
            return None
        return detector_name(self._detector)

    def config(self) -> str:
        if self.aligned:
            return "centred"
        d = self._detector
        settings = d.config() if hasattr(d, "config") else {
            k: getattr(d, k, None) for k in ("min_face_size", "min_face_fraction", "thresholds", "scale_factor", "max_side")}
        return (f"{type(d).__name__}{settings}|face={self.face}"
                f"|crop_fallback<={CROP_MAX_SIDE}px,aspect<={CROP_MAX_ASPECT}")

    def locate(self, image: np.ndarray, path: Path) -> tuple[np.ndarray | None, str]:
        """(landmarks (5,2), DETECTED | CENTRED) or (None, NO_FACE) for the unmasked image read from `path`."""
        if path not in self._found:
            self._found[path] = self._locate(image, NO_FACE)
        return self._found[path]

    def relocate(self, masked_image: np.ndarray) -> tuple[np.ndarray | None, str]:
        """The face detected afresh on a masked image: (landmarks, DETECTED | CENTRED) or (None, MASKED_NO_FACE)."""
        return self._locate(masked_image, MASKED_NO_FACE)

    def _locate(self, image: np.ndarray, miss: str) -> tuple[np.ndarray | None, str]:
        if self.aligned:
            return centred_landmarks(image.shape), CENTRED
        face = pick_face(self._detector.detect(image), image.shape, self.face)
        if face is not None:
            return np.asarray(face.landmarks, dtype=np.float64), DETECTED
        if looks_like_face_crop(image.shape):
            return centred_landmarks(image.shape), CENTRED
        return None, miss


class EmbeddingCache:
    """One .npz per (model, image, variant) under root/<model key prefix>/<xx>/<key>.npz, holding the
    embedding, how the face was located and where (landmarks relative to the image size); a failed image
    is stored with an empty embedding and its failure status, so later runs skip it without reading it."""

    def __init__(self, root):
        self.root = Path(root)

    def path(self, model_key: str, image: Path, variant: str) -> Path:
        stat = image.stat()
        text = f"{CACHE_VERSION}|{model_key}|{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{variant}"
        key = hashlib.sha256(text.encode()).hexdigest()
        return self.root / model_key[:16] / key[:2] / f"{key}.npz"

    @staticmethod
    def load(path: Path) -> tuple[np.ndarray, str, np.ndarray] | None:
        """(embedding, status, relative landmarks (5, 2) or empty), or None when absent or unreadable."""
        if not path.is_file():
            return None
        try:
            with np.load(path) as stored:
                return stored["embedding"], str(stored["status"]), stored["landmarks"]
        except (OSError, ValueError, KeyError):
            return None  # a torn or foreign file: recompute and overwrite

    @staticmethod
    def save(path: Path, embedding: np.ndarray, status: str, landmarks: np.ndarray | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial.npz")
        np.savez(partial, embedding=embedding, status=np.array(status),
                 landmarks=np.empty(0) if landmarks is None else landmarks)
        partial.replace(path)  # atomic: concurrent runs never read half a file


class _Model:
    """One model package with its FaceEmbedder and the cache key of everything that shapes its output."""

    def __init__(self, package, threads: int | None):
        from edge_mfr.embed import FaceEmbedder
        self.package = package
        self.embedder = FaceEmbedder(package, threads=threads)
        meta = package.meta
        self.cache_key = hashlib.sha256(
            f"{package.fingerprint}|{meta.get('input')}|{meta.get('alignment')}".encode()).hexdigest()

    def embed(self, images: list[np.ndarray], landmarks: list[np.ndarray], masked: bool = False,
              detected: bool = False) -> np.ndarray:
        """One face per image; aligned one image at a time, then embedded as a single batch. Masked images take
        the model's masked route (its masked-route map, if it has one): the side a pair masked is known here.
        `detected`: the masked images' points were detected on them (realigned as an unlock would)."""
        if masked and detected:
            landmarks = [self.embedder.masked_landmarks(img, lm[None])[0] for img, lm in zip(images, landmarks)]
        batch = np.concatenate([self.embedder.preprocess(img, lm[None]) for img, lm in zip(images, landmarks)])
        return self.embedder.embed_batch(batch, "masked" if masked else "unmasked")


LOCATED = (DETECTED, CENTRED)


@dataclass
class ImageEmbeddings:
    """Embeddings of a list of images: one (N, D) array per model, NaN rows for failed images.

    `fallback`: per model, (N, D) embeddings of the detector misses at `fallback_landmarks` (NaN on every
    other row); `landmarks`: (N, 5, 2) landmarks of the located images relative to the image size (x / width,
    y / height), NaN for failures; `fallback_landmarks`: their mean, the fixed fallback (None without misses).
    """
    keys: list[str]
    embeddings: list[np.ndarray]
    status: list[str]            # DETECTED, CENTRED, UNREADABLE, NO_FACE, MASKED_NO_FACE or MASK_FAILED per image
    landmarks: np.ndarray
    fallback: list[np.ndarray]
    fallback_landmarks: np.ndarray | None = None
    cache_hits: int = 0

    @property
    def failures(self) -> dict[str, list[str]]:
        """Failure status -> keys of the images that failed that way."""
        failed: dict[str, list[str]] = {}
        for key, status in zip(self.keys, self.status):
            if status not in LOCATED:
                failed.setdefault(status, []).append(key)
        return failed

    @property
    def misses(self) -> np.ndarray:
        """(N,) bool: the detector missed the face (the rows with a fallback embedding)."""
        return np.array([s in MISSES for s in self.status], dtype=bool)

    def with_misses_counted(self, model_index: int) -> np.ndarray:
        """One model's embeddings with every detector miss replaced by its fallback embedding."""
        merged = self.embeddings[model_index].copy()
        merged[self.misses] = self.fallback[model_index][self.misses]
        return merged


class EmbeddingExtractor:
    """Embeds images with several models at once, each image read and located once per variant.

    face: "largest" or "centre" (see `pick_face`); landmarks: "masked" (detect afresh on masked images, as
    deployed) or "unmasked" (reuse the unmasked image's landmarks); detector: object, name or None (see
    `FaceLocator`)."""

    def __init__(self, packages, aligned: bool = False, detector=None, mask_family: str | None = None,
                 seed: int = 0, cache_dir=None, batch_size: int = 32, threads: int | None = None,
                 progress: bool = True, face: str = "largest", landmarks: str = "masked"):
        if not packages:
            raise InputError("no model package to evaluate")
        if landmarks not in LANDMARK_SOURCES:
            raise InputError(f"landmarks must be one of {LANDMARK_SOURCES}, got {landmarks!r}")
        self.models = [_Model(p, threads) for p in packages]
        self.locator = FaceLocator(aligned, detector, face)
        self.landmarks = landmarks
        self.mask_family = mask_family
        self.seed = int(seed)
        self._mask_policy = None
        self._masks_code = ""
        self.cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
        self.batch_size = max(1, int(batch_size))
        self.progress = progress  # progress bars on a terminal only (tqdm's disable=None)
        self._code = _pipeline_digest(self.locator)

    @property
    def mask_policy(self) -> MaskPolicy:
        # Created on first masked use, so unmasked runs need neither the masks module nor a family.
        if self._mask_policy is None:
            import edge_mfr.masks
            self._mask_policy = MaskPolicy(self.mask_family, self.seed)
            self._masks_code = _source_digest(MaskPolicy, image_seed, *_module_files(edge_mfr.masks))
        return self._mask_policy

    def _variant(self, key: str, masked: bool) -> str:
        if masked:
            return (f"{self.mask_policy.variant(key)}|masks={self._masks_code}|landmarks={self.landmarks}"
                    f"|{self.locator.config()}|code={self._code}")
        return f"plain|{self.locator.config()}|code={self._code}"

    def _prepare(self, path: Path, key: str, masked: bool) -> tuple[np.ndarray | None, np.ndarray | None, str]:
        """(image to embed, its landmarks, status); landmarks None on failure."""
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            return None, None, UNREADABLE
        landmarks, status = self.locator.locate(image, path)
        if landmarks is None or not masked:
            return image, landmarks, status
        try:
            image = self.mask_policy.apply(image, landmarks, key)
        except InputError:
            return image, None, MASK_FAILED
        if self.landmarks == "masked":
            landmarks, status = self.locator.relocate(image)
        return image, landmarks, status

    def extract(self, images: list[tuple[Path, str]], masked: bool, description: str = "images") -> ImageEmbeddings:
        """Embed (path, key) images, masked or not; `key` names the image in reports and seeds its mask."""
        if masked:
            _ = self.mask_policy  # an unknown mask family fails here, before any work
        n = len(images)
        out = [np.full((n, m.package.embedding_size), np.nan, dtype=np.float32) for m in self.models]
        status = [""] * n
        relative = np.full((n, 5, 2), np.nan)
        hits = 0
        cache_paths: dict[int, list[Path]] = {}
        pending: list[tuple[int, np.ndarray, np.ndarray, list[int]]] = []  # row, image, landmarks, model indices

        def flush():
            for model_index, model in enumerate(self.models):
                todo = [(row, img, lm) for row, img, lm, wanted in pending if model_index in wanted]
                if not todo:
                    continue
                vectors = model.embed([img for _, img, _ in todo], [lm for _, _, lm in todo], masked,
                                      detected=self.landmarks == "masked")
                for (row, _, _), vector in zip(todo, vectors):
                    out[model_index][row] = vector
                    if self.cache is not None:
                        self.cache.save(cache_paths[row][model_index], vector, status[row], relative[row])
            pending.clear()

        for row, (path, key) in enumerate(tqdm(images, desc=description, unit="img",
                                                  disable=None if self.progress else True)):
            path = Path(path)
            wanted = list(range(len(self.models)))
            if self.cache is not None:
                cache_paths[row] = [self.cache.path(m.cache_key, path, self._variant(key, masked)) for m in self.models]
                stored = [self.cache.load(p) for p in cache_paths[row]]
                known = [entry for entry in stored if entry is not None]
                # Locating the face does not depend on the model, so one stored failure settles the image.
                failed = [s for _, s, _ in known if s not in LOCATED]
                if failed:
                    status[row] = failed[0]
                    hits += 1
                    continue
                for model_index, entry in enumerate(stored):
                    if entry is not None:
                        out[model_index][row] = entry[0]
                wanted = [i for i, entry in enumerate(stored) if entry is None]
                if not wanted:
                    status[row] = known[0][1]
                    relative[row] = known[0][2]
                    hits += 1
                    continue
            image, landmarks, status[row] = self._prepare(path, key, masked)
            if landmarks is not None:
                relative[row] = landmarks / np.array([image.shape[1], image.shape[0]], dtype=np.float64)
                pending.append((row, image, landmarks, wanted))
                if len(pending) >= self.batch_size:
                    flush()
            elif self.cache is not None:
                for p in cache_paths[row]:
                    self.cache.save(p, np.empty(0, dtype=np.float32), status[row])
        flush()
        result = ImageEmbeddings(keys=[k for _, k in images], embeddings=out, status=status, landmarks=relative,
                                 fallback=[np.full_like(e, np.nan) for e in out], cache_hits=hits)
        if result.misses.any():
            self._embed_fallbacks(images, masked, result)
        return result

    def _embed_fallbacks(self, images: list[tuple[Path, str]], masked: bool, result: ImageEmbeddings) -> None:
        """Embed each detector miss at the mean relative landmarks of the located images (fills
        `result.fallback` and `result.fallback_landmarks`). A masked image whose unmasked face was missed
        too gets its mask drawn at the fallback as well."""
        located = np.isfinite(result.landmarks).all(axis=(1, 2))
        if located.any():
            fallback = result.landmarks[located].mean(axis=0)
        else:  # nothing located at all: the aligned-crop template is the only prior left
            fallback = ARCFACE_TEMPLATE_112 / 112.0
        fallback = np.round(fallback, 4)  # a stable cache key across runs that locate the same faces
        result.fallback_landmarks = fallback
        for row in np.flatnonzero(result.misses):
            path, key = Path(images[row][0]), images[row][1]
            variant = f"{self._variant(key, masked)}|{FALLBACK}={fallback.tolist()}"
            paths = [self.cache.path(m.cache_key, path, variant) for m in self.models] if self.cache else None
            stored = [self.cache.load(p) for p in paths] if paths else [None] * len(self.models)
            if all(entry is not None for entry in stored):
                for model_index, entry in enumerate(stored):
                    result.fallback[model_index][row] = entry[0] if entry[0].size else np.nan
                continue
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            size = np.array([image.shape[1], image.shape[0]], dtype=np.float64)
            if masked:
                unmasked_landmarks, _ = self.locator.locate(image, path)
                try:
                    image = self.mask_policy.apply(
                        image, fallback * size if unmasked_landmarks is None else unmasked_landmarks, key)
                except InputError:
                    image = None
            for model_index, model in enumerate(self.models):
                vector = model.embed([image], [fallback * size], masked)[0] if image is not None \
                    else np.empty(0, dtype=np.float32)
                if vector.size:
                    result.fallback[model_index][row] = vector
                if paths:
                    self.cache.save(paths[model_index], vector, FALLBACK, fallback)


def _pipeline_digest(locator: FaceLocator) -> str:
    """Digest of the code between an image file and its unmasked embedding (cache keys change with it)."""
    import edge_mfr.align
    import edge_mfr.embed
    import edge_mfr.runtime
    parts = [*_module_files(edge_mfr.align), *_module_files(edge_mfr.embed), *_module_files(edge_mfr.runtime),
             FaceLocator, pick_face, deployed_detector, centred_landmarks, looks_like_face_crop, _Model]
    if edge_mfr.align.native_available():
        parts += _module_files(sys.modules["edge_mfr._native"])
    if locator._detector is not None:
        detector_module = type(locator._detector).__module__
        parts += _module_files(sys.modules[detector_module.rsplit(".", 1)[0] if "." in detector_module
                                           else detector_module])
    return _source_digest(*parts)


def _metrics(scores, labels, folds, n_resamples, seed):
    """Metrics of the scored pairs (NaN scores left out); None unless both classes remain."""
    scored = np.isfinite(scores)
    kept = labels[scored]
    if not kept.any() or kept.all():
        return None
    return metrics.evaluate(scores[scored], kept, folds=None if folds is None else folds[scored],
                            n_resamples=n_resamples, seed=seed)


def evaluate_pairs(pair_set: PairSet, packages, scenarios=("uu",), mask_family: str | None = None, seed: int = 0,
                   aligned: bool = False, detector=None, cache_dir=None, batch_size: int = 32,
                   threads: int | None = None, n_resamples: int = 1000, progress: bool = True,
                   face: str = "centre", landmarks: str = "masked") -> dict:
    """Score every pair with every model in every scenario; returns the report dict (see report.py).

    Each result holds `metrics` with detector misses excluded and `metrics_misses_counted` with them scored
    at the fallback landmarks (see the module docstring), and `detector_misses` per side."""
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        raise InputError(f"scenarios must be among {SCENARIOS}, got {list(scenarios)}")
    scenarios = list(dict.fromkeys(scenarios))
    extractor = EmbeddingExtractor(packages, aligned=aligned, detector=detector, mask_family=mask_family,
                                   seed=seed, cache_dir=cache_dir, batch_size=batch_size, threads=threads,
                                   progress=progress, face=face, landmarks=landmarks)
    keys = {p.first: p.first_key for p in pair_set.pairs}
    keys.update({p.second: p.second_key for p in pair_set.pairs})
    # Only the images each variant needs: in "um" the references stay unmasked and only probes are masked.
    needed: dict[bool, dict[Path, str]] = {False: {}, True: {}}
    for scenario in scenarios:
        reference_masked, probe_masked = SCENARIO_VARIANTS[scenario]
        for p in pair_set.pairs:
            needed[reference_masked].setdefault(p.first, keys[p.first])
            needed[probe_masked].setdefault(p.second, keys[p.second])
    extracted: dict[bool, ImageEmbeddings] = {}
    rows: dict[bool, dict[Path, int]] = {}
    for masked in (False, True):
        if needed[masked]:
            images = list(needed[masked].items())
            extracted[masked] = extractor.extract(images, masked, "masked images" if masked else "images")
            rows[masked] = {path: i for i, (path, _) in enumerate(images)}

    labels = pair_set.labels
    folds = pair_set.folds
    scorings = [{route: m.package.route_scoring(route) for route in ROUTES} for m in extractor.models]
    results = []
    for model_index, model in enumerate(extractor.models):
        for scenario in scenarios:
            sides = {}
            for side, masked, attribute in (("reference", SCENARIO_VARIANTS[scenario][0], "first"),
                                            ("probe", SCENARIO_VARIANTS[scenario][1], "second")):
                embedded = extracted[masked]
                index = np.array([rows[masked][getattr(p, attribute)] for p in pair_set.pairs], dtype=np.int64)
                sides[side] = (embedded, index)
            (ref, ref_index), (probe, probe_index) = sides["reference"], sides["probe"]
            # A comparison with a masked face is one an unlock makes on the masked route: scored as that route is.
            scoring = scorings[model_index]["masked" if any(SCENARIO_VARIANTS[scenario]) else "unmasked"]
            scores = scoring.pair_scores(ref.embeddings[model_index][ref_index],
                                         probe.embeddings[model_index][probe_index])
            counted = scoring.pair_scores(ref.with_misses_counted(model_index)[ref_index],
                                          probe.with_misses_counted(model_index)[probe_index])
            scored = np.isfinite(scores)
            missed = ref.misses[ref_index] | probe.misses[probe_index]
            failed_keys = {key for embedded, _ in sides.values() for failed in embedded.failures.values()
                           for key in failed}
            miss_images = {side: sorted({embedded.keys[i] for i in np.unique(index[embedded.misses[index]])})
                           for side, (embedded, index) in sides.items()}
            result = {
                "model": model.package.name,
                "fingerprint": model.package.fingerprint,
                "scenario": scenario,
                "n_pairs": len(pair_set.pairs),
                "n_scored": int(scored.sum()),
                "fte_pairs": int((~scored).sum()),
                "fte_rate": float((~scored).mean()),
                "fte_images": sorted(failed_keys),
                "detector_misses": {
                    "pairs": int(missed.sum()),
                    "reference_images": len(miss_images["reference"]),
                    "probe_images": len(miss_images["probe"]),
                    "images": sorted(set(miss_images["reference"]) | set(miss_images["probe"])),
                },
                "n_scored_misses_counted": int(np.isfinite(counted).sum()),
                "metrics": _metrics(scores, labels, folds, n_resamples, seed),
                "metrics_misses_counted": _metrics(counted, labels, folds, n_resamples, seed)
                if missed.any() else None,
                "pairs": [{"first": p.first_key, "second": p.second_key, "genuine": p.genuine, "fold": p.fold,
                           "score": float(s) if ok else None,
                           **({"miss": True, "fallback_score": float(c) if np.isfinite(c) else None} if m else {})}
                          for p, s, ok, c, m in zip(pair_set.pairs, scores, scored, counted, missed)],
            }
            results.append(result)

    image_summary = {}
    for masked, embedded in extracted.items():
        image_summary["masked" if masked else "unmasked"] = {
            "n_images": len(embedded.keys),
            "detected": embedded.status.count(DETECTED),
            "centred_fallback": embedded.status.count(CENTRED),
            "centred_images": [k for k, s in zip(embedded.keys, embedded.status) if s == CENTRED],
            "detector_misses": int(embedded.misses.sum()),
            "fallback_landmarks": None if embedded.fallback_landmarks is None
            else embedded.fallback_landmarks.tolist(),
            "failures": embedded.failures,
            "cache_hits": embedded.cache_hits,
        }
    masked_run = any(s != "uu" for s in scenarios)
    return {
        "format": REPORT_FORMAT,
        "pairs_file": str(pair_set.source),
        "images_dir": str(pair_set.images_dir),
        "n_pairs": len(pair_set.pairs),
        "n_folds": pair_set.n_folds,
        "missing_images": [str(m) for m in pair_set.missing_images],
        "skipped_pairs": pair_set.skipped_pairs,
        "excluded_identities": pair_set.excluded_identities,
        "excluded_pairs": pair_set.excluded_pairs,
        "seed": int(seed),
        "mask_family": mask_family if masked_run else None,
        "aligned": bool(aligned),
        "face": face,
        "landmarks": landmarks if masked_run else None,
        "detector": extractor.locator.detector_name,
        "face_locator": extractor.locator.config(),
        "models": [{"name": m.package.name, "fingerprint": m.package.fingerprint, "path": str(m.package.onnx_path)}
                   for m in extractor.models],
        "images": image_summary,
        "results": results,
    }
