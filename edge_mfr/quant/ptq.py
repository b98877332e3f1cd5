"""INT8 post-training quantization of a model package: a new `NAME_int8` package with a QDQ graph.

Two quantizers calibrated on the same real, hash-pinned faces (edge_mfr.quant.manifest):

- "ort" (default): onnxruntime.quantization.quantize_static, QDQ format, per-channel int8 weights, uint8
  activations, MinMax (or entropy/percentile) ranges. `reduce_range=True` by default: weights use 7 bits,
  because x86 CPUs without VNNI (AVX2 only) multiply u8 x s8 pairs with an int16 accumulation that
  saturates on full-range weights (ONNX Runtime's quantization docs recommend it there). A package is
  built once and run on unknown CPUs, so the safe choice is the default. On an AVX2 machine
  (benchmarks/bench_int8.py, held-out real faces) it took the teacher's fp32/int8 cosine from mean
  0.991-0.995 / min 0.92 with 8-bit weights to mean 0.999 / min 0.997. On a CPU with VNNI, 8-bit
  weights are safe and agree better (teacher, 200 held-out faces: mean 0.99954 / min 0.99904 against
  0.99920 / 0.99825 with 7 bits; docs/quantization.md), at the same speed.
- "nncf": nncf.quantize on the ONNX model (NNCF's own range setting and fast bias correction), with its
  signed activations re-expressed as uint8 (`unsigned_activations`) so ONNX Runtime fuses every conv.

Both start from the graph after onnxruntime's quantization pre-processing (shape inference and graph
optimisation, so Conv+BN+activation are fused before ranges are observed). The result is refused if its
embeddings disagree with the fp32 model's on the calibration faces (mean cosine below
`min_calibration_cosine`: a broken graph), and, with a `GateConfig`, when it moves further from fp32 on
held-out data than the caller's bounds allow (edge_mfr.quant.gate). Calibrated thresholds are not carried
over: int8 scores shift slightly, so the new package must be calibrated again (`edge-mfr calibrate`)
before it is used for unlock decisions.

A two-network package (a masked-route graph, edge_mfr.models.masked_network) is quantized graph by graph with
the same method: the first graph on every calibration face, the masked-route graph on the manifest's masked
faces only, since no other face reaches it. Route maps and metrics are kept: they act on embeddings.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, InputError, ModelPackageError
from ..models.package import ModelPackage, file_sha256, masked_network_path, save_package
from .gate import LFW_SCENARIOS, GateConfig, QuantizationGateError, run_gate
from .manifest import CalibrationManifest, calibration_faces, default_data_root, load_manifest

METHODS = ("ort", "nncf")
CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
# NAME_int8 for the default method; NNCF's result gets its own name so both can sit side by side.
NAME_SUFFIX = {"ort": "_int8", "nncf": "_int8_nncf"}
DEFAULT_BATCH = 16
MIN_MASKED_CALIBRATION_FACES = 8  # ranges from fewer faces than this are noise


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(f"INT8 quantization needs {module} ({exc}); "
                                      "install it with `pip install edge-mfr[train]`") from None


def _embed(onnx_path: Path, faces: np.ndarray, batch: int = DEFAULT_BATCH) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = np.concatenate([session.run(None, {name: faces[i:i + batch]})[0] for i in range(0, len(faces), batch)])
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def embedding_agreement(fp32_onnx: Path, int8_onnx: Path, faces: np.ndarray) -> dict:
    """Cosine between the two models' L2-normalised embeddings of the same faces."""
    cosine = np.sum(_embed(fp32_onnx, faces) * _embed(int8_onnx, faces), axis=1)
    return {"faces": int(len(faces)), "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min())}


class FaceBatchReader:
    """Calibration faces, `batch` at a time, for quantize_static.

    It satisfies onnxruntime.quantization.CalibrationDataReader by its documented structural check (a
    callable get_next returning an input dict, then None), so this module imports no quantization code
    until quantization runs.
    """

    def __init__(self, input_name: str, faces: np.ndarray, batch: int):
        self.input_name = input_name
        self.batches = [faces[i:i + batch] for i in range(0, len(faces), batch)]
        self.position = 0

    def get_next(self) -> dict | None:
        if self.position == len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}


def _quantize_ort(src: Path, dst: Path, faces: np.ndarray, input_name: str, settings: dict) -> None:
    quantization = _require("onnxruntime.quantization")
    quantization.quantize_static(
        str(src), str(dst), FaceBatchReader(input_name, faces, settings["batch"]),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=settings["per_channel"],
        reduce_range=settings["reduce_range"],
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        calibrate_method={"minmax": quantization.CalibrationMethod.MinMax,
                          "entropy": quantization.CalibrationMethod.Entropy,
                          "percentile": quantization.CalibrationMethod.Percentile}[settings["calibrate_method"]],
    )


def _quantize_nncf(src: Path, dst: Path, faces: np.ndarray, input_name: str, settings: dict) -> None:
    nncf = _require("nncf")
    onnx = _require("onnx")
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    # One face per item: NNCF counts subset_size in items, and batch 1 is how the unlock path runs.
    dataset = nncf.Dataset([faces[i:i + 1] for i in range(len(faces))], lambda face: {input_name: face})
    # Per-tensor activations: NNCF otherwise gives depthwise-conv inputs per-channel activation scales
    # (the students' decomposed PReLU), which ONNX Runtime's QLinearConv cannot run.
    advanced = AdvancedQuantizationParameters(activations_quantization_params=QuantizationParameters(per_channel=False))
    # NNCF draws progress bars on stdout; stdout belongs to the caller (`edge-mfr quantize --json`).
    with contextlib.redirect_stdout(sys.stderr):
        quantized = nncf.quantize(onnx.load(str(src)), dataset, subset_size=len(faces),
                                  advanced_parameters=advanced)
    unsigned_activations(quantized)
    onnx.save(quantized, str(dst))


def unsigned_activations(model) -> int:
    """Rewrite every int8 activation Quantize/DequantizeLinear pair to uint8, exactly; returns how many.

    NNCF quantizes activations that can be negative (a projection conv's output, a residual sum) to int8
    and the rest (after ReLU) to uint8. ONNX Runtime's CPU QLinearConv needs input and output of one type,
    so every conv between a signed and an unsigned tensor stays float, wrapped in Q/DQ pairs and layout
    Transposes: slower than FP32 (benchmarks/bench_int8.py profiles it). q_u8 = q_s8 + 128 with zero point
    zp_s8 + 128 represents the same real values, so the graph's arithmetic does not change. Weights (int8
    constants behind DequantizeLinear) stay int8.
    """
    from onnx import TensorProto, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    constants = set(initializers)
    zero_points = set()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) == 3:
            is_weight = node.op_type == "DequantizeLinear" and node.input[0] in constants
            zero_point = initializers.get(node.input[2])
            if not is_weight and zero_point is not None and zero_point.data_type == TensorProto.INT8:
                zero_points.add(node.input[2])
    for name in zero_points:
        values = numpy_helper.to_array(initializers[name]).astype(np.int16) + 128
        initializers[name].CopyFrom(numpy_helper.from_array(values.astype(np.uint8), name))
    # The quantized tensors change type too: fix any recorded type (shape inference wrote int8 there).
    retyped = {node.output[0] for node in model.graph.node
               if node.op_type == "QuantizeLinear" and len(node.input) == 3 and node.input[2] in zero_points}
    for info in list(model.graph.value_info) + list(model.graph.output):
        if info.name in retyped:
            info.type.tensor_type.elem_type = TensorProto.UINT8
    return len(zero_points)


def quantize_package(package: ModelPackage, out_dir: str | Path,
                     manifest: CalibrationManifest | str | Path | None = None, *,
                     data_root: str | Path | None = None, method: str = "ort", per_channel: bool = True,
                     reduce_range: bool = True, calibrate_method: str = "minmax", limit: int | None = None,
                     batch: int = DEFAULT_BATCH, min_calibration_cosine: float = 0.95,
                     gate: GateConfig | None = None) -> ModelPackage:
    """Quantize `package` to int8 and save `out_dir/NAME_int8.onnx` + sidecar; return the new package.

    The new package's name is NAME_int8 ("ort") or NAME_int8_nncf ("nncf"); its fingerprint is new (the
    graph is), its thresholds are empty (calibrate it again), its recipe records the quantization.

    manifest: a CalibrationManifest, its path, or None for the repository's calibration/manifest.json.
    data_root: where the manifest's relative paths live (default EDGE_MFR_DATA or ../shared/data).
    method: "ort" (onnxruntime quantize_static) or "nncf". per_channel / reduce_range / calibrate_method
    apply to "ort" (see the module docstring). limit: calibrate on the first `limit` manifest faces only.
    min_calibration_cosine: sanity floor on the calibration faces themselves (a broken graph, not a gate).
    gate: measure the int8 package on held-out data (edge_mfr.quant.gate) and refuse it when a bound is
    exceeded; the measurements go into the package's recipe and its `accuracy` record.
    Nothing is written to out_dir unless every check passes, so an earlier package there survives a failure.
    Raises InputError for bad arguments, a manifest that does not match its files, overlaps the test
    identities or does not fit the package; BackendUnavailableError when onnx / nncf are missing;
    ModelPackageError when the int8 model disagrees with fp32 on its calibration faces;
    QuantizationGateError when a gate bound is exceeded.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if calibrate_method not in CALIBRATE_METHODS:
        raise InputError(f"calibrate_method must be one of {CALIBRATE_METHODS}, got {calibrate_method!r}")
    if package.meta.get("recipe", {}).get("quantization"):
        raise InputError(f"model {package.name!r} is already quantized; quantize its fp32 source instead")
    if not isinstance(manifest, CalibrationManifest):
        manifest = load_manifest(manifest)
    root = Path(data_root) if data_root is not None else default_data_root()
    faces = calibration_faces(manifest, package, root, limit)
    entries = manifest.entries[:len(faces)]
    # A masked-route graph only ever sees faces on the masked route: its ranges come from the manifest's masked faces.
    masked_faces = faces[[e.mask_type is not None for e in entries]] if package.has_masked_network else None
    if masked_faces is not None and len(masked_faces) < MIN_MASKED_CALIBRATION_FACES:
        raise InputError(f"model {package.name!r} has a masked-route network, which is calibrated on the manifest's "
                         f"masked faces: {len(masked_faces)} of the {len(faces)} faces used are masked, fewer than "
                         f"{MIN_MASKED_CALIBRATION_FACES} (raise --limit or use a manifest with masked faces)")

    out_dir = Path(out_dir)
    name = package.name + NAME_SUFFIX[method]
    out_onnx = out_dir / f"{name}.onnx"
    if out_onnx.resolve() == package.onnx_path.resolve():
        raise InputError(f"output {out_onnx} would overwrite the source package")
    settings = {"batch": int(batch), "per_channel": bool(per_channel), "reduce_range": bool(reduce_range),
                "calibrate_method": calibrate_method}

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edge-mfr-quant-") as tmp:
        quantized, agreement = _quantize_graph(package.onnx_path, Path(tmp) / f"{name}.onnx", faces, method, settings,
                                               min_calibration_cosine, package.name)
        masked_quantized = masked_agreement = None
        if masked_faces is not None:
            masked_quantized, masked_agreement = _quantize_graph(
                masked_network_path(package.onnx_path), masked_network_path(quantized), masked_faces, method,
                settings, min_calibration_cosine, f"{package.name} (masked-route network)")

        if method == "ort":
            tool = {"tool": "onnxruntime.quantization.quantize_static", "version": ort.__version__,
                    "format": "QDQ", "activation_type": "uint8", "weight_type": "int8",
                    "per_channel": settings["per_channel"], "reduce_range": settings["reduce_range"],
                    "calibrate_method": calibrate_method}
        else:
            nncf = _require("nncf")
            tool = {"tool": "nncf.quantize (ONNX backend)", "version": nncf.__version__, "format": "QDQ",
                    "preset": "performance", "activations": "per-tensor",
                    "activation_type": "uint8 (NNCF's int8 activations shifted exactly: unsigned_activations)",
                    "fast_bias_correction": True}
        recipe = dict(package.meta.get("recipe", {}))
        recipe["quantization"] = {
            **tool,
            "method": method,
            "pre_process": "onnxruntime.quantization.quant_pre_process",
            "source": {"name": package.name, "fingerprint": package.fingerprint},
            "calibration_manifest": {"sha256": manifest.sha256, "file": manifest.path.name,
                                     "faces_used": int(len(faces)),
                                     "masked_used": sum(e.mask_type is not None for e in entries)},
            "agreement_on_calibration_faces": agreement,
        }
        if masked_quantized is not None:
            recipe["quantization"]["masked_network"] = {
                "calibration_faces": "the manifest's masked faces (the only faces its route sees)",
                "agreement_on_calibration_faces": masked_agreement}
        meta = {key: value for key, value in package.meta.items()
                if key not in ("fingerprint", "thresholds", "thresholds_by_aggregation", "calibration", "accuracy",
                               "complexity")}
        # The same network as its source: params and MACs are the fp32 graph's (the QDQ graph's initializers
        # also hold quantization scales and zero points, which are not parameters).
        from ..models.complexity import onnx_complexity

        counts = onnx_complexity(package.onnx_path)
        meta.update(name=name, recipe=recipe, thresholds={}, calibration={},
                    complexity={"params": counts.params, "macs": counts.macs, "counted_on": "fp32 source graph"})
        if package.meta.get("licence"):
            # A quantized graph is a derivative of its source: the source's terms, and where it came from.
            graphs = "these INT8 graphs are" if masked_quantized is not None else "this INT8 graph is"
            meta["licence"] = (f"{package.meta['licence']}; {graphs} derived from package "
                               f"{package.name} ({package.fingerprint[:12]}) by edge-mfr quantize, same terms")
        if masked_quantized is not None:
            meta["masked_network"] = {**package.meta["masked_network"], "graph_sha256": file_sha256(masked_quantized),
                                      "quantization": f"{method} int8, as the first graph (recipe.quantization)"}
        candidate = save_package(quantized, meta)

        if gate is not None:
            measured = run_gate(package, candidate, manifest, root, gate)
            recipe["quantization"]["gate"] = measured
            if "lfw" in measured:
                lfw = measured["lfw"]
                meta["accuracy"] = {"lfw": {
                    "pairs": lfw["n_pairs"], "subset": lfw["subset"], "protocol": lfw["protocol"],
                    "measured_by": "edge-mfr quantize accuracy gate",
                    **{scenario: {"accuracy": lfw["int8"][scenario]["accuracy"], "eer": lfw["int8"][scenario]["eer"]}
                       for scenario in LFW_SCENARIOS}}}
            if not measured["passed"]:
                raise QuantizationGateError(
                    f"int8 {method} package of {package.name!r} fails the accuracy gate, not saving it: "
                    + "; ".join(measured["failures"]), measured)

        out_dir.mkdir(parents=True, exist_ok=True)
        # The masked graph lands first: the sidecar (written last, by save_package) names it by hash.
        for src, dst in ([(masked_quantized, masked_network_path(out_onnx))] if masked_quantized else []) + \
                [(quantized, out_onnx)]:
            staged = dst.with_name(f".{dst.name}.partial")
            shutil.copyfile(src, staged)
            os.replace(staged, dst)
    return save_package(out_onnx, meta)


def _quantize_graph(src: Path, dst: Path, faces: np.ndarray, method: str, settings: dict,
                    min_calibration_cosine: float, what: str) -> tuple[Path, dict]:
    """Quantize one graph on `faces` into `dst` (a temporary folder); refuse it when it disagrees with fp32 there."""
    quantization = _require("onnxruntime.quantization")
    import onnxruntime as ort

    prepared = dst.with_name(dst.stem + ".prepared.onnx")
    quantization.quant_pre_process(str(src), str(prepared))
    input_name = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    (_quantize_ort if method == "ort" else _quantize_nncf)(prepared, dst, faces, input_name, settings)
    try:
        agreement = embedding_agreement(src, dst, faces)
    except Exception as exc:  # onnxruntime's errors derive from Exception only
        raise ModelPackageError(f"the int8 {method} graph of {what!r} does not run in ONNX Runtime "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    if not agreement["mean_cosine"] >= min_calibration_cosine:
        raise ModelPackageError(
            f"int8 {method} quantization of {what!r} disagrees with fp32 on the calibration faces "
            f"(mean cosine {agreement['mean_cosine']:.4f} < {min_calibration_cosine}); not saving it")
    return dst, agreement
