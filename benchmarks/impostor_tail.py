"""Who sets the strict thresholds? The impostor attempts at or above each route's FMR 1e-4 threshold on the unlock
protocol of `edge-mfr calibrate` (celeba_test `calib`): how many identity pairs they come from, and which
identities take part in most of them.

At FMR 1e-4 a route's threshold is fixed by its ~100 highest impostor attempts out of about a million. When a few
look-alike identities supply most of them, the threshold every user is held to is set by those people: the
figure to read next to any FNMR at a strict FMR. With `--sheet` the top identities' first photos are written
as one contact sheet (a row per identity), to look at who they are.

    OMP_NUM_THREADS=1 python benchmarks/impostor_tail.py [--model dlib_resnet_v1_masked_route] [--json OUT.json] \
        [--sheet OUT.png]

About 4 minutes of one core (embedding, as calibration does).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.embed import FaceEmbedder  # noqa: E402
from edge_mfr.eval import metrics  # noqa: E402
from edge_mfr.eval.calibrate import read_labelled_images  # noqa: E402
from edge_mfr.eval.runner import deployed_detector  # noqa: E402
from edge_mfr.eval.unlock_calibration import _embed_identity_sets, identity_scores  # noqa: E402
from edge_mfr.io import load_image  # noqa: E402
from edge_mfr.match import ROUTES, route_rows  # noqa: E402
from edge_mfr.models.package import default_model, load_package  # noqa: E402

CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba_test"
TOP = 5
SHEET_PHOTOS = 6
SHEET_SIDE = 128


def route_attempts(package, templates: dict, probes: list[tuple], route: str) -> np.ndarray:
    """(probes, identities in sorted order) max score of each probe of `route` against each identity's templates of
    that route, scored as the package scores the route."""
    met = {i: rows[route_rows(masked, route, package.masked_probe_templates)] for i, (rows, masked) in templates.items()}
    return identity_scores(met, np.stack([p[1] for p in probes]), "max", package.route_scoring(route))[1]


def tail(scores: np.ndarray, probe_ids: np.ndarray, identities: list[str], fmr: float) -> dict:
    genuine = probe_ids[:, None] == np.array(identities)[None]
    threshold = metrics.threshold_for_fmr(scores[~genuine], fmr)
    rows, cols = np.nonzero((scores >= threshold) & ~genuine)
    pairs = Counter(tuple(sorted((probe_ids[r], identities[c]))) for r, c in zip(rows, cols))
    people = Counter(i for r, c in zip(rows, cols) for i in {probe_ids[r], identities[c]})
    top = [i for i, _ in people.most_common(TOP)]
    with_top = sum(1 for r, c in zip(rows, cols) if probe_ids[r] in top or identities[c] in top)
    return {"threshold": float(threshold), "n_impostor": int((~genuine).sum()), "above": int(len(rows)),
            "identity_pairs": len(pairs), "identities": len(people), "top_identities": people.most_common(TOP),
            "above_involving_top": with_top, "top_pairs": [[*pair, n] for pair, n in pairs.most_common(8)],
            "fnmr": float(np.mean(scores[genuine] < threshold))}


def contact_sheet(images, identities: list[str], path: Path) -> None:
    rows = []
    for identity in identities:
        photos = [load_image(i.path) for i in images if i.identity == identity][:SHEET_PHOTOS]
        tiles = [cv2.resize(p, (SHEET_SIDE, SHEET_SIDE), interpolation=cv2.INTER_AREA) for p in photos]
        tiles += [np.zeros((SHEET_SIDE, SHEET_SIDE, 3), np.uint8)] * (SHEET_PHOTOS - len(tiles))
        rows.append(np.hstack(tiles))
    cv2.imwrite(str(path), np.vstack(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="package (default: the default model)")
    parser.add_argument("--fmr", type=float, default=1e-4)
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--sheet", help="write a contact sheet of each route's top identities here (PNG)")
    args = parser.parse_args()
    package = load_package(args.model) if args.model else default_model()
    images = read_labelled_images(CALIB / "images", CALIB / "identities.txt", split="calib")
    templates, probes, _, _ = _embed_identity_sets(images, FaceEmbedder(package, threads=1), deployed_detector(None),
                                                   2, 0, False)
    identities = sorted(templates)
    everyone = [p for variant in probes.values() for p in variant if p[0] in templates]
    result = {"model": package.name, "fingerprint": package.fingerprint, "fmr": args.fmr, "routes": {}}
    print(f"{package.name} ({package.fingerprint}), FMR {args.fmr:g}, celeba_test calib, {len(identities)} identities\n")
    print("| route | threshold | impostor attempts at or above / all | identity pairs | identities | "
          f"attempts involving the top {TOP} identities | top identities (attempts) | FNMR |")
    print("|---|---|---|---|---|---|---|---|")
    for route in ROUTES:
        group = [p for p in everyone if p[2] == route]
        probe_ids = np.array([p[0] for p in group])
        row = tail(route_attempts(package, templates, group, route), probe_ids, identities, args.fmr)
        result["routes"][route] = row
        top = ", ".join(f"{i} ({n})" for i, n in row["top_identities"])
        print(f"| {route} | {row['threshold']:.4f} | {row['above']} / {row['n_impostor']} | {row['identity_pairs']} | "
              f"{row['identities']} | {row['above_involving_top']} | {top} | {100 * row['fnmr']:.1f}% |", flush=True)
    if args.sheet:
        tops = list(dict.fromkeys(i for r in result["routes"].values() for i, _ in r["top_identities"]))
        contact_sheet(images, tops, Path(args.sheet))
        result["sheet_rows"] = tops
        print(f"\ncontact sheet rows (top to bottom): {', '.join(tops)} -> {args.sheet}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
