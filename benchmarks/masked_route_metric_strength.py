"""Is the masked-route metric's shrinkage well chosen for the unlock? `route-metric` picks it on identity-disjoint
folds of the training pairs (clean vs masked TPR at FMR 1e-3); this rescores the unlock protocol of `edge-mfr
calibrate` (celeba_test `calib`, masked-route probes against the templates the package's rule lets them meet, max)
with the metric refitted at each strength on the same training pairs, and with none.

`--wccn` adds a within-class whitening (WCCN) of the same training faces. The unlock's masked route compares a
masked probe with the user's masked templates (other photos, other masks), while the metric whitens what a mask
changes on one photo; WCCN whitens how one person's embeddings vary. Its rows: WCCN of the masked embeddings,
WCCN of clean and masked embeddings together, and the shipped metric followed by WCCN of the masked embeddings
in its space.

    OMP_NUM_THREADS=1 EDGE_MFR_DATA=../shared/data python benchmarks/masked_route_metric_strength.py \
        [--model dlib_resnet_v1_masked_route] [--faces 4000] [--wccn]

About 3 minutes of one core: the package's deployed-path (clean, masked) pairs of celeba_test split train (as
`route-metric` draws them), then `calib` embedded as calibration does.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.embed import FaceEmbedder  # noqa: E402
from edge_mfr.eval import metrics  # noqa: E402
from edge_mfr.eval.calibrate import read_labelled_images  # noqa: E402
from edge_mfr.eval.runner import deployed_detector  # noqa: E402
from edge_mfr.eval.unlock_calibration import _aggregated_scores, _embed_identity_sets  # noqa: E402
from edge_mfr.match import RouteScoring, route_rows, scoring_space  # noqa: E402
from edge_mfr.models.package import load_package  # noqa: E402
from edge_mfr.models.route_map import route_pairs  # noqa: E402
from edge_mfr.models.route_metric import STRENGTHS, fit_mask_whitening, within_class_whitening  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FMRS = (1e-3, 1e-4, 1e-5)
WCCN_STRENGTHS = (0.1, 0.3, 1.0, 3.0)


def scorings(clean: np.ndarray, masked: np.ndarray, identities: np.ndarray, shipped: float | None,
             shipped_metric: np.ndarray | None, wccn: bool):
    """(label, weight) of each masked-route scoring to rescore `calib` with."""
    yield "none (plain cosine)", None
    for strength in STRENGTHS:
        yield f"{strength}" + (" (shipped)" if strength == shipped else ""), fit_mask_whitening(clean, masked, strength)
    if not wccn:
        return
    both, both_ids = np.concatenate([clean, masked]), np.concatenate([identities, identities])
    for strength in WCCN_STRENGTHS:
        yield f"WCCN of masked embeddings, strength {strength}", within_class_whitening(masked, identities, strength)
        yield (f"WCCN of clean and masked embeddings, strength {strength}",
               within_class_whitening(both, both_ids, strength))
        if shipped_metric is not None:  # WCCN in the metric's space: one (D, D) weight up to scale
            after = within_class_whitening(scoring_space(masked, shipped_metric), identities, strength)
            yield f"shipped metric, then WCCN of masked embeddings, strength {strength}", shipped_metric @ after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dlib_resnet_v1_masked_route")
    parser.add_argument("--faces", type=int, default=4000, help="celeba_test train faces for the pairs")
    parser.add_argument("--wccn", action="store_true", help="add within-class whitening rows")
    args = parser.parse_args()
    package = load_package(args.model)
    pairs = route_pairs([package], str(DATA), faces=args.faces)
    clean, masked = pairs["clean"][0], pairs["masked"][0]
    calib = DATA / "celeba_test"
    images = read_labelled_images(calib / "images", calib / "identities.txt", split="calib")
    templates, probes, _, _ = _embed_identity_sets(images, FaceEmbedder(package, threads=1), deployed_detector(None),
                                                   2, 0, False)
    masked_probes = [p for v in probes.values() for p in v if p[2] == "masked" and p[0] in templates]
    met = {i: rows[route_rows(flags, "masked", package.masked_probe_templates)] for i, (rows, flags) in templates.items()}
    shipped = (package.meta.get("scoring") or {}).get("masked", {}).get("strength")
    print(f"{package.name}: {len(clean)} training pairs, {len(masked_probes)} masked-route probes of `calib`; "
          f"shipped strength {shipped}\n")
    print("| masked-route scoring (metric strength) | " + " | ".join(f"FNMR at FMR {f:g}" for f in FMRS) + " |")
    print("|---|" + "---|" * len(FMRS))
    rows = scorings(clean, masked, np.asarray(pairs["identities"]), shipped, package.route_metric("masked"), args.wccn)
    for label, weight in rows:
        genuine, impostor = _aggregated_scores(met, masked_probes, "max", RouteScoring(weight=weight))
        cells = [f"{100 * np.mean(genuine < metrics.threshold_for_fmr(impostor, f)):.1f}%" for f in FMRS]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
