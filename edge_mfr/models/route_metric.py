"""Scoring heads fitted in closed form: the masked-route metric and the score-normalisation cohort.

Masked-route metric: how a probe on the masked route is compared with the templates it meets.

A mask moves a face's embedding along a few directions that have little to do with who the person is. A
probe judged masked is therefore scored in a space where those directions are whitened away: both the probe
and every template it meets are multiplied by W = (S + s I)^(-1/2), where S is the covariance of the change a
mask makes to an embedding (masked minus clean embedding of the same photo, pairs made on the deployed path by
`route_map.route_pairs`) and s a shrinkage chosen on identity-disjoint folds, then L2-normalised and compared by
cosine. Unmasked-route probes are scored as before, so clean-to-clean behaviour stays exactly the network's.

The metric changes no stored template (it is applied when scoring), so it lives in the sidecar's `scoring`
entry, outside the fingerprint: a gallery enrolled before it was added stays valid. The masked route's
thresholds must be recalibrated with it (`edge-mfr calibrate` applies it, as `FaceUnlock` does).

Score-normalisation cohort: embeddings of people who are neither enrolled nor probing (deployed-path clean
and masked faces of training identities), against which every probe and template is put on the scale of its
own top impostor scores (adaptive symmetric normalisation, `match.RouteScoring`). Like the metric it changes
no stored template; every threshold must be recalibrated with it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_mfr.errors import InputError
from edge_mfr.match import scoring_space
from edge_mfr.models.package import ModelPackage, encode_array
from edge_mfr.models.route_map import clean_vs_masked_tpr, derived_package, identity_folds

STRENGTHS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
METHOD = "whitening of the mask-induced change: (cov(masked - clean) + s I)^(-1/2), both sides of a comparison"


def fit_mask_whitening(clean: np.ndarray, masked: np.ndarray, strength: float) -> np.ndarray:
    """W (D, D), symmetric: the inverse square root of the covariance of (masked - clean), shrunk towards a
    multiple of the identity by `strength` (relative to its mean eigenvalue). Scaled so its mean eigenvalue is 1
    (cosine ignores the scale; it keeps the numbers readable)."""
    change = np.asarray(masked, np.float64) - np.asarray(clean, np.float64)
    if change.ndim != 2 or len(change) < 2:
        raise InputError("the mask whitening needs at least two (clean, masked) pairs of (N, D) embeddings")
    if not strength > 0:
        raise InputError(f"the shrinkage strength must be positive, got {strength}")
    return shrunk_whitening(np.cov(change.T, bias=True), strength)


def shrunk_whitening(covariance: np.ndarray, strength: float) -> np.ndarray:
    """W (D, D), symmetric: the inverse square root of `covariance` shrunk towards a multiple of the identity by
    `strength` (relative to its mean eigenvalue), scaled so its mean eigenvalue is 1."""
    d = covariance.shape[0]
    covariance = covariance + strength * np.trace(covariance) / d * np.eye(d)
    values, vectors = np.linalg.eigh(covariance)
    weight = (vectors * values ** -0.5) @ vectors.T
    return (weight / np.mean(values ** -0.5)).astype(np.float32)


def within_class_whitening(embeddings: np.ndarray, labels: np.ndarray, strength: float) -> np.ndarray:
    """WCCN: the shrunk inverse square root (`shrunk_whitening`) of the within-identity covariance of
    `embeddings` (N, D), each row centred on the mean of its identity's rows."""
    labels = np.asarray(labels)
    centred = np.asarray(embeddings, np.float64).copy()
    for label in np.unique(labels):
        rows = labels == label
        centred[rows] -= centred[rows].mean(axis=0)
    return shrunk_whitening(centred.T @ centred / len(centred), strength)


def select_strength(clean: np.ndarray, masked: np.ndarray, identities, strengths=STRENGTHS, fmr: float = 1e-3,
                    seed: int = 0) -> tuple[float, list[dict]]:
    """Shrinkage chosen on identity-disjoint folds of the pairs: clean-vs-masked TPR at `fmr` across different
    faces with both sides in the metric's space, averaged over 5 folds (strength None: plain cosine)."""
    identities = np.asarray(identities)
    results = []
    for strength in (None, *strengths):
        scores = []
        for test in identity_folds(identities, seed):
            clean_test, masked_test = clean[test], masked[test]
            if strength is not None:
                weight = fit_mask_whitening(clean[~test], masked[~test], strength)
                clean_test, masked_test = scoring_space(clean_test, weight), scoring_space(masked_test, weight)
            scores.append(clean_vs_masked_tpr(clean_test, masked_test, identities[test], fmr))
        results.append({"strength": strength, "tpr_um": float(np.mean(scores))})
    best = max((r for r in results if r["strength"] is not None), key=lambda r: r["tpr_um"])
    return best["strength"], results


def with_masked_metric(package: ModelPackage, weight: np.ndarray | None, out_onnx: str | Path, name: str,
                       provenance: dict) -> ModelPackage:
    """A copy of `package` (same graph, same fingerprint) whose masked-route probes are scored with `weight`
    (None: a copy without any metric, the baseline to compare with); thresholds must be recalibrated."""
    entry = None if weight is None else {"weight": np.round(weight, 6).tolist(), "method": METHOD}
    return _with_scoring_entry(package, "masked", entry, "masked_route_metric",
                               "fitted by edge_mfr.models.route_metric", out_onnx, name, provenance)


def with_score_cohort(package: ModelPackage, clean: np.ndarray | None, masked: np.ndarray | None, top_k: int,
                      out_onnx: str | Path, name: str, provenance: dict) -> ModelPackage:
    """A copy of `package` (same graph, same fingerprint) that normalises scores against a cohort: `clean` and
    `masked` (N, D) embeddings of training faces (the masked route uses both); None: a copy without a cohort.
    Thresholds must be recalibrated."""
    entry = None
    if clean is not None:
        clean, masked = np.asarray(clean, np.float32), np.asarray(masked, np.float32)
        d = package.embedding_size
        for part, values in (("clean", clean), ("masked", masked)):
            if values.ndim != 2 or values.shape[1] != d or len(values) <= top_k:
                raise InputError(f"the {part} cohort must be (N, {d}) embeddings with N > top_k = {top_k}, "
                                 f"got {values.shape}")
        entry = {"clean": encode_array(clean), "masked": encode_array(masked), "top_k": int(top_k),
                 "method": "adaptive symmetric score normalisation (AS-norm) against the top_k cohort cosines of "
                           "each side"}
    return _with_scoring_entry(package, "cohort", entry, "score_cohort",
                               "edge_mfr.models.route_metric.with_score_cohort", out_onnx, name, provenance)


def _with_scoring_entry(package: ModelPackage, key: str, entry: dict | None, recipe_key: str, recipe_value: str,
                        out_onnx: str | Path, name: str, provenance: dict) -> ModelPackage:
    """A derived copy of `package` whose sidecar `scoring[key]` is `entry` with its provenance, or is removed
    (None, with its recipe note)."""
    scoring = {k: v for k, v in (package.meta.get("scoring") or {}).items() if k != key}
    if entry is not None:
        scoring[key] = {**entry, **provenance}
    return derived_package(package, out_onnx, name, {recipe_key: recipe_value if entry is not None else None},
                           provenance if entry is not None else {}, scoring=scoring)
