"""Threshold calibration on small real labelled sets (CelebA via an identities file, Glint folders)."""
import shutil
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest

from edge_mfr.errors import InputError
from edge_mfr.eval import metrics
from edge_mfr.cli import main as cli_main
from edge_mfr.eval.calibrate import (calibrate, check_not_trained_on, read_labelled_images, training_overlap_warnings,
                                     write_thresholds)
from edge_mfr.eval.runner import EmbeddingExtractor

TARGETS = (0.1, 0.01, 0.001)


@pytest.fixture()
def package_copy(tmp_path, model_package):
    """The package copied aside, so writing thresholds never touches the original."""
    from edge_mfr.models.package import load_package
    for path in model_package.files:
        shutil.copyfile(path, tmp_path / path.name)
    return load_package(tmp_path / model_package.onnx_path.name)


@pytest.fixture(scope="module")
def celeba_subset(tmp_path_factory, data_dir):
    """5 images each of the first 4 celeba_test `calib` identities with at least 5 (held out from every
    model's training), as an identities file of that split."""
    celeba = data_dir / "celeba_test"
    by_identity = defaultdict(list)
    for line in (celeba / "identities.txt").read_text().splitlines():
        file, identity, split = line.split()
        if split == "calib":
            by_identity[identity].append(file)
    chosen = [i for i in sorted(by_identity) if len(by_identity[i]) >= 5][:4]
    identities_file = tmp_path_factory.mktemp("celeba") / "identities.txt"
    identities_file.write_text("".join(f"{f} {i} calib\n" for i in chosen for f in sorted(by_identity[i])[:5]))
    return celeba / "images", identities_file


def test_calibration_matches_brute_force_and_is_written(tmp_path, celeba_subset, package_copy, masks_available):
    images_dir, identities_file = celeba_subset
    images = read_labelled_images(images_dir, identities_file)
    assert len(images) == 20 and len({im.identity for im in images}) == 4
    cache = tmp_path / "cache"
    result = calibrate(package_copy, images, images_dir, targets=TARGETS, scenarios=("uu", "um"),
                       mask_family="template", cache_dir=cache, progress=False, split="calib")
    info = result["calibration"]
    uu, um = info["scenarios"]["uu"], info["scenarios"]["um"]

    # Independent check: all pair scores from the same (cached) embeddings, thresholds by brute force. Images
    # the deployed detector misses (unmasked, or afresh on the masked copy) are left out of calibration.
    extractor = EmbeddingExtractor([package_copy], mask_family="template", cache_dir=cache, progress=False)
    listed = [(im.path, im.key) for im in images]
    plain = extractor.extract(listed, masked=False)
    masked = extractor.extract(listed, masked=True)
    assert plain.cache_hits == masked.cache_hits == 20
    plain_ok = np.isfinite(plain.embeddings[0]).all(axis=1)
    both_ok = plain_ok & np.isfinite(masked.embeddings[0]).all(axis=1)
    assert uu["n_images"] == plain_ok.sum() >= 16 and um["n_images"] == both_ok.sum() >= 16
    failed = sum(info["image_failures"].values())
    # An unmasked miss fails both variants; a miss afresh on the masked copy fails the masked variant only.
    assert failed == 2 * (~plain_ok).sum() + (plain_ok & ~both_ok).sum()

    def unit(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    identities = np.array([im.identity for im in images])
    a_uu, ids_uu = unit(plain.embeddings[0][plain_ok]), identities[plain_ok]
    # Each scenario scored as its route scores it: U-U as the unmasked route, U-M as the masked one (the
    # package's metric and score-normalisation cohort, where it has them).
    a_um, b_um, ids_um = (unit(plain.embeddings[0][both_ok]), unit(masked.embeddings[0][both_ok]),
                          identities[both_ok])
    uu_scores = package_copy.route_scoring("unmasked").scores(a_uu, a_uu)
    um_scores = package_copy.route_scoring("masked").scores(a_um, b_um)
    uu_impostors = uu_scores[np.triu(ids_uu[:, None] != ids_uu[None, :], k=1)]
    um_impostors = um_scores[ids_um[:, None] != ids_um[None, :]]
    assert uu["n_impostor"] == uu_impostors.size and um["n_impostor"] == um_impostors.size
    # 100-1000 impostors: 10% supported, 1% marginal, 0.1% not supported.
    assert 100 <= uu_impostors.size < 1000 and 100 <= um_impostors.size < 1000
    assert uu["targets"]["0.1"]["support"] == metrics.SUPPORTED
    assert uu["targets"]["0.01"]["support"] == metrics.MARGINAL
    assert uu["targets"]["0.001"]["support"] == metrics.NOT_SUPPORTED and "threshold" not in uu["targets"]["0.001"]
    assert info["targets_not_supported"] == ["0.001"]
    assert set(result["thresholds"]) == {"0.1", "0.01"}
    assert info["support"] == {"0.1": metrics.SUPPORTED, "0.01": metrics.MARGINAL}
    for target in ("0.1", "0.01"):
        expected_uu = metrics.threshold_for_fmr(uu_impostors, float(target))
        expected_um = metrics.threshold_for_fmr(um_impostors, float(target))
        # float32 scores; normalised ones are z-scores of a few units
        assert uu["targets"][target]["threshold"] == pytest.approx(expected_uu, abs=1e-4)
        assert um["targets"][target]["threshold"] == pytest.approx(expected_um, abs=1e-4)
        assert result["thresholds"][target] == max(uu["targets"][target]["threshold"],
                                                   um["targets"][target]["threshold"])
        assert np.mean(uu_impostors >= result["thresholds"][target]) <= float(target) + 1e-6

    updated = write_thresholds(package_copy, result)
    from edge_mfr.models.package import load_package
    reloaded = load_package(updated.onnx_path)
    assert reloaded.fingerprint == package_copy.fingerprint
    assert reloaded.threshold_for(0.01) == pytest.approx(result["thresholds"]["0.01"])
    assert reloaded.meta["calibration"]["targets_not_supported"] == ["0.001"]


@pytest.fixture(scope="module")
def masks_available():
    pytest.importorskip("edge_mfr.masks", reason="edge_mfr.masks is not available yet")


def test_glint_folders_aligned_without_lfw_identities(tmp_path, data_dir, package_copy):
    glint = data_dir / "glint24"
    overlap = (glint / "LFW_OVERLAP.txt").read_text().split()
    images = read_labelled_images(glint, exclude_identities=overlap, max_per_identity=3)
    identities = {im.identity for im in images}
    assert len(identities) == 24 - len(overlap) and not identities & set(overlap)
    assert len(images) == 3 * len(identities)
    result = calibrate(package_copy, images, glint, targets=(0.1,), scenarios=("uu",), aligned=True,
                       progress=False, cache_dir=None)
    uu = result["calibration"]["scenarios"]["uu"]
    assert uu["n_images"] == len(images) and uu["n_failed_images"] == 0
    k = len(identities)
    assert uu["n_impostor"] == len(images) * (len(images) - 1) // 2 - k * 3
    assert "0.1" in result["thresholds"]


def test_training_overlap_is_flagged(model_package, data_dir):
    trained_on_glint = replace(model_package, meta={**model_package.meta, "recipe": {"data": ["glint24", "celeba299"]}})
    assert training_overlap_warnings(trained_on_glint, data_dir / "glint24")
    assert training_overlap_warnings(trained_on_glint, data_dir / "celeba299" / "images")
    assert not training_overlap_warnings(trained_on_glint, data_dir / "rmfd_sample")
    # A recipe with the structured train_data list is checked by check_not_trained_on instead.
    structured = replace(model_package, meta={**model_package.meta, "recipe": {
        "data": ["glint24"], "train_data": [{"name": "glint24", "split": None}]}})
    assert not training_overlap_warnings(structured, data_dir / "glint24")


def test_split_column_selects_the_calibration_identities(data_dir):
    celeba = data_dir / "celeba_test"
    calib = read_labelled_images(celeba / "images", celeba / "identities.txt", split="calib")
    assert len(calib) == 5351 and len({im.identity for im in calib}) == 300
    train = read_labelled_images(celeba / "images", celeba / "identities.txt", split="train", max_per_identity=1)
    assert not {im.identity for im in train} & {im.identity for im in calib}  # identity-disjoint splits
    with pytest.raises(InputError, match="no image of split 'test'.*splits there: calib, train"):
        read_labelled_images(celeba / "images", celeba / "identities.txt", split="test")
    with pytest.raises(InputError, match="needs an identities file"):
        read_labelled_images(data_dir / "glint24", split="calib")


@pytest.fixture()
def tiny_trained_package(tmp_path):
    """A real (if trivial) embedding graph packaged with a training recipe: pooled colour -> fixed linear map,
    trained (says its recipe) on all of glint24 and on celeba_test's train split."""
    import onnx
    from onnx import TensorProto, helper

    from edge_mfr.models.package import save_package
    weight = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "weight"], ["embedding"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor("weight", TensorProto.FLOAT, weight.shape, weight.flatten())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "tiny.onnx")
    meta = {"name": "tiny_student", "architecture": "tiny", "embedding_size": 16,
            "input": {"size": [112, 112], "channel_order": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3},
            "alignment": {"template": [[38.29, 51.7], [73.53, 51.5], [56.03, 71.74], [41.55, 92.37], [70.73, 92.2]]},
            "recipe": {"train_data": [{"name": "glint24", "split": None}, {"name": "celeba_test", "split": "train"}]}}
    return save_package(tmp_path / "tiny.onnx", meta)


@pytest.mark.parametrize("folder, split", [("glint24", None), ("glint24", "calib"), ("celeba_test/images", None),
                                           ("celeba_test/images", "train")])
def test_calibration_refuses_training_data(tiny_trained_package, data_dir, folder, split, capsys):
    argv = ["calibrate", "--model", str(tiny_trained_package.onnx_path), "--images", str(data_dir / folder),
            "--quiet", "--dry-run"]
    if folder.startswith("celeba_test"):
        argv += ["--identities", str(data_dir / "celeba_test" / "identities.txt")]
    if split:
        argv += ["--split", split]
    assert cli_main(argv) == 2
    error = capsys.readouterr().err
    name = folder.split("/")[0]
    assert f"refusing to calibrate model 'tiny_student'" in error and f"'{name}'" in error
    assert str(tiny_trained_package.onnx_path) in error
    from edge_mfr.models.package import load_package
    assert load_package(tiny_trained_package.onnx_path).thresholds == {}  # nothing written


def test_calibration_accepts_held_out_data(tiny_trained_package, data_dir, tmp_path):
    # celeba_test's calib split is disjoint from the train split the recipe names.
    check_not_trained_on(tiny_trained_package, data_dir / "celeba_test" / "images", "calib")
    check_not_trained_on(tiny_trained_package, data_dir / "celeba299" / "images")
    # And a full (small) run on a folder the recipe does not name writes thresholds (12 identities, to be quick).
    identities = sorted({line.split()[1] for line in (data_dir / "celeba299" / "identities.txt").read_text().splitlines()})
    (tmp_path / "rest.txt").write_text("\n".join(identities[12:]) + "\n")
    assert cli_main(["calibrate", "--model", str(tiny_trained_package.onnx_path), "--images",
                     str(data_dir / "celeba299" / "images"), "--identities",
                     str(data_dir / "celeba299" / "identities.txt"), "--max-per-identity", "2",
                     "--exclude-identities", str(tmp_path / "rest.txt"),
                     "--protocol", "pairs", "--scenario", "uu", "--targets", "0.1", "--no-cache", "--quiet"]) == 0
    from edge_mfr.models.package import load_package
    assert "0.1" in load_package(tiny_trained_package.onnx_path).thresholds
