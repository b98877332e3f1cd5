"""Which of a user's templates should a masked probe meet? FNMR of the masked route under three rules.

`match.route_rows` lets a probe the quality gate judges masked meet every template of the claimed user: the
clean enrollment captures and their synthetic masked copies. With a two-network package those are made by
different networks (the clean ones by the first, the masked ones by the masked-route network), so whether the
clean ones help a masked probe is an empirical question. This replays the unlock calibration of
`edge-mfr calibrate` (same enrollment, probes, detector, routing and scoring; celeba_test `calib`), embedding
everything once, and sets the masked route's threshold for each rule on its own impostor attempts:

- all: every template (what FaceUnlock does);
- masked: the synthetic masked templates only;
- clean: the clean templates only.

    OMP_NUM_THREADS=1 python benchmarks/masked_route_templates.py dlib_resnet_v1_masked_route --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from edge_mfr.embed import FaceEmbedder
from edge_mfr.eval import metrics
from edge_mfr.eval.calibrate import read_labelled_images
from edge_mfr.eval.runner import deployed_detector
from edge_mfr.eval.unlock_calibration import _aggregated_scores, _embed_identity_sets
from edge_mfr.models.package import load_package

RULES = {"all": lambda flags: np.ones(len(flags), bool), "masked": lambda flags: flags, "clean": lambda flags: ~flags}
TARGETS = (1e-3, 1e-4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="package path or bundled name")
    parser.add_argument("--data", default=os.environ.get("EDGE_MFR_DATA", "../shared/data"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    package = load_package(args.model)
    root = Path(args.data) / "celeba_test"
    images = read_labelled_images(root / "images", root / "identities.txt", split="calib")  # as `edge-mfr calibrate`
    embedder = FaceEmbedder(package, threads=args.threads)
    start = time.time()
    templates, probes, _, _ = _embed_identity_sets(images, embedder, deployed_detector(None), 2, 0, False)
    masked_probes = [p for p in probes["unmasked"] + probes["masked"] if p[2] == "masked"]
    scoring = package.route_scoring("masked")
    out = {"model": package.name, "fingerprint": package.fingerprint, "identities": len(templates),
           "masked_route_probes": len(masked_probes), "embed_seconds": round(time.time() - start, 1), "rules": {}}
    for rule, pick in RULES.items():
        chosen = {i: rows[pick(flags)] for i, (rows, flags) in templates.items() if pick(flags).any()}
        genuine, impostor = _aggregated_scores(chosen, masked_probes, "max", scoring)
        row = {}
        for target in TARGETS:
            t = metrics.threshold_for_fmr(impostor, target)
            row[str(target)] = {"threshold": float(t), "fnmr": float(np.mean(genuine < t)),
                                "observed_fmr": float(np.mean(impostor >= t)), "n_genuine": int(genuine.size),
                                "n_impostor": int(impostor.size)}
        out["rules"][rule] = row
        print(f"{rule:7s} " + "  ".join(f"FMR {target:g}: FNMR {100 * row[str(target)]['fnmr']:.1f}%"
                                        for target in TARGETS))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
