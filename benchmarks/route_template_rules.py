"""Which enrolled templates should a probe of each route be scored against? Rescoring of one unlock-protocol
calibration run (docs/results.md, "Threshold calibration") under several rules, max aggregation:

- every template (the rule before `match.route_rows`);
- a probe judged unmasked meets the unmasked templates only (`match.route_rows`, the rule in use);
- softer rules between the two: for a probe judged unmasked, a masked template's score counts `delta` less.

Per rule, each route's threshold is set for FMR 1e-4 (and 1e-3) on that route's impostor attempts, as
`edge-mfr calibrate` does; then FNMR is reported per route, and per what was drawn (the people who wore no
mask / a mask, whichever route the quality gate sent them to): the figure users feel. A second table keeps
the rule in use and moves the mask estimator's routing threshold (`QualityPolicy.mask_threshold`, 0.5),
which is valid for a package without a masked-route map (its embedding does not depend on the route).
A third table asks the same of masked-route probes (`ModelPackage.masked_probe_templates`): every template,
the masked ones only, or the clean ones only, each scored with the package's masked-route scoring (its
metric, where it has one) and with plain cosine. With a two-network package the clean templates come from
the first network and the masked ones from the masked-route network, so the answer can differ by package.

    OMP_NUM_THREADS=1 python benchmarks/route_template_rules.py [--model dlib_resnet_v1] [--json OUT.json]

Embeds celeba_test `calib` once as `edge-mfr calibrate` does (about 4 minutes on one thread), then rescores.
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
from edge_mfr.eval.unlock_calibration import _aggregated_scores, _embed_identity_sets  # noqa: E402
from edge_mfr.match import PLAIN, ROUTES  # noqa: E402
from edge_mfr.models.package import load_package  # noqa: E402

CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba_test"
# penalty on masked templates for probes judged unmasked: 0 = every template, inf = unmasked templates only
RULES = {"every template": 0.0, "masked templates -0.005": 0.005, "masked templates -0.01": 0.01,
         "masked templates -0.02": 0.02, "unmasked templates only (in use)": np.inf}
# which of a user's templates a masked-route probe meets
MASKED_PROBE_RULES = {"every template": lambda masked: np.ones(len(masked), bool), "masked templates only":
                      lambda masked: masked, "clean templates only": lambda masked: ~masked}


def attempt_matrix(templates: dict, probes: list[tuple], penalty: float) -> tuple[np.ndarray, np.ndarray]:
    """Per probe and enrolled identity the max score, masked templates lowered by `penalty` for probes of
    the unmasked route; and the mask of genuine attempts."""
    identities = sorted(templates)
    out = np.empty((len(probes), len(identities)))
    embeddings = np.stack([p[1] for p in probes])
    unmasked_route = np.array([p[2] == "unmasked" for p in probes])
    for k, identity in enumerate(identities):
        rows, masked = templates[identity]
        scores = embeddings @ rows.T
        if not masked.all():
            scores = np.where(unmasked_route[:, None] & masked[None, :], scores - penalty, scores)
        out[:, k] = scores.max(axis=1)
    genuine = np.array([p[0] for p in probes])[:, None] == np.array(identities)[None, :]
    return out, genuine


def fnmr_by_route_and_drawn(scores: np.ndarray, genuine: np.ndarray, route: np.ndarray, drawn: np.ndarray,
                            fmr: float) -> list[float]:
    """Each route's threshold set for `fmr` on that route's impostor attempts (as `edge-mfr calibrate` does);
    FNMR per route (ROUTES order), then per drawn variant (unmasked, masked). `scores` (probes, identities),
    `genuine` its genuine cells, one per probe."""
    thresholds = {r: metrics.threshold_for_fmr(scores[route == r][~genuine[route == r]], fmr) for r in ROUTES}
    accepted = scores[genuine] >= np.array([thresholds[r] for r in route])
    return [float(np.mean(~accepted[route == r])) for r in ROUTES] + \
        [float(np.mean(~accepted[drawn == v])) for v in ("unmasked", "masked")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dlib_resnet_v1")
    parser.add_argument("--json", help="write the masked-probe table here")
    args = parser.parse_args()
    images = read_labelled_images(CALIB / "images", CALIB / "identities.txt", split="calib")
    package = load_package(args.model)
    embedder = FaceEmbedder(package, threads=1)
    templates, probes, _, _ = _embed_identity_sets(images, embedder, deployed_detector(None), 2, 0, False)
    drawn = {variant: [(*p, variant) for p in probes[variant]] for variant in probes}  # +(drawn variant,)
    everyone = [p for p in drawn["unmasked"] + drawn["masked"] if p[0] in templates]  # one genuine column each
    print("| rule | FMR | unmasked route FNMR | masked route FNMR | drawn unmasked FNMR | drawn masked FNMR |")
    print("|---|---|---|---|---|---|")
    for rule, penalty in RULES.items():
        scores, genuine = attempt_matrix(templates, everyone, penalty)
        route = np.array([p[2] for p in everyone])
        variant = np.array([p[4] for p in everyone])
        for fmr in (1e-3, 1e-4):
            cells = [f"{100 * f:.1f}%" for f in fnmr_by_route_and_drawn(scores, genuine, route, variant, fmr)]
            print(f"| {rule} | {fmr:g} | " + " | ".join(cells) + " |", flush=True)
    routing_thresholds(templates, everyone)
    masked_probe_rules(package, templates, [p for p in everyone if p[2] == "masked"], args.json)
    return 0


def masked_probe_rules(package, templates: dict, masked_probes: list[tuple], json_path: str | None) -> None:
    """FNMR of the masked route when its probes meet every template, the masked or the clean ones only; the
    threshold set on that rule's own impostor attempts, as `edge-mfr calibrate` does."""
    print(f"\n{package.name}, {len(masked_probes)} masked-route probes (package rule: "
          f"{package.masked_probe_templates})\n")
    print("| masked probes meet | scoring | FNMR at FMR 1e-3 | FNMR at FMR 1e-4 |")
    print("|---|---|---|---|")
    rows = []
    for (rule, pick), (label, scoring) in itertools.product(
            MASKED_PROBE_RULES.items(), (("package", package.route_scoring("masked")), ("plain cosine", PLAIN))):
        chosen = {i: t[pick(masked)] for i, (t, masked) in templates.items() if pick(masked).any()}
        genuine, impostor = _aggregated_scores(chosen, masked_probes, "max", scoring)
        fnmr = {fmr: float(np.mean(genuine < metrics.threshold_for_fmr(impostor, fmr))) for fmr in (1e-3, 1e-4)}
        rows.append({"rule": rule, "scoring": label, "n_genuine": int(genuine.size), "n_impostor": int(impostor.size),
                     **{f"fnmr_at_{fmr:g}": value for fmr, value in fnmr.items()}})
        print(f"| {rule} | {label} | {100 * fnmr[1e-3]:.1f}% | {100 * fnmr[1e-4]:.1f}% |", flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps({"model": package.name, "fingerprint": package.fingerprint,
                                               "rows": rows}, indent=2) + "\n")


def routing_thresholds(templates: dict, everyone: list[tuple]) -> None:
    """The rule in use, probes routed at other mask-probability thresholds; FMR 1e-4."""
    print("\n| routing threshold | masked probes routed masked | unmasked probes routed masked | "
          "drawn unmasked FNMR | drawn masked FNMR |")
    print("|---|---|---|---|---|")
    probability = np.array([p[3] for p in everyone])
    variant = np.array([p[4] for p in everyone])
    by_route = {r: attempt_matrix(templates, [(p[0], p[1], r) for p in everyone], np.inf) for r in ROUTES}
    genuine = by_route["unmasked"][1]
    for tau in (0.7, 0.5, 0.3, 0.2, 0.1):
        route = np.where(probability >= tau, "masked", "unmasked")
        scores = np.where((route == "masked")[:, None], by_route["masked"][0], by_route["unmasked"][0])
        flagged = [np.mean(route[variant == v] == "masked") for v in ("masked", "unmasked")]
        fnmr = fnmr_by_route_and_drawn(scores, genuine, route, variant, 1e-4)[len(ROUTES):]
        print(f"| {tau} | {100 * flagged[0]:.1f}% | {100 * flagged[1]:.1f}% | {100 * fnmr[0]:.1f}% | "
              f"{100 * fnmr[1]:.1f}% |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
