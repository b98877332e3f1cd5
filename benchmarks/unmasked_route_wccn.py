"""Would a within-class whitening of the unmasked route (WCCN) refuse fewer unmasked people at a strict FMR?
The unmasked route compares the teacher's embeddings by plain cosine; a few look-alike identities set its
threshold at FMR 1e-4 (benchmarks/impostor_tail.py). Within-class covariance normalisation scales down the
directions along which one person's photos vary. It is fitted here on the training pool's teacher templates
(celeba299 + celeba_test train, each face averaged with its mirror image as a flipping package embeds it, 939
identities), shrunk towards the identity by a strength, and the unlock protocol's unmasked-route probes of
celeba_test `calib` are rescored against the unmasked templates (max aggregation), each strength with its own
threshold.

    OMP_NUM_THREADS=1 python benchmarks/unmasked_route_wccn.py [--model dlib_resnet_v1_masked_route] \
        [--pool runs/pool_celeba.npz]

About 4 minutes of one core (the `calib` embeddings).
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
from edge_mfr.match import RouteScoring, route_rows  # noqa: E402
from edge_mfr.models.package import load_package  # noqa: E402
from edge_mfr.models.route_metric import within_class_whitening  # noqa: E402
from edge_mfr.runtime.base import l2_normalise  # noqa: E402
from edge_mfr.train.data import TrainingPool  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FMRS = (1e-3, 1e-4, 1e-5)
STRENGTHS = (0.1, 0.3, 1.0, 3.0, 10.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dlib_resnet_v1_masked_route")
    parser.add_argument("--pool", default="runs/pool_celeba.npz")
    args = parser.parse_args()
    package = load_package(args.model)
    pool = TrainingPool.load(args.pool)
    training = l2_normalise(pool.teacher)
    if package.test_time_flip:  # as FaceEmbedder averages a face with its mirror image
        training = l2_normalise(training + l2_normalise(pool.teacher_flipped))
    calib = DATA / "celeba_test"
    images = read_labelled_images(calib / "images", calib / "identities.txt", split="calib")
    templates, probes, _, _ = _embed_identity_sets(images, FaceEmbedder(package, threads=1), deployed_detector(None),
                                                   2, 0, False)
    unmasked = [p for v in probes.values() for p in v if p[2] == "unmasked" and p[0] in templates]
    met = {i: rows[route_rows(flags, "unmasked", package.masked_probe_templates)]
           for i, (rows, flags) in templates.items()}
    print(f"{package.name} ({package.fingerprint[:12]}): WCCN fitted on {len(training)} pool faces of "
          f"{len(np.unique(pool.labels))} identities; {len(unmasked)} unmasked-route probes of `calib`\n")
    print("| unmasked-route scoring | " + " | ".join(f"FNMR at FMR {f:g}" for f in FMRS) + " |")
    print("|---|" + "---|" * len(FMRS))
    for strength in (None, *STRENGTHS):
        weight = None if strength is None else within_class_whitening(training, pool.labels, strength)
        genuine, impostor = _aggregated_scores(met, unmasked, "max", RouteScoring(weight=weight))
        cells = [f"{100 * np.mean(genuine < metrics.threshold_for_fmr(impostor, f)):.1f}%" for f in FMRS]
        label = "plain cosine (shipped)" if strength is None else f"WCCN, strength {strength}"
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
