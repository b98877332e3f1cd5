"""Run a list of training configs back to back on one device at an equal compute budget each, and pack the results.

Used for the GPU runs that made the shipped models (`python -m edge_mfr.train.run_all --device cuda ...`): for each
architecture a 40-step probe measures steps per second, and every config of that architecture then gets
`steps = budget x rate`, so its learning-rate schedule completes within the budget (equal wall time and equal
steps within a family). Packing: teacher-initialised networks as float16 differences from the teacher
(`teacher.teacher_delta`; `load_train_checkpoint`, and so `export`, read them back), students in float32, logs and
curves in one archive.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tarfile
import time
from pathlib import Path

import torch

from edge_mfr.train.config import load_config
from edge_mfr.train.teacher import teacher_delta
from edge_mfr.train.trainer import fit, load_train_checkpoint

PROBE_STEPS = 40
RUN_OVERHEAD_S = 6.0  # pool decode, evaluations and checkpoints of one run


def steps_for_budget(config, budget_s: float, out_dir: Path, log, probe_steps: int = PROBE_STEPS) -> int:
    # A stage-2 run is probed as its stage-1 network (the frozen part dominates its cost).
    stage_one = {"init": "scratch", "init_checkpoint": None, "stage": "classify", "sampler": "random",
                 "arc_weight": 1.0}
    probe = dataclasses.replace(config, name=f"probe_{config.arch}", steps=probe_steps, eval_every=10**9,
                                out_dir=str(out_dir / "probes"), time_budget_s=None, progress=False,
                                **(stage_one if config.stage == "triplet" else {}))
    fit(probe, log=log)
    history = json.loads((out_dir / "probes" / probe.name / "history.json").read_text())
    rate = history["step"] / max(history["train_s"], 1e-6)
    steps = max(probe_steps, int((budget_s - RUN_OVERHEAD_S) * rate))
    log(f"{config.arch}: {rate:.1f} steps/s ({rate * config.batch_size:.0f} faces/s) -> {steps} steps in "
        f"{budget_s:.0f} s")
    return steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_mfr.train.run_all", description=__doc__)
    parser.add_argument("configs", nargs="+", help="config names, run in this order")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--budget", nargs="+", default=["dlib_resnet=60", "mfn_s=35"], metavar="ARCH=SECONDS",
                        help="wall time per run of each architecture (stage 2 runs get a third)")
    parser.add_argument("--runs", default="runs/train")
    parser.add_argument("--pack", help="folder for the packed results")
    parser.add_argument("--probe-steps", type=int, default=PROBE_STEPS)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    args = parser.parse_args(argv)

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log_file = (runs / "run_all.log").open("a")

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    budgets = {k: float(v) for k, v in (item.split("=") for item in args.budget)}
    rates: dict[str, int] = {}
    started = time.perf_counter()
    for name in args.configs:
        config = load_config(name).with_overrides([f"pool={args.pool}", f"device={args.device}",
                                                   f"amp={str(args.amp).lower()}", f"out_dir={runs}",
                                                   "progress=false", *args.set])
        budget = budgets[config.arch] / (3 if config.stage == "triplet" else 1)
        key = f"{config.arch}/{config.stage}"
        try:
            if key not in rates:
                rates[key] = steps_for_budget(config, budget, runs, log, args.probe_steps)
            config = dataclasses.replace(config, steps=rates[key], eval_every=max(1, rates[key] // 8),
                                         hard_after_steps=max(1, min(config.hard_after_steps, rates[key] // 6)),
                                         head_warmup_steps=min(config.head_warmup_steps, rates[key] // 8),
                                         warmup_steps=min(config.warmup_steps, rates[key] // 10),
                                         time_budget_s=budget * 1.5)
            fit(config, log=log)
        except Exception as exc:  # one failed recipe must not cost the others their device time
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
        log(f"elapsed {time.perf_counter() - started:.0f} s")
        if args.pack:  # after every run: a command stopped at its time limit still returns what is done
            pack(runs, Path(args.pack), args.configs, log)
    return 0


def pack(runs: Path, out: Path, names, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    students = []
    with tarfile.open(out / "logs.tar.gz", "w:gz") as archive:
        for path in sorted(runs.rglob("*")):
            if path.suffix in (".json", ".png", ".log"):
                archive.add(path, arcname=str(path.relative_to(runs)))
    for name in names:
        best = runs / name / "best.pt"
        if not best.is_file():
            continue
        record = load_train_checkpoint(best)
        if record["config"]["arch"] == "dlib_resnet":
            if not (out / f"{name}.delta.pt").is_file():
                torch.save(teacher_delta(record), out / f"{name}.delta.pt")
        else:
            students.append(best)
    for index in range(0, len(students), 3):
        with tarfile.open(out / f"students_{index // 3}.tar", "w") as archive:
            for best in students[index:index + 3]:
                archive.add(best, arcname=f"{best.parent.name}/best.pt")
    log(f"packed into {out}: {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    raise SystemExit(main())
