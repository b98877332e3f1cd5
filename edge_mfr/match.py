"""Cosine matching of probe embeddings against enrolled templates: 1:1 verify and 1:N identify."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

AGGREGATIONS = ("max", "mean")
ROUTES = ("unmasked", "masked")  # the quality gate's mask estimate of a probe
MASKED_PROBE_TEMPLATES = ("all", "masked")  # route_rows: what a masked probe meets
TEMPLATE_CACHE_ROWS = 200_000  # cached template statistics per route scoring (about 15 MB)


def route_rows(masked: np.ndarray, route: str, masked_probe_templates: str = "all") -> np.ndarray:
    """Which of one user's templates (their `masked` flags, (T,) bool) a probe of `route` is scored against.

    A probe the quality gate judges unmasked meets the user's unmasked templates only: masked templates,
    real or synthetic, raise impostor scores more than genuine ones there (celeba_test calib, teacher, FNMR
    of the unmasked route at FMR 1e-4: 45.5% against 57.6% with every template; docs/results.md). A masked
    probe meets every template (`masked_probe_templates="all"`), or the masked ones only ("masked": the
    package's rule, `ModelPackage.masked_probe_templates`); any probe of a user who has templates of one kind
    only meets those.
    """
    if route not in ROUTES:
        raise InputError(f"route must be one of {ROUTES}, got {route!r}")
    if masked_probe_templates not in MASKED_PROBE_TEMPLATES:
        raise InputError(f"masked_probe_templates must be one of {MASKED_PROBE_TEMPLATES}, "
                         f"got {masked_probe_templates!r}")
    masked = np.asarray(masked, bool)
    if masked.all() or not masked.any():
        return np.ones(len(masked), bool)
    if route == "unmasked":
        return ~masked
    return masked.copy() if masked_probe_templates == "masked" else np.ones(len(masked), bool)


def scoring_space(vectors: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    """L2-normalised embeddings (N, D) as a route's scoring metric compares them (`ModelPackage.route_metric`):
    multiplied by its weight (D, D) and L2-normalised again; unchanged where the route has no metric."""
    vectors = np.asarray(vectors, np.float32)
    if weight is None:
        return vectors
    projected = vectors @ np.asarray(weight, np.float32)
    return projected / np.maximum(np.linalg.norm(projected, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class RouteScoring:
    """How one probe route compares probes with templates (`ModelPackage.route_scoring`).

    `weight`: the route's metric (`scoring_space`), or None. `cohort`: L2-normalised embeddings of people who
    are neither enrolled nor probing (the package's score-normalisation cohort), or None for raw cosine. With a
    cohort a cosine s between probe p and template t becomes adaptive symmetric normalisation (AS-norm):
    0.5 * ((s - mean_t) / std_t + (s - mean_p) / std_p), the mean and std of each side's `top_k` highest
    cosines with the cohort. It puts every template and probe on the scale of its own impostor scores, so one
    threshold holds for people whose faces draw high impostor scores and for those who draw low ones.
    """

    weight: np.ndarray | None = None
    cohort: np.ndarray | None = None
    top_k: int = 100
    # A gallery's templates are scored again and again: their cohort statistics are computed once. Per template
    # row (keyed by a digest of it in the route's space; bounded, cleared when full), and per whole template
    # matrix (the last few), so an unchanged gallery costs one digest and an enrollment only its new rows.
    _template_cache: dict = field(default_factory=dict, compare=False, repr=False)
    _matrix_cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.cohort is not None:
            if len(self.cohort) <= self.top_k:
                raise InputError(f"a score-normalisation cohort needs more than top_k={self.top_k} embeddings, "
                                 f"got {len(self.cohort)}")
            object.__setattr__(self, "cohort", scoring_space(self.cohort, self.weight))

    def _impostor_stats(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        top = -np.partition(-(vectors @ self.cohort.T), self.top_k - 1, axis=1)[:, :self.top_k]
        return top.mean(axis=1), np.maximum(top.std(axis=1), 1e-6)

    def _templates_in_space(self, templates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored templates -> (templates in the route's space, their cohort means, their cohort stds)."""
        templates = np.ascontiguousarray(templates, np.float32)
        matrix_key = (templates.shape, hashlib.blake2b(templates.tobytes(), digest_size=16).digest())
        if matrix_key not in self._matrix_cache:
            if len(self._matrix_cache) >= 4:
                self._matrix_cache.pop(next(iter(self._matrix_cache)))
            projected = scoring_space(templates, self.weight)
            self._matrix_cache[matrix_key] = (projected, *self._row_stats(projected))
        return self._matrix_cache[matrix_key]

    def _row_stats(self, templates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in templates]
        missing = [i for i, key in enumerate(keys) if key not in self._template_cache]
        if missing:
            mean, std = self._impostor_stats(templates[missing])
            if len(self._template_cache) + len(missing) > TEMPLATE_CACHE_ROWS:
                self._template_cache.clear()
            self._template_cache.update((keys[i], (m, s)) for i, m, s in zip(missing, mean, std))
        stats = np.array([self._template_cache[key] for key in keys], dtype=np.float32).reshape(-1, 2)
        return stats[:, 0], stats[:, 1]

    def scores(self, probes: np.ndarray, templates: np.ndarray) -> np.ndarray:
        """(P, D) probes x (T, D) templates -> (P, T) scores."""
        probes, templates = np.asarray(probes, np.float32), np.asarray(templates, np.float32)
        if probes.ndim != 2 or templates.ndim != 2 or probes.shape[1] != templates.shape[1]:
            raise InputError(f"probes (P, D) and templates (T, D) disagree: {probes.shape} vs {templates.shape}")
        probes = scoring_space(probes, self.weight)
        if self.cohort is None or probes.size == 0 or templates.size == 0:
            return probes @ scoring_space(templates, self.weight).T
        templates, template_mean, template_std = self._templates_in_space(templates)
        probe_mean, probe_std = self._impostor_stats(probes)
        return _as_norm(probes @ templates.T, (probe_mean[:, None], probe_std[:, None]),
                        (template_mean[None], template_std[None]))

    def pair_scores(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Row-wise scores of (N, D) pairs; NaN where either row is NaN (a failed image)."""
        first = np.asarray(scoring_space(first, self.weight) if self.weight is not None else first, np.float64)
        second = np.asarray(scoring_space(second, self.weight) if self.weight is not None else second, np.float64)
        raw = np.sum(first * second, axis=1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))
        if self.cohort is None:
            return raw
        ok = np.isfinite(raw)
        out = np.full(raw.shape, np.nan, dtype=np.float64)
        if ok.any():
            out[ok] = _as_norm(raw[ok], self._impostor_stats(first[ok].astype(np.float32)),
                               self._impostor_stats(second[ok].astype(np.float32)))
        return out


PLAIN = RouteScoring()


def _as_norm(raw: np.ndarray, first: tuple, second: tuple) -> np.ndarray:
    """Raw cosines put on the scale of each side's (mean, std) of top cohort scores, averaged (AS-norm)."""
    return 0.5 * ((raw - first[0]) / first[1] + (raw - second[0]) / second[1])


def cosine_scores(probe: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Scores of one L2-normalised probe (D,) against templates (T, D)."""
    probe = np.asarray(probe, np.float32)
    templates = np.asarray(templates, np.float32)
    if probe.ndim != 1 or templates.ndim != 2 or templates.shape[1] != probe.shape[0]:
        raise InputError(f"probe (D,) and templates (T, D) disagree: {probe.shape} vs {templates.shape}")
    return templates @ probe


def aggregate(scores: np.ndarray, method: str = "max") -> float:
    """One score per user from its template scores. `max` lets a masked probe meet a masked template."""
    if method not in AGGREGATIONS:
        raise InputError(f"aggregation must be one of {AGGREGATIONS}, got {method!r}")
    if len(scores) == 0:
        raise InputError("user has no templates")
    return float(scores.max() if method == "max" else scores.mean())


@dataclass(frozen=True)
class Candidate:
    user: str
    score: float


def rank_users(probe: np.ndarray, row_users: list[str], templates: np.ndarray, method: str = "max",
               scoring: RouteScoring = PLAIN) -> list[Candidate]:
    """All users ranked by aggregated score, best first (1:N identification); `scoring`: the probe route's."""
    if len(row_users) != len(templates):
        raise InputError("one user name per template row is required")
    if len(templates) == 0:
        return []
    if method not in AGGREGATIONS:
        raise InputError(f"aggregation must be one of {AGGREGATIONS}, got {method!r}")
    scores = cosine_scores(probe, templates) if scoring is PLAIN else scoring.scores(probe[None], templates)[0]
    # One pass over the templates, grouped by user (a per-user mask would cost users x templates).
    users, first_row, group = np.unique(np.asarray(row_users), return_index=True, return_inverse=True)
    if method == "max":
        order = np.argsort(group, kind="stable")
        starts = np.searchsorted(group[order], np.arange(len(users)))
        per_user = np.maximum.reduceat(scores[order], starts)
    else:
        per_user = np.bincount(group, weights=scores) / np.bincount(group)
    by_appearance = np.argsort(first_row)  # ties keep the order users first appear in
    ranked = [Candidate(str(users[i]), float(per_user[i])) for i in by_appearance]
    return sorted(ranked, key=lambda c: c.score, reverse=True)
