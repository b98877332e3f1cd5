"""`edge-mfr eval` and `edge-mfr calibrate` through their argparse registration."""
import argparse
import json
import os
import shutil

import pytest

from edge_mfr.cli import eval as eval_cli
from edge_mfr.errors import InputError, ModelPackageError


def _run(argv):
    parser = argparse.ArgumentParser(prog="edge-mfr")
    eval_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A copy of EDGE_MFR_TEST_MODEL (when set) or of the bundled default model."""
    from edge_mfr.models.package import default_model, load_package
    try:
        package = load_package(os.environ["EDGE_MFR_TEST_MODEL"]) if os.environ.get("EDGE_MFR_TEST_MODEL") \
            else default_model()
    except ModelPackageError as exc:
        pytest.skip(f"no model package to run the commands with: {exc}")
    folder = tmp_path_factory.mktemp("model")
    for path in package.files:
        shutil.copyfile(path, folder / path.name)
    return folder / package.onnx_path.name


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_eval_writes_json_markdown_and_plots(tmp_path, lfw_dir, model_path, cache_dir, capsys):
    code = _run(["eval", "--pairs", str(lfw_dir / "pairs.txt"), "--images", str(lfw_dir / "images"),
                 "--model", str(model_path), "--scenario", "uu", "--limit", "20", "--bootstrap", "50",
                 "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "t.md"),
                 "--plots", str(tmp_path / "plots"), "--cache-dir", str(cache_dir), "--quiet"])
    assert code == 0
    out = capsys.readouterr()
    assert "| Model | Scenario |" in out.out and "unmasked images: 40" in out.err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n_pairs"] == 20 and len(result["results"]) == 1
    assert result["face"] == "centre" and result["detector"]  # LFW-style default: the centred subject
    assert (tmp_path / "t.md").read_text() in out.out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["det_uu.png", "score_distributions.png"]


def test_eval_face_rule_landmark_source_and_detector_options(tmp_path, lfw_dir, model_path, cache_dir):
    code = _run(["eval", "--pairs", str(lfw_dir / "pairs.txt"), "--images", str(lfw_dir / "images"),
                 "--model", str(model_path), "--scenario", "um", "--limit", "4", "--bootstrap", "0",
                 "--mask-family", "nist_c", "--face", "largest", "--landmarks", "unmasked", "--detector", "mtcnn",
                 "--json", str(tmp_path / "r.json"), "--cache-dir", str(cache_dir), "--quiet"])
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["face"], result["landmarks"], result["detector"]) == ("largest", "unmasked", "mtcnn")
    with pytest.raises(InputError, match="unknown detector 'nope'"):
        _run(["eval", "--pairs", str(lfw_dir / "pairs.txt"), "--images", str(lfw_dir / "images"),
              "--model", str(model_path), "--limit", "2", "--detector", "nope", "--no-cache", "--quiet"])


def test_eval_bad_pairs_file_is_an_input_error(tmp_path, lfw_dir, model_path):
    bad = tmp_path / "pairs.txt"
    bad.write_text("Zico 1\n")
    with pytest.raises(InputError, match="pairs.txt:1"):
        _run(["eval", "--pairs", str(bad), "--images", str(lfw_dir / "images"), "--model", str(model_path)])


def test_calibrate_dry_run_then_write(tmp_path, data_dir, model_path, cache_dir, capsys):
    glint = data_dir / "glint24"
    common = ["calibrate", "--model", str(model_path), "--images", str(glint), "--aligned",
              "--exclude-identities", str(glint / "LFW_OVERLAP.txt"), "--max-per-identity", "4",
              "--protocol", "pairs", "--scenario", "uu", "--targets", "0.1", "0.01", "1e-5",
              "--cache-dir", str(cache_dir), "--quiet"]
    from edge_mfr.models.package import load_package
    before = load_package(model_path).thresholds
    assert _run(common + ["--dry-run", "--json", str(tmp_path / "cal.json")]) == 0
    out = capsys.readouterr().out
    assert "FMR 1e-05: not supported by" in out
    assert load_package(model_path).thresholds == before
    written = json.loads((tmp_path / "cal.json").read_text())
    assert set(written["thresholds"]) == {"0.1", "0.01"}

    assert _run(common) == 0
    assert load_package(model_path).thresholds == pytest.approx(written["thresholds"])
