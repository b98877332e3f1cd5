"""Parameter and multiply-accumulate (MAC) counts, for torch modules and for exported ONNX graphs.

`torch_complexity` runs one forward pass of a dummy face with a forward hook on every leaf module and
counts, from the real input/output shapes each layer saw:
  - `macs`: Conv2d and Linear multiply-accumulates, the usual headline figure (MobileFaceNet's 0.22 G);
  - `elementwise_ops`: BatchNorm (one multiply-add per element; free once folded into the conv at export),
    activations (one op per element), pooling (one op per window element).
Tensor arithmetic written inline in a `forward` (the residual `x + out`) is no module, so no hook sees it;
it is one add per element of a shortcut, small next to the convs. Leaf modules of a type this file does not
know are listed in `uncounted` rather than silently given zero.

`onnx_complexity` reads the same Conv/Gemm/MatMul MACs from an ONNX file after shape inference, without
torch, for packages whose torch module is not at hand (the bundled teacher).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_mfr.errors import InputError, ModelPackageError


@dataclass
class LayerCount:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int
    elementwise_ops: int


@dataclass
class ComplexityReport:
    """Counts for one forward pass of a single face (batch 1)."""

    params: int
    macs: int
    elementwise_ops: int
    input_size: tuple[int, int]
    layers: list[LayerCount] = field(default_factory=list)
    uncounted: list[str] = field(default_factory=list)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def macs_by_kind(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for layer in self.layers:
            totals[layer.kind] = totals.get(layer.kind, 0) + layer.macs + layer.elementwise_ops
        return totals


def _numel(shape) -> int:
    total = 1
    for side in shape:
        total *= int(side)
    return total


def _leaf_counts(module, inputs, output) -> tuple[str, int, int] | None:
    """(kind, macs, elementwise ops) for one call of a known leaf module, None for an unknown type."""
    from torch import nn

    from edge_mfr.models.dlib_resnet import Affine  # the teacher's frozen batch norm

    out_elements = output.numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_output = (module.in_channels // module.groups) * kh * kw
        return "conv", out_elements * per_output, 0
    if isinstance(module, nn.Linear):
        return "linear", out_elements * module.in_features, 0
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, Affine)):
        return "batchnorm", 0, out_elements
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.PReLU, nn.LeakyReLU, nn.Hardswish, nn.SiLU, nn.Sigmoid)):
        return "activation", 0, out_elements
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        kernel = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 2
        return "pool", 0, out_elements * kernel[0] * kernel[1]
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return "pool", 0, inputs[0].numel()
    if isinstance(module, (nn.Flatten, nn.Identity, nn.Dropout)):
        return "reshape", 0, 0
    return None


def torch_complexity(model, input_size: tuple[int, int] | None = None) -> ComplexityReport:
    """Count parameters and MACs of `model` on one (1, 3, h, w) input; h, w default to `model.input_size`."""
    import torch

    if input_size is None:
        input_size = getattr(model, "input_size", None)
        if input_size is None:
            raise InputError(f"{type(model).__name__} has no input_size attribute; pass input_size=(h, w)")
    input_size = (int(input_size[0]), int(input_size[1]))

    layers: list[LayerCount] = []
    uncounted: list[str] = []
    handles = []

    def make_hook(name: str):
        def hook(module, inputs, output):
            counts = _leaf_counts(module, inputs, output)
            params = sum(p.numel() for p in module.parameters(recurse=False))
            if counts is None:
                uncounted.append(f"{name} ({type(module).__name__})")
                counts = ("unknown", 0, 0)
            kind, macs, elementwise = counts
            layers.append(LayerCount(name, kind, tuple(output.shape), params, macs, elementwise))
        return hook

    for name, module in model.named_modules():
        if not any(True for _ in module.children()):
            handles.append(module.register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        reference = next(iter(model.parameters()), None)
        dtype = reference.dtype if reference is not None else torch.float32
        device = reference.device if reference is not None else "cpu"
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size, dtype=dtype, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    return ComplexityReport(
        params=sum(p.numel() for p in model.parameters()),
        macs=sum(layer.macs for layer in layers),
        elementwise_ops=sum(layer.elementwise_ops for layer in layers),
        input_size=input_size,
        layers=layers,
        uncounted=uncounted,
    )


def architecture_complexity(arch: str, embedding_size: int | None = None,
                            activation: str | None = None) -> ComplexityReport:
    """Counts for a student architecture by name (randomly initialised; counts do not depend on weights)."""
    from edge_mfr.models import mobilefacenet

    model = mobilefacenet.build_student(
        arch,
        embedding_size=embedding_size or mobilefacenet.DEFAULT_EMBEDDING_SIZE,
        activation=activation or mobilefacenet.DEFAULT_ACTIVATION,
    )
    return torch_complexity(model)


def _static_dims(value_info) -> tuple[int, ...] | None:
    dims = value_info.type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") for d in dims[1:]):
        return None
    return (1,) + tuple(int(d.dim_value) for d in dims[1:])  # counted for a batch of one face


def onnx_complexity(onnx_path: str | Path) -> ComplexityReport:
    """Parameters (initializer elements, after any BN folding) and Conv/Gemm/MatMul MACs of an ONNX graph."""
    import onnx
    from onnx import shape_inference

    try:
        model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    except Exception as exc:  # onnx raises several unrelated types for unreadable or invalid files
        raise ModelPackageError(f"cannot read ONNX graph {onnx_path}: {exc}") from exc
    graph = model.graph
    shapes: dict[str, tuple[int, ...] | None] = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        shapes[info.name] = _static_dims(info)
    initializers: dict[str, Any] = {init.name: init for init in graph.initializer}
    for name, init in initializers.items():
        shapes[name] = tuple(init.dims)

    image_inputs = [i for i in graph.input if i.name not in initializers]
    input_shape = shapes.get(image_inputs[0].name) if image_inputs else None
    if input_shape is None or len(input_shape) != 4:
        raise ModelPackageError(f"{onnx_path}: expected one image input (N, 3, h, w), got {input_shape}")

    layers: list[LayerCount] = []
    uncounted: list[str] = []
    for node in graph.node:
        out_shape = shapes.get(node.output[0])
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        weight_shape = shapes.get(node.input[1])
        if out_shape is None or weight_shape is None:
            uncounted.append(f"{node.name or node.op_type} (shape unknown)")
            continue
        if node.op_type == "Conv":
            # weight (C_out, C_in/groups, kh, kw): each output element reads C_in/groups * kh * kw inputs
            macs = _numel(out_shape) * _numel(weight_shape[1:])
            kind = "conv"
        else:
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            reduce_dim = weight_shape[1] if (node.op_type == "Gemm" and trans_b) else weight_shape[0]
            macs = _numel(out_shape) * int(reduce_dim)
            kind = "linear"
        layers.append(LayerCount(node.name or node.op_type, kind, out_shape, 0, macs, 0))

    params = sum(_numel(init.dims) for init in graph.initializer)
    return ComplexityReport(params=params, macs=sum(layer.macs for layer in layers), elementwise_ops=0,
                            input_size=(input_shape[2], input_shape[3]), layers=layers, uncounted=uncounted)


@dataclass
class Latency:
    """Wall time of one ONNX Runtime `run` on a batch, per face."""

    batch_size: int
    threads: int
    median_ms_per_face: float
    min_ms_per_face: float
    runs: int


def ort_cpu_session(onnx_path: str | Path, threads: int):
    """A CPU session as the unlock path runs it: all graph optimisations, `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def interleaved_run_times(sessions: dict[str, Any], batch, repeats: int,
                          warmup: int = 3) -> dict[str, tuple[list[float], list[float]]]:
    """Run several sessions on the same batch, interleaved run by run (rotating the order each round), so load
    from other processes on a shared machine falls on all of them alike. Per session: (wall seconds, calling-
    thread CPU seconds) of each run."""
    import time

    feeds = {name: {session.get_inputs()[0].name: batch} for name, session in sessions.items()}
    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[name])
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in sessions}
    names = list(sessions)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start_wall, start_cpu = time.perf_counter(), time.thread_time()
            sessions[name].run(None, feeds[name])
            times[name][1].append(time.thread_time() - start_cpu)
            times[name][0].append(time.perf_counter() - start_wall)
    return times


def time_ort_sessions(sessions: dict[str, Any], batch, threads: int, repeats: int,
                      warmup: int = 3) -> dict[str, Latency]:
    """Wall-clock latency per face of several sessions timed by `interleaved_run_times`."""
    import numpy as np

    faces = len(batch)
    times = interleaved_run_times(sessions, batch, repeats, warmup)
    return {name: Latency(faces, threads, float(np.median(wall)) * 1e3 / faces, float(np.min(wall)) * 1e3 / faces,
                          len(wall)) for name, (wall, _) in times.items()}
