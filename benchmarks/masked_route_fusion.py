"""Would scoring the masked route with two packages at once refuse fewer masked people? Score-level fusion on the
unlock protocol of `edge-mfr calibrate` (celeba_test `calib`).

Each package embeds `calib` as `edge-mfr calibrate` does (same detector, masks, seeds and routing, so the probes
and templates line up one to one across packages). For the probes the quality gate sends to the masked route,
each package scores every enrolled identity with its own masked-route scoring and template rule
(`ModelPackage.masked_probe_templates`), max over templates. Fused score: (1 - w) x first + w x second, per
template (both packages' templates of one enrollment capture side by side) or per identity (after the max).
Each score's threshold is set for the FMR on its own impostor attempts, as calibration does; FNMR is reported.

    OMP_NUM_THREADS=1 python benchmarks/masked_route_fusion.py --model dlib_resnet_v1 \
        --model dlib_resnet_v1_masked_route --model dlib23_student [--json OUT.json]

About 4 minutes of one core per package (embedding); the fusion is instant. Pairs: each package with each later one.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.embed import FaceEmbedder  # noqa: E402
from edge_mfr.eval import metrics  # noqa: E402
from edge_mfr.eval.calibrate import read_labelled_images  # noqa: E402
from edge_mfr.eval.runner import deployed_detector  # noqa: E402
from edge_mfr.eval.unlock_calibration import _embed_identity_sets  # noqa: E402
from edge_mfr.match import route_rows  # noqa: E402
from edge_mfr.models.package import load_package  # noqa: E402

CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba_test"
WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7)
FMRS = (1e-3, 1e-4)


def masked_route_template_scores(package, templates: dict, probes: list[tuple], identities: list[str]):
    """(probes, template rows) masked-route scores, -inf where the package's rule keeps a template from the probe;
    and each row's identity."""
    rows, owner, allowed = [], [], []
    for identity in identities:
        matrix, masked = templates[identity]
        rows.append(matrix)
        owner += [identity] * len(matrix)
        allowed.append(route_rows(masked, "masked", package.masked_probe_templates))
    scores = package.route_scoring("masked").scores(np.stack([p[1] for p in probes]), np.concatenate(rows))
    return np.where(np.concatenate(allowed)[None], scores, -np.inf), np.array(owner)


def per_identity_max(scores: np.ndarray, owner: np.ndarray, identities: list[str]) -> np.ndarray:
    return np.stack([scores[:, owner == identity].max(axis=1) for identity in identities], axis=1)


def fnmr(scores: np.ndarray, genuine: np.ndarray, fmr: float) -> float:
    return float(np.mean(scores[genuine] < metrics.threshold_for_fmr(scores[~genuine], fmr)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="a package (give two or more)")
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()
    if len(args.model) < 2:
        parser.error("give at least two --model")
    images = read_labelled_images(CALIB / "images", CALIB / "identities.txt", split="calib")
    packages = [load_package(m) for m in args.model]
    embedded = [_embed_identity_sets(images, FaceEmbedder(p, threads=1), deployed_detector(None), 2, 0, False)
                for p in packages]
    identities = sorted(embedded[0][0])
    probe_sets = [[p for variant in ("unmasked", "masked") for p in e[1][variant] if p[0] in e[0] and p[2] == "masked"]
                  for e in embedded]
    if any(sorted(e[0]) != identities or [p[0] for p in s] != [p[0] for p in probe_sets[0]]
           for e, s in zip(embedded, probe_sets)):
        raise SystemExit("the packages' calibration runs do not line up (another detector or data?)")
    genuine = np.array([p[0] for p in probe_sets[0]])[:, None] == np.array(identities)[None]
    per_template = [masked_route_template_scores(p, e[0], s, identities)
                    for p, e, s in zip(packages, embedded, probe_sets)]
    owner = per_template[0][1]
    per_user = [per_identity_max(s, owner, identities) for s, _ in per_template]
    rows = []
    print(f"{len(probe_sets[0])} masked-route probes, {len(identities)} identities\n")
    print("| scores | fusion | FNMR at FMR 1e-3 | FNMR at FMR 1e-4 |")
    print("|---|---|---|---|")

    def report(label: str, fusion: str, scores: np.ndarray) -> None:
        values = {f"fnmr_at_{f:g}": fnmr(scores, genuine, f) for f in FMRS}
        rows.append({"scores": label, "fusion": fusion, **values})
        print(f"| {label} | {fusion} | " + " | ".join(f"{100 * v:.1f}%" for v in values.values()) + " |", flush=True)

    for package, scores in zip(packages, per_user):
        report(package.name, "-", scores)
    for (a, b) in itertools.combinations(range(len(packages)), 2):
        (sa, _), (sb, _) = per_template[a], per_template[b]
        for w in WEIGHTS:
            label = f"{packages[a].name} + {packages[b].name}, w = {w}"
            both = np.where(np.isfinite(sa) & np.isfinite(sb), (1 - w) * sa + w * sb, -np.inf)
            report(label, "per template", per_identity_max(both, owner, identities))
            report(label, "per identity", (1 - w) * per_user[a] + w * per_user[b])
    if args.json:
        Path(args.json).write_text(json.dumps({"models": [{"name": p.name, "fingerprint": p.fingerprint}
                                                          for p in packages], "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
