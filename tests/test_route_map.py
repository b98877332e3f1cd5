"""Masked-route maps: closed-form fit, the routed package format, and the embedder applying it to masked faces only."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from edge_mfr.errors import ModelPackageError
from edge_mfr.models.package import load_package
from edge_mfr.models.route_map import apply_map, fit_ridge, select_alpha, with_masked_route


def test_ridge_fit_recovers_a_linear_map_and_shrinks_towards_identity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 8))
    true_w, true_b = rng.normal(size=(8, 8)), rng.normal(size=8)
    y = x @ true_w.T + true_b
    weight, bias = fit_ridge(x, y, alpha=1e-8)
    np.testing.assert_allclose(weight, true_w, atol=1e-3)
    np.testing.assert_allclose(bias, true_b, atol=1e-3)
    weight, bias = fit_ridge(x, y, alpha=1e6)  # all shrinkage: leave embeddings as they are
    np.testing.assert_allclose(weight, np.eye(8), atol=1e-3)


def test_alpha_is_selected_on_identity_disjoint_folds():
    rng = np.random.default_rng(1)
    identities = np.repeat(np.arange(60), 4)
    centres = rng.normal(size=(60, 16))
    clean = centres[identities] + 0.1 * rng.normal(size=(240, 16))
    masked = clean @ np.diag(np.linspace(0.2, 2.0, 16)) + 0.05 * rng.normal(size=(240, 16))  # a distortion to undo
    clean /= np.linalg.norm(clean, axis=1, keepdims=True)
    masked /= np.linalg.norm(masked, axis=1, keepdims=True)
    alpha, trials = select_alpha(clean, masked, identities)
    unmapped = trials[0]["tpr_um"]
    assert trials[0]["alpha"] is None and max(t["tpr_um"] for t in trials[1:]) >= unmapped
    assert alpha in [t["alpha"] for t in trials[1:]]


@pytest.fixture(scope="module")
def model_package():
    """The bundled teacher: one network and no map of its own, which these tests give one (the default
    two-network package already has a masked-route map)."""
    from edge_mfr.models.package import load_package

    return load_package("dlib_resnet_v1")


@pytest.fixture
def routed_package(tmp_path, model_package):
    rng = np.random.default_rng(2)
    d = model_package.embedding_size
    weight = (np.eye(d) + 0.05 * rng.normal(size=(d, d))).astype(np.float32)
    bias = (0.01 * rng.normal(size=d)).astype(np.float32)
    routed = with_masked_route(model_package, weight, bias, tmp_path / "routed.onnx", "routed",
                               {"alpha": 0.1, "train_data": [{"name": "celeba_test", "split": "train"}]})
    return routed, weight, bias


def test_routed_package_round_trip_binds_the_map_into_the_fingerprint(routed_package, model_package):
    routed, weight, bias = routed_package
    loaded = load_package(routed.onnx_path)
    assert loaded.fingerprint != model_package.fingerprint  # galleries of the two cannot be mixed up
    assert loaded.route_map("unmasked") is None and model_package.route_map("masked") is None
    np.testing.assert_allclose(loaded.route_map("masked")[0], weight, atol=1e-6)
    assert loaded.meta["recipe"]["train_data"] == [{"name": "celeba_test", "split": "train"}]
    assert not loaded.meta.get("thresholds")  # thresholds of the unrouted model do not carry over
    meta = json.loads(loaded.sidecar_path.read_text())
    meta["routes"]["masked"]["bias"][0] += 0.5  # a tampered map no longer matches the fingerprint
    loaded.sidecar_path.write_text(json.dumps(meta))
    with pytest.raises(ModelPackageError, match="does not match"):
        load_package(routed.onnx_path)


def test_embedder_maps_masked_faces_only(routed_package, model_package):
    from edge_mfr.cli.demo import DEMO_DIR
    from edge_mfr.detect import get_detector
    from edge_mfr.embed import FaceEmbedder

    routed, weight, bias = routed_package
    photo = cv2.imread(str(DEMO_DIR / "person_a_1.jpg"))
    face = get_detector().detect_largest(photo)
    plain, mapped = FaceEmbedder(model_package, threads=1), FaceEmbedder(routed, threads=1)
    clean = plain.embed_faces(photo, face.landmarks[None])
    np.testing.assert_allclose(mapped.embed_faces(photo, face.landmarks[None]), clean, atol=1e-6)
    masked = mapped.embed_faces(photo, face.landmarks[None], route="masked")
    np.testing.assert_allclose(masked, apply_map(clean, weight, bias), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(masked, axis=1), 1.0, atol=1e-5)
    with pytest.raises(Exception, match="route must be"):
        mapped.embed_faces(photo, face.landmarks[None], route="sunglasses")
