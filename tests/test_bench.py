"""edge-mfr bench on real photos: frame sources, consistent numbers, several pipelines, bad input, interrupts."""
import json
import shutil

import cv2
import numpy as np
import pytest

from edge_mfr import bench
from edge_mfr.cli import main
from edge_mfr.cli.demo import DEMO_DIR
from edge_mfr.errors import BackendUnavailableError, InputError
from edge_mfr.models.package import BUNDLED_DIR, default_model, load_package

QUICK = ["--iterations", "3", "--warmup", "1", "--batch-sizes", "1", "2"]


@pytest.fixture(scope="module")
def demo_frames() -> bench.Frames:
    return bench.load_frames()


def test_default_frames_are_the_bundled_photos_letterboxed(demo_frames):
    assert len(demo_frames) == len(list(DEMO_DIR.glob("*.jpg"))) and demo_frames.skipped == []
    frame = cv2.imdecode(np.frombuffer(demo_frames.encoded[0], np.uint8), cv2.IMREAD_COLOR)
    assert frame.shape == (480, 640, 3)


def test_folder_skips_unreadable_files_and_empty_folder_is_an_error(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="could be decoded"):
        bench.load_frames(tmp_path)
    (tmp_path / "face.jpg").write_bytes((DEMO_DIR / "person_a_1.jpg").read_bytes())
    frames = bench.load_frames(tmp_path)
    assert frames.labels == ["face.jpg"] and frames.skipped == [str(tmp_path / "broken.jpg")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        bench.load_frames(empty)
    with pytest.raises(InputError, match="not a folder"):
        bench.load_frames(tmp_path / "missing")


def test_video_frames(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    photo = bench.fit_frame(cv2.imread(str(DEMO_DIR / "person_a_1.jpg")), (320, 240))
    for _ in range(5):
        writer.write(photo)
    writer.release()
    frames = bench.load_frames(video=path, max_frames=3)
    assert len(frames) == 3 and frames.labels[0] == "clip.avi#0"
    with pytest.raises(InputError, match="not found"):
        bench.load_frames(video=tmp_path / "none.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"\0" * 100)
    with pytest.raises(InputError):
        bench.load_frames(video=tmp_path / "bad.mp4")


def test_numbers_are_consistent_across_pipelines_and_stages(demo_frames):
    config = bench.BenchConfig(detectors=["yunet", "mtcnn-fast"], iterations=4, warmup=1, batch_sizes=(1, 2))
    result = bench.run_bench(demo_frames, config, log=lambda message: None)
    assert [row["detector"] for row in result["pipelines"]] == ["yunet", "mtcnn-fast"]
    assert result["iterations_done"] == 4 and not result["interrupted"]
    for row in result["pipelines"]:
        assert row["attempts"] == 4 and row["outcomes"]["matched"] == 4
        samples = row["samples_ms"]
        # Every stage of an attempt is timed inside that attempt: stage times add up to at most its total.
        for k, total in enumerate(samples["end_to_end"]):
            assert sum(samples[stage][k] for stage in bench.STAGES if samples[stage]) <= total + 1e-3
        assert samples["refine"] == []  # unmasked photos: the masked-face refiner never runs
        assert np.isclose(sum(row["mean_decomposition_ms"].values()), row["end_to_end"]["mean"], rtol=1e-6)
        e2e = row["end_to_end"]
        assert e2e["p50"] <= e2e["p90"] <= e2e["p99"] <= e2e["max"]
        assert np.isclose(e2e["throughput_per_s"], 1e3 / e2e["mean"])
        assert row["end_to_end_cpu"]["n"] == 4
        assert set(row["embed_batches"]) == {1, 2} or set(row["embed_batches"]) == {"1", "2"}
        assert row["model_fingerprint"] and row["detector_fingerprint"]
    env = result["environment"]
    assert env["cpu"] and env["logical_cores"] >= 1 and env["versions"]["onnxruntime"]
    assert result["memory"]["end"]["peak_rss_mb"] > 0


def test_frame_without_a_face_is_counted_apart(tmp_path):
    cv2.imwrite(str(tmp_path / "a_blank.png"), np.full((480, 640, 3), 128, np.uint8))
    (tmp_path / "b_face.jpg").write_bytes((DEMO_DIR / "person_a_1.jpg").read_bytes())
    result = bench.run_bench(bench.load_frames(tmp_path), bench.BenchConfig(iterations=4, warmup=0, batch_sizes=()),
                             log=lambda message: None)
    row = result["pipelines"][0]
    assert row["outcomes"] == {"matched": 2, "no_face": 2, "refused": 0}
    assert row["end_to_end"]["n"] == 2 and row["end_to_end_all_attempts"]["n"] == 4
    assert row["stages"]["detect"]["n"] == 4 and row["stages"]["embed"]["n"] == 2


def test_masked_frames_take_the_masked_route_and_time_its_refiner(demo_frames, tmp_path, capsys):
    masked = bench.mask_frames(demo_frames, "template", seed=0)
    assert masked.masks == {"masks": "template", "seed": 0, "drawn_by": "yunet-onet", "frames_without_a_face": 0}
    assert all(a != b for a, b in zip(masked.encoded, demo_frames.encoded))
    assert bench.mask_frames(demo_frames, "template", seed=0).encoded == masked.encoded  # deterministic
    result = bench.run_bench(masked, bench.BenchConfig(iterations=1, warmup=0, batch_sizes=()), log=lambda m: None)
    row = result["pipelines"][0]
    assert result["frames"]["synthetic_masks"]["masks"] == "template"
    # the default package realigns masked faces: every attempt the quality gate judged masked is timed there
    assert 0 < row["stages"]["refine"]["n"] <= row["outcomes"]["matched"]
    teacher = bench.run_bench(masked, bench.BenchConfig(models=["dlib_resnet_v1"], iterations=1, warmup=0,
                                                        batch_sizes=()), log=lambda m: None)
    assert not teacher["pipelines"][0]["stages"]["refine"].get("n")  # no refiner, no stage
    assert main(["bench", "--masks", "scarf", *QUICK]) == 2
    assert "neither a mask family (template, nist) nor a mask type" in capsys.readouterr().err


def test_unknown_detector_or_backend_lists_the_available_ones(capsys):
    assert main(["bench", "--detector", "haar", *QUICK]) == 2
    err = capsys.readouterr().err
    assert "haar" in err and "yunet" in err and "mtcnn" in err
    assert main(["bench", "--backend", "onnx", *QUICK]) == 2
    assert "ort, ort-int8, tensorrt" in capsys.readouterr().err


def test_backend_not_available_here_is_skipped_with_the_reason(demo_frames, tmp_path, capsys):
    if bench.available_backends()["tensorrt"] == "available":
        pytest.skip("TensorRT is installed here")
    config = bench.BenchConfig(backends=["ort", "tensorrt"], iterations=1, warmup=0, batch_sizes=())
    messages = []
    result = bench.run_bench(demo_frames, config, log=messages.append)
    assert [row["backend"] for row in result["pipelines"]] == ["ort"]
    assert result["unavailable"][0]["backend"] == "tensorrt" and "backends available here: ort" in messages[0]
    # A model with no INT8 package beside it nor among the bundled ones: ort-int8 cannot run it.
    teacher = load_package("dlib_resnet_v1")
    for suffix in (".onnx", ".json"):
        shutil.copyfile(teacher.onnx_path.with_suffix(suffix), tmp_path / f"teacher_copy{suffix}")
    model = str(tmp_path / "teacher_copy.onnx")
    with pytest.raises(BackendUnavailableError, match="none of the requested pipelines"):
        bench.run_bench(demo_frames, bench.BenchConfig(models=[model], backends=["ort-int8"], iterations=1),
                        log=lambda m: None)
    assert main(["bench", "--model", model, "--backend", "ort-int8", *QUICK]) == 2
    assert "edge-mfr quantize" in capsys.readouterr().err


def test_bundled_int8_package_is_the_default_ort_int8_backend():
    """The default's INT8 version ships calibrated, so `edge-mfr bench --backend ort-int8` runs out of the box."""
    package = bench.resolve_package(None, "ort-int8")
    assert package.name == "dlib_resnet_v1_masked_route_int8" and package.onnx_path.parent == BUNDLED_DIR
    assert bench.available_backends()["ort-int8"] == "available"
    assert default_model().name == "dlib_resnet_v1_masked_route"  # the FP32 two-network package is the default


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", *QUICK, "--json", str(out), "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    assert "end-to-end" in table and "p99" in table and "peak RSS" in table
    result = json.loads(out.read_text())
    assert result["pipelines"][0]["end_to_end"]["n"] == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_folder_and_image_errors_exit_2(tmp_path, capsys):
    assert main(["bench", "--images", str(tmp_path), *QUICK]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["bench", "--images", str(tmp_path), "--video", "x.mp4", *QUICK]) == 2


def test_interrupted_run_writes_partial_results(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    original = bench.EdgePipeline.run

    def interrupted_on_the_fifth(self, data):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, data)

    monkeypatch.setattr(bench.EdgePipeline, "run", interrupted_on_the_fifth)
    out = tmp_path / "partial.json"
    assert main(["bench", "--iterations", "50", "--warmup", "1", "--json", str(out)]) == 2
    assert "partial" in capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["interrupted"] is True and result["iterations_done"] == 3
    assert result["pipelines"][0]["end_to_end"]["n"] == 3


def test_gallery_scaling_searches_agree():
    rows = bench.gallery_scaling([1, 100, 2000], repeats=3)
    assert [row["templates"] for row in rows] == [1, 100, 2000]
    assert rows[-1]["users"] == -(-2000 // bench.TEMPLATES_PER_USER)
    assert all(row["rank_users"]["p50_ms"] > 0 and row["vectorised"]["p50_ms"] > 0 for row in rows)
    # The vectorised exact search the curve is drawn for finds the same best user as the product's ranking.
    from edge_mfr.match import rank_users

    rng = np.random.default_rng(1)
    templates = rng.standard_normal((400, 128)).astype(np.float32)
    templates /= np.linalg.norm(templates, axis=1, keepdims=True)
    users = [f"user{i // bench.TEMPLATES_PER_USER}" for i in range(400)]
    probe = templates[123] + 0.1 * rng.standard_normal(128).astype(np.float32)
    best = np.maximum.reduceat(templates @ probe, np.arange(0, 400, bench.TEMPLATES_PER_USER)).argmax()
    assert f"user{best}" == rank_users(probe, users, templates)[0].user


def test_compare_face_recognition_interleaved_with_accuracy(demo_frames, lfw_dir):
    pytest.importorskip("face_recognition", reason="face_recognition not installed (pip install --no-deps "
                                                   "face_recognition==1.3.0)")
    config = bench.BenchConfig(iterations=2, warmup=0, batch_sizes=(), compare=["face_recognition"])
    result = bench.run_bench(demo_frames, config, log=lambda message: None)
    ours, theirs = result["pipelines"]
    assert theirs["kind"] == "face_recognition" and theirs["attempts"] == 2
    ratio = ours["speedup_vs"][theirs["name"]]
    assert np.isclose(ratio["p50"], theirs["end_to_end"]["p50"] / ours["end_to_end"]["p50"])
    accuracy = bench.compare_accuracy(lfw_dir / "pairs.txt", lfw_dir / "images", 8, "yunet", log=lambda m: None)
    assert accuracy["pairs"] == 8
    for side in ("edge_mfr", "face_recognition"):
        assert 0.0 <= accuracy[side]["accuracy"] <= 1.0 and accuracy[side]["fte_pairs"] >= 0
