"""Decision thresholds for target false match rates, from an impostor-rich labelled image set.

Every image is compared with every other (all pairs, not a sample): N images give about N^2/2 impostor
pairs, e.g. ~20 million from the 6,300 images of celeba299, enough to support FMR 1e-5 (see
`metrics.fmr_support`). Only the highest impostor scores are kept in memory.

Scenarios calibrated (default "uu" and "um"): the device compares probes with or without masks against
unmasked enrolments, so the threshold written for each target is the highest (most conservative) over
the scenarios: it meets the target FMR on both. Targets that any scenario cannot support are not written.

The calibration set must be disjoint from any test set (never LFW when LFW is the benchmark) and from the
model's training identities: a model separates identities it was trained on better than unseen ones, so
thresholds from training identities are too low and the deployed FMR higher than the target.
`check_not_trained_on` refuses a folder (or split) the package's recipe lists in `train_data`; for older
recipes without that list, `calibrate` warns when the recipe names the calibration folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge_mfr import __version__
from edge_mfr.errors import InputError
from edge_mfr.eval import metrics
from edge_mfr.eval.pairs import IMAGE_EXTENSIONS
from edge_mfr.eval.runner import SCENARIO_VARIANTS, EmbeddingExtractor
from edge_mfr.match import PLAIN, RouteScoring

DEFAULT_TARGETS = (1e-3, 1e-4, 1e-5)
DEFAULT_SCENARIOS = ("uu", "um")
_BLOCK_ROWS = 256


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    key: str        # path relative to the images folder, names the image in reports and seeds its mask
    identity: str


def read_labelled_images(images_dir, identities_file=None, exclude_identities=(),
                         max_per_identity: int | None = None, split: str | None = None) -> list[LabelledImage]:
    """Images with identity labels, sorted by identity then file.

    With `identities_file` (lines "FILE IDENTITY", FILE relative to images_dir, as CelebA's
    identity_CelebA.txt, or "FILE IDENTITY SPLIT" as celeba_test's) the labels come from it; otherwise
    every subfolder of images_dir is an identity.
    `split`: keep only the lines of that split (needs the third column); None keeps every line.
    `exclude_identities`: identities to leave out (e.g. those shared with the test set).
    `max_per_identity`: keep only the first N images (sorted by name) of each identity.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"images directory not found: {images_dir}")
    if split is not None and identities_file is None:
        raise InputError(f"split {split!r} needs an identities file with a split column")
    labelled: list[tuple[str, str]] = []  # (identity, relative path)
    if identities_file is not None:
        identities_file = Path(identities_file)
        if not identities_file.is_file():
            raise InputError(f"identities file not found: {identities_file}")
        splits_seen: set[str] = set()
        for line_number, line in enumerate(identities_file.read_text(encoding="utf-8").splitlines(), start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) not in (2, 3):
                raise InputError(f"{identities_file}:{line_number}: expected 'FILE IDENTITY [SPLIT]', got {line!r}")
            if split is not None:
                if len(tokens) != 3:
                    raise InputError(f"{identities_file}:{line_number}: split {split!r} requested but the line "
                                     f"has no split column: {line!r}")
                splits_seen.add(tokens[2])
                if tokens[2] != split:
                    continue
            labelled.append((tokens[1], tokens[0]))
        if split is not None and not labelled:
            raise InputError(f"no image of split {split!r} in {identities_file} "
                             f"(splits there: {', '.join(sorted(splits_seen)) or 'none'})")
        missing = [rel for _, rel in labelled if not (images_dir / rel).is_file()]
        if missing:
            raise InputError(f"{len(missing)} images listed in {identities_file} are missing under {images_dir}, "
                             f"e.g. {', '.join(missing[:5])}")
    else:
        for entry in sorted(os.scandir(images_dir), key=lambda e: e.name):
            if entry.is_dir():
                labelled += [(entry.name, f"{entry.name}/{name}") for name in sorted(os.listdir(entry.path))
                             if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    excluded = set(exclude_identities)
    by_identity: dict[str, list[str]] = {}
    for identity, rel in labelled:
        if identity not in excluded:
            by_identity.setdefault(identity, []).append(rel)
    images = []
    for identity in sorted(by_identity):
        files = sorted(by_identity[identity])[:max_per_identity]
        images += [LabelledImage(images_dir / rel, rel, identity) for rel in files]
    if len(by_identity) < 2:
        raise InputError(f"calibration needs images of at least 2 identities under {images_dir}, "
                         f"found {len(by_identity)}")
    return images


def dataset_name(dataset) -> str:
    """The data set's folder name as training recipes record it: celeba_test/images -> celeba_test."""
    folder = Path(dataset).resolve()
    return folder.parent.name if folder.name == "images" else folder.name


def check_not_trained_on(package, dataset, split: str | None = None) -> None:
    """Refuse (InputError) to calibrate on data the package's recipe says it was trained on.

    The recipe's `train_data` lists {"name": folder basename, "split": "train" | None (whole folder)}.
    A calibration set conflicts with an entry of the same folder when the entry covers the whole folder,
    when the requested split is the one trained on, or when no split was requested (the whole folder,
    training split included, would be used).
    """
    name = dataset_name(dataset)
    train_data = (package.meta.get("recipe") or {}).get("train_data") or []
    if not isinstance(train_data, list):
        raise InputError(f"model {package.name!r}: recipe train_data must be a list, got {type(train_data).__name__}")
    for entry in train_data:
        if not isinstance(entry, dict) or "name" not in entry:
            raise InputError(f"model {package.name!r}: recipe train_data entry {entry!r} has no 'name'")
        if entry["name"] != name:
            continue
        trained_split = entry.get("split")
        if trained_split is None or split is None or split == trained_split:
            what = "all of it" if trained_split is None else f"split {trained_split!r}"
            asked = f"split {split!r} of " if split is not None else "all of "
            raise InputError(
                f"refusing to calibrate model {package.name!r} ({package.onnx_path}) on {asked}{name!r} "
                f"({dataset}): its recipe says it was trained on {what}; thresholds set on training identities "
                f"are too low and the deployed FMR would exceed the target. Calibrate on held-out identities"
                + (f" (e.g. a split other than {trained_split!r})" if trained_split is not None else ""))


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def all_pair_scores(reference: np.ndarray, probe: np.ndarray, identities: np.ndarray, symmetric: bool,
                    keep_top: int, scoring: RouteScoring = PLAIN) -> dict:
    """Scores of every pair of distinct images: all genuine scores, and the `keep_top` highest impostor
    scores with the impostor count, mean and std. `symmetric`: reference and probe are the same variant,
    so each unordered pair is counted once; otherwise every ordered pair (reference i, probe j), i != j.
    `scoring`: how the pairs' route compares faces (`ModelPackage.route_scoring`)."""
    reference, probe = _normalised(reference), _normalised(probe)
    n = len(reference)
    genuine: list[np.ndarray] = []
    top = np.empty(0, dtype=np.float32)
    count, total, total_sq = 0, 0.0, 0.0
    columns = np.arange(n)
    for start in range(0, n, _BLOCK_ROWS):
        rows = np.arange(start, min(start + _BLOCK_ROWS, n))
        scores = scoring.scores(reference[rows], probe)
        distinct = columns[None, :] > rows[:, None] if symmetric else columns[None, :] != rows[:, None]
        same = identities[rows][:, None] == identities[None, :]
        genuine.append(scores[distinct & same])
        impostor = scores[distinct & ~same]
        count += impostor.size
        total += float(impostor.sum(dtype=np.float64))
        total_sq += float(np.square(impostor, dtype=np.float64).sum())
        top = np.concatenate([top, impostor])
        if top.size > keep_top:
            top = np.partition(top, top.size - keep_top)[-keep_top:]
    mean = total / count if count else float("nan")
    return {"genuine": np.concatenate(genuine), "impostor_top": top, "n_impostor": count,
            "impostor_mean": mean, "impostor_std": float(np.sqrt(max(total_sq / count - mean ** 2, 0.0)))
            if count else float("nan")}


def _impostor_count(identities: np.ndarray, symmetric: bool) -> int:
    n = identities.size
    sizes = np.unique(identities, return_counts=True)[1].astype(np.int64)
    same_ordered = int(np.sum(sizes * (sizes - 1)))
    return (n * (n - 1) - same_ordered) // 2 if symmetric else n * (n - 1) - same_ordered


def calibrate(package, images: list[LabelledImage], dataset, targets=DEFAULT_TARGETS, scenarios=DEFAULT_SCENARIOS,
              mask_family: str | None = None, seed: int = 0, aligned: bool = False, detector=None,
              cache_dir=None, threads: int | None = None, progress: bool = True, split: str | None = None) -> dict:
    """Thresholds per target FMR and the evidence behind them (JSON-ready).

    `images`: from `read_labelled_images`; `dataset`: the folder they come from and `split` the split read
    from it (recorded, and checked against the package's training recipe: see `check_not_trained_on`).
    Returns {"thresholds": {str(fmr): threshold}, "calibration": {...}}; pass both to
    `package.with_thresholds` (see `write_thresholds`).
    """
    check_not_trained_on(package, dataset, split)
    targets = sorted({float(t) for t in targets}, reverse=True)
    if not targets or not all(0 < t < 1 for t in targets):
        raise InputError(f"target FMRs must be in (0, 1), got {targets}")
    unknown = [s for s in scenarios if s not in SCENARIO_VARIANTS]
    if unknown or not scenarios:
        raise InputError(f"scenarios must be among {tuple(SCENARIO_VARIANTS)}, got {list(scenarios)}")
    extractor = EmbeddingExtractor([package], aligned=aligned, detector=detector, mask_family=mask_family,
                                   seed=seed, cache_dir=cache_dir, threads=threads, progress=progress)
    pairs_in = [(im.path, im.key) for im in images]
    variants_needed = {masked for s in scenarios for masked in SCENARIO_VARIANTS[s]}
    extracted = {masked: extractor.extract(pairs_in, masked, "masked calibration images" if masked
                                           else "calibration images")
                 for masked in sorted(variants_needed)}
    identities_all = np.array([im.identity for im in images])

    per_scenario = {}
    for scenario in scenarios:
        reference_masked, probe_masked = SCENARIO_VARIANTS[scenario]
        reference = extracted[reference_masked].embeddings[0]
        probe = extracted[probe_masked].embeddings[0]
        # An image enters a scenario only when every variant it is used in was embedded.
        usable = np.isfinite(reference).all(axis=1) & np.isfinite(probe).all(axis=1)
        # A comparison with a masked face is scored as the masked route scores it (its metric, if any).
        scoring = extractor.models[0].package.route_scoring("masked" if reference_masked or probe_masked
                                                            else "unmasked")
        identities = identities_all[usable]
        symmetric = reference_masked == probe_masked
        n_impostor = _impostor_count(identities, symmetric)
        keep_top = min(max(int(np.floor(targets[0] * n_impostor + 1e-9)) + 1, 1), max(n_impostor, 1))
        scores = all_pair_scores(reference[usable], probe[usable], identities, symmetric, keep_top, scoring)
        genuine = scores["genuine"]
        entry = {
            "n_images": int(usable.sum()),
            "n_identities": int(np.unique(identities).size),
            "n_failed_images": int((~usable).sum()),
            "n_genuine": int(genuine.size),
            "n_impostor": int(scores["n_impostor"]),
            "genuine_mean": float(genuine.mean()) if genuine.size else None,
            "genuine_std": float(genuine.std()) if genuine.size else None,
            "impostor_mean": scores["impostor_mean"],
            "impostor_std": scores["impostor_std"],
            "targets": {},
        }
        for target in targets:
            support = metrics.fmr_support(scores["n_impostor"], target)
            result = {"support": support}
            if support != metrics.NOT_SUPPORTED:
                threshold = metrics.threshold_for_fmr(scores["impostor_top"], target, scores["n_impostor"])
                false_matches = int(np.count_nonzero(scores["impostor_top"] >= threshold))
                result.update(threshold=threshold, false_matches=false_matches,
                              observed_fmr=false_matches / scores["n_impostor"],
                              fnmr=float(np.mean(genuine < threshold)) if genuine.size else None)
            entry["targets"][str(target)] = result
        per_scenario[scenario] = entry

    thresholds, support, omitted = {}, {}, []
    for target in targets:
        key = str(target)
        statuses = [per_scenario[s]["targets"][key]["support"] for s in scenarios]
        if metrics.NOT_SUPPORTED in statuses:
            omitted.append(key)
            continue
        thresholds[key] = max(per_scenario[s]["targets"][key]["threshold"] for s in scenarios)
        support[key] = metrics.MARGINAL if metrics.MARGINAL in statuses else metrics.SUPPORTED
    failures = {("masked " if masked else "") + status: len(keys)
                for masked, ext in extracted.items() for status, keys in ext.failures.items()}
    calibration = {
        "method": "all-pairs impostors; per scenario the lowest threshold with observed FMR <= target; "
                  "written threshold = highest over scenarios",
        "dataset": str(dataset),
        "split": split,
        "n_images": len(images),
        "n_identities": int(np.unique(identities_all).size),
        "image_failures": failures,
        "scenarios": per_scenario,
        "support": support,
        "targets_not_supported": omitted,
        "mask_family": mask_family if any(s != "uu" for s in scenarios) else None,
        "seed": int(seed),
        "aligned": bool(aligned),
        "model_fingerprint": package.fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "edge_mfr_version": __version__,
        "warnings": training_overlap_warnings(package, dataset),
    }
    return {"thresholds": thresholds, "calibration": calibration}


def training_overlap_warnings(package, dataset) -> list[str]:
    """For recipes without a structured `train_data` (see `check_not_trained_on`), a warning when the recipe
    mentions the calibration data set's name anywhere."""
    recipe = package.meta.get("recipe") or {}
    name = dataset_name(dataset)
    if "train_data" not in recipe and name and name in str(recipe):
        return [f"the model's training recipe mentions {name!r}: thresholds calibrated on training identities "
                f"are too low and the deployed FMR will exceed the target; calibrate on held-out identities"]
    return []


def write_thresholds(package, result: dict):
    """Store the thresholds and calibration evidence in the package sidecar; returns the updated package."""
    return package.with_thresholds(result["thresholds"], result["calibration"])
