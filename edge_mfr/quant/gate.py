"""The accuracy gate of `edge-mfr quantize`: how far an INT8 package moves from its FP32 source.

Two measurements, both on data the calibration never saw:

- **held-out agreement**: cosine between FP32 and INT8 embeddings of the same aligned face, on
  celeba_test `calib` photos (identities disjoint from every training and calibration face; half of
  them with a seeded synthetic mask), detected with the SDK's MTCNN and aligned with the package's own
  template. Mean and minimum.
- **LFW U-M**: accuracy and EER of both models on LFW pairs whose probe is masked, scored by the eval
  runner (`edge_mfr.eval.runner.evaluate_pairs`, its default deployed-path protocol), and the change
  INT8 - FP32. U-U is measured alongside (the references are embedded anyway). `lfw_pairs` takes a
  balanced subset for speed; the number of pairs used is recorded with the result.

`check_bounds` compares the measurements with the caller's bounds and raises `QuantizationGateError`
(an EdgeMfrError: exit code 2 on the CLI) naming every bound that is exceeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelPackageError
from .manifest import CELEBA_TEST_HELD_OUT_SPLIT, CalibrationManifest

HELD_OUT_SOURCE = "celeba_test"
DEFAULT_HELD_OUT_FACES = 200
LFW_SCENARIOS = ("uu", "um")


class QuantizationGateError(ModelPackageError):
    """The INT8 model moved further from FP32 than a bound allows; `measured` holds the numbers."""

    def __init__(self, message: str, measured: dict):
        super().__init__(message)
        self.measured = measured


@dataclass(frozen=True)
class GateBounds:
    min_mean_cosine: float | None = None  # held-out faces, FP32 vs INT8 embedding of the same face
    min_cosine: float | None = None
    max_eer_increase_points: float | None = None  # LFW U-M EER(INT8) - EER(FP32), percentage points
    max_accuracy_drop_points: float | None = None  # LFW U-M accuracy(FP32) - accuracy(INT8), percentage points

    def as_dict(self) -> dict:
        return {"min_mean_cosine": self.min_mean_cosine, "min_cosine": self.min_cosine,
                "max_eer_increase_points": self.max_eer_increase_points,
                "max_accuracy_drop_points": self.max_accuracy_drop_points}


@dataclass(frozen=True)
class HeldOutFaces:
    """Held-out photos with their landmarks; `masked[i]` says whether image i carries a synthetic mask."""

    paths: tuple[str, ...]  # relative to the data root
    images: tuple[np.ndarray, ...]  # BGR uint8, masked where masked[i]
    landmarks: tuple[np.ndarray, ...]
    masked: tuple[bool, ...]

    def aligned_for(self, package) -> np.ndarray:
        from ..align import align_faces

        return np.stack([align_faces(image, landmarks, template=package.template, size=package.input_size,
                                     channel_order=package.channel_order, mean=package.mean, std=package.std)[0]
                         for image, landmarks in zip(self.images, self.landmarks)])


def held_out_faces(data_root: str | Path, manifest: CalibrationManifest, count: int = DEFAULT_HELD_OUT_FACES,
                   seed: int = 0) -> HeldOutFaces:
    """`count` celeba_test `calib` photos (seeded draw, at most one per identity while identities last), every
    other one masked with a seeded synthetic mask. None of them may be in the calibration manifest."""
    import cv2

    from ..detect import MTCNNDetector
    from ..masks import MASK_TYPES, apply_mask

    if count < 2:
        raise InputError(f"the gate needs at least 2 held-out faces, got {count}")
    root = Path(data_root)
    listing = root / HELD_OUT_SOURCE / "identities.txt"
    identity_of = {}
    for line in listing.read_text(encoding="utf-8").splitlines() if listing.is_file() else []:
        parts = line.split()
        if len(parts) == 3 and parts[2] == CELEBA_TEST_HELD_OUT_SPLIT:
            identity_of[parts[0]] = parts[1]
    if not identity_of:
        raise InputError(f"held-out faces for the accuracy gate not found: {listing} lists no "
                         f"'{CELEBA_TEST_HELD_OUT_SPLIT}' images")
    calibration_paths = {entry.path for entry in manifest.entries}
    rng = np.random.default_rng(seed)
    files = sorted(identity_of)
    order = [files[i] for i in rng.permutation(len(files))]
    # First pass takes one image per identity, later passes the rest, so faces spread over identities.
    seen, first, rest = set(), [], []
    for name in order:
        (rest if identity_of[name] in seen else first).append(name)
        seen.add(identity_of[name])
    detector = MTCNNDetector()
    paths, images, landmarks, masked = [], [], [], []
    for name in first + rest:
        if len(paths) == count:
            break
        rel = f"{HELD_OUT_SOURCE}/images/{name}"
        if rel in calibration_paths:  # cannot happen for a checked manifest; held out means held out
            raise InputError(f"{rel} is in the calibration manifest and cannot be a held-out face")
        image = cv2.imread(str(root / rel), cv2.IMREAD_COLOR)
        face = detector.detect_largest(image) if image is not None else None
        if face is None:
            continue
        is_masked = len(paths) % 2 == 1
        if is_masked:
            mask_type = MASK_TYPES[(len(paths) // 2) % len(MASK_TYPES)]
            image = apply_mask(image, face.landmarks, mask_type, int(rng.integers(2**31 - 1)))
        paths.append(rel)
        images.append(image)
        landmarks.append(np.asarray(face.landmarks, np.float64))
        masked.append(is_masked)
    if len(paths) < count:
        raise InputError(f"only {len(paths)} of the requested {count} held-out faces were detected")
    return HeldOutFaces(tuple(paths), tuple(images), tuple(landmarks), tuple(masked))


def _embed(package, faces: np.ndarray, threads: int | None) -> np.ndarray:
    from ..runtime.ort import OrtEmbedder

    return OrtEmbedder(package, threads=threads).embed(faces)


def held_out_agreement(fp32, int8, faces: HeldOutFaces, threads: int | None = None) -> dict:
    """Cosine between FP32 and INT8 embeddings of each held-out face: mean and min, overall and per variant.
    Masked faces go through a two-network package's masked-route graph, as an unlock sends them."""
    aligned = faces.aligned_for(fp32)
    masked = np.asarray(faces.masked)
    cosine = np.empty(len(aligned))
    for route_masked in (False, True):
        rows = masked == route_masked
        if rows.any():
            models = [(p.masked_network() or p) if route_masked else p for p in (fp32, int8)]
            cosine[rows] = np.sum(_embed(models[0], aligned[rows], threads) * _embed(models[1], aligned[rows], threads),
                                  axis=1)
    return {"source": f"{HELD_OUT_SOURCE} {CELEBA_TEST_HELD_OUT_SPLIT} split (identities disjoint from training "
                      "and calibration), MTCNN landmarks",
            "faces": int(cosine.size), "masked_faces": int(masked.sum()),
            "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
            "mean_cosine_unmasked": float(cosine[~masked].mean()), "mean_cosine_masked": float(cosine[masked].mean())}


def lfw_change(fp32, int8, lfw_dir: str | Path, pairs: int | None = None, seed: int = 0,
               threads: int | None = None, cache_dir: str | Path | None = None) -> dict:
    """LFW U-U and U-M accuracy and EER of both packages (eval runner, default protocol) and INT8 - FP32."""
    from ..eval.pairs import read_pairs
    from ..eval.runner import evaluate_pairs

    lfw_dir = Path(lfw_dir)
    pair_set = read_pairs(lfw_dir / "pairs.txt", lfw_dir / "images", limit=pairs)
    report = evaluate_pairs(pair_set, [fp32, int8], scenarios=LFW_SCENARIOS, seed=seed, threads=threads,
                            cache_dir=cache_dir, n_resamples=0, progress=False)
    by_model: dict[str, dict] = {"fp32": {}, "int8": {}}
    role = {fp32.fingerprint: "fp32", int8.fingerprint: "int8"}
    for result in report["results"]:
        if result["metrics"] is None:
            raise ModelPackageError(f"LFW {result['scenario']} could not be scored for {result['model']} "
                                    f"({result['fte_pairs']} of {result['n_pairs']} pairs failed to enrol)")
        by_model[role[result["fingerprint"]]][result["scenario"]] = {
            "accuracy": result["metrics"]["accuracy"]["mean"], "eer": result["metrics"]["eer"],
            "n_scored": result["n_scored"], "fte_pairs": result["fte_pairs"],
            # pairs where the detector missed a face: excluded from `metrics` by the runner, alike for both models
            "detector_miss_pairs": (result.get("detector_misses") or {}).get("pairs")}
    change = {scenario: {"accuracy_points": 100 * (by_model["int8"][scenario]["accuracy"]
                                                   - by_model["fp32"][scenario]["accuracy"]),
                         "eer_points": 100 * (by_model["int8"][scenario]["eer"] - by_model["fp32"][scenario]["eer"])}
              for scenario in LFW_SCENARIOS}
    protocol = {key: value for key, value in report.items()
                if isinstance(value, (str, int, float, bool)) or value is None}
    return {"pairs_file": str(lfw_dir / "pairs.txt"), "n_pairs": report["n_pairs"],
            "subset": pairs is not None, "protocol": protocol, **by_model, "change": change}


def check_bounds(measured: dict, bounds: GateBounds) -> list[str]:
    """Every bound the measurements exceed, as sentences (empty: the gate passes)."""
    failures = []
    held_out = measured.get("held_out")
    if held_out is not None:
        if bounds.min_mean_cosine is not None and not held_out["mean_cosine"] >= bounds.min_mean_cosine:
            failures.append(f"mean cosine to FP32 on {held_out['faces']} held-out faces is "
                            f"{held_out['mean_cosine']:.5f} < --min-mean-cosine {bounds.min_mean_cosine}")
        if bounds.min_cosine is not None and not held_out["min_cosine"] >= bounds.min_cosine:
            failures.append(f"minimum cosine to FP32 on {held_out['faces']} held-out faces is "
                            f"{held_out['min_cosine']:.5f} < --min-cosine {bounds.min_cosine}")
    lfw = measured.get("lfw")
    if lfw is not None and bounds.max_accuracy_drop_points is not None:
        drop = -lfw["change"]["um"]["accuracy_points"]
        if not drop <= bounds.max_accuracy_drop_points:
            failures.append(f"LFW U-M accuracy drops by {drop:.3f} points ({100 * lfw['fp32']['um']['accuracy']:.2f}% "
                            f"-> {100 * lfw['int8']['um']['accuracy']:.2f}% over {lfw['n_pairs']} pairs) > "
                            f"--max-accuracy-drop {bounds.max_accuracy_drop_points}")
    if lfw is not None and bounds.max_eer_increase_points is not None:
        increase = lfw["change"]["um"]["eer_points"]
        if not increase <= bounds.max_eer_increase_points:
            failures.append(f"LFW U-M EER rises by {increase:.3f} points ({100 * lfw['fp32']['um']['eer']:.3f}% -> "
                            f"{100 * lfw['int8']['um']['eer']:.3f}% over {lfw['n_pairs']} pairs) > "
                            f"--max-eer-increase {bounds.max_eer_increase_points}")
    return failures


@dataclass(frozen=True)
class GateConfig:
    """What the gate measures and the bounds it enforces.

    held_out_faces: how many celeba_test calib faces (0 skips the agreement measurement).
    lfw_dir: LFW folder with pairs.txt and images/ (None: DATA_ROOT/lfw). lfw_pairs: a balanced subset of
    that many pairs, None for all of them, 0 to skip LFW. cache_dir: the eval runner's embedding cache
    (keyed by model fingerprint, so the FP32 embeddings are reused when several INT8 variants are gated).
    """

    bounds: GateBounds = GateBounds()
    held_out_faces: int = DEFAULT_HELD_OUT_FACES
    lfw_dir: Path | None = None
    lfw_pairs: int | None = None
    seed: int = 0
    threads: int | None = None
    cache_dir: Path | None = None


def run_gate(fp32, int8, manifest: CalibrationManifest, data_root: str | Path, config: GateConfig) -> dict:
    """Measure the INT8 package against its FP32 source; returns the numbers, bounds and the verdict."""
    if (config.held_out_faces == 0 and (config.bounds.min_mean_cosine is not None
                                        or config.bounds.min_cosine is not None)):
        raise InputError("cosine bounds need held-out faces (--gate-faces > 0)")
    if config.lfw_pairs == 0 and (config.bounds.max_eer_increase_points is not None
                                  or config.bounds.max_accuracy_drop_points is not None):
        raise InputError("--max-eer-increase and --max-accuracy-drop need LFW pairs (--lfw-pairs > 0 or all)")
    measured: dict = {"bounds": config.bounds.as_dict(), "seed": config.seed}
    if config.held_out_faces:
        faces = held_out_faces(data_root, manifest, config.held_out_faces, config.seed)
        measured["held_out"] = held_out_agreement(fp32, int8, faces, config.threads)
    if config.lfw_pairs != 0:
        lfw_dir = Path(config.lfw_dir) if config.lfw_dir is not None else Path(data_root) / "lfw"
        if not (lfw_dir / "pairs.txt").is_file():
            raise InputError(f"LFW for the accuracy gate not found at {lfw_dir} (pass --lfw DIR, or --lfw-pairs 0 "
                             "to skip the LFW measurement)")
        measured["lfw"] = lfw_change(fp32, int8, lfw_dir, config.lfw_pairs, config.seed, config.threads,
                                    config.cache_dir)
    measured["failures"] = check_bounds(measured, config.bounds)
    measured["passed"] = not measured["failures"]
    return measured
