"""LFW on the deployed path, for any list of model packages: one markdown table for both mask families.

Protocol (issue 8): all 6,000 view-2 pairs; the subject is the face nearest the image centre (LFW centres
it); masked images (U-M: the probe, M-M: both) get a synthetic mask at the unmasked landmarks and are then
detected afresh, as `FaceUnlock` does with a masked probe, with the detector `FaceUnlock` uses. Detector
misses are failures of the system: the main columns count them (the image is embedded at the mean
landmarks of the located images), the last two leave them out. Embeddings come from the evaluation cache,
so a model already evaluated with `edge-mfr eval` under the same protocol costs only the scoring.

Run:
    python benchmarks/lfw_deployed_table.py --model dlib_resnet_v1 --model path/to/student.onnx \
        [--families template nist] [--json-dir DIR] [--disjoint-from ../shared/data/glint24/LFW_OVERLAP.txt]

`--record`: write the first family's U-U / U-M / M-M accuracy and EER (misses counted, all pairs) into each
package's sidecar as `accuracy.lfw`, which `edge-mfr models list` shows (bundled packages are left as they are).

`--disjoint-from`: also report the pairs left after removing those identities (a model trained on glint24
must be reported on LFW over all pairs and over the identity-disjoint remainder). Needs ../shared/data/lfw.
LFW is used for evaluation only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edge_mfr.eval import report
from edge_mfr.eval.pairs import read_pairs
from edge_mfr.eval.runner import evaluate_pairs
from edge_mfr.models.package import BUNDLED_DIR, load_package, save_package

LFW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lfw"
SCENARIO_NAMES = {"uu": "U-U", "um": "U-M", "mm": "M-M"}


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edge-mfr" / "embeddings"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _fnmr(m: dict, key: str) -> str:
    entry = m["fnmr_at_fmr"].get(key)
    if entry is None or entry["support"] == "not supported":
        return "n/s"
    return _percent(entry["fnmr"]) + ("†" if entry["support"] == "marginal" else "")


def table_rows(reports: dict[str, dict], label: str = "") -> list[str]:
    """Markdown rows from {family: report}; U-U (no mask) is shown once, from the first family."""
    rows = []
    models = list(dict.fromkeys(r["model"] for rep in reports.values() for r in rep["results"]))
    for model in models:
        shown_uu = False
        for family, rep in reports.items():
            for result in rep["results"]:
                if result["model"] != model or (result["scenario"] == "uu" and shown_uu):
                    continue
                shown_uu = shown_uu or result["scenario"] == "uu"
                counted, excluded = report.headline_metrics(result), result["metrics"]
                misses = result["detector_misses"]
                masks = "none" if result["scenario"] == "uu" else family
                cells = [model + label, masks, SCENARIO_NAMES[result["scenario"]]]
                if counted is None:
                    rows.append("| " + " | ".join(cells + ["-"] * 9) + " |")
                    continue
                cells += [f"{_percent(counted['accuracy']['mean'])} ± {_percent(counted['accuracy']['std'])}",
                          _percent(counted["eer"]), _fnmr(counted, "0.01"), _fnmr(counted, "0.001"),
                          f"{counted['fdr']:.2f}",
                          f"{misses['pairs']} ({misses['reference_images'] + misses['probe_images']})",
                          f"{result['n_scored']}",
                          _percent(excluded["accuracy"]["mean"]) if excluded else "-",
                          _percent(excluded["eer"]) if excluded else "-"]
                rows.append("| " + " | ".join(cells) + " |")
    return rows


HEADER = ["Model", "Masks", "Scenario", "Accuracy (10-fold)", "EER", "FMR100", "FMR1000", "FDR",
          "Detector misses: pairs (images)", "Pairs without misses", "Accuracy, misses excluded",
          "EER, misses excluded"]


def record_accuracy(packages, family_report: dict) -> None:
    """Each package's U-U / U-M / M-M accuracy and EER in one family's report -> its sidecar's accuracy.lfw."""
    protocol = {k: v for k, v in family_report.items() if k not in ("images", "results")}
    for package in packages:
        if package.onnx_path.parent == BUNDLED_DIR:
            print(f"--record: {package.name} is bundled, not rewritten (evaluate a copy given by path)",
                  file=sys.stderr)
            continue
        rows = [r for r in family_report["results"] if r["fingerprint"] == package.fingerprint]
        record = {"mask_family": family_report["mask_family"], "pairs": family_report["n_pairs"],
                  "subset": family_report["n_pairs"] < 6000, "protocol": protocol,
                  "measured_by": "benchmarks/lfw_deployed_table.py (edge_mfr.eval.runner.evaluate_pairs), "
                                 "misses counted"}
        for row in rows:
            metrics = row["metrics_misses_counted"] or row["metrics"]  # None where nothing was missed
            record[row["scenario"]] = {"accuracy": metrics["accuracy"]["mean"], "eer": metrics["eer"]}
        meta = dict(package.meta, accuracy={**package.meta.get("accuracy", {}), "lfw": record})
        save_package(package.onnx_path, meta)
        print(f"recorded LFW accuracy in {package.sidecar_path}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="model package (path or bundled name)")
    parser.add_argument("--families", nargs="+", default=["template", "nist"], help="mask families")
    parser.add_argument("--pairs", type=Path, default=LFW / "pairs.txt")
    parser.add_argument("--images", type=Path, default=LFW / "images")
    parser.add_argument("--detector", default=None, help="detector name (default: FaceUnlock's)")
    parser.add_argument("--seed", type=int, default=0, help="mask draws")
    parser.add_argument("--limit", type=int, default=None, help="a balanced subset of N pairs (quick checks only)")
    parser.add_argument("--disjoint-from", type=Path, help="identities file: also report the pairs without them")
    parser.add_argument("--json-dir", type=Path, help="write each family's full report (edge-mfr eval JSON) here")
    parser.add_argument("--cache-dir", type=Path, default=_default_cache_dir())
    parser.add_argument("--threads", type=int, default=1, help="inference threads per model")
    parser.add_argument("--record", action="store_true", help="write the first family's results into each "
                        "package's sidecar (accuracy.lfw)")
    args = parser.parse_args()

    packages = [load_package(m) for m in args.model]
    subsets = [("", [])]
    if args.disjoint_from:
        subsets.append((" (identity-disjoint)", args.disjoint_from.read_text(encoding="utf-8").split()))
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    notes = []
    for label, excluded_identities in subsets:
        pair_set = read_pairs(args.pairs, args.images, limit=args.limit, exclude_identities=excluded_identities)
        reports = {}
        for family in args.families:
            print(f"{family} masks{label}: {len(pair_set.pairs)} pairs ...", file=sys.stderr)
            reports[family] = evaluate_pairs(pair_set, packages, scenarios=["uu", "um", "mm"], mask_family=family,
                                             seed=args.seed, detector=args.detector, cache_dir=args.cache_dir,
                                             threads=args.threads, n_resamples=0, progress=sys.stderr.isatty(),
                                             face="centre", landmarks="masked")
            if args.json_dir:
                suffix = "_disjoint" if label else ""
                report.write_json(reports[family], args.json_dir / f"lfw_deployed_{family}{suffix}.json")
        lines += table_rows(reports, label)
        first = next(iter(reports.values()))
        if args.record and not label:
            record_accuracy(packages, first)
        notes.append(f"{len(pair_set.pairs)} pairs{label}"
                     + (f" ({pair_set.excluded_pairs} left out for {len(excluded_identities)} identities)"
                        if excluded_identities else ""))
    print("\n".join(lines))
    print()
    print(f"LFW view 2, {'; '.join(notes)}; detector {first['detector']}, centre face, masked images detected "
          f"afresh; masks drawn per image with seed {args.seed}. Rates in %. FMR100/FMR1000: lowest FNMR at "
          f"FMR <= 1% / 0.1% († fewer than 10 impostors at that FMR, n/s fewer than 1/FMR). Accuracy, EER, "
          f"FMR100, FMR1000 and FDR count detector misses as errors of the system (the missed image is embedded "
          f"at the mean landmarks of the located images); the last two columns leave those pairs out.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
