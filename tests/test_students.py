"""MobileFaceNet students: sizes, shapes, exact PReLU decomposition, export to a package, CLI."""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import subprocess
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edge_mfr.cli import models as models_cli  # noqa: E402
from edge_mfr.errors import ModelPackageError  # noqa: E402
from edge_mfr.models import export  # noqa: E402
from edge_mfr.models.complexity import onnx_complexity, torch_complexity  # noqa: E402
from edge_mfr.models.mobilefacenet import ARCHITECTURES, build_student  # noqa: E402
from edge_mfr.models.package import load_package  # noqa: E402
from edge_mfr.runtime.ort import OrtEmbedder  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These nets are small: one torch thread is faster than two fighting other jobs for two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def trained_like(arch: str, activation: str = "prelu", seed: int = 0):
    """A student whose BN statistics and PReLU slopes look like a trained net's, so outputs are O(10)
    and a parity check means something (fresh BN running stats make eval outputs explode)."""
    torch.manual_seed(seed)
    model = build_student(arch, activation=activation)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.PReLU):
                # trained slopes are mostly small positives; include zero and negative ones too
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.6 - 0.1)
                module.weight[0] = 0.0
        model.train()
        for _ in range(2):
            model(torch.rand(8, 3, 112, 112, generator=generator) * 2 - 1)
    return model.eval()


@pytest.fixture(scope="module")
def real_faces(data_dir) -> np.ndarray:
    """Eight ArcFace-aligned glint24 crops of eight identities, normalised for a student (RGB, +-1)."""
    folders = sorted(p for p in (data_dir / "glint24").iterdir() if p.is_dir())[:8]
    crops = [cv2.imread(str(sorted(folder.glob("*.jpg"))[0]))[:, :, ::-1] for folder in folders]
    batch = (np.stack(crops).astype(np.float32) - 127.5) / 127.5
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def test_mac_and_param_counts_in_expected_ranges():
    small = torch_complexity(build_student("mfn_s"))
    medium = torch_complexity(build_student("mfn_m"))
    # MobileFaceNet as published: 0.99 M params, 221 M MACs
    assert 0.95e6 < small.params < 1.05e6
    assert 0.21e9 < small.macs < 0.23e9
    assert 1.6e6 < medium.params < 2.0e6
    assert 0.42e9 < medium.macs < 0.48e9
    assert not small.uncounted and not medium.uncounted
    kinds = small.macs_by_kind()
    assert kinds["linear"] == 512 * 128 and kinds["conv"] == small.macs - kinds["linear"]
    assert set(ARCHITECTURES) >= {"mfn_s", "mfn_m"}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_forward_shapes(arch):
    model = build_student(arch, activation="prelu").eval()
    with torch.no_grad():
        assert model(torch.zeros(3, 3, 112, 112)).shape == (3, 128)
    wide = build_student(arch, embedding_size=256).eval()  # default activation: ReLU
    with torch.no_grad():
        assert wide(torch.zeros(2, 3, 112, 112)).shape == (2, 256)
    assert not any(isinstance(m, torch.nn.PReLU) for m in wide.modules())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, real_faces):
    """A trained-like mfn_s saved as a checkpoint and exported through `edge-mfr models export`."""
    folder = tmp_path_factory.mktemp("student")
    model = trained_like("mfn_s", seed=3)
    checkpoint = export.save_checkpoint(model, folder / "student.pt", recipe={"note": "test weights"})
    parser = argparse.ArgumentParser()
    models_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "export", str(checkpoint), "--out", str(folder / "pkg" / "mfn_s_t.onnx")])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert args.func(args) == 0
    return SimpleNamespace(model=model, checkpoint=checkpoint, onnx_path=folder / "pkg" / "mfn_s_t.onnx",
                           printed=printed.getvalue(), folder=folder)


def run_onnx(path, batch: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": batch})[0]


def test_decomposed_prelu_is_exactly_prelu(exported, real_faces):
    model = exported.model
    decomposed = export.decompose_prelu(model)
    assert not any(isinstance(m, torch.nn.PReLU) for m in decomposed.modules())
    assert sum(isinstance(m, export.DecomposedPReLU) for m in decomposed.modules()) == sum(
        isinstance(m, torch.nn.PReLU) for m in model.modules())
    batch = torch.from_numpy(real_faces)
    with torch.no_grad():
        assert torch.equal(decomposed(batch), model(batch))
    # ONNX Runtime: the shipped (decomposed) graph gives the very numbers of a native-PRelu export.
    native_path = export.export_onnx(model, exported.folder / "native.onnx")
    assert any(node.op_type == "PRelu" for node in onnx.load(str(native_path)).graph.node)
    assert not any(node.op_type == "PRelu" for node in onnx.load(str(exported.onnx_path)).graph.node)
    np.testing.assert_array_equal(run_onnx(exported.onnx_path, real_faces), run_onnx(native_path, real_faces))


def test_checkpoint_export_round_trip_via_package(exported, real_faces):
    assert "parity random" in exported.printed and "max |onnxruntime - torch|" in exported.printed
    package = load_package(exported.onnx_path)
    assert package.architecture == "mfn_s" and package.embedding_size == 128 and package.input_size == (112, 112)
    assert package.channel_order == "RGB" and np.allclose(package.mean, 127.5) and np.allclose(package.std, 127.5)
    assert package.meta["recipe"]["note"] == "test weights"
    assert package.meta["recipe"]["export"]["checkpoint_sha256"]

    reloaded = export.student_from_checkpoint(export.load_checkpoint(exported.checkpoint))
    embedder = OrtEmbedder(package, threads=1)
    random_batch = np.random.default_rng(5).uniform(-1, 1, (4, 3, 112, 112)).astype(np.float32)
    for batch in (random_batch, real_faces):
        with torch.no_grad():
            expected = reloaded(torch.from_numpy(batch))
        raw = run_onnx(package.onnx_path, batch)
        scale = float(expected.abs().max())
        assert scale > 1.0  # a meaningful output, not a vanishing one
        # raw embeddings: float32 accumulation order differs, so the bound scales with the output
        assert np.abs(raw - expected.numpy()).max() < 1e-5 * scale
        # what the unlock path compares: L2-normalised embeddings from the package's runtime
        normalised = torch.nn.functional.normalize(expected, dim=1).numpy()
        assert np.abs(embedder.embed(batch) - normalised).max() < 1e-4
    # The graph holds the same conv/linear MACs as the torch module it came from, including the decomposition's
    # two depthwise 1x1 convs per PReLU (BN folding changes params only).
    assert onnx_complexity(package.onnx_path).macs == torch_complexity(export.decompose_prelu(reloaded)).macs


def with_input_dims(source, target, dims) -> None:
    """Copy of an ONNX graph with its input declared as `dims` (int = fixed, str = symbolic)."""
    graph_model = onnx.load(str(source))
    shape = graph_model.graph.input[0].type.tensor_type.shape
    for dim, value in zip(shape.dim, dims):
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    onnx.save(graph_model, str(target))


def test_wrong_input_shape_onnx_is_refused(exported, tmp_path, monkeypatch):
    export.check_student_onnx(exported.onnx_path, (112, 112), 128)  # the real export passes
    for name, dims in (("fixed_batch", (1, 3, 112, 112)), ("size96", ("N", 3, 96, 96)), ("gray", ("N", 1, 112, 112))):
        bad = tmp_path / f"{name}.onnx"
        with_input_dims(exported.onnx_path, bad, dims)
        with pytest.raises(ModelPackageError, match="input"):
            export.check_student_onnx(bad, (112, 112), 128)

    # export_student itself refuses a graph that came out with a fixed batch, and writes no package.
    bad = tmp_path / "fixed_batch.onnx"
    monkeypatch.setattr(export, "export_onnx", lambda model, out, opset=17: shutil.copyfile(bad, out))
    out = tmp_path / "refused" / "student.onnx"
    with pytest.raises(ModelPackageError, match="dynamic batch"):
        export.export_student(exported.model, out, verbose=False)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_cli_models_info_prints_counts(capsys):
    parser = argparse.ArgumentParser()
    models_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "info", "mfn_s"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    expected = torch_complexity(build_student("mfn_s"))
    assert f"{expected.macs:,}" in out and f"{expected.params:,}" in out and "0.221 G" in out


def test_models_list_does_not_import_torch():
    code = (
        "import argparse, sys\n"
        "from edge_mfr.cli import models\n"
        "p = argparse.ArgumentParser(); models.register(p.add_subparsers(dest='command'))\n"
        "a = p.parse_args(['models', 'list']); rc = a.func(a)\n"
        "assert 'torch' not in sys.modules, 'models list imported torch'\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "name" in result.stdout and "fingerprint" in result.stdout


def test_cli_models_info_shows_route_thresholds_aggregation_and_scoring(capsys):
    """A device team reads how the bundled default scores: per-route thresholds, the calibrated aggregation
    and the masked route's metric."""
    parser = argparse.ArgumentParser()
    models_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "info", "dlib_resnet_v1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "unmasked probes: FMR" in out and "masked probes:   FMR" in out
    assert "aggregation:  max (mean FNMR of unmasked and masked people" in out
    assert "scoring:      masked route through a metric" in out and "non-commercial" in out
