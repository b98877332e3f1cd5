"""Thresholds for the unlock system as deployed, not for single image pairs.

`FaceUnlock.verify` scores a probe against every template of the claimed user (the enrollment captures
plus their synthetically masked copies) and keeps the max (or mean). An impostor therefore gets several
chances per attempt, and masked probes meet masked templates, so a threshold calibrated on single
unmasked/masked pairs lets through more impostors than its nominal FMR. This module simulates the
deployed protocol on a labelled set: per identity, the first `enroll_per_identity` images are enrolled
exactly as `FaceUnlock.enroll` does, the rest are probes (each unmasked and with a random synthetic
mask), and every probe attempts every identity. The FMR is counted per attempt.

`FaceUnlock` applies a separate threshold to probes its quality gate judges masked, because masked
probes meet masked templates and score higher against impostors too; and it scores a probe judged unmasked
against the user's unmasked templates only (`match.route_rows`). Calibration routes each probe by that same
mask estimate (not by whether a mask was drawn) and scores it the same way, so estimator mistakes are part
of the measured FMR of each route.

Detection follows the deployed path: the detector `FaceUnlock` builds by default (or the one named), the
largest face, and a masked probe is detected afresh on the masked picture, as a door camera would see it.
A masked probe the detector misses cannot be accepted: it is counted (`masked_probe_misses`) and makes no
attempt, so it adds no impostor attempt and is left out of the per-route FNMR.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from datetime import datetime, timezone

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..detect import detector_name
from ..embed import FaceEmbedder
from ..errors import InputError
from ..io import load_image
from ..masks import MASK_TYPES, apply_mask
from ..match import AGGREGATIONS, PLAIN, ROUTES, RouteScoring, route_rows
from ..quality import QualityPolicy, assess
from ..unlock import SYNTHETIC_MASK_TYPES, detector_conflict_message, synthesize_masked_copies
from . import metrics
from .calibrate import LabelledImage, check_not_trained_on
from .runner import deployed_detector, image_seed

PROBE_VARIANTS = ("unmasked", "masked")  # what was drawn


def _largest(detector, frame):
    faces = detector.detect(frame)
    return max(faces, key=lambda d: d.area) if faces else None


def _embed_identity_sets(images: list[LabelledImage], embedder: FaceEmbedder, detector,
                         enroll_per_identity: int, seed: int, progress: bool):
    """Per identity: template matrix (enrollment as deployed, with copies in SYNTHETIC_MASK_TYPES) and probe
    embeddings per variant; the images without a face and the masked probes whose re-detection failed."""
    by_identity: dict[str, list[LabelledImage]] = defaultdict(list)
    for image in images:
        by_identity[image.identity].append(image)
    templates, probes, failures, masked_misses = {}, {v: [] for v in PROBE_VARIANTS}, [], []
    policy = QualityPolicy.verify()
    todo = [(identity, group) for identity, group in sorted(by_identity.items()) if len(group) > enroll_per_identity]
    for identity, group in tqdm(todo, desc="calibration identities", disable=not progress):
        rows, masked_flags = [], []
        for k, image in enumerate(group):
            frame = load_image(image.path)
            face = _largest(detector, frame)
            if face is None:
                failures.append(image.key)
                continue
            rng = np.random.default_rng(image_seed(image.key, seed))
            if k < enroll_per_identity:
                rows.append(embedder.embed_faces(frame, face.landmarks[None])[0])
                masked_flags.append(False)
                for _, masked in synthesize_masked_copies(frame, face.landmarks, rng):
                    rows.append(embedder.embed_faces(masked, face.landmarks[None], route="masked", detected=False)[0])
                    masked_flags.append(True)
            else:
                mask_type = MASK_TYPES[rng.integers(len(MASK_TYPES))]
                masked = apply_mask(frame, face.landmarks, mask_type, rng)
                for variant, picture in (("unmasked", frame), ("masked", masked)):
                    seen = face if variant == "unmasked" else _largest(detector, picture)
                    if seen is None:
                        masked_misses.append(image.key)
                        continue
                    report = assess(picture, seen, policy)
                    route = "masked" if report.masked else "unmasked"
                    embedding = embedder.embed_faces(picture, seen.landmarks[None], route=route)[0]
                    probes[variant].append((identity, embedding, route, report.masked_probability))
        if rows:
            templates[identity] = (np.stack(rows), np.array(masked_flags))
    return templates, probes, failures, masked_misses


def attempt_scores(templates: dict[str, tuple[np.ndarray, np.ndarray]], probes: list[tuple], aggregation: str,
                   scoring: dict | None = None, masked_probe_templates: str = "all"):
    """(genuine scores, impostor scores): every probe (identity, embedding, route) against every enrolled
    identity (templates, their masked flags), aggregated over the templates that `FaceUnlock` scores a probe
    of that route against (`match.route_rows` under the package's `masked_probe_templates` rule), each route
    scored as `scoring[route]` says (`ModelPackage.route_scoring`, as `FaceUnlock.scoring_of`; default plain
    cosine)."""
    if aggregation not in AGGREGATIONS:
        raise InputError(f"aggregation must be one of {AGGREGATIONS}")
    genuine, impostor = [], []
    for route in ROUTES:
        group = [p for p in probes if p[2] == route]
        if group:
            chosen = {i: rows[route_rows(flags, route, masked_probe_templates)]
                      for i, (rows, flags) in templates.items()}
            g, imp = _aggregated_scores(chosen, group, aggregation, (scoring or {}).get(route, PLAIN))
            genuine.append(g)
            impostor.append(imp)
    return np.concatenate(genuine), np.concatenate(impostor)


def identity_scores(templates: dict[str, np.ndarray], probe_matrix: np.ndarray, aggregation: str,
                    scoring: RouteScoring = PLAIN) -> tuple[list[str], np.ndarray]:
    """The identities (sorted) and the (probes, identities) matrix of each probe's score against each identity's
    templates, aggregated over them (max or mean)."""
    identities = sorted(templates)
    stacked = np.concatenate([templates[i] for i in identities])
    starts = np.cumsum([0] + [len(templates[i]) for i in identities[:-1]])
    scores = scoring.scores(probe_matrix, stacked)
    if aggregation == "max":
        return identities, np.maximum.reduceat(scores, starts, axis=1)
    counts = np.array([len(templates[i]) for i in identities])
    return identities, np.add.reduceat(scores, starts, axis=1) / counts


def _aggregated_scores(templates: dict[str, np.ndarray], probes: list[tuple], aggregation: str,
                       scoring: RouteScoring = PLAIN):
    identities, per_identity = identity_scores(templates, np.stack([p[1] for p in probes]), aggregation, scoring)
    probe_ids = np.array([p[0] for p in probes])
    own = probe_ids[:, None] == np.array(identities)[None, :]
    return per_identity[own], per_identity[~own & np.isin(probe_ids, identities)[:, None]]


def calibrate_unlock(package, images: list[LabelledImage], dataset, targets=(1e-3, 1e-4, 1e-5),
                     enroll_per_identity: int = 2, aggregations=AGGREGATIONS, seed: int = 0,
                     detector=None, progress: bool = True, split: str | None = None,
                     threads: int | None = None) -> dict:
    """Per aggregation and mask route, the threshold meeting each target per-attempt FMR, with the
    evidence. Returns {"thresholds": {aggregation: {route|"all": {str(fmr): t}}}, "calibration": {...}}.
    `dataset`/`split`: where `images` come from; refused when the package was trained on them.
    `detector`: a detector object or name; None: the one `FaceUnlock` uses by default."""
    check_not_trained_on(package, dataset, split)
    embedder = FaceEmbedder(package, threads=threads)
    if detector is None or isinstance(detector, str):
        detector = deployed_detector(detector)
    conflicts = embedder.detector_conflicts(detector, thresholds=False)  # the thresholds are made here
    if conflicts:
        warnings.warn(detector_conflict_message(package.name, detector, conflicts), stacklevel=2)
    templates, probes, failures, masked_misses = _embed_identity_sets(images, embedder, detector,
                                                                      enroll_per_identity, seed, progress)
    if len(templates) < 2 or not probes["unmasked"]:
        raise InputError("calibration needs at least 2 identities with more images than enrollment uses")
    thresholds, evidence = {}, {}
    scoring = {route: embedder.package.route_scoring(route) for route in ROUTES}
    all_probes = probes["unmasked"] + probes["masked"]
    routed = {route: [p for p in all_probes if p[2] == route] for route in ROUTES}
    for aggregation in aggregations:
        thresholds[aggregation] = {"all": {}, **{route: {} for route in ROUTES}}
        evidence[aggregation] = {}
        # Scored once per (drawn variant, route). What people feel: each drawn variant's attempts, whichever
        # route the gate sent them to, judged by that route's threshold (the routes' scores need not share a
        # scale: a route may have its own metric); each route's threshold is set on all its attempts.
        rule = package.masked_probe_templates
        per_variant = {v: {r: attempt_scores(templates, group, aggregation, scoring, rule)
                           for r in ROUTES if (group := [p for p in probes[v] if p[2] == r])}
                       for v in PROBE_VARIANTS}
        per_route = {route: tuple(np.concatenate(part) for part in zip(*(by_route[route] for by_route in
                                                                           per_variant.values() if route in by_route)))
                     for route in ROUTES if routed[route]}
        for target in sorted(targets, reverse=True):
            key = str(float(target))
            rows = {}
            for route, (genuine, impostor) in per_route.items():
                support = metrics.fmr_support(len(impostor), target)
                row = {"support": support, "n_genuine": int(genuine.size), "n_impostor": int(impostor.size)}
                if support != metrics.NOT_SUPPORTED:
                    t = metrics.threshold_for_fmr(impostor, target)
                    row.update(threshold=t, fnmr=float(np.mean(genuine < t)),
                               observed_fmr=float(np.mean(impostor >= t)))
                rows["route " + route] = row
            evidence[aggregation][key] = rows
            route_evidence = [rows.get("route " + r) for r in ROUTES]
            if all(r is not None and "threshold" in r for r in route_evidence):
                for route, row in zip(ROUTES, route_evidence):
                    thresholds[aggregation][route][key] = row["threshold"]
                # For callers without a mask verdict: the stricter route meets the target for both.
                thresholds[aggregation]["all"][key] = max(r["threshold"] for r in route_evidence)
                for variant, by_route in per_variant.items():
                    rejected = np.concatenate([g < rows["route " + r]["threshold"] for r, (g, _) in by_route.items()])
                    accepted = np.concatenate([i >= rows["route " + r]["threshold"]
                                               for r, (_, i) in by_route.items()])
                    rows["drawn " + variant] = {"at": "route thresholds", "n_genuine": int(rejected.size),
                                                "n_impostor": int(accepted.size), "fnmr": float(rejected.mean()),
                                                "observed_fmr": float(accepted.mean())}
    calibration = {
        "method": "unlock simulation: per identity the first images enrolled as FaceUnlock.enroll does "
                  "(plus synthetic masked copies), the rest probe every identity unmasked and masked (masked "
                  "probes detected afresh on the masked picture, misses make no attempt); "
                  "probes routed by the quality gate's mask estimate and scored against the templates of their "
                  "route (unmasked probes: the unmasked templates; masked probes: as the package's "
                  "masked_probe_templates rule says); FMR per attempt within each route; "
                  "'all' = the higher of the two route thresholds",
        "dataset": str(dataset),
        "split": split,
        "enroll_per_identity": enroll_per_identity,
        "enrollment_mask_types": list(SYNTHETIC_MASK_TYPES),
        "masked_probe_templates": package.masked_probe_templates,
        "n_identities": len(templates),
        "n_probes": {v: len(p) for v, p in probes.items()},
        "n_routed": {route: len(p) for route, p in routed.items()},
        "detector": detector_name(detector),
        "detection_failures": len(failures),
        "masked_probe_misses": len(masked_misses),
        "evidence": evidence,
        "seed": int(seed),
        "model_fingerprint": package.fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "edge_mfr_version": __version__,
    }
    aggregation, calibration["aggregation_choice"] = preferred_aggregation(evidence)
    return {"thresholds": thresholds, "calibration": calibration, "aggregation": aggregation}


def preferred_aggregation(evidence: dict, target: float = 1e-4) -> tuple[str, str]:
    """The aggregation under which people, with and without a mask, are falsely refused least at `target`
    (mean of the two drawn variants' FNMR at the route thresholds; the strictest supported target when
    `target` was not calibrated), and why; max when nothing is comparable."""
    rates = {}
    for aggregation, per_target in evidence.items():
        supported = [k for k, rows in per_target.items() if "drawn masked" in rows]
        if not supported:
            continue
        key = str(float(target)) if str(float(target)) in supported else min(supported, key=float)
        rows = per_target[key]
        rates[aggregation] = (key, 0.5 * (rows["drawn unmasked"]["fnmr"] + rows["drawn masked"]["fnmr"]))
    if not rates:
        return "max", "no supported target to compare aggregations at"
    best = min(rates, key=lambda a: (rates[a][1], a != "max"))  # ties keep max
    why = ", ".join(f"{a} {100 * fnmr:.1f}%" for a, (_, fnmr) in sorted(rates.items()))
    return best, f"mean FNMR of unmasked and masked people at FMR {rates[best][0]}: {why}"
