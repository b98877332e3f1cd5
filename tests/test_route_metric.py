"""Scoring heads: the masked-route metric (closed-form whitening, its selection), the score-normalisation cohort
(AS-norm), their package entries (outside the fingerprint), and calibration scoring attempts through them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_mfr.errors import InputError, ModelPackageError
from edge_mfr.eval.unlock_calibration import attempt_scores
from edge_mfr.match import RouteScoring, scoring_space
from edge_mfr.models.package import load_package
from edge_mfr.models.route_metric import (fit_mask_whitening, select_strength, with_masked_metric,
                                         with_score_cohort, within_class_whitening)


def _pairs(seed=0, identities=80, per_identity=3, d=16):
    """Clean embeddings of a few faces per identity, and masked copies moved along two nuisance directions."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(identities), per_identity)
    centres = rng.normal(size=(identities, d))
    clean = centres[labels] + 0.3 * rng.normal(size=(len(labels), d))
    nuisance = np.zeros((2, d))
    nuisance[0, 0] = nuisance[1, 1] = 1.0
    masked = clean + rng.normal(scale=3.0, size=(len(labels), 2)) @ nuisance + 0.05 * rng.normal(size=clean.shape)
    clean /= np.linalg.norm(clean, axis=1, keepdims=True)
    masked /= np.linalg.norm(masked, axis=1, keepdims=True)
    return clean, masked, labels


def test_whitening_shrinks_what_a_mask_changes_and_keeps_the_rest():
    clean, masked, _ = _pairs()
    weight = fit_mask_whitening(clean, masked, strength=0.1)
    np.testing.assert_allclose(weight, weight.T, atol=1e-5)
    gains = np.linalg.norm(weight, axis=0)
    assert gains[:2].max() < 0.5 * np.median(gains[2:])  # the nuisance directions are damped
    with pytest.raises(InputError, match="positive"):
        fit_mask_whitening(clean, masked, strength=0.0)
    with pytest.raises(InputError, match="two"):
        fit_mask_whitening(clean[:1], masked[:1], strength=0.1)


def test_within_class_whitening_damps_how_one_persons_embeddings_vary_not_where_people_differ():
    """WCCN on the masked views: the two nuisance directions vary within each identity (damped); the identity
    centres vary between identities only, which centring on each identity's mean removes."""
    _, masked, labels = _pairs()
    weight = within_class_whitening(masked, labels, strength=0.1)
    np.testing.assert_allclose(weight, weight.T, atol=1e-5)
    gains = np.linalg.norm(weight, axis=0)
    assert gains[:2].max() < 0.5 * np.median(gains[2:])
    shifted = masked + 5.0 * np.eye(masked.shape[1])[labels % masked.shape[1]]  # per-identity offsets only
    np.testing.assert_allclose(within_class_whitening(shifted, labels, 0.1), weight, atol=1e-5)


def test_strength_is_chosen_on_identity_disjoint_folds_and_beats_plain_cosine_here():
    clean, masked, labels = _pairs(seed=1)
    strength, trials = select_strength(clean, masked, labels, fmr=1e-2)
    assert trials[0]["strength"] is None and strength in [t["strength"] for t in trials[1:]]
    best = max(t["tpr_um"] for t in trials[1:])
    assert best > trials[0]["tpr_um"] + 0.05


@pytest.fixture
def scored_package(tmp_path, model_package):
    d = model_package.embedding_size
    rng = np.random.default_rng(2)
    weight = (np.eye(d) + 0.1 * rng.normal(size=(d, d))).astype(np.float32)
    package = with_masked_metric(model_package, weight, tmp_path / "scored.onnx", "scored",
                                 {"strength": 0.1, "train_data": [{"name": "celeba_test", "split": "train"}]})
    return package, weight


def test_metric_package_keeps_the_fingerprint_and_drops_thresholds(scored_package, model_package, tmp_path):
    package, weight = scored_package
    loaded = load_package(package.onnx_path)
    assert loaded.fingerprint == model_package.fingerprint  # stored templates do not change: galleries stay valid
    np.testing.assert_allclose(loaded.route_metric("masked"), weight, atol=1e-5)
    assert loaded.route_metric("unmasked") is None
    assert not loaded.meta.get("thresholds")  # the masked route's thresholds must be recalibrated
    assert {"name": "celeba_test", "split": "train"} in loaded.meta["recipe"]["train_data"]
    plain = with_masked_metric(loaded, None, tmp_path / "plain.onnx", "plain", {})
    assert plain.route_metric("masked") is None and "masked_route_metric" not in plain.meta["recipe"]
    meta = json.loads(loaded.sidecar_path.read_text())
    meta["scoring"]["masked"]["weight"] = meta["scoring"]["masked"]["weight"][:-1]  # not D x D
    loaded.sidecar_path.write_text(json.dumps(meta))
    with pytest.raises(ModelPackageError, match="scoring metric"):
        load_package(package.onnx_path)


def test_calibration_scores_masked_route_attempts_through_the_metric():
    rng = np.random.default_rng(3)
    d = 8

    def unit(n):
        x = rng.normal(size=(n, d))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    templates = {name: (unit(3), np.array([False, True, True])) for name in ("a", "b")}
    probes = [("a", unit(1)[0], "masked"), ("b", unit(1)[0], "unmasked")]
    weight = rng.normal(size=(d, d)).astype(np.float32)
    genuine, impostor = attempt_scores(templates, probes, "max", {"masked": RouteScoring(weight)})
    unmasked_b = float(np.max(templates["b"][0][:1] @ probes[1][1]))  # unmasked templates only, plain cosine
    masked_a = float(np.max(scoring_space(templates["a"][0], weight) @ scoring_space(probes[0][1][None], weight)[0]))
    np.testing.assert_allclose(sorted(genuine), sorted([masked_a, unmasked_b]), atol=1e-5)
    plain, _ = attempt_scores(templates, probes, "max")
    assert not np.allclose(sorted(plain), sorted(genuine))
    assert len(impostor) == 2


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_as_norm_puts_each_side_on_the_scale_of_its_top_cohort_scores():
    rng = np.random.default_rng(4)
    cohort, probes, templates = _unit(rng, 300, 8), _unit(rng, 5, 8), _unit(rng, 7, 8)
    scoring = RouteScoring(None, cohort, top_k=20)

    def stats(x):
        top = np.sort(x @ cohort.T, axis=1)[:, -20:]
        return top.mean(1), top.std(1)

    (pm, ps), (tm, ts) = stats(probes), stats(templates)
    raw = probes @ templates.T
    expected = 0.5 * ((raw - tm[None]) / ts[None] + (raw - pm[:, None]) / ps[:, None])
    np.testing.assert_allclose(scoring.scores(probes, templates), expected, rtol=1e-4, atol=1e-4)
    first, second = probes.copy(), templates[:5].copy()
    first[2] = np.nan  # a failed image stays unscored
    pairs = scoring.pair_scores(first, second)
    assert np.isnan(pairs[2])
    keep = [0, 1, 3, 4]
    np.testing.assert_allclose(pairs[keep], np.diag(scoring.scores(probes, templates[:5]))[keep], rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="more than top_k"):
        RouteScoring(None, cohort[:20], top_k=20)


def test_cohort_package_keeps_the_fingerprint_and_feeds_both_routes(tmp_path, model_package):
    rng = np.random.default_rng(5)
    d = model_package.embedding_size
    clean, masked = _unit(rng, 150, d), _unit(rng, 120, d)
    package = with_score_cohort(model_package, clean, masked, 50, tmp_path / "cohort.onnx", "cohort",
                                {"train_data": [{"name": "celeba_test", "split": "train"}]})
    loaded = load_package(package.onnx_path)
    assert loaded.fingerprint == model_package.fingerprint and not loaded.meta.get("thresholds")
    np.testing.assert_allclose(loaded.score_cohort("unmasked"), clean, atol=1e-3)  # stored as float16
    assert loaded.score_cohort("masked").shape == (270, d)
    assert loaded.route_scoring("masked").top_k == 50
    plain = with_score_cohort(loaded, None, None, 50, tmp_path / "plain.onnx", "plain", {})
    assert plain.score_cohort("masked") is None and "score_cohort" not in plain.meta["recipe"]
    with pytest.raises(InputError, match="N > top_k"):
        with_score_cohort(model_package, clean[:40], masked, 50, tmp_path / "small.onnx", "small", {})
    meta = json.loads(loaded.sidecar_path.read_text())
    meta["scoring"]["cohort"]["clean"]["shape"] = [150, d - 1]  # bytes and shape disagree
    loaded.sidecar_path.write_text(json.dumps(meta))
    with pytest.raises(ModelPackageError, match="cohort"):
        load_package(package.onnx_path)
