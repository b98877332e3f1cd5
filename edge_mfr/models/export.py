"""Student checkpoints and their export to an edge-mfr model package (ONNX + sidecar).

Checkpoint format (a `torch.save`d dict, written by `save_checkpoint` and the training code):
    {
      "format": "edge-mfr-student/1",
      "arch": "mfn_s",                 # a key of edge_mfr.models.mobilefacenet.ARCHITECTURES
      "embedding_size": 128,
      "activation": "prelu",           # edge_mfr.models.mobilefacenet.ACTIVATIONS
      "input_size": [112, 112],        # optional, default 112x112
      "state_dict": {...},             # MobileFaceNet.state_dict()
      "recipe": {...},                 # how it was trained: data, losses, epochs, teacher fingerprint...
      "licence": "...",                # optional; default: the training data's non-commercial terms
    }

Export (`export_student`) rebuilds the network, swaps every PReLU for `DecomposedPReLU` (same numbers,
see below), exports with a dynamic batch axis, refuses a graph whose input is not (N, 3, h, w), checks
ONNX Runtime against the original PyTorch module on a random and a real batch, and writes the package.

Why decompose PReLU: ONNX Runtime's CPU provider runs convolutions in a blocked NCHWc layout and fuses
Relu into them, but has no NCHWc PRelu, so every PRelu costs a reorder out of and back into the blocked
layout (benchmarks/bench_activation.py: mfn_s 2-3x slower than with ReLU). `DecomposedPReLU` writes
    prelu(x) = relu(x) + (-a) * relu(-x)
with the negation and the per-channel scale as 1x1 depthwise convolutions, all ops the NCHWc path
keeps blocked (the negation conv takes the second Relu, the scale conv absorbs the Add). It is exact:
for x > 0 it is x + (-a) * 0 = x, for x < 0 it is 0 + (-a) * (-x) = a * x, the same single rounding.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge_mfr.errors import InputError, ModelPackageError

CHECKPOINT_FORMAT = "edge-mfr-student/1"
PACKAGE_FORMAT = "edge-mfr-model/1"
ONNX_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
# Students take ArcFace-style input: RGB crops aligned to the ArcFace template, (pixel - 127.5) / 127.5.
STUDENT_CHANNEL_ORDER = "RGB"
STUDENT_MEAN = 127.5
STUDENT_STD = 127.5
# |ONNX - torch| allowed, relative to the largest |torch| output (float32 accumulation order differs).
PARITY_TOLERANCE = 1e-5
DEFAULT_LICENCE = (
    "Code Apache-2.0. Weights trained on CelebA and Glint360K samples (and distilled from dlib's CC0 "
    "model): non-commercial research use only, inheriting the training data's terms."
)
PARITY_FACES = 8


# --- checkpoints --------------------------------------------------------------------------------------

def save_checkpoint(model, path: str | Path, recipe: dict[str, Any], licence: str | None = None) -> Path:
    """Write a MobileFaceNet and how it was made in the checkpoint format above."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": model.arch,
        "embedding_size": model.embedding_size,
        "activation": model.activation,
        "input_size": list(model.input_size),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        # plain JSON types only: the recipe goes into the package sidecar, and torch.load(weights_only=True)
        # refuses anything else (e.g. torch.__version__ is a TorchVersion object)
        "recipe": json.loads(json.dumps(recipe)),
    }
    if licence is not None:
        checkpoint["licence"] = licence
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint_file(path: str | Path, error=ModelPackageError) -> Any:
    """torch.load of a checkpoint (tensors and plain types only), with one clear error for a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for damaged files
        raise error(f"cannot read checkpoint {path}: {exc}") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a student checkpoint dict, checking the keys the rebuild needs."""
    path = Path(path)
    checkpoint = read_checkpoint_file(path)
    missing = [k for k in ("arch", "embedding_size", "activation", "state_dict") if not (
        isinstance(checkpoint, dict) and k in checkpoint)]
    if missing:
        raise ModelPackageError(f"{path} is not an edge-mfr student checkpoint (missing {', '.join(missing)})")
    return checkpoint


def student_from_checkpoint(checkpoint: dict[str, Any]):
    """Rebuild the MobileFaceNet of a checkpoint dict, in eval mode."""
    from edge_mfr.models.mobilefacenet import build_student

    model = build_student(checkpoint["arch"], embedding_size=int(checkpoint["embedding_size"]),
                          activation=checkpoint["activation"],
                          input_size=tuple(checkpoint.get("input_size", (112, 112))))
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise ModelPackageError(f"checkpoint weights do not fit {checkpoint['arch']}: {exc}") from exc
    return model.eval()


# --- PReLU decomposition ------------------------------------------------------------------------------

class DecomposedPReLU(nn.Module):
    """prelu(x) = relu(x) + (-a) * relu(-x) on (N, C, H, W), with the negation and the per-channel scale
    as 1x1 depthwise convolutions so ONNX Runtime keeps it in its fused NCHWc layout."""

    def __init__(self, prelu: nn.PReLU, channels: int):
        super().__init__()
        slope = prelu.weight.detach().reshape(-1)
        if slope.numel() not in (1, channels):
            raise InputError(f"PReLU has {slope.numel()} slopes for {channels} channels")
        self.negate = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        self.scale = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        with torch.no_grad():
            self.negate.weight.fill_(-1.0)
            self.scale.weight.copy_((-slope).expand(channels).reshape(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) + self.scale(F.relu(self.negate(x)))


def decompose_prelu(model):
    """A deep copy of `model` (eval mode) with every 4-D PReLU replaced by the exact DecomposedPReLU.

    The channel count of each PReLU is taken from a forward pass on one dummy face, so this works on
    any module with an `input_size` attribute, not only MobileFaceNet.
    """
    model = copy.deepcopy(model).eval()
    input_shapes: dict[nn.Module, tuple[int, ...]] = {}
    handles = [m.register_forward_hook(lambda mod, inputs, _out: input_shapes.__setitem__(mod, inputs[0].shape))
               for m in model.modules() if isinstance(m, nn.PReLU)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *model.input_size))
    finally:
        for handle in handles:
            handle.remove()

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.PReLU):
                shape = input_shapes.get(child)
                if shape is None or len(shape) != 4:
                    raise InputError(f"PReLU {name} sees input shape {shape}; only (N, C, H, W) is decomposed")
                setattr(parent, name, DecomposedPReLU(child, shape[1]))
            else:
                swap(child)

    swap(model)
    return model


# --- ONNX checks --------------------------------------------------------------------------------------

def check_student_onnx(onnx_path: str | Path, input_size: tuple[int, int], embedding_size: int) -> None:
    """Refuse a graph that is not one image input (N dynamic, 3, h, w) -> one (N, embedding_size) output."""
    import onnx

    try:
        graph = onnx.load(str(onnx_path)).graph
    except Exception as exc:  # protobuf decode errors have no common base class
        raise ModelPackageError(f"cannot read ONNX file {onnx_path}: {exc}") from exc
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelPackageError(f"{onnx_path}: expected one input and one output, got {len(inputs)} and "
                                f"{len(graph.output)}")

    def dims(value_info) -> list[int | str]:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in value_info.type.tensor_type.shape.dim]

    in_dims, out_dims = dims(inputs[0]), dims(graph.output[0])
    expected = ["N", 3, int(input_size[0]), int(input_size[1])]
    if len(in_dims) != 4 or isinstance(in_dims[0], int) or in_dims[1:] != expected[1:]:
        raise ModelPackageError(f"{onnx_path}: input {inputs[0].name!r} has shape {in_dims}, expected "
                                f"{expected} (dynamic batch, 3 channels, the package's input size)")
    if len(out_dims) != 2 or out_dims[1] != embedding_size:
        raise ModelPackageError(f"{onnx_path}: output has shape {out_dims}, expected [N, {embedding_size}]")


def default_parity_faces(input_size: tuple[int, int], count: int = PARITY_FACES) -> np.ndarray | None:
    """Real aligned faces (glint24 crops, ArcFace-aligned 112x112) normalised for a student, or None
    when the shared data is absent (EDGE_MFR_DATA, default ../shared/data next to the repository)."""
    import cv2

    data_dir = Path(os.environ.get("EDGE_MFR_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    glint = data_dir / "glint24"
    if not glint.is_dir():
        return None
    identities = sorted(p for p in glint.iterdir() if p.is_dir())
    files = [sorted(d.glob("*.jpg"))[0] for d in identities if any(d.glob("*.jpg"))][:count]
    faces = []
    for file in files:
        image = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if image is None:
            continue
        if image.shape[:2] != tuple(input_size):
            image = cv2.resize(image, (input_size[1], input_size[0]), interpolation=cv2.INTER_AREA)
        faces.append(image[:, :, ::-1])  # BGR -> RGB
    if not faces:
        return None
    batch = (np.stack(faces).astype(np.float32) - STUDENT_MEAN) / STUDENT_STD
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def onnx_parity(model, onnx_path: str | Path, batch: np.ndarray) -> tuple[float, float]:
    """(max |ONNX Runtime - torch|, max |torch|) of the raw embeddings of `batch`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {INPUT_NAME: batch})
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(batch)).numpy()
    return float(np.abs(actual - expected).max()), float(np.abs(expected).max())


# --- export -------------------------------------------------------------------------------------------

def export_onnx(model, out_onnx: str | Path, opset: int = ONNX_OPSET) -> Path:
    """torch.onnx export of an image -> embedding module at its `input_size`, batch axis dynamic."""
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated upstream but is 10x faster here than the dynamo one and
        # produces the same graph for these plain conv nets; the warning would only clutter CLI output.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 3, *model.input_size),), str(out_onnx),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True,
        )
    return Path(out_onnx)


def _check_parity(model, onnx_path: Path, parity_batch: np.ndarray | None, verbose: bool) -> dict[str, float | None]:
    """Max |ONNX Runtime - torch| on a random and a real batch; raises past PARITY_TOLERANCE x output scale."""
    input_size = tuple(model.input_size)
    random_batch = np.random.default_rng(0).uniform(-1.0, 1.0, (4, 3, *input_size)).astype(np.float32)
    real_batch = parity_batch if parity_batch is not None else default_parity_faces(input_size)
    parity: dict[str, float | None] = {}
    for label, batch in (("random", random_batch), ("real", real_batch)):
        if batch is None:
            parity[label] = None
            if verbose:
                print(f"parity {label:6s}: skipped (no real faces: set EDGE_MFR_DATA or pass parity_batch)")
            continue
        diff, scale = onnx_parity(model, onnx_path, np.ascontiguousarray(batch, dtype=np.float32))
        parity[label] = diff
        if verbose:
            print(f"parity {label:6s}: max |onnxruntime - torch| = {diff:.3g} over {len(batch)} faces "
                  f"(max |embedding| {scale:.3g})")
        if not diff <= PARITY_TOLERANCE * max(scale, 1.0):
            raise ModelPackageError(f"ONNX export of {model.arch} differs from PyTorch by {diff:.3g} on the "
                                    f"{label} batch (tolerance {PARITY_TOLERANCE} x output scale {scale:.3g})")
    return parity


def export_student(checkpoint_path_or_module, out_onnx: str | Path, *, name: str | None = None,
                   recipe: dict[str, Any] | None = None, licence: str | None = None,
                   decompose: bool = True, opset: int = ONNX_OPSET, parity_batch: np.ndarray | None = None,
                   verbose: bool = True):
    """Export a student to `out_onnx` + sidecar and return the saved ModelPackage.

    checkpoint_path_or_module: a checkpoint path (format in the module docstring), a checkpoint dict, or a
      MobileFaceNet module. name: package name (default: the ONNX file stem). recipe: merged over the
      checkpoint's recipe. decompose: swap PReLU for the exact NCHWc-friendly decomposition.
      parity_batch: real normalised faces (N, 3, h, w) for the parity check (default: glint24 crops).
    Raises ModelPackageError when the graph's input/output shape is wrong or ONNX Runtime disagrees with
    PyTorch beyond PARITY_TOLERANCE (relative to the output scale).
    """
    from edge_mfr.align import template_for_size
    from edge_mfr.models.package import save_package

    checkpoint_sha256 = None
    if isinstance(checkpoint_path_or_module, (str, Path)):
        checkpoint_sha256 = hashlib.sha256(Path(checkpoint_path_or_module).read_bytes()).hexdigest()
        checkpoint = load_checkpoint(checkpoint_path_or_module)
    elif isinstance(checkpoint_path_or_module, dict):
        checkpoint = checkpoint_path_or_module
    elif isinstance(checkpoint_path_or_module, torch.nn.Module):
        module = checkpoint_path_or_module
        checkpoint = {"arch": module.arch, "embedding_size": module.embedding_size,
                      "activation": module.activation, "input_size": list(module.input_size),
                      "state_dict": module.state_dict(), "recipe": {}}
    else:
        raise InputError(f"expected a checkpoint path, dict or MobileFaceNet, got {type(checkpoint_path_or_module)}")
    model = student_from_checkpoint(checkpoint)
    input_size = tuple(int(side) for side in model.input_size)

    out_onnx = Path(out_onnx)
    if out_onnx.suffix != ".onnx":
        raise InputError(f"output path must end in .onnx, got {out_onnx}")
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    decomposed = decompose and model.activation == "prelu"
    # Build and check under a temporary name: a refused export must not replace (or orphan) a package.
    staging = out_onnx.with_name(f".{out_onnx.stem}.exporting.onnx")
    try:
        export_onnx(decompose_prelu(model) if decomposed else model, staging, opset)
        check_student_onnx(staging, input_size, model.embedding_size)
        parity = _check_parity(model, staging, parity_batch, verbose)
        os.replace(staging, out_onnx)
    finally:
        staging.unlink(missing_ok=True)

    full_recipe = dict(checkpoint.get("recipe") or {})
    full_recipe.update(recipe or {})
    full_recipe["export"] = {
        "exporter": f"torch {torch.__version__} torch.onnx (TorchScript), opset {opset}",
        "prelu": ("decomposed: relu(x) + (-a)*relu(-x), depthwise 1x1 convs" if decomposed
                  else "native PRelu ops" if model.activation == "prelu" else "none in this network"),
        "onnx_vs_torch_max_abs_diff": parity,
        "checkpoint_sha256": checkpoint_sha256,
    }
    meta = {
        "format": PACKAGE_FORMAT,
        "name": name or out_onnx.stem,
        "architecture": model.arch,
        "input": {"size": list(input_size), "channel_order": STUDENT_CHANNEL_ORDER,
                  "mean": [STUDENT_MEAN] * 3, "std": [STUDENT_STD] * 3},
        "alignment": {"template": template_for_size(input_size).tolist()},
        "embedding_size": model.embedding_size,
        "recipe": full_recipe,
        "licence": licence or checkpoint.get("licence") or DEFAULT_LICENCE,
        "thresholds": {},
        "calibration": {},
    }
    return save_package(out_onnx, meta)
