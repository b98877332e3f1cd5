"""`edge-mfr quantize`: INT8 post-training quantization of a model package from a calibration manifest,
with an accuracy gate on held-out data (edge_mfr.quant.gate): exit 2 when a bound is exceeded."""

from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="make an INT8 (QDQ) copy of a model package, calibrated on real faces",
        description="Quantize a model package to INT8 with ONNX Runtime static quantization (or NNCF), "
                    "calibrated on the faces listed in a calibration manifest (calibration/README.md). "
                    "Then measures it against the FP32 source on data the calibration never saw: cosine of the "
                    "two embeddings of held-out celeba_test calib faces, and LFW U-U/U-M accuracy and EER "
                    "(deployed-path protocol). Exits 2 without writing anything when a bound is exceeded; "
                    "otherwise writes OUT_DIR/NAME_int8.onnx + .json with the measurements in its metadata. "
                    "Calibrate its thresholds before using it to unlock.",
    )
    parser.add_argument("model", help="model package: .onnx, .json, a directory holding one, or a bundled name")
    parser.add_argument("-o", "--out-dir", type=Path, required=True, help="where the int8 package is written")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="calibration manifest (default: the repository's calibration/manifest.json)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder the manifest's paths are relative to (default: $EDGE_MFR_DATA or ../shared/data)")
    parser.add_argument("--method", choices=("ort", "nncf"), default="ort",
                        help="ort: onnxruntime quantize_static (default); nncf: nncf.quantize")
    parser.add_argument("--calibrate-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                        help="activation range estimator for --method ort (default minmax)")
    parser.add_argument("--full-range-weights", action="store_true",
                        help="8-bit instead of 7-bit weights (only for CPUs with VNNI or ARM dot-product; "
                             "AVX2-only x86 saturates on them)")
    parser.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor, not per channel")
    parser.add_argument("--limit", type=int, default=None, help="calibrate on the first N manifest faces only")
    gate = parser.add_argument_group("accuracy gate (held-out data; a bound exceeded exits 2)")
    gate.add_argument("--min-mean-cosine", type=float, default=0.99,
                      help="lowest mean FP32/INT8 cosine on the held-out faces (default 0.99)")
    gate.add_argument("--min-cosine", type=float, default=0.95,
                      help="lowest FP32/INT8 cosine of any held-out face (default 0.95)")
    gate.add_argument("--max-eer-increase", type=float, default=0.5,
                      help="largest rise of LFW U-M EER, in percentage points (default 0.5: 2.0%% -> 2.5%%)")
    gate.add_argument("--max-accuracy-drop", type=float, default=0.3,
                      help="largest fall of LFW U-M accuracy, in percentage points (default 0.3)")
    gate.add_argument("--gate-faces", type=int, default=200,
                      help="held-out celeba_test calib faces, half of them masked (default 200; 0 skips)")
    gate.add_argument("--lfw", type=Path, default=None, help="LFW folder with pairs.txt and images/ "
                                                             "(default: DATA_ROOT/lfw)")
    gate.add_argument("--lfw-pairs", type=int, default=None,
                      help="a balanced subset of N LFW pairs, for speed (default all 6000; 0 skips LFW)")
    gate.add_argument("--eval-cache", type=Path, default=None,
                      help="embedding cache folder for the LFW measurement (reuses FP32 embeddings across runs)")
    gate.add_argument("--no-gate", action="store_true", help="skip the accuracy gate (nothing measured or recorded)")
    gate.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for the gate's inference")
    parser.add_argument("--json", action="store_true", help="print the new package's summary and recipe as JSON")
    parser.set_defaults(func=run)


def gate_config(args):
    """The GateConfig the arguments ask for, or None with --no-gate."""
    from ..errors import InputError
    from ..quant.gate import GateBounds, GateConfig

    if args.no_gate:
        return None
    if args.gate_faces < 0 or (args.lfw_pairs is not None and args.lfw_pairs < 0):
        raise InputError("--gate-faces and --lfw-pairs must not be negative")
    if args.gate_faces == 1:
        raise InputError("--gate-faces must be 0 (skip) or at least 2")
    for flag, value in (("--min-mean-cosine", args.min_mean_cosine), ("--min-cosine", args.min_cosine)):
        if not -1.0 <= value <= 1.0:
            raise InputError(f"{flag} is a cosine, between -1 and 1; got {value}")
    for flag, value in (("--max-eer-increase", args.max_eer_increase), ("--max-accuracy-drop", args.max_accuracy_drop)):
        if not value >= 0:
            raise InputError(f"{flag} must be at least 0 points, got {value}")
    skip_cosine = args.gate_faces == 0
    bounds = GateBounds(min_mean_cosine=None if skip_cosine else args.min_mean_cosine,
                        min_cosine=None if skip_cosine else args.min_cosine,
                        max_eer_increase_points=None if args.lfw_pairs == 0 else args.max_eer_increase,
                        max_accuracy_drop_points=None if args.lfw_pairs == 0 else args.max_accuracy_drop)
    return GateConfig(bounds=bounds, held_out_faces=args.gate_faces, lfw_dir=args.lfw, lfw_pairs=args.lfw_pairs,
                      threads=args.threads, cache_dir=args.eval_cache)


def _print_gate(measured: dict) -> None:
    held_out = measured.get("held_out")
    if held_out:
        print(f"held-out faces ({held_out['faces']}, {held_out['masked_faces']} masked): fp32/int8 cosine mean "
              f"{held_out['mean_cosine']:.5f} (unmasked {held_out['mean_cosine_unmasked']:.5f}, masked "
              f"{held_out['mean_cosine_masked']:.5f}), min {held_out['min_cosine']:.5f}")
    lfw = measured.get("lfw")
    if lfw:
        for scenario in ("uu", "um"):
            fp32, int8, change = lfw["fp32"][scenario], lfw["int8"][scenario], lfw["change"][scenario]
            print(f"LFW {scenario.upper()} ({lfw['n_pairs']} pairs): accuracy {100 * fp32['accuracy']:.2f}% -> "
                  f"{100 * int8['accuracy']:.2f}% ({change['accuracy_points']:+.2f} pts), EER "
                  f"{100 * fp32['eer']:.2f}% -> {100 * int8['eer']:.2f}% ({change['eer_points']:+.2f} pts)")


def run(args) -> int:
    from ..models.package import load_package
    from ..quant.gate import QuantizationGateError
    from ..quant.ptq import quantize_package

    package = load_package(args.model)
    try:
        quantized = quantize_package(
            package, args.out_dir, args.manifest, data_root=args.data_root, method=args.method,
            per_channel=not args.per_tensor, reduce_range=not args.full_range_weights,
            calibrate_method=args.calibrate_method, limit=args.limit, gate=gate_config(args),
        )
    except QuantizationGateError as exc:
        if args.json:
            print(json.dumps({"passed": False, "gate": exc.measured}, indent=2))
        else:
            _print_gate(exc.measured)
        raise
    recipe = quantized.meta["recipe"]["quantization"]
    if args.json:
        print(json.dumps({**quantized.summary(), "quantization": recipe}, indent=2))
    else:
        agreement = recipe["agreement_on_calibration_faces"]
        print(f"wrote {quantized.onnx_path} ({quantized.name}, fingerprint {quantized.fingerprint[:12]})")
        print(f"calibrated on {agreement['faces']} faces of manifest {recipe['calibration_manifest']['sha256'][:12]}; "
              f"fp32/int8 cosine on them: mean {agreement['mean_cosine']:.4f}, min {agreement['min_cosine']:.4f}")
        if "masked_network" in recipe:
            masked = recipe["masked_network"]["agreement_on_calibration_faces"]
            print(f"masked-route network: {masked['faces']} masked calibration faces; fp32/int8 cosine on them: "
                  f"mean {masked['mean_cosine']:.4f}, min {masked['min_cosine']:.4f}")
        if "gate" in recipe:
            _print_gate(recipe["gate"])
            print("accuracy gate: passed")
        print("thresholds are not carried over: run `edge-mfr calibrate` on the new package before unlocking with it")
    return 0
