"""The masked-face alignment refiner: its geometry, the bundled refiner on real masked faces, and how a package
carries it."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from edge_mfr.errors import ModelPackageError
from edge_mfr.masked_alignment import MaskedAlignmentRefiner, corrected_landmarks, relative_similarity
from edge_mfr.models.teacher import DLIB_CHIP_TEMPLATE_150

REFINER = "masked_alignment_refiner_v1"


def test_moving_points_back_by_their_similarity_aligns_them_as_the_clean_points_do():
    rng = np.random.default_rng(0)
    clean = DLIB_CHIP_TEMPLATE_150 * 1.7 + np.array([40.0, 25.0])  # a face somewhere in a photo
    for _ in range(20):
        masked = clean + rng.normal(0.0, 4.0, clean.shape)  # points a mask moved, each its own way
        similarity = relative_similarity(clean, masked)
        assert np.abs(similarity).max() > 1e-3
        back = relative_similarity(clean, corrected_landmarks(masked, similarity))
        assert np.allclose(back, 0.0, atol=1e-6)
    assert np.allclose(relative_similarity(clean, clean), 0.0, atol=1e-9)


def test_the_bundled_refiner_moves_real_masked_faces_towards_their_clean_alignment(data_dir):
    """celeba_test `calib` (identities the refiner never saw), masks drawn away from the clean points as real
    masks are worn: the refined alignment is closer to the clean one in scale and angle, most faces better."""
    from edge_mfr.detect import get_detector
    from edge_mfr.masks import apply_mask, jittered_points, random_mask_type
    from edge_mfr.train.data import _celeba_items

    items = list(_celeba_items(data_dir / "celeba_test", "calib", 1, 40))
    find = get_detector("yunet-onet", threads=1)
    refiner = MaskedAlignmentRefiner(REFINER)
    rng = np.random.default_rng(1)
    before, after = [], []
    for _, path in items:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        face = find.detect_largest(image)
        if face is None:
            continue
        covered = apply_mask(image, jittered_points(face.landmarks, 0.08, rng), random_mask_type(rng), rng)
        again = find.detect_largest(covered)
        if again is None:
            continue
        before.append(relative_similarity(face.landmarks, again.landmarks))
        after.append(relative_similarity(face.landmarks, refiner.refine(covered, again.landmarks[None])[0]))
    before, after = np.abs(np.array(before)), np.abs(np.array(after))
    assert len(before) >= 30
    assert np.median(after[:, 2]) < 0.6 * np.median(before[:, 2])  # log-scale
    assert np.median(after[:, 3]) < 0.7 * np.median(before[:, 3])  # degrees
    assert np.mean(np.linalg.norm(after[:, :2], axis=1) < np.linalg.norm(before[:, :2], axis=1)) > 0.6


def test_a_package_with_a_refiner_realigns_detected_masked_faces_only(package_copy):
    from edge_mfr.detect import get_detector
    from edge_mfr.embed import FaceEmbedder
    from edge_mfr.io import load_image
    from edge_mfr.masks import apply_mask
    from edge_mfr.models.package import load_package

    plain = package_copy.with_masked_alignment_refiner(None)
    refined = package_copy.with_masked_alignment_refiner(REFINER)
    assert refined.fingerprint != plain.fingerprint  # masked enrollment captures embed differently: galleries rebind
    assert not refined.thresholds and "calibration" not in refined.meta  # measured without it: calibrate again
    assert load_package(refined.onnx_path).masked_alignment_refiner["name"] == REFINER  # the sidecar on disk
    assert refined.with_masked_alignment_refiner(None).fingerprint == plain.fingerprint

    from pathlib import Path

    image = load_image(Path(__file__).resolve().parents[1] / "edge_mfr" / "demo_data" / "person_a_1.jpg")
    points = get_detector("yunet-onet").detect_largest(image).landmarks[None]
    covered = apply_mask(image, points[0], "surgical", 0)
    seen = get_detector("yunet-onet").detect_largest(covered).landmarks[None]
    with_refiner, without = FaceEmbedder(refined, threads=1), FaceEmbedder(plain, threads=1)
    moved = with_refiner.masked_landmarks(covered, seen)
    assert moved.shape == seen.shape and not np.allclose(moved, seen)
    assert np.array_equal(without.masked_landmarks(covered, seen), seen)
    expected = without.embed_faces(covered, moved, route="masked")
    assert np.allclose(with_refiner.embed_faces(covered, seen, route="masked"), expected, atol=1e-6)
    # a synthetic copy drawn at the clean points is aligned by them, as enrollment does
    assert np.allclose(with_refiner.embed_faces(covered, points, route="masked", detected=False),
                       without.embed_faces(covered, points, route="masked"), atol=1e-6)
    assert np.allclose(with_refiner.embed_faces(image, points), without.embed_faces(image, points), atol=1e-6)


def test_a_refiner_the_package_was_not_calibrated_with_is_refused(package_copy):
    from edge_mfr.embed import FaceEmbedder
    from edge_mfr.models.package import load_package

    refined = package_copy.with_masked_alignment_refiner(REFINER)
    meta = json.loads(refined.sidecar_path.read_text())
    meta["masked_alignment_refiner"]["graph_sha256"] = "0" * 64
    refined.sidecar_path.write_text(json.dumps(meta))
    with pytest.raises(ModelPackageError):  # the fingerprint no longer matches what the sidecar says
        FaceEmbedder(load_package(refined.onnx_path), threads=1)
    with pytest.raises(ModelPackageError, match="is not the 000000000000"):
        MaskedAlignmentRefiner(REFINER, "0" * 64)
    with pytest.raises(ModelPackageError, match="is not bundled"):
        package_copy.with_masked_alignment_refiner("no_such_refiner")
    meta["masked_alignment_refiner"] = "yes"
    refined.sidecar_path.write_text(json.dumps(meta))
    with pytest.raises(ModelPackageError, match="masked_alignment_refiner must be an object"):
        load_package(refined.onnx_path)


def test_an_unlock_with_another_detector_than_the_refiner_and_thresholds_were_fitted_to_warns(package_copy, tmp_path):
    import warnings

    from edge_mfr.detect import get_detector
    from edge_mfr.embed import FaceEmbedder
    from edge_mfr.unlock import FaceUnlock

    assert package_copy.calibration_detector == "yunet-onet"
    with pytest.warns(UserWarning, match=r"its unlock thresholds were calibrated with 'yunet-onet' and its masked-face "
                                         r"alignment refiner 'masked_alignment_refiner_v1' learned the points of "
                                         r"'yunet-onet', but faces are detected with 'mtcnn'"):
        FaceUnlock(model=package_copy, gallery=tmp_path / "g.emfr", passphrase="x", detector="mtcnn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FaceUnlock(model=package_copy, gallery=tmp_path / "g.emfr", passphrase="x")  # the default detector
    # calibrating makes the thresholds, so only the refiner's detector counts there
    embedder = FaceEmbedder(package_copy, threads=1)
    assert embedder.detector_conflicts(get_detector("mtcnn"), thresholds=False) == [
        "its masked-face alignment refiner 'masked_alignment_refiner_v1' learned the points of 'yunet-onet'"]
    assert FaceEmbedder(package_copy.with_masked_alignment_refiner(None), threads=1).detector_conflicts(
        get_detector("mtcnn"), thresholds=False) == []


def test_refiner_pairs_come_from_training_photos_and_train_an_exportable_refiner(data_dir, tmp_path):
    """A few real pairs (every 400th celeba_test `train` photo): targets are the measured similarities, identities
    are training identities only; a short fit exports a graph that answers as the network does, in real units."""
    import onnxruntime as ort
    import torch

    from edge_mfr.train.refiner import (REFINER_SIZE, export_refiner, fit_refiner, predict, refiner_pairs,
                                        save_refiner_checkpoint)

    pairs = refiner_pairs(data_dir, masks_per_face=2, shards=400, progress=False)
    n = len(pairs["chips"])
    assert n >= 40 and pairs["chips"].shape == (n, REFINER_SIZE, REFINER_SIZE, 3) and pairs["chips"].dtype == np.uint8
    assert np.abs(pairs["targets"][:, 2]).max() < 0.5 and np.abs(pairs["targets"]).max(axis=0)[2] > 0.005
    listing = (data_dir / "celeba_test" / "identities.txt").read_text().split("\n")
    calib = {p[1] for p in (line.split() for line in listing if line.strip()) if p[2] == "calib"}
    train = {p[1] for p in (line.split() for line in listing if line.strip()) if p[2] == "train"}
    assert set(pairs["identities"]) <= train and not set(pairs["identities"]) & calib

    result = fit_refiner(pairs["chips"], pairs["targets"], pairs["identities"], epochs=2, batch_size=16,
                         holdout_fraction=0.2, log=lambda _: None)
    checkpoint = tmp_path / "refiner.pt"
    assert pairs["detector"] == "yunet-onet"  # the unlock's: the refiner learns how a mask moves its points
    save_refiner_checkpoint(result, checkpoint, pairs["detector"])
    graph = export_refiner(checkpoint, tmp_path / "tiny_refiner.onnx", {"train_data": [{"name": "celeba_test"}]})
    chips = torch.from_numpy(pairs["chips"][:5])
    expected = predict(result["network"], chips, result["mean"], result["std"])
    x = (pairs["chips"][:5].astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 127.5
    answered = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {"chip": x})[0]
    assert np.allclose(answered, expected, atol=1e-4)
    meta = json.loads(graph.with_suffix(".json").read_text())
    assert meta["input_size"] == REFINER_SIZE and meta["detector"] == "yunet-onet"

    from edge_mfr.train.__main__ import main as train

    assert train(["refiner-export", str(checkpoint), "--out", str(tmp_path / "cli" / "r.onnx")]) == 0
    meta = json.loads((tmp_path / "cli" / "r.json").read_text())
    assert meta["detector"] == "yunet-onet" and meta["train_data"] == [{"name": "celeba_test", "split": "train"}]
    assert train(["refiner-export", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.onnx")]) == 2


def test_the_cli_switches_the_refiner_and_names_it(package_copy, capsys):
    from edge_mfr.cli import main as cli
    from edge_mfr.models.package import load_package

    path = str(package_copy.onnx_path)
    assert cli(["models", "masked-alignment", path, "off"]) == 0
    plain = load_package(path)
    assert plain.masked_alignment_refiner is None and not plain.thresholds
    capsys.readouterr()
    assert cli(["models", "masked-alignment", path, REFINER]) == 0
    assert load_package(path).masked_alignment_refiner["name"] == REFINER
    assert "run `edge-mfr calibrate`" not in capsys.readouterr().out  # 'off' had already dropped them
    capsys.readouterr()
    assert cli(["models", "info", path]) == 0
    assert f"realigned by the refiner {REFINER}" in capsys.readouterr().out
    from edge_mfr.masked_alignment import bundled_refiner

    assert cli(["models", "list", "--json", "--dir", str(package_copy.onnx_path.parent)]) == 0
    listed = [r for r in json.loads(capsys.readouterr().out)["packages"] if r["origin"] == "dir"][0]
    graphs = [f for f in load_package(path).files if f.suffix == ".onnx"]
    assert listed["masked_alignment_refiner"] == REFINER  # a device needs its graph too: counted in the size
    assert listed["size_bytes"] == sum(f.stat().st_size for f in graphs) + bundled_refiner(REFINER)[0].stat().st_size
    assert cli(["models", "masked-alignment", path, "no_such_refiner"]) == 2
    assert cli(["models", "masked-alignment", "no_such_package", "off"]) == 2


def test_no_face_at_all_cannot_send_the_points_away():
    from edge_mfr.masked_alignment import LARGEST_CORRECTION

    refiner = MaskedAlignmentRefiner(REFINER)
    points = (DLIB_CHIP_TEMPLATE_150 * 1.5 + 40.0)[None]
    for image in (np.zeros((300, 300, 3), np.uint8), np.full((300, 300, 3), 255, np.uint8),
                  np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)):
        predicted = refiner.predict(image, points)
        assert predicted.shape == (1, 4) and np.all(np.abs(predicted) <= LARGEST_CORRECTION + 1e-9)
        moved = relative_similarity(points[0], refiner.refine(image, points)[0])
        assert np.all(np.abs(moved) <= LARGEST_CORRECTION + 1e-6)
    assert refiner.refine(np.zeros((10, 10, 3), np.uint8), np.empty((0, 5, 2), np.float32)).shape == (0, 5, 2)


def test_refiner_fit_refuses_missing_or_foreign_pairs_and_no_epochs(tmp_path, capsys):
    from edge_mfr.train.__main__ import main as train

    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    assert train(["refiner-fit", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r.pt")]) == 2
    assert train(["refiner-fit", str(foreign), "--out", str(tmp_path / "r.pt")]) == 2
    assert "missing" in capsys.readouterr().err
    pairs = tmp_path / "pairs.npz"
    fields = dict(chips=np.zeros((8, 64, 64, 3), np.uint8), targets=np.zeros((8, 4), np.float32),
                  identities=np.array(["a", "b"] * 4))
    np.savez(pairs, **fields)  # made without saying whose points they are
    assert train(["refiner-fit", str(pairs), "--out", str(tmp_path / "r.pt")]) == 2
    assert "pairs.npz: detector" in capsys.readouterr().err
    np.savez(pairs, **fields, detector="yunet-onet")
    assert train(["refiner-fit", str(pairs), "--epochs", "0", "--out", str(tmp_path / "r.pt")]) == 2
    assert "at least one epoch" in capsys.readouterr().err and not (tmp_path / "r.pt").exists()
    other = tmp_path / "other.npz"
    np.savez(other, **fields, detector="mtcnn")
    assert train(["refiner-fit", str(pairs), str(other), "--out", str(tmp_path / "r.pt")]) == 2
    assert "different detectors (mtcnn, yunet-onet)" in capsys.readouterr().err and not (tmp_path / "r.pt").exists()
