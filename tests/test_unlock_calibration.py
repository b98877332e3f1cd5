"""Unlock-protocol calibration: per-attempt aggregation logic, and a small real run written into a package."""

import shutil

import numpy as np
import pytest

from edge_mfr.eval.calibrate import read_labelled_images
from edge_mfr.eval.unlock_calibration import attempt_scores, calibrate_unlock


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_attempt_scores_aggregate_each_identity_over_its_templates():
    templates = {"a": (np.stack([_unit([1, 0, 0]), _unit([0, 1, 0])]), np.array([False, False])),
                 "b": (np.stack([_unit([0, 0, 1])]), np.array([False]))}
    probes = [("a", _unit([1, 1, 0]), "unmasked"), ("b", _unit([0, 1, 1]), "masked")]
    genuine, impostor = attempt_scores(templates, probes, "max")
    half = 1 / np.sqrt(2)
    np.testing.assert_allclose(sorted(genuine), [half, half], rtol=1e-6)  # a->a max, b->b
    np.testing.assert_allclose(sorted(impostor), [0.0, half], atol=1e-6)  # a->b 0, b->a max(0, .707)
    genuine_mean, impostor_mean = attempt_scores(templates, probes, "mean")
    np.testing.assert_allclose(sorted(impostor_mean), [0.0, half / 2], atol=1e-6)
    assert len(genuine) == 2 and len(impostor) == 2  # one attempt per (probe, other identity)


def test_attempt_scores_score_an_unmasked_probe_against_the_unmasked_templates_only():
    """As FaceUnlock does (match.route_rows): a's masked template would win for an unmasked probe."""
    templates = {"a": (np.stack([_unit([1, 0, 0]), _unit([0, 1, 0])]), np.array([False, True])),
                 "b": (np.stack([_unit([0, 1, 0])]), np.array([True]))}  # b has masked templates only
    probe = _unit([0.2, 1, 0])
    genuine, impostor = attempt_scores(templates, [("a", probe, "unmasked"), ("b", probe, "unmasked")], "max")
    np.testing.assert_allclose(sorted(genuine), sorted([probe[0], probe[1]]), rtol=1e-6)  # a: unmasked row only
    np.testing.assert_allclose(sorted(impostor), sorted([probe[1], probe[0]]), rtol=1e-6)  # b keeps its masked row
    genuine_masked, _ = attempt_scores(templates, [("a", probe, "masked")], "max")
    np.testing.assert_allclose(genuine_masked, [probe[1]], rtol=1e-6)  # a masked probe meets every template
    genuine_rule, _ = attempt_scores(templates, [("a", _unit([1, 0.2, 0]), "masked")], "max", None, "masked")
    np.testing.assert_allclose(genuine_rule, [_unit([1, 0.2, 0])[1]], rtol=1e-6)  # the masked template only


def test_unlock_calibration_on_real_faces_writes_per_aggregation_thresholds(tmp_path, data_dir):
    from edge_mfr.models.package import default_model, load_package

    bundled = default_model()
    for path in bundled.files:
        shutil.copyfile(path, tmp_path / path.name)
    package = load_package(tmp_path / bundled.onnx_path.name)
    celeba = data_dir / "celeba_test"  # split calib: held out from every model's training
    images = read_labelled_images(celeba / "images", celeba / "identities.txt", split="calib",
                                  max_per_identity=4)[:40]
    result = calibrate_unlock(package, images, celeba / "images", targets=(0.1, 1e-5), enroll_per_identity=2,
                              progress=False, split="calib")
    evidence = result["calibration"]["evidence"]
    assert set(result["thresholds"]) == {"max", "mean"}
    assert result["aggregation"] in ("max", "mean") and "FMR 0.1" in result["calibration"]["aggregation_choice"]
    routed = result["calibration"]["n_routed"]
    assert routed["masked"] > 0 and routed["unmasked"] > 0  # the mask estimate sends probes both ways
    for aggregation in ("max", "mean"):
        table = result["thresholds"][aggregation]
        assert set(table["all"]) == {"0.1"}  # 1e-5 is not supported by ~100 attempts
        rows = evidence[aggregation]["0.1"]
        assert table["all"]["0.1"] == max(table["masked"]["0.1"], table["unmasked"]["0.1"])
        assert table["masked"]["0.1"] == rows["route masked"]["threshold"]
        # each route's threshold meets the target on its attempts; a drawn variant mixes routes, so its FMR at
        # those thresholds is measured, not guaranteed (here it lands either side of 0.1)
        assert all(rows[f"route {route}"]["observed_fmr"] <= 0.1 for route in ("masked", "unmasked"))
        # what people feel: each drawn variant judged by the thresholds of the routes its attempts took
        assert rows["drawn masked"]["at"] == "route thresholds"
        assert rows["drawn unmasked"]["n_genuine"] + rows["drawn masked"]["n_genuine"] == \
            rows["route unmasked"]["n_genuine"] + rows["route masked"]["n_genuine"]
    # max over more templates can only raise an impostor's score, so its threshold is at least mean's
    assert result["thresholds"]["max"]["all"]["0.1"] >= result["thresholds"]["mean"]["all"]["0.1"]
    updated = package.with_thresholds(result["thresholds"]["max"]["all"], result["calibration"], result["thresholds"])
    reloaded = load_package(updated.onnx_path)
    assert reloaded.fingerprint == bundled.fingerprint
    assert reloaded.threshold_for(0.1, "mean", "masked") == pytest.approx(result["thresholds"]["mean"]["masked"]["0.1"])
    with pytest.raises(Exception, match="no calibrated threshold"):
        reloaded.threshold_for(1e-4)


def test_the_preferred_aggregation_refuses_people_least_at_the_default_fmr():
    from edge_mfr.eval.unlock_calibration import preferred_aggregation

    def rows(unmasked, masked):
        return {"drawn unmasked": {"fnmr": unmasked}, "drawn masked": {"fnmr": masked}}

    evidence = {"max": {"0.001": rows(0.1, 0.4), "0.0001": rows(0.26, 0.64)},
                "mean": {"0.001": rows(0.2, 0.5), "0.0001": rows(0.25, 0.63)}}
    choice, why = preferred_aggregation(evidence)
    assert choice == "mean" and "0.0001" in why and "mean 44.0%" in why
    assert preferred_aggregation(evidence, target=1e-3)[0] == "max"
    tie = {"max": {"0.0001": rows(0.3, 0.6)}, "mean": {"0.0001": rows(0.3, 0.6)}}
    assert preferred_aggregation(tie)[0] == "max"
    # an uncalibrated default target: the strictest supported one decides
    assert preferred_aggregation({"max": {"0.001": rows(0.1, 0.2)}, "mean": {"0.001": rows(0.1, 0.3)}})[0] == "max"
    assert preferred_aggregation({"max": {"0.1": {}}})[0] == "max"
