"""Masked-route maps: a linear map, fitted in closed form, from a network's embedding of a masked face to its
embedding of the same face unmasked, applied to masked probes only (the quality gate routes them).

Pairs are made on the deployed path: a training-pool photo, a synthetic mask drawn on it (both families), the
face detected afresh on the masked photo with the deployed detector, then aligned and embedded as an unlock
would; the clean side is the same photo unmasked. Ridge regression with a bias on L2-normalised embeddings;
the result is L2-normalised again at run time. The unmasked route is never changed, so clean-to-clean
behaviour stays exactly the network's.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from edge_mfr.errors import InputError
from edge_mfr.models.package import ModelPackage, masked_network_path, save_package
from edge_mfr.runtime.base import l2_normalise

DEFAULT_ALPHA = 0.1


def route_pairs(packages: list[ModelPackage], data_dir, faces: int = 4000, seed: int = 0, detector: str | None = None,
                threads: int = 1, progress: bool = True) -> dict:
    """Clean and masked L2-normalised embeddings of the same training faces, for each package, each side as an
    unlock embeds it (the masked face on the masked route: a two-network package's second network).

    Returns {"clean": [(n, D) per package], "masked": [...], "files", "identities", "mask_types", "misses", ...}.
    Faces whose masked photo has no detected face are dropped (and counted): the map cannot help a miss.
    """
    from tqdm import tqdm

    from edge_mfr.detect import DEFAULT_DETECTOR, get_detector
    from edge_mfr.embed import FaceEmbedder
    from edge_mfr.masks import apply_mask, random_mask_type
    from edge_mfr.train.data import source_items

    detector_name = detector or DEFAULT_DETECTOR
    find = get_detector(detector_name, threads=threads)
    embedders = [FaceEmbedder(p, threads=threads) for p in packages]
    items = source_items(Path(data_dir), "celeba_test")  # its train split: pool identities, never calib or LFW
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(items), min(faces, len(items)), replace=False))
    clean = [[] for _ in packages]
    masked = [[] for _ in packages]
    files, identities, types, misses = [], [], [], 0
    for index in tqdm(chosen, desc="route pairs", disable=not progress, mininterval=5):
        identity, file = items[index]
        image = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if image is None:
            continue
        face = find.detect_largest(image)
        if face is None:
            continue
        mask_type = random_mask_type(rng)
        covered = apply_mask(image, face.landmarks, mask_type, rng)
        again = find.detect_largest(covered)
        if again is None:
            misses += 1
            continue
        for k, embedder in enumerate(embedders):
            clean[k].append(embedder.embed_faces(image, face.landmarks[None])[0])
            masked[k].append(embedder.embed_faces(covered, again.landmarks[None], route="masked")[0])
        files.append(str(file))
        identities.append(identity)
        types.append(mask_type)
    if not files:
        raise InputError("no usable training faces for the route map")
    return {"clean": [np.stack(c) for c in clean], "masked": [np.stack(m) for m in masked], "files": files,
            "identities": identities, "mask_types": types, "misses": misses, "detector": detector_name, "seed": seed}


def fit_ridge(masked: np.ndarray, clean: np.ndarray, alpha: float = DEFAULT_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """W, b minimising |masked @ W.T + b - clean|^2 + alpha n |W - I|^2: shrunk towards leaving embeddings as they
    are, not towards zero."""
    x = np.asarray(masked, np.float64)
    y = np.asarray(clean, np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    d = x.shape[1]
    gram = xc.T @ xc + alpha * len(x) * np.eye(d)
    weight_t = np.linalg.solve(gram, xc.T @ yc + alpha * len(x) * np.eye(d))
    weight = weight_t.T
    bias = y_mean - x_mean @ weight_t
    return weight.astype(np.float32), bias.astype(np.float32)


def tpr_at_fmr(genuine: np.ndarray, impostor: np.ndarray, fmr: float) -> float:
    threshold = np.sort(impostor)[::-1][max(0, int(np.floor(fmr * len(impostor))) - 1)]
    return float(np.mean(genuine > threshold))


def identity_folds(identities, seed: int = 0, count: int = 5) -> list[np.ndarray]:
    """Boolean test masks of `count` identity-disjoint folds over the pairs' identities."""
    identities = np.asarray(identities)
    unique = np.random.default_rng(seed).permutation(np.unique(identities))
    return [np.isin(identities, fold) for fold in np.array_split(unique, count)]


def clean_vs_masked_tpr(clean: np.ndarray, masked: np.ndarray, identities: np.ndarray, fmr: float) -> float:
    """TPR at `fmr` of every clean embedding against every masked one (different faces of one identity are
    genuine, of different identities impostors)."""
    similarity = clean @ masked.T
    same = identities[:, None] == identities[None, :]
    return tpr_at_fmr(similarity[same], similarity[~same], fmr)


def select_alpha(clean: np.ndarray, masked: np.ndarray, identities, alphas=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
                 fmr: float = 1e-3, seed: int = 0) -> tuple[float, list[dict]]:
    """Ridge strength chosen on identity-disjoint folds of the pairs: clean-vs-masked TPR at `fmr` (masked side
    mapped) across different faces, averaged over 5 folds. alpha -> infinity is the unmapped network."""
    identities = np.asarray(identities)
    results = []
    for alpha in (None, *alphas):
        scores = []
        for test in identity_folds(identities, seed):
            if alpha is None:
                mapped = masked[test]
            else:
                mapped = apply_map(masked[test], *fit_ridge(masked[~test], clean[~test], alpha))
            scores.append(clean_vs_masked_tpr(clean[test], mapped, identities[test], fmr))
        results.append({"alpha": alpha, "tpr_um": float(np.mean(scores))})
    best = max((r for r in results if r["alpha"] is not None), key=lambda r: r["tpr_um"])
    return best["alpha"], results


def apply_map(embeddings: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return l2_normalise(embeddings @ weight.T + bias)


def with_masked_route(package: ModelPackage, weight: np.ndarray, bias: np.ndarray, out_onnx: str | Path, name: str,
                      provenance: dict) -> ModelPackage:
    """A copy of `package` (same graph) whose masked probes go through the map; thresholds must be recalibrated."""
    routes = {"masked": {"weight": np.round(weight, 7).tolist(), "bias": np.round(bias, 7).tolist(),
                         "method": "ridge regression, masked -> clean embedding of the same face",
                         "base_fingerprint": package.fingerprint, **provenance}}
    return derived_package(package, out_onnx, name, {"masked_route_map": "fitted by edge_mfr.models.route_map"},
                           provenance, routes=routes)


def derived_package(package: ModelPackage, out_onnx: str | Path, name: str, recipe: dict, provenance: dict,
                    **changes) -> ModelPackage:
    """A copy of `package` (same graph) under `name`, its recipe extended by `recipe` and the training data of
    `provenance`, sidecar keys replaced by `changes`; thresholds and the accuracy record dropped (they must be
    recalibrated and measured again)."""
    out_onnx = Path(out_onnx)
    if out_onnx.resolve() == package.onnx_path.resolve():
        raise InputError("write the derived package next to, not over, its source")
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(package.onnx_path, out_onnx)
    if package.has_masked_network:
        shutil.copyfile(masked_network_path(package.onnx_path), masked_network_path(out_onnx))
    # Thresholds and measured accuracy belong to the source: the copy must be calibrated and measured itself.
    meta = {k: v for k, v in package.meta.items() if k not in ("fingerprint", "thresholds", "thresholds_by_aggregation",
                                                                 "calibration", "format", "accuracy")}
    meta["name"] = name
    # What a route map or metric was fitted on counts as training data: `edge-mfr calibrate` refuses it.
    train_data = list(package.meta.get("recipe", {}).get("train_data", []))
    train_data += [d for d in provenance.get("train_data", []) if d not in train_data]
    meta["recipe"] = {**package.meta.get("recipe", {}), **recipe, "train_data": train_data}
    meta["recipe"] = {k: v for k, v in meta["recipe"].items() if v is not None}  # None: an entry removed
    meta.update(changes)
    return save_package(out_onnx, meta)
