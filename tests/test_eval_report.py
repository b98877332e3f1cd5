import json

import numpy as np
import pytest

from edge_mfr.errors import InputError
from edge_mfr.eval import metrics, report


def _result(model, scenario, seed, n_pairs=400, fte=3):
    """A report entry from overlapping score distributions, with `fte` unscored pairs."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_pairs) % 2
    scores = np.where(labels == 1, rng.normal(0.6, 0.15, n_pairs), rng.normal(0.1, 0.1, n_pairs))
    scored = np.arange(n_pairs) >= fte
    pairs = [{"first": f"A/A_{i:04d}", "second": f"B/B_{i:04d}", "genuine": bool(l), "fold": int(i % 10),
              "score": float(s) if ok else None} for i, (s, l, ok) in enumerate(zip(scores, labels, scored))]
    return {"model": model, "fingerprint": "0" * 64, "scenario": scenario, "n_pairs": n_pairs,
            "n_scored": int(scored.sum()), "fte_pairs": fte, "fte_rate": fte / n_pairs, "fte_images": [],
            "metrics": metrics.evaluate(scores[scored], labels[scored], folds=(np.arange(n_pairs) % 10)[scored],
                                        n_resamples=50, seed=seed),
            "pairs": pairs}


@pytest.fixture()
def two_models_report():
    results = [_result(model, scenario, seed) for seed, (model, scenario) in
               enumerate([(m, s) for m in ("small", "large") for s in ("uu", "um")])]
    return {"format": report.REPORT_FORMAT, "pairs_file": "/data/pairs.txt", "images_dir": "/data/images",
            "n_pairs": 400, "n_folds": 10, "missing_images": [], "skipped_pairs": 0, "seed": 0,
            "mask_family": "template", "aligned": False, "models": [], "images": {}, "results": results}


def test_json_round_trip_replaces_infinities(tmp_path, two_models_report):
    # FNMR@FMR can sit at the reject-everything point, whose threshold is +inf: JSON gets null.
    two_models_report["results"][0]["metrics"]["fnmr_at_fmr"]["0.001"]["threshold"] = float("inf")
    path = report.write_json(two_models_report, tmp_path / "out" / "report.json")
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    loaded = report.load_json(path)
    assert loaded["results"][0]["metrics"]["fnmr_at_fmr"]["0.001"]["threshold"] is None
    scores, labels = report.scored_pairs(loaded["results"][1])
    assert scores.size == 397 and set(labels.tolist()) == {0, 1}


def test_load_json_refuses_other_files(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="not an edge-mfr evaluation report"):
        report.load_json(path)


def test_markdown_table_has_a_row_per_model_and_scenario(two_models_report):
    table = report.markdown_table(two_models_report)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Model")]
    assert [row.split(" | ")[:2] for row in rows] == [["| small", "uu"], ["| small", "um"],
                                                      ["| large", "uu"], ["| large", "um"]]
    first = two_models_report["results"][0]["metrics"]
    assert f"{100 * first['eer']:.2f} [" in rows[0]
    # 200 impostors: FMR100 is marginal (†), FMR1000 and TPR@FAR=0.1% are not supported.
    cells = rows[0].split(" | ")
    assert cells[2] == "none"
    assert cells[8].endswith("†") and cells[9] == "n/s" and cells[11] == "n/s"
    assert "3 (0.75%)" in rows[0]
    assert "um = unmasked vs masked probe" in table and "masks: template" in table


def test_detector_misses_are_reported_counted_and_excluded(two_models_report, tmp_path):
    """Misses scored at the fallback landmarks give a second set of metrics and a second table row."""
    result = two_models_report["results"][1]
    missed = result["pairs"][10:14]
    for pair in missed:
        pair["miss"], pair["fallback_score"], pair["score"] = True, 0.0, None
    result["n_scored"] -= len(missed)
    result["detector_misses"] = {"pairs": 4, "reference_images": 1, "probe_images": 3, "images": []}
    result["n_scored_misses_counted"] = result["n_scored"] + len(missed)
    excluded, labels = report.scored_pairs(result)
    counted, counted_labels = report.scored_pairs(result, misses_counted=True)
    assert counted.size == excluded.size + 4 and np.count_nonzero(counted == 0.0) >= 4
    result["metrics"] = metrics.evaluate(excluded, labels, n_resamples=0)
    result["metrics_misses_counted"] = metrics.evaluate(counted, counted_labels, n_resamples=0)
    assert report.headline_metrics(result) is result["metrics_misses_counted"]
    rows = [line for line in report.markdown_table(two_models_report).splitlines() if line.startswith("| small | um")]
    assert len(rows) == 2
    assert " | 4 pairs (4 img): counted | 397 | 3 (0.75%) | " in rows[0]
    assert " | 4 pairs: excluded | 393 | 7 (1.75%) | " in rows[1]
    assert f"{100 * result['metrics_misses_counted']['eer']:.2f}" in rows[0]
    assert f"{100 * result['metrics']['eer']:.2f}" in rows[1]
    assert report.plot_det(two_models_report, tmp_path)


def test_plots_are_written(tmp_path, two_models_report):
    det = report.plot_det(two_models_report, tmp_path)
    assert [p.name for p in det] == ["det_uu.png", "det_um.png"]
    distributions = report.plot_score_distributions(two_models_report, tmp_path)
    for path in det + [distributions]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
