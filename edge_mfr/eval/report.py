"""Evaluation reports: JSON, a markdown table, DET and score-distribution plots.

Everything here works on the JSON-ready report dict built by `edge_mfr.eval.runner` (or loaded back from
a saved JSON file), so tables and plots can be regenerated or combined without recomputing embeddings.

Report layout ("edge-mfr-eval/2"):
    {format, pairs_file, images_dir, n_pairs, n_folds, missing_images, skipped_pairs, excluded_identities,
     excluded_pairs, seed, mask_family, aligned, face (largest|centre), landmarks (masked|unmasked: where a
     masked image's landmarks come from), detector, face_locator, models: [{name, fingerprint, path}],
     images: {unmasked|masked: {...counts, detector_misses, fallback_landmarks, failures...}},
     results: [{model, fingerprint, scenario, n_pairs, n_scored, fte_pairs, fte_rate, fte_images,
                detector_misses: {pairs, reference_images, probe_images, images},
                metrics (misses excluded; see metrics.evaluate), n_scored_misses_counted,
                metrics_misses_counted (misses scored at the fallback landmarks; null without misses),
                pairs: [{first, second, genuine, fold, score|null, [miss: true, fallback_score]}]}]}
A pair whose image gave no face has score null: it is left out of `metrics`. When the detector missed the
face, the pair also has the score at the fallback landmarks, used by `metrics_misses_counted`. Version 1
reports (no misses section) load too.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edge_mfr.errors import InputError
from edge_mfr.eval.metrics import MARGINAL, NOT_SUPPORTED, det_points

REPORT_FORMAT = "edge-mfr-eval/2"
READABLE_FORMATS = ("edge-mfr-eval/1", REPORT_FORMAT)
SCENARIO_TITLES = {"uu": "unmasked vs unmasked", "um": "unmasked vs masked probe", "mm": "masked vs masked"}


def _json_ready(value):
    """Non-finite floats become null: JSON has no Infinity/NaN (e.g. a threshold of +inf = reject all)."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(report: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_ready(report), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def load_json(path) -> dict:
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    if report.get("format") not in READABLE_FORMATS:
        raise InputError(f"{path} is not an edge-mfr evaluation report (format {report.get('format')!r})")
    return report


def scored_pairs(result: dict, misses_counted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels) of the scored pairs of one result: detector misses left out, or with
    `misses_counted` scored at their fallback landmarks."""
    def score(p):
        return p.get("fallback_score") if misses_counted and p.get("miss") else p["score"]
    kept = [(score(p), p["genuine"]) for p in result["pairs"] if score(p) is not None]
    return (np.array([s for s, _ in kept], dtype=np.float64), np.array([int(g) for _, g in kept], dtype=np.int64))


def headline_metrics(result: dict) -> dict | None:
    """The honest figures of a result: misses counted when there were any, else the scored pairs'."""
    return result.get("metrics_misses_counted") or result.get("metrics")


def _percent(value, digits=2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _supported(cell: str, entry: dict) -> str:
    if entry["support"] == NOT_SUPPORTED:
        return "n/s"
    return cell + ("†" if entry["support"] == MARGINAL else "")


def _metric_cells(m: dict) -> list[str]:
    eer_cell = _percent(m["eer"])
    interval = m.get("bootstrap", {}).get("intervals", {}).get("eer")
    if interval:
        eer_cell += f" [{_percent(interval[0])}, {_percent(interval[1])}]"
    fnmr = m["fnmr_at_fmr"]
    tpr = m["tpr_at_far"]
    return [
        f"{_percent(m['accuracy']['mean'])} ± {_percent(m['accuracy']['std'])}",
        eer_cell,
        f"{m['auc']:.4f}",
        _supported(_percent(fnmr["0.01"]["fnmr"]), fnmr["0.01"]) if "0.01" in fnmr else "-",
        _supported(_percent(fnmr["0.001"]["fnmr"]), fnmr["0.001"]) if "0.001" in fnmr else "-",
        _supported(_percent(tpr["0.002"]["tpr"]), tpr["0.002"]) if "0.002" in tpr else "-",
        _supported(_percent(tpr["0.001"]["tpr"]), tpr["0.001"]) if "0.001" in tpr else "-",
        f"{m['fdr']:.2f}",
        f"{m['genuine_mean']:.3f} ± {m['genuine_std']:.3f}",
        f"{m['impostor_mean']:.3f} ± {m['impostor_std']:.3f}",
    ]


def markdown_table(report: dict) -> str:
    """One row per model and scenario, two when the detector missed faces (misses counted at the fallback
    landmarks, then excluded). Rates in %; † marks a marginal impostor count, n/s an unsupported one."""
    header = ["Model", "Scenario", "Detector misses", "Pairs scored", "Unscored pairs", "Accuracy (10-fold)",
              "EER [95% CI]", "AUC", "FMR100", "FMR1000", "TPR@FAR=0.2%", "TPR@FAR=0.1%", "FDR", "Genuine μ±σ",
              "Impostor μ±σ"]
    rows = []
    for result in report["results"]:
        misses = result.get("detector_misses") or {"pairs": 0}
        n = result["n_pairs"]
        variants = [("none" if not misses["pairs"] else "excluded", result.get("metrics"), result["n_scored"])]
        if misses["pairs"]:
            images = misses["reference_images"] + misses["probe_images"]
            variants = [(f"{misses['pairs']} pairs ({images} img): counted", result.get("metrics_misses_counted"),
                         result.get("n_scored_misses_counted", result["n_scored"])),
                        (f"{misses['pairs']} pairs: excluded", result.get("metrics"), result["n_scored"])]
        for label, m, n_scored in variants:
            cells = [result["model"], result["scenario"], label, str(n_scored),
                     f"{n - n_scored} ({_percent((n - n_scored) / n if n else 0.0)}%)"]
            rows.append(cells + (_metric_cells(m) if m is not None else ["-"] * (len(header) - len(cells))))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    scenarios = list(dict.fromkeys(r["scenario"] for r in report["results"]))
    masked = bool(set(scenarios) - {"uu"})
    located = ("aligned crops (no detection)" if report.get("aligned") else
               f"detector {report.get('detector') or '?'}, {report.get('face', 'largest')} face")
    if masked and not report.get("aligned"):
        located += ("; masked images detected afresh" if report.get("landmarks", "unmasked") == "masked"
                    else "; masked images keep the unmasked image's landmarks")
    notes = [
        "",
        f"Pairs: {report['n_pairs']} from `{Path(report['pairs_file']).name}`"
        + (f", {report['skipped_pairs']} skipped for {len(report['missing_images'])} missing images"
           if report.get("skipped_pairs") else "")
        + (f", {report['excluded_pairs']} excluded for involving {len(report['excluded_identities'])} "
           f"excluded identities" if report.get("excluded_pairs") else "") + ". "
        + "Scenarios: " + "; ".join(f"{s} = {SCENARIO_TITLES.get(s, s)}" for s in scenarios)
        + (f" (masks: {report['mask_family']}, seed {report['seed']})" if masked else "") + f". Faces: {located}.",
        "Rates in %. FMR100/FMR1000: lowest FNMR at FMR <= 1% / 0.1%. Detector misses: pairs with an image where "
        "no face was found; 'counted' scores them at the mean landmarks of the located images (a fixed fallback), "
        "'excluded' leaves them out. Unscored pairs: unreadable images, failed masks, and misses when excluded. "
        "† fewer than 10 impostors fall at that FMR (estimate noisy); n/s: fewer impostors than 1/FMR.",
    ]
    return "\n".join(lines + notes) + "\n"


def write_markdown(report: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_table(report), encoding="utf-8")
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def plot_det(report: dict, out_dir) -> list[Path]:
    """One DET plot per scenario (det_<scenario>.png), a curve per model, both axes logarithmic; detector
    misses are counted (scored at the fallback landmarks) when there were any.

    A rate of exactly 0 cannot sit on a log axis: it is drawn at half the rate's resolution (0.5 / number
    of impostor or genuine pairs), so a perfectly separated model still shows as a corner.
    """
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for scenario in dict.fromkeys(r["scenario"] for r in report["results"]):
        fig, ax = plt.subplots(figsize=(6, 5))
        for result in report["results"]:
            if result["scenario"] != scenario or headline_metrics(result) is None:
                continue
            counted = result.get("metrics_misses_counted") is not None
            fmr, fnmr, _ = det_points(*scored_pairs(result, misses_counted=counted))
            m = headline_metrics(result)
            # The observed points already include every corner of the staircase.
            ax.plot(np.maximum(fmr, 0.5 / m["n_impostor"]), np.maximum(fnmr, 0.5 / m["n_genuine"]),
                    label=f"{result['model']} (EER {100 * m['eer']:.2f}%)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("FMR (false match rate)")
        ax.set_ylabel("FNMR (false non-match rate)")
        ax.set_title(f"DET, {scenario}: {SCENARIO_TITLES.get(scenario, scenario)}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / f"det_{scenario}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_score_distributions(report: dict, out_dir) -> Path:
    """score_distributions.png: genuine and impostor histograms, a panel per model (rows) and scenario
    (columns), with the EER threshold marked; detector misses counted as in `plot_det`."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(r["model"] for r in report["results"]))
    scenarios = list(dict.fromkeys(r["scenario"] for r in report["results"]))
    fig, axes = plt.subplots(len(models), len(scenarios), figsize=(4 * len(scenarios), 3 * len(models)),
                             squeeze=False, sharex=True)
    counted = {id(r): r.get("metrics_misses_counted") is not None for r in report["results"]}
    all_scores = np.concatenate([scored_pairs(r, counted[id(r)])[0] for r in report["results"]] + [np.zeros(0)])
    margin = 0.02
    bins = np.linspace(all_scores.min() - margin, all_scores.max() + margin, 60) if all_scores.size else 60
    for result in report["results"]:
        ax = axes[models.index(result["model"]), scenarios.index(result["scenario"])]
        ax.set_title(f"{result['model']} / {result['scenario']}", fontsize=9)
        if headline_metrics(result) is None:
            continue
        scores, labels = scored_pairs(result, counted[id(result)])
        ax.hist(scores[labels == 1], bins=bins, density=True, alpha=0.55, label="genuine")
        ax.hist(scores[labels == 0], bins=bins, density=True, alpha=0.55, label="impostor")
        threshold = headline_metrics(result).get("eer_threshold")
        if threshold is not None and math.isfinite(threshold):
            ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label="EER threshold")
        ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("cosine similarity")
    fig.tight_layout()
    path = out_dir / "score_distributions.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
