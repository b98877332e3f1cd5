"""Training the masked-face alignment refiner (edge_mfr.masked_alignment): a small CNN that, shown a masked face aligned by the points a detector found on
the masked photo, predicts how that alignment differs from the one the clean photo's points give.

A mask moves the detector's points (median 5% of scale and 2 degrees; docs/detectors.md), and the clean templates a
masked probe meets were aligned with clean points. Aligning calib's masked probes with their clean photo's points
instead (an oracle) cuts the default's masked-route FNMR at FMR 1e-4 from 57.3% to 51.6% (docs/training.md,
"A masked-face alignment refiner"), so the alignment error is worth predicting.

Pairs are made on the deployed path from training-pool photos (celeba_test `train`, never `calib` or LFW): detect
on the photo, draw a random synthetic mask at those points, detect again on the masked photo; the input is the
masked photo aligned by its own points, the target the similarity from the clean chip to that masked chip (shift x,
shift y as fractions of the side, log-scale, angle in degrees).
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from edge_mfr.align import warp_crops
from edge_mfr.errors import InputError
from edge_mfr.masked_alignment import relative_similarity
from edge_mfr.train.data import chip_template, source_items

REFINER_SIZE = 64
TARGET_NAMES = ("shift_x", "shift_y", "log_scale", "angle_deg")


def refiner_pairs(data_dir: str | Path, masks_per_face: int = 2, seed: int = 0, shard: int = 0, shards: int = 1,
                  mask_jitter: float = 0.08, detector: str | None = None, progress: bool = True) -> dict:
    """Inputs (N, 64, 64, 3) uint8 BGR, targets (N, 4), identities (N,) of celeba_test `train` photos (every
    `shards`-th photo from `shard`).

    Each mask is drawn at the clean points moved by `mask_jitter` (`edge_mfr.masks.jittered_points`: shift and
    log-scale as that fraction of the eye distance and of the size, angle in radians): drawn exactly at the clean
    points, a synthetic mask's outline alone would tell where those points were, which a real mask, worn higher
    or lower, does not."""
    from tqdm import tqdm

    from edge_mfr.detect import DEFAULT_DETECTOR, get_detector
    from edge_mfr.masks import apply_mask, jittered_points, random_mask_type

    find = get_detector(detector or DEFAULT_DETECTOR, threads=1)
    items = source_items(Path(data_dir), "celeba_test")[shard::shards]
    small = chip_template(REFINER_SIZE)
    chips, targets, identities, misses = [], [], [], 0
    for k, (identity, file) in enumerate(tqdm(items, desc="refiner pairs", disable=not progress, mininterval=10)):
        image = cv2.imread(str(file), cv2.IMREAD_COLOR)
        face = None if image is None else find.detect_largest(image)
        if face is None:
            continue
        rng = np.random.default_rng([seed, shard, k])
        for _ in range(masks_per_face):
            worn_at = jittered_points(face.landmarks, mask_jitter, rng) if mask_jitter > 0 else face.landmarks
            covered = apply_mask(image, worn_at, random_mask_type(rng), rng)
            again = find.detect_largest(covered)
            if again is None:
                misses += 1
                continue
            chips.append(warp_crops(covered, again.landmarks[None], small, REFINER_SIZE)[0])
            targets.append(relative_similarity(face.landmarks, again.landmarks))
            identities.append(identity)
    if not chips:
        raise InputError("no usable training faces for the alignment refiner")
    return {"chips": np.stack(chips), "targets": np.asarray(targets, np.float32),
            "identities": np.asarray(identities), "misses": misses, "detector": find.registry_name}


class RefinerNet(nn.Module):
    """Four strided 3x3 convolutions and a linear head: 64 px BGR chip -> 4 standardized similarity parameters."""

    def __init__(self, width: int = 16):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width, 8 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True), nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * 16, 128), nn.ReLU(inplace=True),
                                  nn.Linear(128, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def refiner_input(chips: torch.Tensor) -> torch.Tensor:
    """uint8 BGR (b, 64, 64, 3) -> float (b, 3, 64, 64) in [-1, 1] (what the exported graph takes)."""
    return (chips.float().permute(0, 3, 1, 2) - 127.5) / 127.5


def fit_refiner(chips: np.ndarray, targets: np.ndarray, identities: np.ndarray, epochs: int = 20,
                batch_size: int = 128, lr: float = 2e-3, holdout_fraction: float = 0.1, seed: int = 0,
                log=print) -> dict:
    """Train on all but an identity-disjoint hold-out; returns the network, the target scale and the hold-out's
    error per parameter (std of the target as it is, and of target - prediction)."""
    if epochs < 1:
        raise InputError(f"the refiner needs at least one epoch, got {epochs}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    names = np.unique(identities)
    held = np.isin(identities, rng.permutation(names)[:max(1, int(round(len(names) * holdout_fraction)))])
    train_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)
    mean = targets[train_rows].mean(0)
    std = targets[train_rows].std(0) + 1e-6
    x_all = torch.from_numpy(chips)
    y_all = torch.from_numpy((targets - mean) / std)
    network = RefinerNet()
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, len(train_rows) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    started = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        network.train()
        order = rng.permutation(train_rows)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = torch.from_numpy(order[start:start + batch_size])
            x = refiner_input(x_all[rows])
            if rng.random() < 0.5:  # a mirrored face moves the other way in x and in angle
                x = x.flip(3)
                y = y_all[rows] * torch.tensor([-1.0, 1.0, 1.0, -1.0]) + torch.from_numpy(
                    (mean * np.array([-2.0, 0.0, 0.0, -2.0]) / std).astype(np.float32))
            else:
                y = y_all[rows]
            loss = nn.functional.smooth_l1_loss(network(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
        errors = holdout_errors(network, x_all[held_rows], targets[held_rows], mean, std)
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}; hold-out residual std "
            + ", ".join(f"{n} {e:.4f}" for n, e in zip(TARGET_NAMES, errors["residual_std"]))
            + f" ({time.perf_counter() - started:.0f} s)")
    return {"network": network, "mean": mean, "std": std, "train_faces": len(train_rows),
            "holdout_faces": len(held_rows), **errors}  # the last epoch's


def save_refiner_checkpoint(result: dict, path: str | Path, detector: str) -> None:
    """`fit_refiner`'s result as the checkpoint `export_refiner` reads, with the detector whose points it learned."""
    torch.save({"state": result["network"].state_dict(), "mean": result["mean"], "std": result["std"],
                "detector": detector,
                "holdout": {k: result[k] for k in ("target_std", "target_rms", "residual_std", "residual_rms")},
                "train_faces": result["train_faces"], "holdout_faces": result["holdout_faces"]}, path)


@torch.no_grad()
def predict(network: RefinerNet, chips: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    network.eval()
    out = torch.cat([network(refiner_input(chips[s:s + 512])) for s in range(0, len(chips), 512)])
    return out.numpy() * std + mean


def holdout_errors(network, chips: torch.Tensor, targets: np.ndarray, mean, std) -> dict:
    residual = targets - predict(network, chips, mean, std)
    return {"target_std": targets.std(0).tolist(), "target_rms": np.sqrt((targets ** 2).mean(0)).tolist(),
            "residual_std": residual.std(0).tolist(), "residual_rms": np.sqrt((residual ** 2).mean(0)).tolist()}


class _InUnits(nn.Module):
    """The network with its target scaling folded in: the exported graph answers in shift, log-scale, degrees."""

    def __init__(self, network: RefinerNet, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x) * self.std + self.mean


def export_refiner(checkpoint: str | Path, out: str | Path, provenance: dict) -> Path:
    """A refiner-fit checkpoint -> NAME.onnx (input: (N, 3, 64, 64) BGR in [-1, 1]; output: (N, 4)) + NAME.json."""
    import json

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not state.get("detector"):
        raise InputError(f"{checkpoint} does not say which detector's points it learned (refit it with refiner-fit)")
    network = RefinerNet()
    network.load_state_dict(state["state"])
    model = _InUnits(network, state["mean"], state["std"]).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, torch.zeros(1, 3, REFINER_SIZE, REFINER_SIZE), str(out), input_names=["chip"],
                      output_names=["similarity"], dynamic_axes={"chip": {0: "n"}, "similarity": {0: "n"}},
                      opset_version=17, dynamo=False)
    meta = {"name": out.stem, "input_size": REFINER_SIZE, "input": "BGR chip aligned to the teacher's template by "
            "the points detected on the masked face, (x - 127.5) / 127.5, NCHW",
            "output": list(TARGET_NAMES), "frame": "the teacher's 150 px chip; shifts as fractions of its side",
            "holdout": state["holdout"], "train_faces": state["train_faces"], "holdout_faces": state["holdout_faces"],
            **provenance, "detector": state["detector"]}  # FaceUnlock warns when another detector's points come
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
