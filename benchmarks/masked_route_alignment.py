"""How far a masked-route network's embeddings are from the first network's space, and what aligns them.

Input: the deployed-path pairs `route-map` caches (--pairs) for a two-network package: the first network's
embedding of a clean training photo and the masked-route network's embedding of the same photo masked.
On identity-disjoint folds (fitted on the other folds), TPR at FMR 1e-3 across different photos of
clean-vs-masked (a masked probe against the first network's clean templates) and masked-vs-masked (against
the network's own masked templates), for: the embeddings as they come, the masked side's mean moved onto the
clean side's, and the ridge map of `route-map` at each alpha.

    python benchmarks/masked_route_alignment.py runs/route_pairs_mrn.npz
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from edge_mfr.models.route_map import apply_map, clean_vs_masked_tpr, fit_ridge, identity_folds
from edge_mfr.runtime.base import l2_normalise

ALPHAS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", help=".npz of clean, masked, identities (route-map --pairs)")
    args = parser.parse_args()
    with np.load(args.pairs) as data:
        clean, masked, identities = data["clean"], data["masked"], data["identities"]
    aligners = [("as they come", lambda train, m: m),
                ("masked mean moved onto the clean mean",
                 lambda train, m: l2_normalise(m - masked[train].mean(0) + clean[train].mean(0)))]
    aligners += [(f"ridge map, alpha {alpha}",
                  lambda train, m, alpha=alpha: apply_map(m, *fit_ridge(masked[train], clean[train], alpha)))
                 for alpha in ALPHAS]
    print(f"{len(clean)} pairs of {len(np.unique(identities))} identities; TPR at FMR 1e-3, 5 identity-disjoint folds")
    print("| masked side | clean-vs-masked | masked-vs-masked |\n|---|---|---|")
    for name, align in aligners:
        um, mm = [], []
        for test in identity_folds(identities):
            aligned = align(~test, masked[test])
            um.append(clean_vs_masked_tpr(clean[test], aligned, identities[test], 1e-3))
            mm.append(clean_vs_masked_tpr(aligned, aligned, identities[test], 1e-3))
        print(f"| {name} | {np.mean(um):.3f} | {np.mean(mm):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
