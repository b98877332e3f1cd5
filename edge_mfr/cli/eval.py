"""`edge-mfr eval` (verification benchmark on a pairs file) and `edge-mfr calibrate` (FMR thresholds)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from edge_mfr.errors import InputError
from edge_mfr.eval.runner import FACE_RULES, LANDMARK_SOURCES, SCENARIOS


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edge-mfr" / "embeddings"


def _add_common(parser) -> None:
    parser.add_argument("--mask-family", default=None, metavar="template|nist|TYPE",
                        help="synthetic masks for masked scenarios: a family drawn at random per image, or one "
                             "mask type (see edge_mfr.masks.MASK_TYPES); default: any type")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image mask draws and the bootstrap")
    parser.add_argument("--aligned", action="store_true",
                        help="images are crops aligned to the ArcFace 112 template: skip detection")
    parser.add_argument("--detector", default=None, metavar="NAME",
                        help="face detector (see edge_mfr.detect.available_detectors()); default: the one FaceUnlock "
                             "uses, with its settings")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"embedding cache (default {_default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached embeddings")
    parser.add_argument("--threads", type=int, default=None, help="inference threads per model")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _cache_dir(args):
    return None if args.no_cache else (args.cache_dir or _default_cache_dir())


def _identity_list(path) -> list[str]:
    """One identity per line (names have no spaces in LFW syntax); none without a file."""
    if path is None:
        return []
    if not path.is_file():
        raise InputError(f"identities file not found: {path}")
    return path.read_text(encoding="utf-8").split()


def _load_models(paths):
    from edge_mfr.models.package import default_model, load_package
    return [load_package(p) for p in paths] if paths else [default_model()]


def register(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "eval", help="verification benchmark (accuracy, EER, FMR100/1000, ...) on an LFW-syntax pairs file",
        description="Score every pair of a pairs file with one or more models, unmasked and/or with synthetic "
                    "masks, and report verification metrics.")
    evaluate.add_argument("--pairs", required=True, type=Path, help="pairs file in LFW syntax")
    evaluate.add_argument("--images", required=True, type=Path, help="folder holding Name/Name_0001.jpg ...")
    evaluate.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=["uu"],
                          help="uu: unmasked pairs; um: probe (second image) masked; mm: both masked")
    evaluate.add_argument("--model", action="append", default=None, metavar="PACKAGE",
                          help="model package (.onnx, .json or folder); repeat for side-by-side models "
                               "(default: the bundled default model)")
    evaluate.add_argument("--json", type=Path, help="write the full report (metrics and per-pair scores) here")
    evaluate.add_argument("--markdown", type=Path, help="write the markdown table here")
    evaluate.add_argument("--plots", type=Path, help="write DET and score-distribution PNGs into this folder")
    evaluate.add_argument("--limit", type=int, default=None, help="use a balanced subset of N pairs")
    evaluate.add_argument("--exclude-identities", type=Path,
                          help="file with one identity per line whose pairs are left out (and counted), e.g. "
                               "glint24/LFW_OVERLAP.txt for an identity-disjoint LFW result")
    evaluate.add_argument("--missing", choices=("error", "skip"), default="error",
                          help="missing images: stop with a list, or skip (and count) their pairs")
    evaluate.add_argument("--face", choices=FACE_RULES, default="centre",
                          help="which detected face is the subject: the one nearest the image centre (default: "
                               "LFW-style sets centre their subject, and a larger face in the background is not "
                               "them) or the largest (as FaceUnlock picks in a camera frame)")
    evaluate.add_argument("--landmarks", choices=LANDMARK_SOURCES, default="masked",
                          help="masked images: detect the face afresh on the masked image, as FaceUnlock does "
                               "(default), or reuse the unmasked image's landmarks (scenarios then differ only in "
                               "the mask)")
    evaluate.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                          help="bootstrap resamples for confidence intervals (0: none)")
    _add_common(evaluate)
    evaluate.set_defaults(func=run_eval)

    calibrate = subparsers.add_parser(
        "calibrate", help="thresholds for target FMRs from a labelled image set, written into the model package",
        description="Compare every image of a labelled set with every other, choose the threshold meeting each "
                    "target FMR, and store them in the package sidecar. Use identities disjoint from any test "
                    "set and from the model's training data: a folder (or split) that the package's recipe "
                    "lists in train_data is refused.")
    calibrate.add_argument("--model", required=True, type=Path, metavar="PACKAGE", help="model package to calibrate")
    calibrate.add_argument("--images", required=True, type=Path,
                           help="labelled images: one subfolder per identity, or files named by --identities")
    calibrate.add_argument("--identities", type=Path,
                           help="'FILE IDENTITY [SPLIT]' lines, FILE relative to --images")
    calibrate.add_argument("--split", default=None,
                           help="use only the --identities lines of this split (third column), e.g. calib")
    calibrate.add_argument("--exclude-identities", type=Path,
                           help="file with one identity per line to leave out (e.g. those in the test set)")
    calibrate.add_argument("--max-per-identity", type=int, default=None, help="keep the first N images of each")
    calibrate.add_argument("--targets", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5], help="target FMRs")
    calibrate.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=["uu", "um"],
                           help="scenarios to calibrate on; the threshold written is the highest over them")
    calibrate.add_argument("--protocol", choices=("unlock", "pairs"), default="unlock",
                           help="unlock (default): simulate enrollment with synthetic masked templates and count "
                                "FMR per verify attempt, per aggregation; pairs: single image pairs per --scenario")
    calibrate.add_argument("--enroll-per-identity", type=int, default=2,
                           help="unlock protocol: images enrolled per identity, the rest are probes")
    calibrate.add_argument("--json", type=Path, help="also write the thresholds and calibration evidence here")
    calibrate.add_argument("--dry-run", action="store_true", help="report only; leave the package unchanged")
    _add_common(calibrate)
    calibrate.set_defaults(func=run_calibrate)


def run_eval(args) -> int:
    from edge_mfr.eval import report
    from edge_mfr.eval.pairs import read_pairs
    from edge_mfr.eval.runner import evaluate_pairs

    pair_set = read_pairs(args.pairs, args.images, missing=args.missing, limit=args.limit,
                          exclude_identities=_identity_list(args.exclude_identities))
    if pair_set.excluded_pairs:
        print(f"excluded {pair_set.excluded_pairs} pairs involving identities in {args.exclude_identities}",
              file=sys.stderr)
    if pair_set.skipped_pairs:
        print(f"skipped {pair_set.skipped_pairs} pairs with {len(pair_set.missing_images)} missing images",
              file=sys.stderr)
    result = evaluate_pairs(pair_set, _load_models(args.model), scenarios=args.scenario,
                            mask_family=args.mask_family, seed=args.seed, aligned=args.aligned,
                            cache_dir=_cache_dir(args), threads=args.threads, n_resamples=args.bootstrap,
                            progress=not args.quiet, face=args.face, landmarks=args.landmarks,
                            detector=args.detector)
    for variant, summary in result["images"].items():
        failed = sum(len(keys) for keys in summary["failures"].values())
        print(f"{variant} images: {summary['n_images']}, detected {summary['detected']}, centred fallback "
              f"{summary['centred_fallback']}, failed {failed}"
              + (f" ({', '.join(f'{k}: {len(v)}' for k, v in summary['failures'].items())})" if failed else ""),
              file=sys.stderr)
    for entry in result["results"]:
        misses = entry["detector_misses"]
        if misses["pairs"]:
            print(f"{entry['model']} {entry['scenario']}: detector missed {misses['reference_images']} reference and "
                  f"{misses['probe_images']} probe images, {misses['pairs']} pairs", file=sys.stderr)
    table = report.markdown_table(result)
    print(table)
    if args.json:
        report.write_json(result, args.json)
    if args.markdown:
        report.write_markdown(result, args.markdown)
    if args.plots:
        report.plot_det(result, args.plots)
        report.plot_score_distributions(result, args.plots)
    return 0


def run_calibrate(args) -> int:
    from edge_mfr.eval.calibrate import calibrate, check_not_trained_on, read_labelled_images, write_thresholds
    from edge_mfr.eval.report import write_json
    from edge_mfr.models.package import load_package

    package = load_package(args.model)
    check_not_trained_on(package, args.images, args.split)  # before reading or embedding anything
    images = read_labelled_images(args.images, args.identities, _identity_list(args.exclude_identities),
                                  args.max_per_identity, split=args.split)
    if args.protocol == "unlock":
        return _calibrate_unlock(args, package, images)
    result = calibrate(package, images, args.images, targets=args.targets, scenarios=args.scenario,
                       mask_family=args.mask_family, seed=args.seed, aligned=args.aligned, detector=args.detector,
                       cache_dir=_cache_dir(args), threads=args.threads, progress=not args.quiet, split=args.split)
    info = result["calibration"]
    print(f"{package.name}: {info['n_images']} images of {info['n_identities']} identities from {info['dataset']}")
    for scenario, entry in info["scenarios"].items():
        print(f"  {scenario}: {entry['n_genuine']} genuine, {entry['n_impostor']} impostor pairs "
              f"({entry['n_failed_images']} images failed)")
        for target, t in entry["targets"].items():
            if "threshold" in t:
                print(f"    FMR {target}: threshold {t['threshold']:.4f} ({t['support']}, {t['false_matches']} false "
                      f"matches, FNMR {100 * t['fnmr']:.2f}%)")
            else:
                print(f"    FMR {target}: not supported by {entry['n_impostor']} impostors")
    for warning in info["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        write_json(result, args.json)
    if not result["thresholds"]:
        print("no target FMR is supported by this calibration set; package left unchanged", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(result["thresholds"]))
    else:
        write_thresholds(package, result)
        print(f"wrote thresholds {json.dumps(result['thresholds'])} into {package.onnx_path.with_suffix('.json')}")
    return 0


def _calibrate_unlock(args, package, images) -> int:
    from edge_mfr.eval.report import write_json
    from edge_mfr.eval.unlock_calibration import calibrate_unlock

    result = calibrate_unlock(package, images, args.images, targets=args.targets,
                              enroll_per_identity=args.enroll_per_identity, seed=args.seed, progress=not args.quiet,
                              split=args.split, threads=args.threads, detector=args.detector)
    info = result["calibration"]
    print(f"{package.name}: unlock protocol on {info['n_identities']} identities from {info['dataset']}"
          + (f" split {info['split']}" if info["split"] else "") + " "
          f"({info['n_probes']['unmasked']} probes, each unmasked and masked, routed {info['n_routed']}; "
          f"{info['detection_failures']} images without a face, {info['masked_probe_misses']} masked probes missed "
          f"by {info['detector']})")
    for aggregation, per_target in info["evidence"].items():
        for target, rows in per_target.items():
            print(f"  {aggregation} FMR {target}:")
            for name, row in rows.items():
                if "threshold" in row:
                    print(f"    {name}: threshold {row['threshold']:.4f}, FNMR {100 * row['fnmr']:.1f}% "
                          f"({row['n_impostor']} impostor attempts, {row['support']})")
                elif "at" in row:
                    print(f"    {name}, at the {row['at']}: FNMR {100 * row['fnmr']:.1f}%, observed FMR "
                          f"{row['observed_fmr']:.2g} ({row['n_genuine']} genuine attempts)")
                else:
                    print(f"    {name}: not supported by {row['n_impostor']} impostor attempts")
    if args.json:
        write_json(result, args.json)
    by_aggregation = result["thresholds"]
    if not by_aggregation.get("max", {}).get("all"):
        print("no target FMR is supported by this calibration set; package left unchanged", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(by_aggregation))
    else:
        package.with_thresholds(by_aggregation["max"]["all"], info, by_aggregation, result["aggregation"])
        print(f"preferred aggregation: {result['aggregation']} ({info['aggregation_choice']})")
        print(f"wrote thresholds {json.dumps(by_aggregation)} into {package.sidecar_path}")
    return 0
