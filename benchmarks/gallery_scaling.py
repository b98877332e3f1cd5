"""Identify (1:N) time against gallery size, 1 to 100k templates, with a PNG curve.

Exact searches over the same random unit templates (8 per user, as enrollment stores them; 128-d as
the bundled teacher): the SDK's `edge_mfr.match.rank_users` with plain cosine, a vectorised one (a
matrix-vector product, then np.maximum.reduceat for the per-user max), which ranks the same best user
(tests/test_bench.py), and `rank_users` through the bundled default's masked-route scoring (metric and AS-norm
cohort: what FaceUnlock.identify does for a masked probe), whose first search computes each template's
cohort statistics (`first_ms`; cached after). Single thread recommended: OMP_NUM_THREADS=1.

    OMP_NUM_THREADS=1 python benchmarks/gallery_scaling.py --plot docs/plots/bench/gallery_scaling.png \
        --json docs/plots/bench/gallery_scaling.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.bench import environment, gallery_scaling  # noqa: E402
from edge_mfr.models.package import default_model  # noqa: E402

UNLOCK_BUDGET_MS = 20.0  # the whole unlock's p50 target; matching should be a small part of it


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 1000, 3000, 10000, 30000, 100000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-seconds-per-size", type=float, default=20.0)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    scoring = default_model().route_scoring("masked") if args.dim == default_model().embedding_size else None
    rows = []
    print(f"{'templates':>10}{'users':>8}{'rank_users p50 ms':>20}{'p90':>10}{'vectorised p50 ms':>20}{'p90':>10}"
          f"{'normalised p50 ms':>20}{'p90':>10}{'first':>10}")
    for size in args.sizes:
        row = gallery_scaling([size], dim=args.dim, repeats=args.repeats,
                              max_seconds_per_size=args.max_seconds_per_size, scoring=scoring)[0]
        rows.append(row)
        normalised = row.get("rank_users_scoring")
        print(f"{row['templates']:>10}{row['users']:>8}{row['rank_users']['p50_ms']:>20.3f}"
              f"{row['rank_users']['p90_ms']:>10.3f}{row['vectorised']['p50_ms']:>20.3f}"
              f"{row['vectorised']['p90_ms']:>10.3f}"
              + (f"{normalised['p50_ms']:>20.3f}{normalised['p90_ms']:>10.3f}{normalised['first_ms']:>10.1f}"
                 if normalised else ""), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": environment([1]), "dim": args.dim, "rows": rows}, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sizes = [row["templates"] for row in rows]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, label in (("rank_users", "edge_mfr.match.rank_users, plain cosine"),
                            ("vectorised", "exact, vectorised (matvec + reduceat)"),
                            ("rank_users_scoring", "rank_users, masked route of the default (metric + AS-norm, "
                                                   "template statistics cached)")):
            if name not in rows[0]:
                continue
            ax.plot(sizes, [row[name]["p50_ms"] for row in rows], "o-", label=f"{label}, p50")
            ax.fill_between(sizes, [row[name]["p50_ms"] for row in rows], [row[name]["p90_ms"] for row in rows],
                            alpha=0.2)
        ax.axhline(UNLOCK_BUDGET_MS, color="grey", linestyle="--", label="20 ms: the whole unlock's p50 target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"gallery size, templates ({args.dim}-d, 8 per user)")
        ax.set_ylabel("identify time, ms (p50; band to p90)")
        ax.set_title("1:N search time vs gallery size, one thread", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
