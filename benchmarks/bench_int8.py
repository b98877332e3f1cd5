"""FP32 vs INT8 on ONNX Runtime CPU: latency at batch 1 and 32, size on disk, cosine to FP32, and where the
time goes when INT8 is not 1.5x faster.

For each FP32 package given (default: the bundled teacher), this quantizes it with edge_mfr.quant on the
calibration manifest (calibration/README.md), once per method:
  int8-ort            onnxruntime quantize_static, the default settings (QDQ, per-channel, 7-bit weights)
  int8-ort-fullrange  the same with 8-bit weights (reduce_range=False)
  int8-nncf           nncf.quantize
then
  - times FP32 and every INT8 session interleaved run by run (rotating the order each round), as the unlock
    path runs them (all graph optimisations), on --threads intra-op threads (default 1), at batch 1 and 32:
    median wall time per face, the fastest run, and the median CPU time of the calling thread per face.
    With one thread ONNX Runtime runs every kernel on the calling thread, so CPU time is the work done,
    unaffected by other processes preempting it on a shared machine; the speed ratio FP32/INT8 is given
    on CPU time (threads 1) and on wall time;
  - size of each .onnx on disk;
  - cosine between FP32 and INT8 embeddings of the same held-out face (edge_mfr.quant.gate: celeba_test
    calib photos, half masked, identities disjoint from training and calibration): mean and min.
    --latency-only skips it (an untrained export: its embeddings mean nothing, only its speed does);
  - when an INT8 variant is under 1.5x faster at batch 1 (or with --profile), a per-op-type profile of
    one FP32 and one INT8 session from onnxruntime's profiler (ms per face at batch 1, share of the run),
    and the CPU's int8 dot-product features from /proc/cpuinfo (avx512_vnni, avx_vnni, amx_int8).

Run: OMP_NUM_THREADS=1 python benchmarks/bench_int8.py [PACKAGE ...] [--latency-only] [--json out.json]
(PACKAGE: a .onnx/.json path, a package folder or a bundled name).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_mfr.models.complexity import interleaved_run_times, ort_cpu_session  # noqa: E402
from edge_mfr.models.package import load_package  # noqa: E402
from edge_mfr.quant.gate import held_out_agreement, held_out_faces  # noqa: E402
from edge_mfr.quant.manifest import default_data_root, load_manifest  # noqa: E402
from edge_mfr.quant.ptq import quantize_package  # noqa: E402

TARGET_SPEEDUP = 1.5
VARIANTS = {"int8-ort": {"method": "ort"},
            "int8-ort-fullrange": {"method": "ort", "reduce_range": False},
            "int8-nncf": {"method": "nncf"}}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
PROFILE_TOP = 8


def cpu_features() -> dict:
    flags: set[str] = set()
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"model": model, **{flag: flag in flags for flag in CPU_FLAGS}}


def time_sessions(sessions: dict, batch: np.ndarray, repeats: int, warmup: int = 3) -> dict[str, dict]:
    """Per session: median and min wall ms per face and median calling-thread CPU ms per face, the sessions
    interleaved run by run so load from other processes falls on all of them alike."""
    faces = len(batch)
    return {name: {"wall_ms_per_face": float(np.median(wall)) * 1e3 / faces,
                   "min_wall_ms_per_face": float(np.min(wall)) * 1e3 / faces,
                   "cpu_ms_per_face": float(np.median(cpu)) * 1e3 / faces, "runs": repeats}
            for name, (wall, cpu) in interleaved_run_times(sessions, batch, repeats, warmup).items()}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def op_profile(onnx_path: Path, batch: np.ndarray, threads: int, runs: int) -> dict:
    """ms per face by op type (kernel time from onnxruntime's profiler), averaged over `runs` runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="bench-int8-profile-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "trace")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: batch}
        for _ in range(3):
            session.run(None, feed)
        session.end_profiling()  # drop the warm-up runs
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    nodes: dict[str, set] = defaultdict(set)
    model_run_us = [event["dur"] for event in trace if event.get("cat") == "Session" and event["name"] == "model_run"]
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            by_op[op] += event["dur"]
            nodes[op].add(event["name"])
    faces = len(batch)
    total_runs = len(model_run_us)
    per_face = {op: us / 1e3 / total_runs / faces for op, us in by_op.items()}
    return {"runs": total_runs, "model_run_ms_per_face": float(np.median(model_run_us)) / 1e3 / faces,
            "kernel_ms_per_face": sum(per_face.values()),
            "ops": {op: {"ms_per_face": ms, "nodes": len(nodes[op])}
                    for op, ms in sorted(per_face.items(), key=lambda kv: -kv[1])}}


def print_profile(name: str, profile: dict) -> None:
    total = profile["kernel_ms_per_face"]
    print(f"  {name}: model_run {profile['model_run_ms_per_face']:.3f} ms/face, kernels {total:.3f} ms/face "
          f"({profile['runs']} runs)")
    for op, row in list(profile["ops"].items())[:PROFILE_TOP]:
        print(f"    {op:24s} {row['ms_per_face']:8.3f} ms  {100 * row['ms_per_face'] / total:5.1f}%  "
              f"({row['nodes']} nodes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="*", default=["dlib_resnet_v1"],
                        help="FP32 packages (paths or bundled names); default: the bundled teacher")
    parser.add_argument("--manifest", type=Path, default=None, help="calibration manifest (default: the repo's)")
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the INT8 packages here (default: temporary)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats-b1", type=int, default=60)
    parser.add_argument("--repeats-b32", type=int, default=6)
    parser.add_argument("--held-out-faces", type=int, default=200)
    parser.add_argument("--latency-only", action="store_true",
                        help="no cosine to FP32 (for untrained exports: only their speed means anything)")
    parser.add_argument("--profile", action="store_true", help="profile ops even when INT8 reaches the target")
    parser.add_argument("--profile-runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    manifest = load_manifest(args.manifest)
    packages = [load_package(p) for p in args.packages]
    cpu = cpu_features()
    print(f"CPU: {cpu['model']}; " + ", ".join(f"{flag} {'yes' if cpu[flag] else 'no'}" for flag in CPU_FLAGS))
    faces = None
    if not args.latency_only:
        faces = held_out_faces(args.data_root, manifest, args.held_out_faces, args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        out_dir = args.out_dir or Path(tmp)
        for fp32 in packages:
            int8 = {name: quantize_package(fp32, out_dir / name, manifest, data_root=args.data_root,
                                           min_calibration_cosine=0.0 if args.latency_only else 0.95,
                                           **VARIANTS[name])
                    for name in args.variants}
            sessions = {"fp32": ort_cpu_session(fp32.onnx_path, args.threads)}
            sessions.update({name: ort_cpu_session(pkg.onnx_path, args.threads) for name, pkg in int8.items()})
            h, w = fp32.input_size
            rng = np.random.default_rng(args.seed)
            batches = {b: rng.uniform(-1, 1, (b, 3, h, w)).astype(np.float32) for b in (1, 32)}  # speed only
            times = {1: time_sessions(sessions, batches[1], args.repeats_b1),
                     32: time_sessions(sessions, batches[32], args.repeats_b32)}
            row = {"model": fp32.name, "fingerprint": fp32.fingerprint[:12], "threads": args.threads,
                   "fp32": {"size_bytes": fp32.onnx_path.stat().st_size,
                            **{f"b{b}": times[b]["fp32"] for b in times}},
                   "int8": {}}
            for name, package in int8.items():
                entry = {"package": package.name, "fingerprint": package.fingerprint[:12],
                         "size_bytes": package.onnx_path.stat().st_size}
                for b in times:
                    base, quant = times[b]["fp32"], times[b][name]
                    entry[f"b{b}"] = {**quant, "speedup_cpu": base["cpu_ms_per_face"] / quant["cpu_ms_per_face"],
                                      "speedup_wall": base["wall_ms_per_face"] / quant["wall_ms_per_face"]}
                # the target is judged on the work done (CPU time) with one thread, else on wall time
                entry["b1_speedup"] = entry["b1"]["speedup_cpu" if args.threads == 1 else "speedup_wall"]
                if faces is not None:
                    entry["held_out"] = held_out_agreement(fp32, package, faces, args.threads)
                row["int8"][name] = entry
            slow = [name for name, e in row["int8"].items() if e["b1_speedup"] < TARGET_SPEEDUP]
            if slow or args.profile:
                row["profile_b1"] = {"fp32": op_profile(fp32.onnx_path, batches[1], args.threads, args.profile_runs)}
                for name in (list(int8) if args.profile else slow):
                    row["profile_b1"][name] = op_profile(int8[name].onnx_path, batches[1], args.threads,
                                                         args.profile_runs)
            results.append(row)

    print(f"\nONNX Runtime {__import__('onnxruntime').__version__} CPU, {args.threads} thread(s), ms per face: "
          "CPU = median calling-thread CPU time, wall = median wall time (fastest run); speedup = fp32 / int8")
    print(f"load average at the end: {load_average()} (other processes share these cores)")
    print("| model | variant | size MB | b1 CPU | b1 wall (min) | b1 speedup CPU / wall | b32 CPU | b32 wall (min) "
          "| b32 speedup CPU / wall | mean cos | min cos |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def cells(t: dict, speedups: str) -> str:
        return (f"{t['cpu_ms_per_face']:.3f} | {t['wall_ms_per_face']:.3f} ({t['min_wall_ms_per_face']:.3f}) | "
                f"{speedups}")

    for r in results:
        f = r["fp32"]
        print(f"| {r['model']} | fp32 | {f['size_bytes'] / 2**20:.2f} | {cells(f['b1'], '1 / 1')} | "
              f"{cells(f['b32'], '1 / 1')} | 1 | 1 |")
        for name, e in r["int8"].items():
            cos = e.get("held_out")
            agreement = f"{cos['mean_cosine']:.5f} | {cos['min_cosine']:.5f}" if cos else "n/a | n/a"
            speed = {b: f"{e[b]['speedup_cpu']:.2f}x / {e[b]['speedup_wall']:.2f}x" for b in ("b1", "b32")}
            print(f"| {r['model']} | {name} | {e['size_bytes'] / 2**20:.2f} | {cells(e['b1'], speed['b1'])} | "
                  f"{cells(e['b32'], speed['b32'])} | {agreement} |")
    if faces is not None:
        print(f"cosine: FP32 vs INT8 embedding of the same face, {len(faces.paths)} held-out celeba_test calib "
              f"faces ({sum(faces.masked)} masked)")
    for r in results:
        if "profile_b1" in r:
            print(f"\nwhere the time goes, {r['model']}, batch 1, {args.threads} thread(s) (onnxruntime profiler, "
                  f"top {PROFILE_TOP} op types):")
            for name, profile in r["profile_b1"].items():
                print_profile(name, profile)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "load_average": load_average(), "argv": sys.argv[1:],
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
