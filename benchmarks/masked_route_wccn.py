"""Would a within-class whitening (WCCN) on the masked route refuse fewer masked people at a strict FMR?
The masked route's metric whitens what a mask changes (masked minus clean embedding of the same photo). An
unlock's masked route, though, compares a masked probe with the user's masked templates: other photos, other
masks. WCCN whitens how one person's masked embeddings vary across photos and masks. It is fitted on the
package's deployed-path masked embeddings of celeba_test split train (as `route-metric` draws them), alone, after
the shipped metric, and on clean and masked embeddings together; `calib`'s masked-route probes are rescored
against the templates the package lets them meet (max aggregation), each scoring with its own threshold.

    OMP_NUM_THREADS=1 EDGE_MFR_DATA=../shared/data python benchmarks/masked_route_wccn.py \
        [--model dlib_resnet_v1_masked_route] [--faces 4000]

About 6 minutes of one core: the pairs, then `calib` embedded as calibration does.
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
from edge_mfr.models.route_metric import within_class_whitening  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FMRS = (1e-3, 1e-4, 1e-5)
STRENGTHS = (0.1, 0.3, 1.0, 3.0)


def candidates(clean: np.ndarray, masked: np.ndarray, identities: np.ndarray, metric: np.ndarray | None):
    """(label, weight) of each scoring tried; the shipped metric first."""
    yield "shipped metric", metric
    yield "plain cosine", None
    both = np.concatenate([clean, masked])
    for strength in STRENGTHS:
        yield f"WCCN of masked embeddings, strength {strength}", within_class_whitening(masked, identities, strength)
        yield (f"WCCN of clean and masked embeddings, strength {strength}",
               within_class_whitening(both, np.concatenate([identities, identities]), strength))
        if metric is not None:  # the metric's space, then WCCN there: one (D, D) weight up to scale
            after = within_class_whitening(scoring_space(masked, metric), identities, strength)
            yield f"shipped metric, then WCCN of masked embeddings, strength {strength}", metric @ after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dlib_resnet_v1_masked_route")
    parser.add_argument("--faces", type=int, default=4000, help="celeba_test train faces for the pairs")
    args = parser.parse_args()
    package = load_package(args.model)
    pairs = route_pairs([package], str(DATA), faces=args.faces)
    clean, masked = pairs["clean"][0], pairs["masked"][0]
    identities = np.asarray(pairs["identities"])
    calib = DATA / "celeba_test"
    images = read_labelled_images(calib / "images", calib / "identities.txt", split="calib")
    templates, probes, _, _ = _embed_identity_sets(images, FaceEmbedder(package, threads=1), deployed_detector(None),
                                                   2, 0, False)
    masked_probes = [p for v in probes.values() for p in v if p[2] == "masked" and p[0] in templates]
    met = {i: rows[route_rows(flags, "masked", package.masked_probe_templates)] for i, (rows, flags) in templates.items()}
    print(f"{package.name} ({package.fingerprint[:12]}): {len(masked)} training faces of "
          f"{len(np.unique(identities))} identities, {len(masked_probes)} masked-route probes of `calib`\n")
    print("| masked-route scoring | " + " | ".join(f"FNMR at FMR {f:g}" for f in FMRS) + " |")
    print("|---|" + "---|" * len(FMRS))
    for label, weight in candidates(clean, masked, identities, package.route_metric("masked")):
        genuine, impostor = _aggregated_scores(met, masked_probes, "max", RouteScoring(weight=weight))
        cells = [f"{100 * np.mean(genuine < metrics.threshold_for_fmr(impostor, f)):.1f}%" for f in FMRS]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
