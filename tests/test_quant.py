"""INT8 post-training quantization of the real bundled teacher, calibrated on real face crops."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_mfr.align import ARCFACE_TEMPLATE_112, align_faces
from edge_mfr.errors import InputError, ModelPackageError
from edge_mfr.masks import apply_mask
from edge_mfr.models.package import load_package
from edge_mfr.quant.manifest import CalibrationEntry, file_sha256, load_manifest, write_manifest
from edge_mfr.quant.ptq import quantize_package
from edge_mfr.runtime.ort import OrtEmbedder

REPO = Path(__file__).resolve().parents[1]
CALIBRATION_FACES = 12  # the first 12 faces of the shipped manifest: enough for a test-sized calibration
# Lax bounds for the passing run: the test is that the gate measures and records, not the model's quality.
LAX_GATE = ["--gate-faces", "6", "--lfw-pairs", "20", "--min-mean-cosine", "0.9", "--min-cosine", "0.8",
            "--max-eer-increase", "100", "--max-accuracy-drop", "100", "--threads", "2"]


@pytest.fixture(scope="module")
def teacher():
    try:
        return load_package("dlib_resnet_v1")  # the bundled teacher: one network (the default has two)
    except ModelPackageError as exc:
        pytest.skip(f"no bundled model package: {exc}")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from edge_mfr.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def glint_entry(data_dir: Path, identity: str, index: int = 0) -> CalibrationEntry:
    """A pre-aligned 112x112 glint24 crop as a manifest entry."""
    file = sorted((data_dir / "glint24" / identity).glob("*.jpg"))[index]
    return CalibrationEntry(path=file.relative_to(data_dir).as_posix(), sha256=file_sha256(file),
                            identity=f"glint24/{identity}", landmarks=ARCFACE_TEMPLATE_112,
                            landmarks_from="arcface_template_112", mask_type=None, mask_seed=None)


def held_out_faces(data_dir: Path, package) -> np.ndarray:
    """Crops of all 24 glint24 identities (none is in the shipped manifest), each plain and with a mask."""
    faces = []
    for i, folder in enumerate(sorted(p for p in (data_dir / "glint24").iterdir() if p.is_dir())):
        image = cv2.imread(str(sorted(folder.glob("*.jpg"))[10]), cv2.IMREAD_COLOR)
        for variant in (image, apply_mask(image, ARCFACE_TEMPLATE_112, "n95", i)):
            faces.append(align_faces(variant, ARCFACE_TEMPLATE_112, template=package.template, size=package.input_size,
                                     channel_order=package.channel_order, mean=package.mean, std=package.std)[0])
    return np.stack(faces)


@pytest.fixture(scope="module")
def quantized(teacher, data_dir, lfw_dir, tmp_path_factory):
    """The teacher quantized from the shipped manifest through the CLI, with a (lax) accuracy gate."""
    from edge_mfr.cli import main

    out = tmp_path_factory.mktemp("quant") / "out"
    code = main(["quantize", str(teacher.onnx_path), "-o", str(out), "--data-root", str(data_dir),
                 "--limit", str(CALIBRATION_FACES), *LAX_GATE])
    assert code == 0
    return load_manifest(), load_package(out / "dlib_resnet_v1_int8.onnx")


def test_int8_package_loads_runs_and_agrees_with_fp32(teacher, quantized, data_dir):
    manifest, package = quantized
    reloaded = load_package(package.onnx_path)  # checks sidecar, fingerprint and graph shapes again
    assert reloaded.name == "dlib_resnet_v1_int8"
    assert reloaded.fingerprint != teacher.fingerprint
    assert reloaded.input_size == teacher.input_size and reloaded.embedding_size == teacher.embedding_size
    # fp32 thresholds do not carry over, pair-level or per aggregation and route: the package must be recalibrated
    assert "thresholds_by_aggregation" in teacher.meta and "thresholds_by_aggregation" not in reloaded.meta
    assert reloaded.thresholds == {}
    recipe = reloaded.meta["recipe"]["quantization"]
    assert recipe["calibration_manifest"]["sha256"] == manifest.sha256
    assert recipe["calibration_manifest"]["faces_used"] == CALIBRATION_FACES
    assert recipe["calibration_manifest"]["masked_used"] == sum(
        e.mask_type is not None for e in manifest.entries[:CALIBRATION_FACES])
    assert recipe["source"]["fingerprint"] == teacher.fingerprint
    assert reloaded.meta["licence"].startswith(teacher.meta["licence"])  # the source's terms, and its origin
    assert f"derived from package {teacher.name} ({teacher.fingerprint[:12]})" in reloaded.meta["licence"]
    assert (recipe["format"], recipe["per_channel"], recipe["reduce_range"]) == ("QDQ", True, True)

    faces = held_out_faces(data_dir, teacher)
    fp32 = OrtEmbedder(teacher, threads=2).embed(faces)
    int8 = OrtEmbedder(reloaded, threads=2).embed(faces)
    cosine = np.sum(fp32 * int8, axis=1)
    assert cosine.min() > 0.9, f"int8 disagrees with fp32 on held-out real faces: min cosine {cosine.min():.4f}"

    with pytest.raises(InputError, match="already quantized"):
        quantize_package(reloaded, package.onnx_path.parent / "again", manifest, data_root=data_dir)


def test_gate_measurements_are_recorded_in_the_int8_metadata(quantized):
    _, package = quantized
    gate = package.meta["recipe"]["quantization"]["gate"]
    assert gate["passed"] and gate["failures"] == []
    assert gate["bounds"] == {"min_mean_cosine": 0.9, "min_cosine": 0.8, "max_eer_increase_points": 100.0,
                              "max_accuracy_drop_points": 100.0}
    held_out = gate["held_out"]
    assert held_out["faces"] == 6 and held_out["masked_faces"] == 3
    assert -1.0 <= held_out["min_cosine"] <= held_out["mean_cosine"] <= 1.0
    lfw = gate["lfw"]
    assert lfw["n_pairs"] == 20 and lfw["subset"]
    for scenario in ("uu", "um"):
        assert lfw["change"][scenario]["eer_points"] == pytest.approx(
            100 * (lfw["int8"][scenario]["eer"] - lfw["fp32"][scenario]["eer"]))
    # `edge-mfr models list` reads the int8 model's own LFW numbers from here
    accuracy = package.meta["accuracy"]["lfw"]
    assert accuracy["pairs"] == 20 and accuracy["um"]["eer"] == lfw["int8"]["um"]["eer"]


def test_models_list_shows_size_complexity_precision_and_recorded_accuracy(quantized, capsys):
    _, package = quantized
    code, out, _ = run_cli(["models", "list", "--json", "--dir", str(package.onnx_path.parent)], capsys)
    assert code == 0
    # the bundled INT8 teacher has the same name: take the one from --dir
    rows = {(row["origin"], row["name"]): row for row in json.loads(out)["packages"]}
    int8, fp32 = rows["dir", "dlib_resnet_v1_int8"], rows["bundled", "dlib_resnet_v1"]
    assert int8["precision"] == "int8 QDQ (ort)" and fp32["precision"] == "fp32"
    assert int8["size_bytes"] == package.onnx_path.stat().st_size < fp32["size_bytes"] / 3
    assert int8["params"] == fp32["params"] > 0 and int8["gmacs"] == fp32["gmacs"] > 0
    assert int8["lfw"]["pairs"] == 20 and int8["lfw"]["um"] == package.meta["accuracy"]["lfw"]["um"]


def test_a_two_network_package_is_quantized_graph_by_graph(teacher, data_dir, tmp_path, capsys):
    """The bundled default (the teacher + a masked-route network): both graphs become INT8 in one package; the
    masked-route graph is calibrated on the manifest's masked faces only, the held-out gate embeds masked faces
    through it, and the route map survives (it acts on embeddings)."""
    from edge_mfr.embed import FaceEmbedder

    source = load_package("dlib_resnet_v1_masked_route")
    assert source.has_masked_network
    out = tmp_path / "out"
    code, out_text, err = run_cli(["quantize", str(source.onnx_path), "-o", str(out), "--data-root", str(data_dir),
                                   "--limit", "16", "--gate-faces", "4", "--lfw-pairs", "0", "--min-mean-cosine",
                                   "0.9", "--threads", "2"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [f"{source.name}_int8.json", f"{source.name}_int8.masked.onnx",
                                                      f"{source.name}_int8.onnx"]
    int8 = load_package(out / f"{source.name}_int8.onnx")  # checks both graphs against the sidecar
    assert int8.has_masked_network and int8.fingerprint != source.fingerprint and int8.thresholds == {}
    assert int8.meta["masked_network"]["graph_sha256"] != source.meta["masked_network"]["graph_sha256"]
    assert np.array_equal(int8.route_map("masked")[0], source.route_map("masked")[0])
    recipe = int8.meta["recipe"]["quantization"]
    masked_faces = sum(e.mask_type is not None for e in load_manifest().entries[:16])
    assert recipe["calibration_manifest"]["faces_used"] == 16
    assert recipe["masked_network"]["agreement_on_calibration_faces"]["faces"] == masked_faces
    assert recipe["gate"]["held_out"]["masked_faces"] == 2 and recipe["gate"]["passed"]
    assert "these INT8 graphs are derived" in int8.meta["licence"]

    # Each route of the INT8 package agrees with the same route of the FP32 one, and the routes differ.
    faces = held_out_faces(data_dir, source)[1::2]  # the masked variants
    fp32, quantized = FaceEmbedder(source, threads=2), FaceEmbedder(int8, threads=2)
    masked_cosine = np.sum(fp32.embed_batch(faces, "masked") * quantized.embed_batch(faces, "masked"), axis=1)
    assert masked_cosine.min() > 0.9, f"masked route: min cosine {masked_cosine.min():.4f}"
    assert not np.allclose(quantized.embed_batch(faces, "masked"), quantized.embed_batch(faces, "unmasked"), atol=1e-2)


def test_a_two_network_package_needs_masked_calibration_faces(data_dir, tmp_path, capsys):
    source = load_package("dlib_resnet_v1_masked_route")
    code, _, err = run_cli(["quantize", str(source.onnx_path), "-o", str(tmp_path / "out"), "--data-root",
                            str(data_dir), "--limit", "8", "--no-gate"], capsys)
    assert code == 2 and "4 of the 8 faces used are masked, fewer than 8" in err
    assert not (tmp_path / "out").exists()


def test_gate_refuses_an_int8_model_beyond_a_bound_with_exit_2(teacher, data_dir, tmp_path, capsys):
    """No INT8 graph matches FP32 exactly, so a mean cosine of 1.0 cannot be met: exit 2, nothing written,
    and an earlier package in the output folder is left alone."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "dlib_resnet_v1_int8.onnx"
    earlier.write_bytes(b"an earlier package")
    code, out_text, err = run_cli(["quantize", str(teacher.onnx_path), "-o", str(out), "--data-root", str(data_dir),
                                   "--limit", str(CALIBRATION_FACES), "--gate-faces", "4", "--lfw-pairs", "0",
                                   "--min-mean-cosine", "1.0"], capsys)
    assert code == 2
    assert "fails the accuracy gate" in err and "--min-mean-cosine 1.0" in err
    assert "held-out faces (4, 2 masked)" in out_text  # the measured numbers are shown
    assert earlier.read_bytes() == b"an earlier package" and sorted(p.name for p in out.iterdir()) == [earlier.name]


def test_calibration_overlapping_test_identities_is_refused(teacher, data_dir, tmp_path, capsys):
    """An LFW identity (glint24/Tom_Hanks is in LFW) or a celeba_test calib identity in the calibration set."""
    calib_line = next(line.split() for line in (data_dir / "celeba_test" / "identities.txt").read_text().splitlines()
                      if line.endswith(" calib"))
    calib_file = data_dir / "celeba_test" / "images" / calib_line[0]
    calib_entry = CalibrationEntry(path=f"celeba_test/images/{calib_line[0]}", sha256=file_sha256(calib_file),
                                   identity=f"celeba_test/{calib_line[1]}", landmarks=ARCFACE_TEMPLATE_112,
                                   landmarks_from="mtcnn", mask_type=None, mask_seed=None)
    cases = {"lfw": (glint_entry(data_dir, "Tom_Hanks"), "glint24/Tom_Hanks is an LFW identity"),
             "calib": (calib_entry, f"celeba_test/{calib_line[1]} is a celeba_test calib identity")}
    for name, (entry, reason) in cases.items():
        manifest = write_manifest(tmp_path / f"{name}.json", [entry], {"tool": "tests/test_quant.py"})
        with pytest.raises(InputError, match="overlaps the test identities"):
            manifest.check_identities(data_dir)
        code, _, err = run_cli(["quantize", str(teacher.onnx_path), "-o", str(tmp_path / name), "--data-root",
                                str(data_dir), "--manifest", str(manifest.path), "--no-gate"], capsys)
        assert code == 2 and reason in err, err
        assert not (tmp_path / name).exists()


def test_quantization_without_its_calibration_data_is_refused(teacher, data_dir, tmp_path, capsys):
    base = ["quantize", str(teacher.onnx_path), "-o", str(tmp_path / "out"), "--no-gate"]
    code, _, err = run_cli([*base, "--data-root", str(tmp_path / "absent")], capsys)
    assert code == 2 and "calibration data root" in err and "does not exist" in err
    code, _, err = run_cli([*base, "--manifest", str(tmp_path / "none.json")], capsys)
    assert code == 2 and "none.json not found" in err
    empty_root = tmp_path / "empty_root"  # the folder exists, its images do not
    empty_root.mkdir()
    code, _, err = run_cli([*base, "--data-root", str(empty_root)], capsys)
    assert code == 2 and "256 missing" in err
    assert not (tmp_path / "out").exists()


def test_prealigned_crops_that_do_not_fit_the_input_size_are_refused(teacher, data_dir, tmp_path, capsys):
    """112x112 ArcFace crops cannot calibrate the 150x150 teacher without resampling them."""
    assert teacher.input_size != (112, 112)
    manifest = write_manifest(tmp_path / "glint.json", [glint_entry(data_dir, "Barack_Obama", i) for i in range(2)],
                              {"tool": "tests/test_quant.py"})
    with pytest.raises(InputError, match="takes 150x150 input"):
        manifest.check_geometry(teacher)
    code, _, err = run_cli(["quantize", str(teacher.onnx_path), "-o", str(tmp_path / "out"), "--data-root",
                            str(data_dir), "--manifest", str(manifest.path), "--no-gate"], capsys)
    assert code == 2 and "pre-aligned 112x112 ArcFace crops" in err and "takes 150x150 input" in err


def test_nncf_path_quantizes_a_student_graph_onnxruntime_can_run(data_dir, tmp_path):
    """NNCF on a MobileFaceNet export (decomposed PReLU, depthwise convs): its int8 graph must run in ONNX
    Runtime. The student is untrained, so only the graph is under test, not its accuracy."""
    pytest.importorskip("nncf", reason="the NNCF path needs nncf (pip install edge-mfr[train])")
    torch = pytest.importorskip("torch", reason="exporting a student needs torch")
    from edge_mfr.models.export import export_student
    from edge_mfr.models.mobilefacenet import build_student

    torch.manual_seed(0)
    student = export_student(build_student("mfn_s"), tmp_path / "mfn_s_untrained.onnx", verbose=False)
    load_manifest().check_geometry(student)  # photos with landmarks fit any input size
    package = quantize_package(student, tmp_path / "out", data_root=data_dir, method="nncf",
                               limit=CALIBRATION_FACES, min_calibration_cosine=0.0)
    assert package.name == "mfn_s_untrained_int8_nncf"
    assert package.meta["recipe"]["quantization"]["activations"] == "per-tensor"
    embeddings = OrtEmbedder(load_package(package.onnx_path), threads=2).embed(held_out_faces(data_dir, student)[:4])
    assert embeddings.shape == (4, 128) and np.all(np.isfinite(embeddings))


def test_manifest_check_names_missing_and_modified_files(data_dir, tmp_path):
    root = tmp_path / "data"
    source = data_dir / "glint24" / "Barack_Obama"
    copied = []
    for file in sorted(source.glob("*.jpg"))[:3]:
        target = root / "glint24" / source.name / file.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        copied.append(target)
    entries = [CalibrationEntry(path=f.relative_to(root).as_posix(), sha256=file_sha256(f),
                                identity=f"glint24/{source.name}", landmarks=ARCFACE_TEMPLATE_112,
                                landmarks_from="arcface_template_112", mask_type=None, mask_seed=None) for f in copied]
    manifest = write_manifest(tmp_path / "manifest.json", entries, {})
    assert manifest.check_files(root) == root

    copied[0].unlink()
    copied[1].write_bytes(copied[1].read_bytes() + b"\0")
    with pytest.raises(InputError) as error:
        load_manifest(tmp_path / "manifest.json").check_files(root)
    message = str(error.value)
    assert f"1 missing: {entries[0].path}" in message
    assert f"1 modified (sha256 differs from the manifest): {entries[1].path}" in message
    assert entries[2].path not in message


def test_manifest_refuses_evaluation_data(tmp_path):
    entry = {"path": "lfw/images/Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "sha256": "0" * 64, "identity": "lfw/x",
             "landmarks": ARCFACE_TEMPLATE_112.tolist(), "landmarks_from": "mtcnn", "mask_type": None,
             "mask_seed": None}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"format": "edge-mfr-calibration/1", "selection": {}, "entries": [entry]}))
    with pytest.raises(InputError, match="not under the training pool"):
        load_manifest(path)


def test_shipped_manifest_is_identity_balanced_training_data(data_dir):
    manifest = load_manifest(REPO / "calibration" / "manifest.json")
    manifest.check_files(data_dir)
    manifest.check_identities(data_dir)  # no LFW name, no celeba_test calib id, celeba_test train split only
    per_identity = {}
    for entry in manifest.entries:
        per_identity[entry.identity] = per_identity.get(entry.identity, 0) + 1
    assert len(manifest.entries) == 256 and set(per_identity.values()) == {2}
    assert {entry.source for entry in manifest.entries} == {"celeba299", "celeba_test"}
    assert {entry.landmarks_from for entry in manifest.entries} == {"mtcnn"}  # fits every package geometry
    assert manifest.masked_count == 128


def test_make_manifest_selection_is_seeded(data_dir):
    spec = importlib.util.spec_from_file_location("make_manifest", REPO / "calibration" / "make_manifest.py")
    make_manifest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_manifest)
    first = make_manifest.select(data_dir, count=6, per_identity=2, masked_fraction=0.5, seed=7)
    second = make_manifest.select(data_dir, count=6, per_identity=2, masked_fraction=0.5, seed=7)
    assert [e.to_dict() for e in first] == [e.to_dict() for e in second]
    assert len({e.identity for e in first}) == 3 and sum(e.mask_type is not None for e in first) == 3
