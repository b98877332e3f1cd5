"""The model package format: what loads, and the clear errors for what does not."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_mfr.errors import ModelPackageError
from edge_mfr.models.package import bundled_models, default_model, load_package, save_package


def _tiny_graph(path, input_shape, output_dim=128):
    """A real (if trivial) embedding graph: global average pool + a fixed linear layer."""
    weight = np.random.default_rng(0).standard_normal((3, output_dim)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weight"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", output_dim])],
        [helper.make_tensor("weight", TensorProto.FLOAT, weight.shape, weight.flatten())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


META = {"name": "tiny", "architecture": "tiny", "embedding_size": 128,
        "input": {"size": [112, 112], "channel_order": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3},
        "alignment": {"template": [[38.29, 51.7], [73.53, 51.5], [56.03, 71.74], [41.55, 92.37], [70.73, 92.2]]}}


def test_bundled_models_load_with_calibrated_thresholds():
    """The default is the two-network package (the teacher for unmasked faces, a masked-route network for masked
    ones), with thresholds per route; the teacher alone is bundled beside it."""
    package = default_model()
    assert package.name == "dlib_resnet_v1_masked_route" and package.has_masked_network
    assert [p.name for p in bundled_models()] == ["dlib23_student", "dlib23_student_int8", "dlib_resnet_v1",
                                                  "dlib_resnet_v1_int8", "dlib_resnet_v1_masked_route",
                                                  "dlib_resnet_v1_masked_route_int8"]
    assert default_model().masked_probe_templates == "masked"  # measured best for it (docs/results.md)
    for package in (default_model(), load_package("dlib_resnet_v1")):
        assert package.input_size == (150, 150) and package.embedding_size == 128
        assert package.threshold_for(1e-4) > package.threshold_for(1e-3)
        assert package.threshold_for(1e-4, route="masked") > package.threshold_for(1e-3, route="masked")
    assert default_model().masked_network().onnx_path.name == "dlib_resnet_v1_masked_route.masked.onnx"
    assert "trained on CelebA" in default_model().meta["licence"]  # its masked-route network's terms


def test_bundled_int8_default_is_calibrated_and_each_route_agrees_with_fp32_on_a_real_face():
    """The default's INT8 version: both graphs quantized (the first is the INT8 teacher's graph, byte for byte),
    calibrated on itself per route, and each route's embedding of a real demo face agrees with the FP32 default's."""
    import cv2

    from edge_mfr.cli.demo import DEMO_DIR
    from edge_mfr.detect import get_detector
    from edge_mfr.embed import FaceEmbedder
    from edge_mfr.models.package import file_sha256, package_fingerprint

    fp32, int8 = default_model(), load_package("dlib_resnet_v1_masked_route_int8")
    assert int8.has_masked_network and int8.masked_probe_templates == fp32.masked_probe_templates
    assert file_sha256(int8.onnx_path) == load_package("dlib_resnet_v1_int8").fingerprint
    # quantized from the FP32 default's networks; test-time flipping was switched on for both afterwards
    assert int8.test_time_flip == fp32.test_time_flip
    unflipped = {k: v for k, v in fp32.meta.items() if k != "test_time_flip"}
    assert int8.meta["recipe"]["quantization"]["source"]["fingerprint"] in (
        fp32.fingerprint, package_fingerprint(fp32.onnx_path, unflipped))
    assert int8.meta["recipe"]["quantization"]["gate"]["passed"]
    assert int8.meta["calibration"]["model_fingerprint"] == int8.fingerprint
    for route in ("unmasked", "masked"):
        assert int8.threshold_for(1e-4, route=route) > int8.threshold_for(1e-3, route=route)
    image = cv2.imread(str(sorted(DEMO_DIR.glob("*.jpg"))[0]), cv2.IMREAD_COLOR)
    landmarks = get_detector("yunet").detect_largest(image).landmarks[None]
    for route in ("unmasked", "masked"):
        a = FaceEmbedder(fp32, threads=1).embed_faces(image, landmarks, route=route)
        b = FaceEmbedder(int8, threads=1).embed_faces(image, landmarks, route=route)
        assert float(np.sum(a * b)) > 0.99, route


def test_bundled_student_is_cheaper_calibrated_and_embeds_a_real_face_like_its_int8_version():
    """The compact student: the teacher's network without three residual units, cheaper than the teacher by its
    graph's own count, with its LFW accuracy and thresholds per route recorded, CelebA's terms in its licence, and
    its INT8 version (gated, calibrated on itself) agreeing with it on a real demo face on both routes."""
    import cv2

    from edge_mfr.cli.demo import DEMO_DIR
    from edge_mfr.detect import get_detector
    from edge_mfr.embed import FaceEmbedder
    from edge_mfr.models.complexity import onnx_complexity

    student, int8, teacher = (load_package(n) for n in ("dlib23_student", "dlib23_student_int8", "dlib_resnet_v1"))
    assert student.architecture == "dlib_resnet23_metric" and student.input_size == teacher.input_size
    assert onnx_complexity(student.onnx_path).gmacs < 0.8 * onnx_complexity(teacher.onnx_path).gmacs
    assert student.meta["recipe"]["config"]["drop_units"] == [8, 9, 12]
    mix = student.meta["recipe"]["interpolation"]  # version 2: between the KD and the identity-loss fine-tunes
    assert mix["weight"] == 0.7 and [r["name"] for r in mix["from"]] == ["dlib23_sqkd", "dlib23_arc_masks"]
    assert "non-commercial" in student.meta["licence"]
    assert student.meta["accuracy"]["lfw"]["pairs"] == 6000
    # version 3 is version 2's network with a masked-face alignment refiner: its INT8 graph was quantized (and
    # gated) from that network before the refiner was added to both packages
    from edge_mfr.models.package import package_fingerprint

    network_alone = {k: v for k, v in student.meta.items() if k != "masked_alignment_refiner"}
    assert int8.meta["recipe"]["quantization"]["source"]["fingerprint"] == package_fingerprint(student.onnx_path,
                                                                                                network_alone)
    assert int8.masked_alignment_refiner == student.masked_alignment_refiner is not None
    assert int8.meta["recipe"]["quantization"]["gate"]["passed"]
    image = cv2.imread(str(sorted(DEMO_DIR.glob("*.jpg"))[0]), cv2.IMREAD_COLOR)
    landmarks = get_detector("yunet").detect_largest(image).landmarks[None]
    for package in (student, int8):
        assert package.meta["calibration"]["model_fingerprint"] == package.fingerprint
        for route in ("unmasked", "masked"):
            assert package.threshold_for(1e-4, route=route) > package.threshold_for(1e-3, route=route)
    for route in ("unmasked", "masked"):
        a = FaceEmbedder(student, threads=1).embed_faces(image, landmarks, route=route)
        b = FaceEmbedder(int8, threads=1).embed_faces(image, landmarks, route=route)
        assert float(np.sum(a * b)) > 0.99, route


def test_bundled_int8_teacher_is_calibrated_and_agrees_with_fp32_on_a_real_face():
    """The shipped INT8 teacher: a bundled package, derived from the FP32 teacher, with its own thresholds for
    both probe routes, and the same embedding as the FP32 teacher on a real demo photo."""
    import cv2

    from edge_mfr.cli.demo import DEMO_DIR
    from edge_mfr.detect import get_detector
    from edge_mfr.embed import FaceEmbedder

    teacher = load_package("dlib_resnet_v1")
    int8 = load_package("dlib_resnet_v1_int8")  # bundled name; checks sidecar, fingerprint and graph shapes
    assert teacher.name == "dlib_resnet_v1" and int8.name in {p.name for p in bundled_models()}
    assert int8.fingerprint != teacher.fingerprint and int8.input_size == teacher.input_size
    assert int8.meta["recipe"]["quantization"]["source"]["fingerprint"] == teacher.fingerprint
    assert int8.meta["recipe"]["quantization"]["gate"]["passed"]
    licence = int8.meta["licence"]  # the network's terms, where the graph came from, what its scoring is from
    assert licence.startswith(teacher.meta["licence"].split(";")[0]) and "derived from package dlib_resnet_v1" in licence
    for package in (teacher, int8):  # scoring fitted on CelebA-derived data carries CelebA's terms
        if package.meta.get("scoring"):
            assert "non-commercial" in package.meta["licence"]
    assert int8.meta["calibration"]["model_fingerprint"] == int8.fingerprint  # calibrated on itself, not inherited
    for aggregation in ("max", "mean"):
        for route in ("unmasked", "masked", "all"):
            strict, default, loose = (int8.threshold_for(fmr, aggregation, route) for fmr in (1e-5, 1e-4, 1e-3))
            assert np.isfinite(strict) and loose < default < strict  # normalised scores: not bounded by 1
    assert int8.threshold_for(1e-4) == int8.threshold_for(1e-4, "max", "all")
    assert int8.threshold_for(1e-4, "max", "all") >= int8.threshold_for(1e-4, "max", "unmasked")

    photo = cv2.imread(str(DEMO_DIR / "person_a_1.jpg"))
    face = get_detector().detect_largest(photo)
    fp32_embedding = FaceEmbedder(teacher, threads=1).embed_faces(photo, face.landmarks[None])
    int8_embedding = FaceEmbedder(int8, threads=1).embed_faces(photo, face.landmarks[None])
    cosine = float(np.sum(fp32_embedding * int8_embedding))
    assert cosine > 0.99, f"INT8 embedding of a real face disagrees with FP32: cosine {cosine:.5f}"


def test_save_and_load_round_trip(tmp_path):
    _tiny_graph(tmp_path / "tiny.onnx", ["N", 3, 112, 112])
    saved = save_package(tmp_path / "tiny.onnx", META)
    loaded = load_package(tmp_path)  # a directory holding one pair
    assert loaded.fingerprint == saved.fingerprint and len(loaded.fingerprint) == 64
    assert load_package(tmp_path / "tiny.json").meta == loaded.meta


def test_graph_with_wrong_input_shape_is_refused(tmp_path):
    _tiny_graph(tmp_path / "tiny.onnx", ["N", 3, 96, 96])
    with pytest.raises(ModelPackageError, match=r"input shape .* does not match the sidecar's \(N, 3, 112, 112\)"):
        save_package(tmp_path / "tiny.onnx", META)


def test_sidecar_that_does_not_match_its_graph_is_refused(package_copy, tmp_path):
    _tiny_graph(tmp_path / "other.onnx", ["N", 3, 150, 150])
    shutil.copyfile(tmp_path / "other.onnx", package_copy.onnx_path)
    with pytest.raises(ModelPackageError, match="sidecar does not match its graph"):
        load_package(package_copy.onnx_path)


def test_missing_or_malformed_sidecar(package_copy):
    sidecar = package_copy.sidecar_path
    meta = json.loads(sidecar.read_text())
    sidecar.write_text("{not json")
    with pytest.raises(ModelPackageError, match="not valid JSON"):
        load_package(package_copy.onnx_path)
    sidecar.write_text(json.dumps({k: v for k, v in meta.items() if k != "alignment"}))
    with pytest.raises(ModelPackageError, match="lacks alignment"):
        load_package(package_copy.onnx_path)
    for matching in ({"masked_probe_templates": "clean"}, "masked"):
        sidecar.write_text(json.dumps({**meta, "matching": matching}))
        with pytest.raises(ModelPackageError, match="masked_probe_templates is 'all' or 'masked'"):
            load_package(package_copy.onnx_path)
    sidecar.unlink()
    with pytest.raises(ModelPackageError, match="sidecar not found"):
        load_package(package_copy.onnx_path)


def test_corrupt_graph_is_refused(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelPackageError, match="not a loadable ONNX graph"):
        save_package(tmp_path / "bad.onnx", META)


def test_threshold_for_an_uncalibrated_fmr_names_what_exists(package_copy):
    with pytest.raises(ModelPackageError, match="no calibrated threshold for FMR 0.05"):
        package_copy.threshold_for(0.05)


@pytest.fixture()
def two_network_package(tmp_path):
    """The bundled teacher with the bundled INT8 teacher as its masked-route network: two real graphs that share
    the input and the embedding space, as a fine-tuned masked-route network does."""
    from edge_mfr.models.masked_network import with_masked_network

    return with_masked_network(load_package("dlib_resnet_v1"), load_package("dlib_resnet_v1_int8"),
                               tmp_path / "pair" / "two.onnx", "two")


def test_a_two_network_package_embeds_the_masked_route_with_its_second_graph(two_network_package, tmp_path):
    from edge_mfr.detect import get_detector
    from edge_mfr.embed import FaceEmbedder
    from edge_mfr.io import load_image

    two = two_network_package
    assert sorted(p.name for p in two.onnx_path.parent.iterdir()) == ["two.json", "two.masked.onnx", "two.onnx"]
    assert load_package(two.onnx_path.parent).name == "two"  # the folder holds one package, not two
    teacher, int8 = load_package("dlib_resnet_v1"), load_package("dlib_resnet_v1_int8")
    assert two.fingerprint not in (teacher.fingerprint, int8.fingerprint)  # a gallery binds to both graphs
    assert two.meta["masked_network"]["graph_sha256"] == int8.fingerprint
    assert not two.thresholds and "masked" not in (two.meta.get("scoring") or {})  # fitted for the other network
    assert "accuracy" not in two.meta  # the teacher's measured accuracy is not the new package's
    assert "masked route, network dlib_resnet_v1_int8" in two.meta["licence"]  # both networks' terms
    assert two.masked_probe_templates == "masked" and teacher.masked_probe_templates == "all"

    image = load_image(Path(__file__).resolve().parents[1] / "edge_mfr" / "demo_data" / "person_a_1.jpg")
    landmarks = get_detector("yunet").detect_largest(image).landmarks[None]
    embedder = FaceEmbedder(two, threads=1)
    assert np.allclose(embedder.embed_faces(image, landmarks), FaceEmbedder(teacher, threads=1).embed_faces(image, landmarks))
    masked = embedder.embed_faces(image, landmarks, route="masked")
    assert np.allclose(masked, FaceEmbedder(int8, threads=1).embed_faces(image, landmarks))
    assert not np.allclose(masked, embedder.embed_faces(image, landmarks), atol=1e-3)


def test_a_derived_copy_of_a_two_network_package_keeps_both_graphs(two_network_package, tmp_path):
    from edge_mfr.models.route_metric import with_masked_metric

    copy = with_masked_metric(two_network_package, None, tmp_path / "copy" / "copy.onnx", "copy", {})
    assert copy.masked_network().onnx_path.is_file() and copy.fingerprint == two_network_package.fingerprint


def test_a_two_network_package_takes_a_masked_route_map_once(two_network_package, tmp_path):
    """The map that aligns the masked-route network's embeddings with the first network's clean templates
    (`route-map` on a two-network package) is part of both the package and its fingerprint; a second map on
    top of it is refused before any pair is drawn."""
    from edge_mfr.models.route_map import with_masked_route
    from edge_mfr.train.__main__ import main as train_cli

    d = two_network_package.embedding_size
    mapped = with_masked_route(two_network_package, np.eye(d, dtype=np.float32), np.full(d, 0.01, np.float32),
                               tmp_path / "mapped" / "mapped.onnx", "mapped", {})
    assert mapped.has_masked_network and mapped.route_map("masked") is not None
    assert mapped.fingerprint != two_network_package.fingerprint
    assert train_cli(["route-map", "--model", str(mapped.onnx_path), "--out", str(tmp_path / "again.onnx"),
                      "--name", "again", "--data", str(tmp_path / "no_data")]) == 2


def test_a_two_network_package_with_a_missing_or_swapped_second_graph_is_refused(two_network_package):
    from edge_mfr.models.package import masked_network_path

    second = masked_network_path(two_network_package.onnx_path)
    shutil.copyfile(two_network_package.onnx_path, second)  # the first graph put in the second's place
    with pytest.raises(ModelPackageError, match="does not match its graphs"):
        load_package(two_network_package.onnx_path)
    second.unlink()
    with pytest.raises(ModelPackageError, match="two.masked.onnx is not beside it"):
        load_package(two_network_package.onnx_path)
    meta = json.loads(two_network_package.sidecar_path.read_text())
    del meta["masked_network"]["graph_sha256"]
    two_network_package.sidecar_path.write_text(json.dumps(meta))
    with pytest.raises(ModelPackageError, match="with its graph_sha256"):
        load_package(two_network_package.onnx_path)


def test_a_masked_route_network_must_share_the_input_and_embedding(two_network_package, tmp_path):
    from edge_mfr.errors import InputError
    from edge_mfr.models.masked_network import with_masked_network

    _tiny_graph(tmp_path / "tiny.onnx", ["N", 3, 112, 112])
    tiny = save_package(tmp_path / "tiny.onnx", META)
    with pytest.raises(InputError, match="differ in input size, mean, std, alignment template"):
        with_masked_network(load_package("dlib_resnet_v1"), tiny, tmp_path / "bad.onnx", "bad")
    with pytest.raises(InputError, match="already has a masked-route network"):
        with_masked_network(two_network_package, tiny, tmp_path / "again.onnx", "again")
    from edge_mfr.train.__main__ import main as train_cli

    assert train_cli(["masked-network", "--network", str(tiny.onnx_path), "--out", str(tmp_path / "cli.onnx"),
                      "--name", "cli"]) == 2
    shutil.copyfile(tmp_path / "tiny.onnx", tmp_path / "x.masked.onnx")
    with pytest.raises(ModelPackageError, match="kept for the masked-route graph"):
        save_package(tmp_path / "x.masked.onnx", META)


def test_test_time_flip_averages_each_face_with_its_mirror_and_rebinds_the_package(package_copy, capsys):
    from edge_mfr.cli import main as cli
    from edge_mfr.detect import get_detector
    from edge_mfr.embed import FaceEmbedder
    from edge_mfr.io import load_image
    from edge_mfr.runtime.base import l2_normalise

    unflipped = package_copy.with_test_time_flip(False)
    plain = FaceEmbedder(unflipped, threads=1)
    assert not unflipped.test_time_flip
    assert cli(["models", "test-time-flip", str(package_copy.onnx_path), "on"]) == 0
    flipped = load_package(package_copy.onnx_path)  # the sidecar on disk, its fingerprint checked against it
    assert flipped.test_time_flip and flipped.fingerprint != unflipped.fingerprint  # galleries rebind
    assert not flipped.thresholds and "thresholds_by_aggregation" not in flipped.meta  # measured without it
    assert "accuracy" not in flipped.meta
    with pytest.raises(ModelPackageError, match="run `edge-mfr calibrate`"):
        flipped.threshold_for(1e-4)

    image = load_image(Path(__file__).resolve().parents[1] / "edge_mfr" / "demo_data" / "person_a_1.jpg")
    batch = plain.preprocess(image, get_detector("yunet").detect_largest(image).landmarks[None])
    mirror = np.ascontiguousarray(batch[..., ::-1])
    embedder = FaceEmbedder(flipped, threads=1)
    expected = l2_normalise(plain.embed_batch(batch) + plain.embed_batch(mirror))
    assert np.allclose(embedder.embed_batch(batch), expected, atol=1e-5)  # unmasked route: no map to apply after
    for route in ("unmasked", "masked"):
        assert np.allclose(embedder.embed_batch(batch, route), embedder.embed_batch(mirror, route), atol=1e-5)
        assert float(embedder.embed_batch(batch, route)[0] @ plain.embed_batch(batch, route)[0]) > 0.9

    capsys.readouterr()
    assert cli(["models", "list", "--dir", str(package_copy.onnx_path.parent), "--json"]) == 0
    rows = {(r["origin"], r["name"]): r for r in json.loads(capsys.readouterr().out)["packages"]}
    listed, teacher = rows[("dir", flipped.name)], rows[("bundled", "dlib_resnet_v1")]
    assert listed["test_time_flip"] and listed["gmacs"] == pytest.approx(2 * teacher["gmacs"])  # two runs per face

    assert flipped.with_test_time_flip(False).fingerprint == unflipped.fingerprint
    assert cli(["models", "test-time-flip", "no_such_package", "on"]) == 2
