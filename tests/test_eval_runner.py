"""End-to-end evaluation on a small real LFW subset, plus the runner's building blocks."""
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_mfr.align import ARCFACE_TEMPLATE_112
from edge_mfr.errors import InputError
from edge_mfr.eval import report
from edge_mfr.eval.pairs import read_pairs
from edge_mfr.eval.runner import (CENTRED, DETECTED, NO_FACE, UNREADABLE, EmbeddingExtractor, FaceLocator,
                                  MaskPolicy, centred_landmarks, evaluate_pairs, image_seed, looks_like_face_crop,
                                  pick_face)

N_PAIRS = 20


@pytest.fixture(scope="module")
def masks_module():
    return pytest.importorskip("edge_mfr.masks", reason="edge_mfr.masks is not available yet")


@pytest.fixture(scope="module")
def lfw_subset(tmp_path_factory, lfw_dir):
    """20 real LFW pairs (10 genuine, 10 impostor, one per fold) copied into a tree of our own, where one
    image is then corrupted and another replaced by a frame with no face."""
    source = read_pairs(lfw_dir / "pairs.txt", lfw_dir / "images", limit=N_PAIRS)
    root = tmp_path_factory.mktemp("lfw_subset")
    images = root / "images"
    for path in source.unique_images():
        (images / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, images / path.parent.name / path.name)
    lines = []
    for p in source.pairs:
        (name_a, number_a), (name_b, number_b) = _name_number(p.first_key), _name_number(p.second_key)
        lines.append(f"{name_a}\t{number_a}\t{number_b}" if p.genuine else f"{name_a}\t{number_a}\t{name_b}\t{number_b}")
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    unreadable = images / source.pairs[0].second.parent.name / source.pairs[0].second.name
    unreadable.write_bytes(b"not a JPEG")
    no_face = images / source.pairs[-1].second.parent.name / source.pairs[-1].second.name
    cv2.imwrite(str(no_face), np.full((250, 250, 3), 128, np.uint8))
    return root, source.pairs[0].second_key, source.pairs[-1].second_key


def _name_number(key):
    name, stem = key.split("/")
    return name, int(stem.rsplit("_", 1)[1])


def test_image_seed_is_stable_and_distinct():
    assert image_seed("Zico/Zico_0001", 0) == image_seed("Zico/Zico_0001", 0)
    assert len({image_seed("Zico/Zico_0001", 0), image_seed("Zico/Zico_0002", 0), image_seed("Zico/Zico_0001", 1)}) == 3


def test_crop_rule_and_centred_landmarks():
    assert looks_like_face_crop((112, 112, 3)) and looks_like_face_crop((160, 140, 3))
    assert not looks_like_face_crop((250, 250, 3)) and not looks_like_face_crop((112, 60, 3))
    np.testing.assert_allclose(centred_landmarks((112, 112, 3)), ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(centred_landmarks((224, 112, 3)), ARCFACE_TEMPLATE_112 * [1, 2])


def test_face_locator_on_real_images(lfw_dir, data_dir):
    locator = FaceLocator()
    lfw_image = lfw_dir / "images" / "Zico" / "Zico_0001.jpg"
    landmarks, status = locator.locate(cv2.imread(str(lfw_image)), lfw_image)
    assert status == DETECTED and landmarks.shape == (5, 2)
    assert 80 < landmarks[:, 0].mean() < 170  # LFW faces sit in the middle of the 250x250 frame
    # Nothing detected: a crop-sized image is taken as pre-aligned (and counted so by the runner), a
    # larger one has no face.
    landmarks, status = locator.locate(np.full((112, 112, 3), 128, np.uint8), Path("grey_crop"))
    assert status == CENTRED
    np.testing.assert_allclose(landmarks, ARCFACE_TEMPLATE_112)
    assert locator.locate(np.full((250, 250, 3), 128, np.uint8), Path("grey_frame")) == (None, NO_FACE)
    glint = sorted((data_dir / "glint24").glob("*/*.jpg"))[0]
    landmarks, status = FaceLocator(aligned=True).locate(cv2.imread(str(glint)), glint)
    assert status == CENTRED
    np.testing.assert_allclose(landmarks, ARCFACE_TEMPLATE_112)


def test_mask_policy_is_deterministic_per_image(masks_module, lfw_dir):
    image = cv2.imread(str(lfw_dir / "images" / "Zico" / "Zico_0001.jpg"))
    landmarks, _ = FaceLocator().locate(image, Path("Zico_0001"))
    policy = MaskPolicy("template", seed=3)
    first = policy.apply(image, landmarks, "Zico/Zico_0001")
    assert np.array_equal(first, MaskPolicy("template", seed=3).apply(image, landmarks, "Zico/Zico_0001"))
    assert not np.array_equal(first, image)
    assert policy.choose("Zico/Zico_0001")[0] in masks_module.FAMILIES["template"]
    assert MaskPolicy("nist_c", seed=3).choose("any/key")[0] == "nist_c"
    with pytest.raises(InputError, match="unknown mask family"):
        MaskPolicy("paper_bag", seed=0)


def test_end_to_end_on_real_lfw_pairs(tmp_path, lfw_subset, model_package, masks_module):
    root, unreadable_key, no_face_key = lfw_subset
    pair_set = read_pairs(root / "pairs.txt", root / "images")
    assert len(pair_set.pairs) == N_PAIRS
    cache = tmp_path / "cache"
    result = evaluate_pairs(pair_set, [model_package], scenarios=["uu", "um", "mm"], mask_family="template",
                            seed=0, cache_dir=cache, n_resamples=100, progress=False)

    unmasked = result["images"]["unmasked"]
    assert unmasked["failures"] == {UNREADABLE: [unreadable_key], NO_FACE: [no_face_key]}
    assert unmasked["detected"] + unmasked["centred_fallback"] == unmasked["n_images"] - 2
    assert unmasked["detector_misses"] == 1
    # The fixed fallback is the mean landmarks of the located LFW faces: eyes above the mouth, mid-frame.
    fallback = np.array(unmasked["fallback_landmarks"])
    assert 0.3 < fallback[:, 0].mean() < 0.7 and fallback[0, 1] < fallback[3, 1]
    assert result["face"] == "centre" and result["landmarks"] == "masked" and result["detector"]
    assert [r["scenario"] for r in result["results"]] == ["uu", "um", "mm"]
    for entry in result["results"]:
        # The two failed images are probes. Excluded: neither pair is scored. Counted: the detector miss is
        # scored at the fallback landmarks; the unreadable image stays unscored.
        assert entry["fte_pairs"] == 2 and entry["n_scored"] == N_PAIRS - 2
        assert set(entry["fte_images"]) == {unreadable_key, no_face_key}
        misses = entry["detector_misses"]
        assert misses["pairs"] == 1 and misses["probe_images"] >= 1 and no_face_key in misses["images"]
        unscored = [p for p in entry["pairs"] if p["score"] is None]
        assert {p["second"] for p in unscored} == {unreadable_key, no_face_key}
        missed = [p for p in entry["pairs"] if p.get("miss")]
        assert {p["second"] for p in missed} >= {no_face_key} and all(p["fallback_score"] is not None for p in missed)
        assert entry["n_scored_misses_counted"] == N_PAIRS - 1
        assert entry["metrics_misses_counted"]["n_pairs"] == N_PAIRS - 1
        m = entry["metrics"]
        assert m["n_pairs"] == N_PAIRS - 2
        assert 0.5 < m["auc"] <= 1.0 and 0 <= m["eer"] < 0.5
        assert m["genuine_mean"] > m["impostor_mean"]
        assert m["fnmr_at_fmr"]["0.001"]["support"] == "not supported"
    uu, um, mm = (r["metrics"] for r in result["results"])
    # A mask on the probe must not make verification easier. (Scores, not only rates, are comparable across
    # scenarios only when both routes score alike: a masked-route metric puts U-M on its own scale.)
    assert um["auc"] <= uu["auc"] and um["eer"] >= uu["eer"]
    if not model_package.meta.get("scoring"):  # plain cosine on both routes
        assert um["genuine_mean"] < uu["genuine_mean"]

    # Reports from the real result.
    report.write_json(result, tmp_path / "report.json")
    assert report.load_json(tmp_path / "report.json")["results"][1]["scenario"] == "um"
    table = report.write_markdown(result, tmp_path / "table.md").read_text()
    # Two rows per scenario with a detector miss: counted, then excluded.
    assert table.count(f"| {model_package.name} |") == 6 and table.count("1 pairs: excluded") == 3
    plots = report.plot_det(result, tmp_path / "plots") + [report.plot_score_distributions(result, tmp_path / "plots")]
    assert all(p.stat().st_size > 0 for p in plots)

    # Second run: every embedding comes from the cache and the scores are identical.
    again = evaluate_pairs(pair_set, [model_package], scenarios=["uu", "um", "mm"], mask_family="template",
                           seed=0, cache_dir=cache, n_resamples=0, progress=False)
    assert again["images"]["unmasked"]["cache_hits"] == unmasked["n_images"]
    assert again["images"]["masked"]["cache_hits"] == result["images"]["masked"]["n_images"]
    for first, second in zip(result["results"], again["results"]):
        assert [p["score"] for p in first["pairs"]] == [p["score"] for p in second["pairs"]]

    # A package with a masked-route scoring metric: the same embeddings (same fingerprint: all from the cache);
    # comparisons with a masked face are scored through the metric, clean ones as before.
    from edge_mfr.models.route_metric import with_masked_metric

    d = model_package.embedding_size
    weight = np.eye(d, dtype=np.float32) + 0.2 * np.random.default_rng(0).normal(size=(d, d)).astype(np.float32)
    scored = with_masked_metric(model_package, weight, tmp_path / "scored.onnx", "scored", {})
    metric = evaluate_pairs(pair_set, [scored], scenarios=["uu", "um"], mask_family="template", seed=0,
                            cache_dir=cache, n_resamples=0, progress=False)
    assert metric["images"]["masked"]["cache_hits"] == metric["images"]["masked"]["n_images"]
    plain_uu, plain_um = ([p["score"] for p in r["pairs"]] for r in result["results"][:2])
    metric_uu, metric_um = ([p["score"] for p in r["pairs"]] for r in metric["results"])
    assert metric_uu == plain_uu
    assert all(abs(a - b) > 1e-4 for a, b in zip(metric_um, plain_um) if a is not None)

    # Touching one image invalidates only its own cache entries.
    touched = pair_set.pairs[1].first
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 1_000_000_000))
    extractor = EmbeddingExtractor([model_package], cache_dir=cache, face="centre", progress=False)
    images = list(dict.fromkeys((p.first, p.first_key) for p in pair_set.pairs[:4]))
    embedded = extractor.extract(images, masked=False)
    assert embedded.cache_hits == len(images) - 1


def test_unknown_scenario_is_refused(lfw_dir, model_package):
    pair_set = read_pairs(lfw_dir / "pairs.txt", lfw_dir / "images", limit=2)
    with pytest.raises(InputError, match="scenarios must be among"):
        evaluate_pairs(pair_set, [model_package], scenarios=["xx"], progress=False)


def test_face_rule_picks_the_centred_subject_over_a_larger_background_face(lfw_dir):
    """Alejandro_Avila_0003: a larger face at the top right of the frame, the subject in the middle."""
    path = lfw_dir / "images" / "Alejandro_Avila" / "Alejandro_Avila_0003.jpg"
    image = cv2.imread(str(path))
    largest, _ = FaceLocator(face="largest").locate(image, path)
    centre, _ = FaceLocator(face="centre").locate(image, path)
    assert 80 < centre[:, 0].mean() < 170 and 80 < centre[:, 1].mean() < 170
    assert largest[:, 0].mean() > 170  # the background face
    with pytest.raises(InputError, match="face rule"):
        FaceLocator(face="biggest")
    assert pick_face([], image.shape, "centre") is None


def test_masked_images_are_detected_afresh_and_misses_get_the_fallback(lfw_dir, model_package, masks_module):
    """Charles_Holzner_0001 with a template-family mask: the detector no longer finds the face (a real miss:
    of the images in LFW's 6,000 pairs, masked, the default detector misses 3 with template masks)."""
    keys = ["Charles_Holzner/Charles_Holzner_0001", "Zico/Zico_0001", "Zico/Zico_0002"]
    images = [(lfw_dir / "images" / f"{key}.jpg", key) for key in keys]
    unmasked = EmbeddingExtractor([model_package], mask_family="template", face="centre", progress=False)
    plain = unmasked.extract(images, masked=False)
    assert plain.status == [DETECTED] * 3 and not plain.misses.any()

    afresh = EmbeddingExtractor([model_package], mask_family="template", face="centre", progress=False)
    masked = afresh.extract(images, masked=True)
    assert masked.status[0] == "masked_no_face" and masked.status[1:] == [DETECTED] * 2
    assert np.isnan(masked.embeddings[0][0]).all() and np.isfinite(masked.fallback[0][0]).all()
    np.testing.assert_allclose(masked.fallback_landmarks, np.round(masked.landmarks[1:].mean(axis=0), 4))
    assert np.isfinite(masked.with_misses_counted(0)).all()
    # Re-detected on the masked picture: close to, but not exactly, the unmasked landmarks (relative to the
    # image size; the mouth corners, hidden under the mask, move most: 0.051 here).
    shift = np.abs(masked.landmarks[1:] - plain.landmarks[1:]).max()
    assert 0 < shift < 0.08

    kept = EmbeddingExtractor([model_package], mask_family="template", face="centre", landmarks="unmasked",
                              progress=False).extract(images, masked=True)
    assert kept.status == [DETECTED] * 3
    np.testing.assert_array_equal(kept.landmarks, plain.landmarks)
    with pytest.raises(InputError, match="landmarks must be one of"):
        EmbeddingExtractor([model_package], landmarks="guessed", progress=False)
