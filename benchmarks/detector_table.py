"""The detector table: detection rate on real and synthetic masks, LFW accuracy with each detector's
landmarks, and latency, for every registered detector (docs/detectors.md is written from its output).

1. rmfd_sample: share of the 246 real masked photos in which the detector finds at least one face.
2. Masked LFW: a fixed-seed subset of LFW images (--lfw-images, 0 = all 7,701). Each image gets a mask of
   each family drawn on the full image by `edge_mfr.masks` at reference landmarks (MTCNN's on the unmasked
   image, else YuNet's; images where neither finds a face are left out and counted), with the mask type and
   draw of the evaluation suite's per-image seed (`edge_mfr.eval.runner.MaskPolicy`), so every detector
   sees the same masked pictures. The masked image is then detected afresh; it counts as found when a
   detection overlaps the reference box (IoU >= 0.3); how often the largest detection is that face is
   recorded too (LFW photos often show other people). The unmasked rate on the same images is shown too.
3. Verification on LFW view 2 with each detector's landmarks (`edge_mfr.eval.runner.evaluate_pairs`, the
   eval suite's runner): 10-fold accuracy for U-U and for U-M with each mask family (--pairs limits the
   pairs to a balanced subset; 0 = all 6,000). Pairs whose image the detector misses are failures to enrol
   (FTE), reported, not scored.
4. Latency: detect() on 640x480 frames holding one LFW face each (the bench's letterbox), one thread,
   after a warm-up: p50 / p90 over --latency-frames frames x 5 rounds.

    OMP_NUM_THREADS=1 nohup python benchmarks/detector_table.py --json /tmp/detectors.json > /tmp/det.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.bench import fit_frame  # noqa: E402
from edge_mfr.detect import MTCNNDetector, available_detectors, get_detector  # noqa: E402
from edge_mfr.eval.pairs import read_pairs  # noqa: E402
from edge_mfr.eval.runner import MaskPolicy, evaluate_pairs  # noqa: E402
from edge_mfr.models.package import default_model  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAMILIES = ("template", "nist")
FOUND_IOU = 0.3
# The unlock pipeline's configuration of each detector: search only for faces its quality gate accepts.
UNLOCK_MIN_FACE = 48


def iou(a, b) -> float:
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def build(spec: str):
    """'name' or 'name@unlock' (the FaceUnlock configuration: min_face_size=UNLOCK_MIN_FACE)."""
    name, _, variant = spec.partition("@")
    return get_detector(name, threads=1, **({"min_face_size": UNLOCK_MIN_FACE} if variant == "unlock" else {}))


def rmfd_rate(detector, paths) -> dict:
    """Photos with a face found, and with a face the unlock could use (side >= UNLOCK_MIN_FACE)."""
    found = usable = 0
    for path in paths:
        faces = detector.detect(cv2.imread(str(path)))
        found += bool(faces)
        usable += any(min(face.width, face.height) >= UNLOCK_MIN_FACE for face in faces)
    return {"images": len(paths), "found": found, "rate": found / len(paths),
            "found_usable": usable, "usable_rate": usable / len(paths)}


def masked_lfw(detectors: dict, lfw_images: Path, paths: list[Path], seed: int) -> dict:
    reference, fallback = MTCNNDetector(threads=1), get_detector("yunet", threads=1)
    policies = {family: MaskPolicy(family, seed) for family in FAMILIES}
    counts = {spec: {"unmasked": 0, **{family: 0 for family in FAMILIES}} for spec in detectors}
    largest_counts = {spec: dict(c) for spec, c in counts.items()}
    excluded = []
    used = 0
    for done, path in enumerate(paths):
        if done % 200 == 0:
            print(f"masked LFW: {done}/{len(paths)} images", flush=True)
        image = cv2.imread(str(path))
        face = reference.detect_largest(image) or fallback.detect_largest(image)
        if face is None:
            excluded.append(str(path.relative_to(lfw_images)))
            continue
        used += 1
        key = str(path.relative_to(lfw_images).with_suffix(""))
        variants = {"unmasked": image, **{f: p.apply(image, face.landmarks, key) for f, p in policies.items()}}
        for spec, detector in detectors.items():
            for variant, picture in variants.items():
                faces = detector.detect(picture)
                if any(iou(found.box, face.box) >= FOUND_IOU for found in faces):
                    counts[spec][variant] += 1
                largest = max(faces, key=lambda d: d.area) if faces else None
                if largest is not None and iou(largest.box, face.box) >= FOUND_IOU:
                    largest_counts[spec][variant] += 1
    return {"images": len(paths), "used": used, "excluded": excluded,
            "rates": {spec: {v: n / max(used, 1) for v, n in c.items()} for spec, c in counts.items()},
            "counts": counts, "largest_is_the_face": largest_counts}


def verification(detector, pairs_file: Path, images: Path, limit: int, seed: int, cache: Path,
                 landmarks: str = "masked", families=FAMILIES) -> dict:
    pair_set = read_pairs(pairs_file, images, limit=limit or None)
    package = default_model()
    out = {"pairs": len(pair_set.pairs), "model": package.name, "landmarks": landmarks}
    for family in families:
        report = evaluate_pairs(pair_set, [package], scenarios=("uu", "um"), mask_family=family, seed=seed,
                                detector=detector, cache_dir=cache, threads=1, n_resamples=200, progress=False,
                                landmarks=landmarks)
        for result in report["results"]:
            scenario = "uu" if result["scenario"] == "uu" else f"um_{family}"
            metrics = result["metrics"] or {}
            counted = result.get("metrics_misses_counted") or {}
            out[scenario] = {"accuracy": metrics.get("accuracy", {}).get("mean"), "eer": metrics.get("eer"),
                             "fte_pairs": result["fte_pairs"], "n_scored": result["n_scored"],
                             "accuracy_misses_counted": counted.get("accuracy", {}).get("mean"),
                             "eer_misses_counted": counted.get("eer")}
    return out


def latency(detector, frames: list[np.ndarray], rounds: int = 5) -> dict:
    detector.detect(frames[0])
    times, cpu = [], []
    for _ in range(rounds):
        for frame in frames:
            start, cpu_start = time.perf_counter(), time.process_time()
            detector.detect(frame)
            times.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - cpu_start) * 1e3)
    # CPU time is reported beside wall time: on a shared machine it is far less disturbed by other jobs.
    return {"p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90)),
            "mean_ms": float(np.mean(times)), "cpu_p50_ms": float(np.percentile(cpu, 50)),
            "cpu_p90_ms": float(np.percentile(cpu, 90)), "n": len(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--detectors", nargs="+",
                        default=[*available_detectors(), *(f"{n}@unlock" for n in available_detectors())])
    parser.add_argument("--lfw-images", type=int, default=2000, help="fixed-seed subset size, 0 = all")
    parser.add_argument("--pairs", type=int, default=0, help="balanced pair subset, 0 = all 6,000")
    parser.add_argument("--no-verification", action="store_true")
    parser.add_argument("--latency-only", action="store_true")
    parser.add_argument("--landmarks", choices=("masked", "unmasked"), default="masked",
                        help="verification: detect afresh on masked probes (deployed) or reuse the unmasked landmarks")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--verification-only", action="store_true",
                        help="skip latency and detection rates (to run verification in a separate process)")
    parser.add_argument("--verify-detectors", nargs="+", default=None,
                        help="detectors to run verification for (default: every one in --detectors)")
    parser.add_argument("--latency-frames", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/edge_mfr_detector_table_cache"))
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()

    lfw = args.data / "lfw"
    rmfd = sorted((args.data / "rmfd_sample").glob("*/*.jpg"))
    lfw_all = sorted((lfw / "images").glob("*/*.jpg"))
    if not rmfd or not lfw_all:
        print(f"data not found under {args.data}", file=sys.stderr)
        return 2
    subset = lfw_all
    if args.lfw_images and args.lfw_images < len(lfw_all):
        picked = np.random.default_rng(args.seed).choice(len(lfw_all), args.lfw_images, replace=False)
        subset = [lfw_all[i] for i in sorted(picked)]
    detectors = {spec: build(spec) for spec in args.detectors}
    frames = [fit_frame(cv2.imread(str(p))) for p in lfw_all[:: max(1, len(lfw_all) // args.latency_frames)]]
    frames = frames[: args.latency_frames]

    results = {"settings": vars(args) | {"data": str(args.data), "cache": str(args.cache),
                                        "json": str(args.json) if args.json else None},
               "detectors": {spec: getattr(d, "config", lambda d=d: {k: getattr(d, k) for k in (
                   "min_face_size", "min_face_fraction", "thresholds", "scale_factor", "max_side")})()
                   for spec, d in detectors.items()}}

    def save():
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))

    if args.latency_only:
        results["latency"] = {spec: latency(d, frames) for spec, d in detectors.items()}
        print("latency", json.dumps(results["latency"]), flush=True)
        save()
        return 0
    if not args.verification_only:
        results["latency"] = {spec: latency(d, frames) for spec, d in detectors.items()}
        print("latency", json.dumps(results["latency"]), flush=True)
        results["rmfd"] = {spec: rmfd_rate(d, rmfd) for spec, d in detectors.items()}
        print("rmfd", json.dumps(results["rmfd"]), flush=True)
        save()
        results["masked_lfw"] = masked_lfw(detectors, lfw / "images", subset, args.seed)
        print("masked_lfw", json.dumps({k: v for k, v in results["masked_lfw"].items() if k != "excluded"}),
              flush=True)
        save()
    if not args.no_verification:
        results["verification"] = {}
        for spec in args.verify_detectors or args.detectors:
            results["verification"][spec] = verification(detectors[spec] if spec in detectors else build(spec),
                                                         lfw / "pairs.txt", lfw / "images", args.pairs, args.seed,
                                                         args.cache, args.landmarks, args.families)
            print("verification", spec, json.dumps(results["verification"][spec]), flush=True)
            save()

    print("\n| detector | rmfd_sample | LFW unmasked | LFW template mask | LFW NIST mask | U-U acc | U-M template "
          "| U-M NIST | FTE pairs | detect p50 / p90 ms (640x480) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if args.verification_only:
        return 0
    for spec in detectors:
        rm, ml, lat = results["rmfd"][spec], results["masked_lfw"]["rates"][spec], results["latency"][spec]
        ver = results.get("verification", {}).get(spec, {})

        def acc(key):
            value = ver.get(key, {}).get("accuracy")
            return f"{value:.4f}" if value is not None else "-"

        fte = "/".join(str(ver[k]["fte_pairs"]) for k in ("uu", "um_template", "um_nist") if k in ver) or "-"
        print(f"| {spec} | {rm['rate']:.4f} ({rm['found']}/{rm['images']}) | {ml['unmasked']:.4f} | "
              f"{ml['template']:.4f} | {ml['nist']:.4f} | {acc('uu')} | {acc('um_template')} | {acc('um_nist')} | "
              f"{fte} | {lat['p50_ms']:.2f} / {lat['p90_ms']:.2f} (CPU {lat['cpu_p50_ms']:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
