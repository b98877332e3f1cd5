"""The dlib teacher as a trainable PyTorch network, rebuilt from the bundled ONNX package.

The weights come from the package's ONNX initializers (named after the PyTorch rebuild's parameters), the
structure from a small JSON layout (strides, paddings, pooling) taken from dlib's `.dat` where it is installed
and carried in the training pool otherwise, so a GPU machine needs neither dlib's file nor the parser. Both the
teacher's cached templates and a teacher-initialised student see crops through `chip_input`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from edge_mfr.errors import InputError, ModelPackageError
from edge_mfr.models.dlib_format import (
    AffineWeights,
    ConvWeights,
    DlibFaceResNetWeights,
    PoolSpec,
    ResidualUnitWeights,
)
from edge_mfr.models.dlib_resnet import DlibFaceResNet

TEACHER_INPUT = 150
TEACHER_DIVISOR = 256.0


def _conv_layout(conv: ConvWeights) -> dict:
    return {"shape": list(conv.weight.shape), "stride": list(conv.stride), "padding": list(conv.padding)}


def _pool_layout(pool: PoolSpec | None) -> dict | None:
    return None if pool is None else {"kind": pool.kind, "window": list(pool.window), "stride": list(pool.stride),
                                      "padding": list(pool.padding)}


def layout_of(weights: DlibFaceResNetWeights) -> dict:
    """Everything but the numbers: enough to rebuild the network and load its weights from ONNX."""
    return {
        "input_size": list(weights.input_size), "mean_rgb": list(weights.input_mean_rgb),
        "stem_conv": _conv_layout(weights.stem_conv), "stem_pool": _pool_layout(weights.stem_pool),
        "units": [{"conv1": _conv_layout(u.conv1), "conv2": _conv_layout(u.conv2),
                   "shortcut_pool": _pool_layout(u.shortcut_pool)} for u in weights.units],
        "head_pool": _pool_layout(weights.head_pool), "embedding_shape": list(weights.embedding_weight.shape),
    }


def _zero_conv(layout: dict) -> ConvWeights:
    return ConvWeights(np.zeros(layout["shape"], np.float32), np.zeros(layout["shape"][0], np.float32),
                       tuple(layout["stride"]), tuple(layout["padding"]))


def _unit_affine(channels: int) -> AffineWeights:
    return AffineWeights(np.ones(channels, np.float32), np.zeros(channels, np.float32))


def _pool(layout: dict | None) -> PoolSpec | None:
    return None if layout is None else PoolSpec(layout["kind"], tuple(layout["window"]), tuple(layout["stride"]),
                                                tuple(layout["padding"]))


def network_from_layout(layout: dict) -> DlibFaceResNet:
    """The network with placeholder weights (load real ones with `load_onnx_weights`)."""
    units = tuple(ResidualUnitWeights(_zero_conv(u["conv1"]), _unit_affine(u["conv1"]["shape"][0]),
                                      _zero_conv(u["conv2"]), _unit_affine(u["conv2"]["shape"][0]),
                                      _pool(u["shortcut_pool"])) for u in layout["units"])
    weights = DlibFaceResNetWeights(
        input_size=tuple(layout["input_size"]), input_mean_rgb=tuple(layout["mean_rgb"]),
        input_divisor=TEACHER_DIVISOR, stem_conv=_zero_conv(layout["stem_conv"]),
        stem_affine=_unit_affine(layout["stem_conv"]["shape"][0]), stem_pool=_pool(layout["stem_pool"]),
        units=units, head_pool=_pool(layout["head_pool"]),
        embedding_weight=np.zeros(layout["embedding_shape"], np.float32), metric_margin=0.0,
        metric_distance_threshold=0.0, source="layout", size_bytes=0)
    return DlibFaceResNet(weights)


def load_onnx_weights(network: torch.nn.Module, onnx_path: str | Path) -> None:
    """Copy the ONNX initializers named like the network's parameters and buffers into it; all must be there."""
    import onnx
    from onnx import numpy_helper

    initializers = {i.name: i for i in onnx.load(str(onnx_path)).graph.initializer}
    state = network.state_dict()
    missing = [name for name in state if name not in initializers]
    if missing:
        raise ModelPackageError(f"{onnx_path} lacks the teacher weights {missing[:5]}... (not the dlib teacher?)")
    for name, tensor in state.items():
        value = torch.from_numpy(numpy_helper.to_array(initializers[name]).copy())
        if value.shape != tensor.shape:
            raise ModelPackageError(f"{onnx_path}: {name} is {tuple(value.shape)}, "
                                    f"the layout says {tuple(tensor.shape)}")
        state[name] = value
    network.load_state_dict(state)


def chip_input(crops: torch.Tensor, mean_rgb, size: int = TEACHER_INPUT) -> torch.Tensor:
    """uint8 BGR chips (N, s, s, 3) on any device -> the teacher's float input (N, 3, 150, 150):
    RGB, resized to 150 (bilinear), (pixel - mean) / 256 as dlib's input layer does."""
    x = crops.flip(-1).permute(0, 3, 1, 2).float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.as_tensor(mean_rgb, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / TEACHER_DIVISOR


def teacher_onnx_path() -> Path:
    from edge_mfr.models.package import BUNDLED_DIR
    from edge_mfr.models.teacher import TEACHER_NAME

    return BUNDLED_DIR / f"{TEACHER_NAME}.onnx"


def load_bundled_teacher(network: DlibFaceResNet, fingerprint: str | None = None) -> DlibFaceResNet:
    """Load the bundled teacher's weights into `network`; `fingerprint`, when given, is the teacher the caller's
    data was made with, and must be the bundled one."""
    from edge_mfr.models.package import file_sha256

    onnx_path = teacher_onnx_path()
    if fingerprint is not None and file_sha256(onnx_path) != fingerprint:
        raise InputError(f"{onnx_path} is not the teacher this training data was prepared with")
    load_onnx_weights(network, onnx_path)
    return network


def bundled_teacher_network(layout: dict, fingerprint: str | None = None) -> DlibFaceResNet:
    return load_bundled_teacher(network_from_layout(layout), fingerprint)


def teacher_delta(record: dict) -> dict:
    """A trained teacher-initialised network's record with its weights as float16 differences from the teacher
    (exact to about 1e-3 of a difference, half the size)."""
    base = bundled_teacher_network(record["pool_meta"]["teacher_layout"]).state_dict()
    packed = {k: v for k, v in record.items() if k != "network"}
    packed["network_delta_fp16"] = {k: (v - base[k]).half() for k, v in record["network"].items()}
    return packed


def undelta(packed: dict) -> dict:
    """Inverse of `teacher_delta`: the record with float32 weights."""
    base = bundled_teacher_network(packed["pool_meta"]["teacher_layout"]).state_dict()
    record = {k: v for k, v in packed.items() if k != "network_delta_fp16"}
    record["network"] = {k: base[k] + v.float() for k, v in packed["network_delta_fp16"].items()}
    return record


class TeacherNet:
    """The frozen teacher for cached templates: raw (unnormalised) 128-d descriptors of uint8 chips."""

    def __init__(self, network: DlibFaceResNet, layout: dict, device: str = "cpu"):
        self.network = network.to(device).eval()
        self.layout = layout
        self.device = torch.device(device)

    @torch.no_grad()
    def embed_crops(self, crops: np.ndarray, batch_size: int = 128) -> np.ndarray:
        out = []
        for start in range(0, len(crops), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(crops[start:start + batch_size])).to(self.device)
            out.append(self.network(chip_input(batch, self.layout["mean_rgb"])).float().cpu().numpy())
        return np.concatenate(out) if out else np.empty((0, self.layout["embedding_shape"][0]), np.float32)
