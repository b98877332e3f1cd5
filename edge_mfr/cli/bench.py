"""`edge-mfr bench`: unlock latency per stage and end to end on this device, for one or more pipelines
(model x backend x detector x threads), optionally against the face_recognition package, with the
environment, peak memory, a table, JSON and a plot. See edge_mfr/bench.py for what is measured."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError


def run(args) -> int:
    from .. import bench

    if args.image and (args.images or args.video):
        raise InputError("give --image, --images or --video, not several")
    if args.image:  # one photo: kept from the first version of this command
        image = Path(args.image)
        if not image.is_file():
            raise InputError(f"{image}: benchmark image not found")
        frames = bench.load_frames(images=image.parent, size=(args.width, args.height), max_frames=None)
        keep = [i for i, label in enumerate(frames.labels) if label == image.name]
        frames = bench.Frames(str(image), [frames.labels[i] for i in keep], [frames.encoded[i] for i in keep],
                              frames.size)
        if not frames.encoded:
            raise InputError(f"{image}: could not be decoded as an image")
    else:
        frames = bench.load_frames(args.images, args.video, (args.width, args.height), args.max_frames)
    if args.masks:
        frames = bench.mask_frames(frames, args.masks, args.seed)
    config = bench.BenchConfig(
        models=args.model or [None], backends=args.backend or ["ort"], detectors=args.detector or [],
        threads=args.threads or [1], iterations=args.iterations, duration_s=args.duration, warmup=args.warmup,
        batch_sizes=tuple(args.batch_sizes), gallery_users=args.gallery_users, compare=args.compare or [],
        seed=args.seed)
    log = (lambda message: print(message, file=sys.stderr))

    def checkpoint(partial):
        if args.json and args.json != "-":
            bench.write_json(partial, Path(args.json))

    result = bench.run_bench(frames, config, log=log, on_progress=checkpoint)
    if config.compare and args.accuracy_pairs and not result["interrupted"]:
        lfw = Path(args.lfw)
        if (lfw / "pairs.txt").is_file():
            try:
                result["accuracy"] = bench.compare_accuracy(
                    lfw / "pairs.txt", lfw / "images", args.accuracy_pairs, (args.detector or [None])[0]
                    or __import__("edge_mfr.detect", fromlist=["DEFAULT_DETECTOR"]).DEFAULT_DETECTOR,
                    model=(args.model or [None])[0], seed=args.seed, log=log)
            except KeyboardInterrupt:
                result["interrupted"] = True
                log("interrupted during the accuracy measurement: writing the speed results")
        else:
            result["accuracy"] = None
            log(f"accuracy not measured: LFW pairs not found at {lfw / 'pairs.txt'} (--lfw DIR)")
    if args.json == "-":
        print(bench.json.dumps({k: v for k, v in result.items()}, indent=2, default=str))
    else:
        print(bench.format_table(result))
        if args.json:
            bench.write_json(result, Path(args.json))
            print(f"\nJSON: {args.json}")
    if args.plot:
        bench.plot(result, Path(args.plot))
        print(f"plot: {args.plot}", file=sys.stderr if args.json == "-" else sys.stdout)
    if result["interrupted"]:
        log("interrupted: the results above are partial" + (f" (written to {args.json})" if args.json else ""))
        return 2
    return 0


def register(subparsers) -> None:
    from ..detect import available_detectors

    parser = subparsers.add_parser(
        "bench", help="unlock latency per stage and end to end on this device (several pipelines, interleaved)",
        description="Runs the unlock pipeline (decode, detect, quality, align, embed, match) on real frames and "
                    "reports p50/p90/p99/max/mean and throughput per stage and end to end, per pipeline, with "
                    "the environment and peak memory. Several --model/--backend/--detector/--threads values "
                    "are measured in one run, interleaved frame by frame.")
    source = parser.add_argument_group("frames (default: the bundled demo photos)")
    source.add_argument("--images", help="folder of photos (searched recursively)")
    source.add_argument("--video", help="video file; up to --max-frames frames are read")
    source.add_argument("--image", help="a single photo")
    source.add_argument("--max-frames", type=int, default=200)
    source.add_argument("--masks", metavar="FAMILY|TYPE", default=None,
                        help="draw a synthetic mask (a family: template, nist; or one mask type) on each frame's "
                             "face, so that attempts take the masked route and its alignment refiner is timed")
    source.add_argument("--width", type=int, default=640)
    source.add_argument("--height", type=int, default=480)
    what = parser.add_argument_group("pipelines (each option may be repeated: every combination is measured)")
    what.add_argument("--model", action="append", help="model package path or bundled name; default: best bundled")
    what.add_argument("--backend", action="append", help="ort | ort-int8 | tensorrt (default ort)")
    what.add_argument("--detector", action="append",
                      help=f"one of {', '.join(available_detectors())} (default: the SDK's default detector)")
    what.add_argument("--threads", type=int, action="append", help="inference threads (default 1)")
    what.add_argument("--compare", action="append", choices=("face_recognition",),
                      help="also run this peer on the same frames, interleaved, and measure its accuracy")
    how = parser.add_argument_group("measurement")
    how.add_argument("--iterations", "--repeats", type=int, default=200,
                     help="passes over the frames, one frame each (default 200)")
    how.add_argument("--duration", type=float, default=None, help="time budget in seconds instead of --iterations")
    how.add_argument("--warmup", type=int, default=10, help="unmeasured attempts per pipeline first (default 10)")
    how.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8, 32],
                     help="embedder batch sizes to measure (default 1 8 32; none to skip)")
    how.add_argument("--gallery-users", type=int, default=10, help="gallery size for the match stage, in users")
    how.add_argument("--accuracy-pairs", type=int, default=300,
                     help="LFW pairs for the accuracy next to --compare (balanced subset; 0 skips)")
    how.add_argument("--lfw", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "lfw"),
                     help="LFW folder holding pairs.txt and images/")
    how.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--json", nargs="?", const="-", default=None,
                     help="write all results to this file (kept up to date while running); alone: JSON to stdout")
    out.add_argument("--plot", help="PNG of the latency distributions")
    parser.set_defaults(func=run)
