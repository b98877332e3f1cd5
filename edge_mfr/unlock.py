"""The product's main job: enroll people on the device, then verify (1:1) or identify (1:N) them.

frame -> detect -> quality -> align -> embed -> match, each stage timed. Thresholds come from the model
package's calibration for a target false match rate; the gallery is encrypted and bound to the model.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .detect import DEFAULT_DETECTOR, Detection, detector_name, get_detector
from .embed import FaceEmbedder
from .errors import GalleryError, InputError, QualityError
from .gallery import Gallery, RollbackCounter
from .match import AGGREGATIONS, ROUTES, Candidate, RouteScoring, aggregate, rank_users
from .models.package import ModelPackage
from .quality import QualityPolicy, QualityReport, assess

DEFAULT_FMR = 1e-4
# Another face at least this fraction of the largest face's width makes a capture ambiguous for
# enrollment; smaller ones are bystanders in the background.
COMPETING_FACE_RATIO = 0.5
# Masks drawn on the enrollment captures of a user enrolled without one, so masked probes meet masked templates.
# The six NIST-style shapes cover the face to different heights, which is what lets a probe's mask, whatever it is,
# meet a template like it; with surgical as the commonest real mask (celeba_test calib, default model, masked-route
# FNMR at FMR 1e-4: 62.6% against 67.6% for surgical, KN95 and cloth, and 65.2% against 65.1% on probes wearing
# the template family's masks; benchmarks/enrollment_mask_types.py, docs/results.md).
SYNTHETIC_MASK_TYPES = ("surgical", "nist_a", "nist_b", "nist_c", "nist_d", "nist_e", "nist_f")

MaskSynthesizer = Callable[[np.ndarray, np.ndarray, np.random.Generator], Iterable[tuple[str, np.ndarray]]]


def synthesize_masked_copies(image: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator,
                             mask_types: tuple[str, ...] = SYNTHETIC_MASK_TYPES) -> Iterator[tuple[str, np.ndarray]]:
    """Default enrollment hook: the capture with each of `mask_types` drawn on it, one at a time (a generator, so
    that only one full-size masked copy exists at once). Thresholds hold for the mask types they were calibrated
    with (`calibration.enrollment_mask_types` of the package)."""
    from .masks import apply_mask

    for mask_type in mask_types:
        yield mask_type, apply_mask(image, landmarks, mask_type, rng)


def detector_conflict_message(model: str, detector, conflicts: list[str]) -> str:
    """A warning for `FaceEmbedder.detector_conflicts`: points of another detector align faces differently."""
    return (f"model {model!r}: {' and '.join(conflicts)}, but faces are detected with {detector_name(detector)!r}; "
            "the FMR and FNMR reached may differ from the calibrated ones: detect with that detector, or "
            "recalibrate with this one (`edge-mfr calibrate --detector`)")


def unlock_detector(name: str = DEFAULT_DETECTOR, enroll_policy: QualityPolicy | None = None,
                    verify_policy: QualityPolicy | None = None, threads: int | None = 1):
    """The named detector as the unlock pipeline runs it: searching only for faces at least as large as the
    quality policies accept (smaller ones would be refused anyway), which is what makes detection cheap."""
    policies = (enroll_policy or QualityPolicy.enroll(), verify_policy or QualityPolicy.verify())
    smallest_usable = min(policy.min_face_size for policy in policies)
    return get_detector(name, min_face_size=max(smallest_usable, 1.0), threads=threads)


@dataclass
class Capture:
    """One frame after detection, quality and embedding (embedding is None when refused before it)."""

    source: str
    faces_found: int
    competing_faces: int
    detection: Detection | None
    quality: QualityReport | None
    embedding: np.ndarray | None
    latency_ms: dict[str, float]

    @property
    def usable(self) -> bool:
        return self.embedding is not None


@dataclass
class Decision:
    accepted: bool
    reason: str
    user: str | None
    score: float | None
    threshold: float
    fmr: float
    source: str = ""
    faces_found: int = 0
    quality: dict | None = None
    candidates: list[Candidate] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "decision": "accepted" if self.accepted else "rejected",
            "accepted": self.accepted,
            "reason": self.reason,
            "user": self.user,
            "score": self.score,
            "threshold": self.threshold,
            "fmr": self.fmr,
            "source": self.source,
            "faces_found": self.faces_found,
            "quality": self.quality,
            "candidates": [{"user": c.user, "score": c.score} for c in self.candidates],
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
        }


@dataclass
class EnrollReport:
    user: str
    accepted: list[str]
    refused: dict[str, list[str]]
    templates: int
    masked_templates: int
    synthetic_templates: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _Stopwatch:
    def __init__(self):
        self.latency: dict[str, float] = {}

    def lap(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.latency[stage] = self.latency.get(stage, 0.0) + (now - start) * 1e3
        return now


class FaceUnlock:
    """Enroll, verify and identify against an encrypted on-device gallery.

    model: a ModelPackage, a path or bundled name, or None for the best bundled model.
    gallery: the gallery file path; the secret is `passphrase` or `key_file`.
    fmr: target false match rate; its threshold must be calibrated in the model package.
    detector: a detector object (anything with `detect(image) -> list[Detection]`), a detector name (see
        `edge_mfr.detect.available_detectors()`), or None for DEFAULT_DETECTOR. A name is built to search only
        for faces the quality policies could accept (min_face_size), which is what makes detection cheap.
    """

    def __init__(
        self,
        model: ModelPackage | str | Path | None = None,
        gallery: str | Path | None = None,
        passphrase: str | None = None,
        key_file: str | Path | None = None,
        fmr: float = DEFAULT_FMR,
        aggregation: str | None = None,
        detector=None,
        backend: str = "ort",
        threads: int | None = None,
        enroll_policy: QualityPolicy | None = None,
        verify_policy: QualityPolicy | None = None,
        mask_synthesizer: MaskSynthesizer | None = synthesize_masked_copies,
        seed: int = 0,
        *,
        candidates_on_rejection: bool = False,
        rollback_counter: RollbackCounter | None = None,
    ):
        self.embedder = FaceEmbedder(model, backend=backend, threads=threads)
        aggregation = self.embedder.package.aggregation if aggregation is None else aggregation  # the package's
        if aggregation not in AGGREGATIONS:
            raise InputError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        # One threshold per probe route: masked probes meet masked templates and need a stricter one.
        self.thresholds = {route: self.embedder.package.threshold_for(fmr, aggregation, route)
                           for route in ("unmasked", "masked")}
        self.threshold = max(self.thresholds.values())
        calibrated_with = self.embedder.package.enrollment_mask_types
        if mask_synthesizer is synthesize_masked_copies and calibrated_with not in (None, SYNTHETIC_MASK_TYPES):
            warnings.warn(f"model {self.embedder.package.name!r} was calibrated for enrollments with synthetic masks "
                          f"{', '.join(calibrated_with)}, but enrollment draws {', '.join(SYNTHETIC_MASK_TYPES)}: "
                          "its masked-route FMR may differ from the target; recalibrate it (`edge-mfr calibrate`)",
                          stacklevel=2)
        self._scoring = {route: self.embedder.package.route_scoring(route) for route in ROUTES}
        self.fmr = fmr
        self.aggregation = aggregation
        self.enroll_policy = enroll_policy or QualityPolicy.enroll()
        self.verify_policy = verify_policy or QualityPolicy.verify()
        if detector is None or isinstance(detector, str):
            detector = unlock_detector(detector or DEFAULT_DETECTOR, self.enroll_policy, self.verify_policy)
        self.detector = detector
        self._warn_if_detector_differs()
        self.mask_synthesizer = mask_synthesizer
        self.seed = seed
        self.gallery_path = Path(gallery) if gallery is not None else None
        self._secret = {"passphrase": passphrase, "key_file": key_file}
        # Off by default: a rejected probe must not tell a stranger who is enrolled (docs/security.md).
        self.candidates_on_rejection = candidates_on_rejection
        self._rollback_counter = rollback_counter
        self._gallery: Gallery | None = None

    def _warn_if_detector_differs(self) -> None:
        conflicts = self.embedder.detector_conflicts(self.detector)
        if conflicts:
            warnings.warn(detector_conflict_message(self.package.name, self.detector, conflicts), stacklevel=3)

    @property
    def package(self) -> ModelPackage:
        return self.embedder.package

    def gallery(self, create: bool = False) -> Gallery:
        if self._gallery is None:
            if self.gallery_path is None:
                raise GalleryError("no gallery path given")
            if not self.gallery_path.exists():
                if not create:
                    raise GalleryError(f"{self.gallery_path}: no gallery here yet; enroll someone first")
                try:
                    self._gallery = Gallery.create(self.gallery_path, self.package.fingerprint,
                                                   rollback_counter=self._rollback_counter, **self._secret)
                except GalleryError:
                    if not self.gallery_path.exists():
                        raise
                    # Another process created it first: join that gallery instead.
            if self._gallery is None:
                self._gallery = Gallery.open(self.gallery_path, model_fingerprint=self.package.fingerprint,
                                             rollback_counter=self._rollback_counter, **self._secret)
        return self._gallery

    # -- stages -------------------------------------------------------------------------------

    def capture(self, frame: np.ndarray, policy: QualityPolicy, source: str = "frame") -> Capture:
        """Detect the largest face, gate its quality, embed it when it passes."""
        watch = _Stopwatch()
        start = time.perf_counter()
        faces = self.detector.detect(frame)
        start = watch.lap("detect", start)
        if not faces:
            return Capture(source, 0, 0, None, None, None, watch.latency)
        face = max(faces, key=lambda d: d.area)
        competing = sum(d.width >= COMPETING_FACE_RATIO * face.width for d in faces)
        report = assess(frame, face, policy)
        start = watch.lap("quality", start)
        if not report.passed:
            return Capture(source, len(faces), competing, face, report, None, watch.latency)
        points = face.landmarks[None]
        if report.masked and self.embedder.refiner is not None:
            points = self.embedder.masked_landmarks(frame, points)
            start = watch.lap("refine", start)
        batch = self.embedder.preprocess(frame, points)
        start = watch.lap("align", start)
        # The probe's route (as the quality gate judges it) picks its threshold and, where the model has one, the
        # masked-route map of its embedding.
        embedding = self.embedder.embed_batch(batch, "masked" if report.masked else "unmasked")[0]
        watch.lap("embed", start)
        return Capture(source, len(faces), competing, face, report, embedding, watch.latency)

    # -- enrollment ---------------------------------------------------------------------------

    def enroll(self, user: str, frames: Iterable[tuple[str, np.ndarray]], replace: bool = False,
               min_captures: int = 1) -> EnrollReport:
        """Enroll `user` from (label, frame) captures; poor captures are refused with their reasons.

        A user with no masked capture also gets templates from synthetically masked copies of the
        accepted captures. No image is stored, only embeddings and their provenance.
        """
        rng = np.random.default_rng(self.seed)
        templates, info, accepted, refused = [], [], [], {}
        # Synthetic masked templates are made as each capture is accepted, so that no frame is kept and
        # memory does not grow with the number of captures; they are dropped if a real masked one turns up.
        synthetic_templates, synthetic_info = [], []
        for label, frame in frames:
            cap = self.capture(frame, self.enroll_policy, label)
            if cap.faces_found == 0:
                refused[label] = ["no face found"]
            elif cap.competing_faces > 1:
                refused[label] = [f"{cap.competing_faces} similar-sized faces in the capture; enrollment needs "
                                  "exactly one person"]
            elif not cap.usable:
                refused[label] = list(cap.quality.reasons)
            else:
                accepted.append(label)
                templates.append(cap.embedding)
                info.append({"source": Path(label).name, "masked": bool(cap.quality.masked), "synthetic": False,
                             "quality": cap.quality.to_dict()})
                if self.mask_synthesizer is not None and not any(i["masked"] for i in info):
                    for mask_type, masked in self.mask_synthesizer(frame, cap.detection.landmarks, rng):
                        synthetic_templates.append(
                            self.embedder.embed_faces(masked, cap.detection.landmarks[None], route="masked",
                                                      detected=False)[0])
                        synthetic_info.append({"source": Path(cap.source).name, "masked": True, "synthetic": True,
                                               "mask_type": mask_type})
                        del masked
            del frame  # let the next capture's decode reuse this one's memory
        if len(accepted) < min_captures:
            details = "; ".join(f"{k}: {', '.join(v)}" for k, v in refused.items())
            raise QualityError(f"enrollment of {user!r} needs {min_captures} good capture(s), got {len(accepted)} ({details})",
                               [r for v in refused.values() for r in v])
        if not any(i["masked"] for i in info):
            templates += synthetic_templates
            info += synthetic_info
        gallery = self.gallery(create=True)
        gallery.add_user(user, np.stack(templates).astype(np.float32), info, replace=replace)
        return EnrollReport(user, accepted, refused, len(templates), sum(i["masked"] for i in info),
                            sum(i["synthetic"] for i in info))

    # -- matching -----------------------------------------------------------------------------

    def _refusal(self, cap: Capture, user: str | None) -> Decision | None:
        if cap.faces_found == 0:
            return Decision(False, "no face found", user, None, self.threshold, self.fmr, cap.source, 0,
                            latency_ms=_with_total(cap.latency_ms))
        if not cap.usable:
            return Decision(False, "quality: " + "; ".join(cap.quality.reasons), user, None, self.threshold, self.fmr,
                            cap.source, cap.faces_found, cap.quality.to_dict(), latency_ms=_with_total(cap.latency_ms))
        return None

    @staticmethod
    def route_of(cap: Capture) -> str:
        """The probe's route: masked when the quality gate judges the face masked."""
        return "masked" if cap.quality.masked else "unmasked"

    def scoring_of(self, cap: Capture) -> RouteScoring:
        """How the probe's route compares it with templates: the package's metric for that route (a masked-route
        metric whitens what a mask changes) and its score-normalisation cohort, where it has them."""
        return self._scoring[self.route_of(cap)]

    def threshold_for(self, cap: Capture) -> float:
        """The threshold of the probe's route."""
        return self.thresholds[self.route_of(cap)]

    def verify(self, user: str, frame: np.ndarray, source: str = "frame") -> Decision:
        """1:1: does the largest face in `frame` belong to `user`? The probe is scored against the user's
        templates of its route (`match.route_rows`)."""
        gallery = self.gallery()
        rule = self.package.masked_probe_templates
        # an unknown user raises here, before any capture
        by_route = {route: gallery.templates(user, route, rule) for route in ROUTES}
        cap = self.capture(frame, self.verify_policy, source)
        refusal = self._refusal(cap, user)
        if refusal:
            return refusal
        start = time.perf_counter()
        score = aggregate(self.scoring_of(cap).scores(cap.embedding[None], by_route[self.route_of(cap)])[0],
                          self.aggregation)
        latency = dict(cap.latency_ms, match=(time.perf_counter() - start) * 1e3)
        threshold = self.threshold_for(cap)
        accepted = score >= threshold
        reason = "match" if accepted else "score below threshold"
        return Decision(accepted, reason, user, score, threshold, self.fmr, source, cap.faces_found,
                        cap.quality.to_dict(), latency_ms=_with_total(latency))

    def identify(self, frame: np.ndarray, source: str = "frame", top_k: int = 3, *,
                 candidates_on_rejection: bool | None = None) -> Decision:
        """1:N: who, of everyone enrolled, is the largest face in `frame` (if anyone)?

        A rejected decision lists no candidates (nearest enrolled names and scores) unless
        `candidates_on_rejection` (default: the instance's setting, off) asks for them.
        """
        gallery = self.gallery()
        cap = self.capture(frame, self.verify_policy, source)
        refusal = self._refusal(cap, None)
        if refusal:
            return refusal
        names, templates = gallery.all_templates(self.route_of(cap), self.package.masked_probe_templates)
        start = time.perf_counter()
        ranked = rank_users(cap.embedding, names, templates, self.aggregation, self.scoring_of(cap))
        latency = dict(cap.latency_ms, match=(time.perf_counter() - start) * 1e3)
        if not ranked:
            return Decision(False, "gallery is empty", None, None, self.threshold, self.fmr, source, cap.faces_found,
                            cap.quality.to_dict(), latency_ms=_with_total(latency))
        best = ranked[0]
        threshold = self.threshold_for(cap)
        accepted = best.score >= threshold
        if candidates_on_rejection is None:
            candidates_on_rejection = self.candidates_on_rejection
        candidates = ranked[:top_k] if accepted or candidates_on_rejection else []
        return Decision(accepted, "match" if accepted else "nobody enrolled scores above threshold",
                        best.user if accepted else None, best.score, threshold, self.fmr, source,
                        cap.faces_found, cap.quality.to_dict(), candidates, _with_total(latency))

    def verify_stream(self, user: str, frames: Iterable[tuple[str, np.ndarray]]) -> Decision:
        """Verify over several frames (video, camera): the first accepted frame, else the best-scoring one."""
        return _first_or_best(self.verify(user, frame, label) for label, frame in frames)

    def identify_stream(self, frames: Iterable[tuple[str, np.ndarray]]) -> Decision:
        return _first_or_best(self.identify(frame, label) for label, frame in frames)


def _with_total(latency: dict[str, float]) -> dict[str, float]:
    return dict(latency, total=sum(latency.values()))


def _first_or_best(decisions: Iterable[Decision]) -> Decision:
    best = None
    for decision in decisions:
        if decision.accepted:
            return decision
        if best is None or (decision.score is not None and (best.score is None or decision.score > best.score)):
            best = decision
    if best is None:
        raise InputError("no frames to match")
    return best
