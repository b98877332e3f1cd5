"""Params, MACs and ONNX Runtime CPU latency per face of every student, and of the bundled teacher.

Students are exported the way `edge-mfr models export` ships them (PReLU decomposed for the NCHWc path),
with PReLU and with ReLU, and randomly initialised weights: latency does not depend on the weight values. Packages found in
edge_mfr/models/bundled/ (the dlib teacher) are timed as shipped. Sessions are timed interleaved, run by
run, so load from other processes on a shared machine falls on all models alike; the table shows the
median and (best) ms/face. `--package` adds trained packages (a path or an installed name), timed as shipped.

Run: nice python benchmarks/bench_models.py [--threads 1 2] [--repeats 30] [--package runs/models/student.onnx]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from edge_mfr.models.complexity import ort_cpu_session, onnx_complexity, time_ort_sessions, torch_complexity
from edge_mfr.models.export import decompose_prelu, export_onnx
from edge_mfr.models.mobilefacenet import ARCHITECTURES, build_student
from edge_mfr.models.package import bundled_models, load_package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per model at batch 1 "
                        "(larger batches use a quarter)")
    parser.add_argument("--activations", nargs="+", default=["prelu", "relu"],
                        help="student activations to compare (see mobilefacenet.ACTIVATIONS)")
    parser.add_argument("--package", action="append", default=[], help="also time this model package")
    args = parser.parse_args()

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHITECTURES:
            for activation in args.activations:
                model = build_student(arch, activation=activation).eval()
                counts = torch_complexity(model)
                name = f"{arch}/{activation}"
                path = export_onnx(decompose_prelu(model), Path(tmp) / f"{arch}_{activation}.onnx")
                rows[name] = {"path": path, "input_size": model.input_size, "params": counts.params,
                              "macs": counts.macs, "note": "random init" + (", PReLU decomposed as exported"
                                                                           if activation == "prelu" else "")}
        packages = [(p, "bundled") for p in bundled_models()] + [(load_package(p), "package") for p in args.package]
        for package, origin in packages:
            counts = onnx_complexity(package.onnx_path)
            rows[package.name] = {"path": package.onnx_path, "input_size": package.input_size,
                                  "params": counts.params, "macs": counts.macs,
                                  "note": f"{origin} {package.architecture}"}

        rng = np.random.default_rng(0)
        timings: dict[tuple[str, int, int], tuple[float, float]] = {}
        for threads in args.threads:
            sessions = {name: ort_cpu_session(row["path"], threads) for name, row in rows.items()}
            for batch_size in args.batches:
                repeats = args.repeats if batch_size == 1 else max(5, args.repeats // 4)
                # One batch per input size; each model sees the same number of faces.
                for size in {row["input_size"] for row in rows.values()}:
                    batch = rng.uniform(-1, 1, (batch_size, 3, *size)).astype(np.float32)
                    group = {name: s for name, s in sessions.items() if rows[name]["input_size"] == size}
                    for name, result in time_ort_sessions(group, batch, threads, repeats).items():
                        timings[(name, threads, batch_size)] = (result.median_ms_per_face, result.min_ms_per_face)

    print(f"onnxruntime CPU, {os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.1f}; "
          "ms/face as median (best)")
    columns = [(t, b) for t in args.threads for b in args.batches]
    header = (f"{'model':16s} {'input':>7s} {'params':>8s} {'GMACs':>6s} "
              + " ".join(f"{f'{t}T b{b}':>15s}" for t, b in columns) + "  note")
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        cells = " ".join(f"{timings[(name, t, b)][0]:6.2f} ({timings[(name, t, b)][1]:6.2f})" for t, b in columns)
        h, w = row["input_size"]
        print(f"{name:16s} {f'{h}x{w}':>7s} {row['params'] / 1e6:7.2f}M {row['macs'] / 1e9:6.3f} {cells}  "
              f"{row['note']}")


if __name__ == "__main__":
    main()
