"""Detection rate (share of images with at least one face) and per-image latency of a detector (--detector NAME,
any of edge_mfr.detect.available_detectors(); default mtcnn).

Runs on the real masked photos of rmfd_sample (246) and on celeba299 (6,300 unmasked in-the-wild images,
or a fixed-seed subset with --celeba-limit). Every image of both sets shows at least one face, so the
rate is a recall proxy at image level. Latency is the wall time of detect() on a decoded image (decoding
excluded), single process, after one warm-up call; the process CPU time per call is printed too, as it
is far less disturbed by other jobs on a shared machine.

    nice python benchmarks/detect_rate.py                       # defaults, full celeba299
    nice python benchmarks/detect_rate.py --detector yunet --celeba-limit 1000
    nice python benchmarks/detect_rate.py --celeba-limit 1000 --min-face-fraction 0 --thresholds 0.6 0.7 0.8
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.detect import available_detectors, get_detector  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def measure(detector, paths: list[Path]) -> dict:
    """Detect on every image; returns rate, face counts, latencies (ms) and the paths with no face."""
    latencies, cpu_times, counts, misses, relative_sizes = [], [], [], [], []
    detector.detect(cv2.imread(str(paths[0])))  # warm-up: first ORT runs allocate
    for path in paths:
        image = cv2.imread(str(path))
        start, cpu_start = time.perf_counter(), time.process_time()
        faces = detector.detect(image)
        latencies.append((time.perf_counter() - start) * 1000)
        cpu_times.append((time.process_time() - cpu_start) * 1000)
        counts.append(len(faces))
        if faces:
            largest = max(faces, key=lambda face: face.area)
            relative_sizes.append(largest.width / min(image.shape[:2]))
        else:
            misses.append(path)
    latencies = np.asarray(latencies)
    return {
        "images": len(paths),
        "with_face": int(np.count_nonzero(counts)),
        "rate": float(np.mean(np.asarray(counts) > 0)),
        "faces": int(np.sum(counts)),
        "ms_median": float(np.median(latencies)),
        "ms_p90": float(np.percentile(latencies, 90)),
        "ms_mean": float(latencies.mean()),
        "cpu_ms_median": float(np.median(cpu_times)),
        "cpu_ms_mean": float(np.mean(cpu_times)),
        "largest_face_rel_p10": float(np.percentile(relative_sizes, 10)) if relative_sizes else float("nan"),
        "misses": misses,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--detector", default="mtcnn", choices=available_detectors())
    parser.add_argument("--celeba-limit", type=int, default=0, help="random subset size (0 = all 6,300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-face-size", type=float, default=None)
    parser.add_argument("--min-face-fraction", type=float, default=None)
    parser.add_argument("--thresholds", type=float, nargs=3, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--list-misses", action="store_true")
    args = parser.parse_args()

    options = {"threads": args.threads}
    if args.min_face_size is not None:
        options["min_face_size"] = args.min_face_size
    if args.min_face_fraction is not None:
        options["min_face_fraction"] = args.min_face_fraction
    if args.thresholds is not None:
        options["thresholds"] = tuple(args.thresholds)
    detector = get_detector(args.detector, **options)
    settings = detector.config() if hasattr(detector, "config") else {
        k: getattr(detector, k) for k in ("min_face_size", "min_face_fraction", "thresholds", "scale_factor", "max_side")}
    print(f"{args.detector}: {settings}, threads={detector.threads}")

    rmfd = sorted((args.data / "rmfd_sample").glob("*/*.jpg"))
    celeba = sorted((args.data / "celeba299" / "images").glob("*.jpg"))
    if not rmfd or not celeba:
        print(f"data not found under {args.data}", file=sys.stderr)
        return 2
    if args.celeba_limit and args.celeba_limit < len(celeba):
        picked = np.random.default_rng(args.seed).choice(len(celeba), args.celeba_limit, replace=False)
        celeba = [celeba[i] for i in sorted(picked)]

    for name, paths in (("rmfd_sample (masked)", rmfd), (f"celeba299 ({len(celeba)} images)", celeba)):
        result = measure(detector, paths)
        print(
            f"{name}: detection rate {result['rate']:.4f} ({result['with_face']}/{result['images']}), "
            f"{result['faces']} faces; latency ms median {result['ms_median']:.1f} p90 {result['ms_p90']:.1f} "
            f"mean {result['ms_mean']:.1f}; CPU ms median {result['cpu_ms_median']:.1f} "
            f"mean {result['cpu_ms_mean']:.1f}; "
            f"largest face / short side p10 {result['largest_face_rel_p10']:.2f}"
        )
        if args.list_misses:
            for path in result["misses"]:
                print(f"  no face: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
