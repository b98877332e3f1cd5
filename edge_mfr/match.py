"""Cosine matching of probe embeddings against enrolled templates: 1:1 verify and 1:N identify."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

AGGREGATIONS = ("max", "mean")
ROUTES = ("unmasked", "masked")  # the quality gate's mask estimate of a probe


def route_rows(masked: np.ndarray, route: str) -> np.ndarray:
    """Which of one user's templates (their `masked` flags, (T,) bool) a probe of `route` is scored against.

    A probe the quality gate judges unmasked meets the user's unmasked templates only: masked templates,
    real or synthetic, raise impostor scores more than genuine ones there (celeba_test calib, teacher, FNMR
    of the unmasked route at FMR 1e-4: 45.5% against 57.6% with every template; docs/results.md). A masked
    probe meets every template (the masked ones are what it needs), and so does any probe of a user who has
    no unmasked template.
    """
    if route not in ROUTES:
        raise InputError(f"route must be one of {ROUTES}, got {route!r}")
    masked = np.asarray(masked, bool)
    if route == "masked" or masked.all():
        return np.ones(len(masked), bool)
    return ~masked


def scoring_space(vectors: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    """L2-normalised embeddings (N, D) as a route's scoring metric compares them (`ModelPackage.route_metric`):
    multiplied by its weight (D, D) and L2-normalised again; unchanged where the route has no metric."""
    vectors = np.asarray(vectors, np.float32)
    if weight is None:
        return vectors
    projected = vectors @ np.asarray(weight, np.float32)
    return projected / np.maximum(np.linalg.norm(projected, axis=-1, keepdims=True), 1e-12)


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


def rank_users(probe: np.ndarray, row_users: list[str], templates: np.ndarray, method: str = "max") -> list[Candidate]:
    """All users ranked by aggregated score, best first (1:N identification)."""
    if len(row_users) != len(templates):
        raise InputError("one user name per template row is required")
    if len(templates) == 0:
        return []
    if method not in AGGREGATIONS:
        raise InputError(f"aggregation must be one of {AGGREGATIONS}, got {method!r}")
    scores = cosine_scores(probe, templates)
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
