"""Do a package's calibrated thresholds hold on people from another dataset? The unlock protocol of
`edge-mfr calibrate` run on LFW (evaluation only: nothing here sets a threshold), scored for several packages
that share one network (plain cosine, masked-route metric, metric + AS-norm cohort: the same embeddings,
computed once), each with its own scoring:

- at the package's shipped thresholds (calibrated on celeba_test `calib`): the false match rate actually
  observed on LFW's impostor attempts, and the FNMR, per route and per what was drawn;
- at thresholds set on LFW itself for the same target FMR: FNMR at equal observed FMR, which compares the
  scorings' discrimination without any calibration drift.

    OMP_NUM_THREADS=1 python benchmarks/threshold_transfer.py PACKAGE [PACKAGE ...] [--max-per-identity 6]

Per identity with more than 2 photos (at most --max-per-identity), 2 enrolled as `FaceUnlock.enroll` does
(plus synthetic masked copies), the rest probe every identity unmasked and masked (detected afresh), routed
by the quality gate. Needs ../shared/data/lfw.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.embed import FaceEmbedder  # noqa: E402
from edge_mfr.eval import metrics  # noqa: E402
from edge_mfr.eval.calibrate import read_labelled_images  # noqa: E402
from edge_mfr.eval.runner import deployed_detector  # noqa: E402
from edge_mfr.eval.unlock_calibration import _embed_identity_sets, attempt_scores  # noqa: E402
from edge_mfr.match import ROUTES  # noqa: E402
from edge_mfr.models.package import load_package  # noqa: E402

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw" / "images"
VARIANTS = ("unmasked", "masked")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="+")
    parser.add_argument("--max-per-identity", type=int, default=6)
    parser.add_argument("--targets", type=float, nargs="+", default=[1e-3, 1e-4])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    packages = [load_package(p) for p in args.packages]
    if len({p.fingerprint for p in packages}) != 1:
        print("error: the packages must share one network (fingerprint): embeddings are computed once",
              file=sys.stderr)
        return 2
    images = read_labelled_images(LFW, max_per_identity=args.max_per_identity)
    embedder = FaceEmbedder(packages[0], threads=1)
    templates, probes, _, misses = _embed_identity_sets(images, embedder, deployed_detector(None), 2, 0, False)
    print(f"LFW: {len(templates)} identities, {len(probes['unmasked'])} probes each way, {len(misses)} masked "
          f"probes missed")
    print("| package | aggregation | FMR target | thresholds | route | observed FMR | FNMR | drawn unmasked FNMR "
          "| drawn masked FNMR |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for package in packages:
        scoring = {route: package.route_scoring(route) for route in ROUTES}
        for aggregation in ("max", "mean"):
            scores = {(v, r): attempt_scores(templates, [p for p in probes[v] if p[2] == r], aggregation, scoring,
                                             package.masked_probe_templates)
                      for v in VARIANTS for r in ROUTES if any(p[2] == r for p in probes[v])}
            for target in args.targets:
                lfw_own = {r: metrics.threshold_for_fmr(
                    np.concatenate([s[1] for (_, route), s in scores.items() if route == r]), target) for r in ROUTES}
                shipped = {r: package.threshold_for(target, aggregation, r) for r in ROUTES}
                for label, thresholds in (("shipped (calib)", shipped), ("set on LFW", lfw_own)):
                    fnmr_drawn = [float(np.mean(np.concatenate(
                        [s[0] < thresholds[r] for (v, r), s in scores.items() if v == variant]))) for variant in VARIANTS]
                    for route in ROUTES:
                        genuine = np.concatenate([s[0] for (_, r), s in scores.items() if r == route])
                        impostor = np.concatenate([s[1] for (_, r), s in scores.items() if r == route])
                        row = {"package": package.name, "aggregation": aggregation, "target": target,
                               "thresholds": label, "route": route, "threshold": thresholds[route],
                               "observed_fmr": float(np.mean(impostor >= thresholds[route])),
                               "n_impostor": int(impostor.size), "fnmr": float(np.mean(genuine < thresholds[route])),
                               "drawn_fnmr": dict(zip(VARIANTS, fnmr_drawn))}
                        rows.append(row)
                        print(f"| {package.name} | {aggregation} | {target:g} | {label} ({thresholds[route]:.4f}) | "
                              f"{route} | {row['observed_fmr']:.2e} | {100 * row['fnmr']:.1f}% | "
                              f"{100 * fnmr_drawn[0]:.1f}% | {100 * fnmr_drawn[1]:.1f}% |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"identities": len(templates), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
