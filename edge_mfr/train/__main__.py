"""`python -m edge_mfr.train prepare|fit|export|...`: build the training pool, train one config, interpolate two
fine-tunes, export a package, fit the closed-form masked-route heads, assemble a two-network package.

Multi-process: `torchrun --nproc_per_node=N -m edge_mfr.train fit CONFIG ...` (gloo on CPU, NCCL on GPUs).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edge_mfr.errors import EdgeMfrError, InputError

DEFAULT_DATA = os.environ.get("EDGE_MFR_DATA", str(Path(__file__).resolve().parents[3] / "shared" / "data"))


def main(argv: list[str] | None = None) -> int:
    from edge_mfr.train.data import TRAINING_SOURCES

    parser = argparse.ArgumentParser(prog="python -m edge_mfr.train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="align, compress and embed the training images; paint mask layers")
    prepare.add_argument("--data", default=DEFAULT_DATA, help="shared data root (default $EDGE_MFR_DATA)")
    prepare.add_argument("--out", required=True, help="output .npz")
    prepare.add_argument("--sources", nargs="+", default=["celeba299", "celeba_test"], choices=list(TRAINING_SOURCES))
    prepare.add_argument("--crop-size", type=int, default=112)
    prepare.add_argument("--max-per-identity", type=int, help="cap images per identity")
    prepare.add_argument("--max-identities", type=int, help="cap identities per source (small test pools)")
    prepare.add_argument("--masks", type=int, default=600, help="mask layers to paint")
    prepare.add_argument("--no-templates", action="store_true",
                         help="leave the teacher's templates to the first training run (on its device)")

    subset = commands.add_parser("subset", help="a smaller pool: at most N faces per identity (seeded draw)")
    subset.add_argument("pool")
    subset.add_argument("--per-identity", type=int, required=True)
    subset.add_argument("--seed", type=int, default=0)
    subset.add_argument("--out", required=True)

    fit = commands.add_parser("fit", help="train one config")
    fit.add_argument("config", help="config name (edge_mfr/train/configs/NAME.py) or path to a .py")
    fit.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config fields to override")
    fit.add_argument("--resume", action="store_true", help="continue from OUT_DIR/NAME/last.pt if it exists")

    export = commands.add_parser("export", help="best.pt (or final.pt, last.pt) of a run -> model package (ONNX + sidecar)")
    export.add_argument("checkpoint")
    export.add_argument("--out", required=True, help="output .onnx")
    export.add_argument("--name")

    interpolate = commands.add_parser("interpolate", help="weight interpolation of fine-tunes of one network "
                                      "(WiSE-FT / model soups) -> a best.pt-style checkpoint, measured on the hold-out")
    interpolate.add_argument("checkpoints", nargs="+", help="best.pt (or final.pt, last.pt) of each run, all from the "
                             "same starting weights")
    share = interpolate.add_mutually_exclusive_group()
    share.add_argument("--weight", type=float, help="two runs: the share of the second, 0-1")
    share.add_argument("--weights", help="one weight per run, comma-separated, summing to 1 (default: uniform)")
    interpolate.add_argument("--pool", required=True, help="the training pool the runs used (for the hold-out)")
    interpolate.add_argument("--out", required=True, help="output .pt (export it like a run's best.pt)")
    interpolate.add_argument("--name", help="the network's name (default: the output's stem)")
    interpolate.add_argument("--threads", type=int, default=2)

    route = commands.add_parser("route-map", help="fit a masked-route map for a package; write the routed package")
    _pair_arguments(route, faces=2500, out="output .onnx of the routed package")

    metric = commands.add_parser("route-metric", help="fit a masked-route scoring metric for a package; write a "
                                 "copy that scores masked probes with it (same graph and fingerprint)")
    _pair_arguments(metric, faces=2500, out="output .onnx of the copy")
    metric.add_argument("--drop", action="store_true", help="write a copy without any masked-route metric instead "
                        "(the baseline to compare with)")

    cohort = commands.add_parser("score-cohort", help="give a package a score-normalisation cohort of deployed-path "
                                 "training faces (AS-norm); write a copy (same graph and fingerprint)")
    _pair_arguments(cohort, faces=4000, out="output .onnx of the copy")
    cohort.add_argument("--top-k", type=int, default=100, help="cohort scores per side that set its scale")
    cohort.add_argument("--drop", action="store_true", help="write a copy without a cohort instead")

    two = commands.add_parser("masked-network", help="a two-network package: --model's network for unmasked faces, "
                              "--network's for the masked route; thresholds must be recalibrated")
    two.add_argument("--model", default="dlib_resnet_v1", help="package path or bundled name (the unmasked route)")
    two.add_argument("--network", required=True, help="package of the masked-route network (`export` of a "
                     "dlib_masked_route run)")
    two.add_argument("--out", required=True, help="output .onnx (NAME.masked.onnx is written beside it)")
    two.add_argument("--name", required=True)

    pairs = commands.add_parser("refiner-pairs", help="masked faces aligned by their own detected points, and how "
                                "that alignment differs from the clean photo's (celeba_test train)")
    pairs.add_argument("--data", default=DEFAULT_DATA, help="shared data root (default $EDGE_MFR_DATA)")
    pairs.add_argument("--masks-per-face", type=int, default=2)
    pairs.add_argument("--shard", type=int, default=0, help="take every SHARDS-th photo from this one")
    pairs.add_argument("--shards", type=int, default=1)
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--mask-jitter", type=float, default=0.08, help="masks drawn this far from the clean points "
                       "(fraction of the eye distance, of the size, radians)")
    pairs.add_argument("--detector", default=None, help="the detector whose points on masked faces the refiner "
                       "learns to move (default: the unlock's)")
    pairs.add_argument("--out", required=True, help="output .npz")

    refiner = commands.add_parser("refiner-fit", help="train the masked-face alignment refiner on refiner-pairs")
    refiner.add_argument("pairs", nargs="+", help=".npz files of refiner-pairs")
    refiner.add_argument("--epochs", type=int, default=20)
    refiner.add_argument("--seed", type=int, default=0)
    refiner.add_argument("--threads", type=int, default=2)
    refiner.add_argument("--out", required=True, help="output .pt")
    refiner_export = commands.add_parser("refiner-export", help="a refiner-fit checkpoint -> NAME.onnx + NAME.json "
                                         "(for edge_mfr/models/refiners)")
    refiner_export.add_argument("checkpoint", help="refiner-fit output .pt")
    refiner_export.add_argument("--out", required=True, help="output NAME.onnx (NAME.json beside it)")

    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            from edge_mfr.train.data import prepare_pool

            pool = prepare_pool(args.data, sources=tuple(args.sources), crop_size=args.crop_size,
                                max_per_identity=args.max_per_identity, max_identities=args.max_identities,
                                mask_count=args.masks,
                                with_templates=not args.no_templates)
            path = pool.save(args.out)
            skipped = pool.meta["skipped"]
            print(f"wrote {path}: {len(pool)} faces of {len(pool.identities)} identities, "
                  f"{pool.blobs.nbytes / 2**20:.1f} MiB of crops; skipped {skipped['missing']} missing, "
                  f"{skipped['unreadable']} unreadable, {skipped['no_face']} without a detected face")
        elif args.command == "subset":
            import numpy as np

            from edge_mfr.train.data import TrainingPool

            pool = TrainingPool.load(args.pool)
            rng = np.random.default_rng(args.seed)
            rows = np.concatenate([np.sort(rng.permutation(np.flatnonzero(pool.labels == label))[:args.per_identity])
                                   for label in np.unique(pool.labels)])
            path = pool.subset(rows).save(args.out)
            print(f"wrote {path}: {len(rows)} of {len(pool)} faces")
        elif args.command == "fit":
            from edge_mfr.train.config import load_config
            from edge_mfr.train.trainer import fit as run

            run(load_config(args.config).with_overrides(args.overrides), resume=args.resume)
        elif args.command == "interpolate":
            from edge_mfr.train.interpolate import interpolate_checkpoints

            weights = _interpolation_weights(args)
            record = interpolate_checkpoints(args.checkpoints, weights, args.out, args.pool, name=args.name,
                                             threads=args.threads)
            metrics = record["metrics"]
            print(f"wrote {args.out}: hold-out TPR@FMR1e-3 uu {metrics['tpr_uu']:.4f} um {metrics['tpr_um']:.4f} "
                  f"mm {metrics['tpr_mm']:.4f} masked_route {metrics['tpr_masked_route']:.4f}")
        elif args.command == "route-map":
            route_map_command(args)
        elif args.command == "route-metric":
            route_metric_command(args)
        elif args.command == "score-cohort":
            score_cohort_command(args)
        elif args.command == "refiner-pairs":
            import numpy as np

            from edge_mfr.train.refiner import refiner_pairs

            made = refiner_pairs(args.data, args.masks_per_face, args.seed, args.shard, args.shards,
                                 args.mask_jitter, args.detector)
            np.savez(args.out, **made)
            print(f"wrote {args.out}: {len(made['chips'])} masked faces, {made['misses']} masked photos missed")
        elif args.command == "refiner-fit":
            refiner_fit_command(args)
        elif args.command == "refiner-export":
            refiner_export_command(args)
        elif args.command == "masked-network":
            from edge_mfr.models.masked_network import with_masked_network
            from edge_mfr.models.package import load_package

            package = with_masked_network(load_package(args.model), load_package(args.network), args.out, args.name)
            print(f"wrote {package.onnx_path} and {package.masked_network().onnx_path.name} "
                  f"({package.fingerprint[:12]}); fit its masked-route metric (route-metric) and calibrate it")
        else:
            from edge_mfr.train.export import export_package

            package = export_package(args.checkpoint, args.out, name=args.name)
            print(f"wrote {package.onnx_path} ({package.fingerprint[:12]})")
    except EdgeMfrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def refiner_fit_command(args) -> None:
    import numpy as np
    import torch

    from edge_mfr.train.refiner import fit_refiner, save_refiner_checkpoint

    torch.set_num_threads(args.threads)
    for path in args.pairs:
        if not Path(path).is_file():
            raise InputError(f"refiner pairs {path} not found (make them with refiner-pairs)")
    loaded = [np.load(path) for path in args.pairs]
    missing = [f"{path}: {key}" for path, d in zip(args.pairs, loaded)
               for key in ("chips", "targets", "identities", "detector") if key not in d]
    if missing:
        raise InputError(f"not refiner-pairs output, missing {', '.join(missing)}")
    detectors = sorted({str(d["detector"]) for d in loaded})
    if len(detectors) > 1:  # each detector moves its points differently on a masked face
        raise InputError(f"refiner pairs of different detectors ({', '.join(detectors)}): fit one refiner per detector")
    chips, targets, identities = (np.concatenate([d[k] for d in loaded]) for k in ("chips", "targets", "identities"))
    result = fit_refiner(chips, targets, identities, epochs=args.epochs, seed=args.seed)
    save_refiner_checkpoint(result, args.out, detectors[0])
    print(f"wrote {args.out}: {result['train_faces']} training faces, {result['holdout_faces']} held out, "
          f"points of {detectors[0]}")


def refiner_export_command(args) -> None:
    from datetime import date

    from edge_mfr.train.refiner import export_refiner

    if not Path(args.checkpoint).is_file():
        raise InputError(f"refiner checkpoint {args.checkpoint} not found (make it with refiner-fit)")
    graph = export_refiner(args.checkpoint, args.out, {
        "train_data": [{"name": "celeba_test", "split": "train"}],  # where refiner-pairs draws its photos
        "data_terms": "CelebA: non-commercial research purposes only; the refiner inherits those terms",
        "date": date.today().isoformat()})
    print(f"wrote {graph} and {graph.with_suffix('.json').name}; bundle both in edge_mfr/models/refiners")


def _interpolation_weights(args) -> list[float] | None:
    """--weight (two runs: the second's share) or --weights (one per run); None: a uniform soup."""
    if args.weight is not None:
        if len(args.checkpoints) != 2:
            raise InputError(f"--weight is the second run's share of two; {len(args.checkpoints)} checkpoints "
                             "given: use --weights")
        return [1.0 - args.weight, args.weight]
    if args.weights is None:
        return None
    try:
        return [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise InputError(f"--weights {args.weights!r}: expected comma-separated numbers") from None


def _pair_arguments(parser, faces: int, out: str) -> None:
    """The arguments of the commands fitted on deployed-path (clean, masked) pairs (`route_pairs_for`)."""
    parser.add_argument("--model", default="dlib_resnet_v1", help="package path or bundled name")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--faces", type=int, default=faces, help="celeba_test train faces to draw pairs from")
    parser.add_argument("--pairs", help=".npz cache of the pairs (written when absent, reused when it matches)")
    parser.add_argument("--out", required=True, help=out)
    parser.add_argument("--name", required=True)


def route_pairs_for(args, package):
    """The deployed-path (clean, masked) pairs of `package`: from the --pairs cache when it was made with this
    graph, else drawn now (and cached there)."""
    import numpy as np

    from edge_mfr.models.route_map import route_pairs

    cache = Path(args.pairs) if args.pairs else None
    if cache is not None and cache.is_file() and str(np.load(cache)["fingerprint"]) == package.fingerprint:
        with np.load(cache) as data:
            return {key: data[key] for key in data.files}
    made = route_pairs([package], args.data, faces=args.faces)
    pairs = {"clean": made["clean"][0], "masked": made["masked"][0], "identities": np.array(made["identities"]),
             "files": np.array(made["files"]), "mask_types": np.array(made["mask_types"]),
             "misses": made["misses"], "detector": made["detector"], "fingerprint": package.fingerprint}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **pairs)
    return pairs


def pairs_provenance(pairs) -> dict:
    import numpy as np

    return {"pairs": int(len(pairs["clean"])), "identities": int(len(np.unique(pairs["identities"]))),
            "masked_photo_misses": int(pairs["misses"]), "detector": str(pairs["detector"]),
            "data": "celeba_test split train (training pool identities)",
            "train_data": [{"name": "celeba_test", "split": "train"}]}


def route_map_command(args) -> None:
    from edge_mfr.models.package import load_package
    from edge_mfr.models.route_map import fit_ridge, select_alpha, with_masked_route

    package = load_package(args.model)
    if package.route_map("masked") is not None:
        raise InputError(f"{package.name!r} already has a masked-route map; fit one on the package without it")
    pairs = route_pairs_for(args, package)
    alpha, trials = select_alpha(pairs["clean"], pairs["masked"], pairs["identities"])
    weight, bias = fit_ridge(pairs["masked"], pairs["clean"], alpha)
    provenance = {"alpha": alpha, "alpha_selection": trials, **pairs_provenance(pairs)}
    routed = with_masked_route(package, weight, bias, args.out, args.name, provenance)
    for trial in trials:
        print(f"alpha {trial['alpha']}: identity-disjoint clean-vs-masked TPR@FMR1e-3 {trial['tpr_um']:.4f}")
    print(f"wrote {routed.onnx_path} ({routed.fingerprint[:12]}): alpha {alpha}, {provenance['pairs']} pairs")


def route_metric_command(args) -> None:
    from edge_mfr.models.package import load_package
    from edge_mfr.models.route_metric import fit_mask_whitening, select_strength, with_masked_metric

    package = load_package(args.model)
    if args.drop:
        plain = with_masked_metric(package, None, args.out, args.name, {})
        print(f"wrote {plain.onnx_path} ({plain.fingerprint[:12]}) without a masked-route metric")
        return
    pairs = route_pairs_for(args, package)
    strength, trials = select_strength(pairs["clean"], pairs["masked"], pairs["identities"])
    weight = fit_mask_whitening(pairs["clean"], pairs["masked"], strength)
    provenance = {"strength": strength, "strength_selection": trials, **pairs_provenance(pairs)}
    scored = with_masked_metric(package, weight, args.out, args.name, provenance)
    for trial in trials:
        print(f"strength {trial['strength']}: identity-disjoint clean-vs-masked TPR@FMR1e-3 {trial['tpr_um']:.4f}")
    print(f"wrote {scored.onnx_path} ({scored.fingerprint[:12]}): strength {strength}, {provenance['pairs']} pairs; "
          f"recalibrate its thresholds with `edge-mfr calibrate`")


def score_cohort_command(args) -> None:
    from edge_mfr.models.package import load_package
    from edge_mfr.models.route_metric import with_score_cohort

    package = load_package(args.model)
    if args.drop:
        plain = with_score_cohort(package, None, None, args.top_k, args.out, args.name, {})
        print(f"wrote {plain.onnx_path} ({plain.fingerprint[:12]}) without a score-normalisation cohort")
        return
    pairs = route_pairs_for(args, package)
    scored = with_score_cohort(package, pairs["clean"], pairs["masked"], args.top_k, args.out, args.name,
                               pairs_provenance(pairs))
    print(f"wrote {scored.onnx_path} ({scored.fingerprint[:12]}): a cohort of {len(pairs['clean'])} clean and "
          f"{len(pairs['masked'])} masked faces, top {args.top_k}; recalibrate its thresholds with `edge-mfr calibrate`")


if __name__ == "__main__":
    sys.exit(main())
