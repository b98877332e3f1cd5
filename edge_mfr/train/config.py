"""One training run = one `TrainConfig`, kept as a Python file in edge_mfr/train/configs/ (or anywhere) defining
`config = TrainConfig(...)`; command-line `key=value` overrides go on top. The resolved config is stored in every
checkpoint and in the exported package's recipe, so a package says exactly how it was trained, and a resume is
refused when the config it continues differs in anything that changes the result.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_mfr.errors import InputError

ARCHES = ("dlib_resnet", "mfn_s", "mfn_m")
SELECTIONS = ("student", "masked_route")
# Fields that may differ on resume: where and how fast the run goes, not what it computes.
RUNTIME_FIELDS = ("out_dir", "device", "threads", "amp", "time_budget_s", "stop_after_steps", "progress", "pool")
# Fields added after runs existed, with the default that keeps what those runs computed: left out of the hash at
# that default, so a checkpoint from before still resumes.
LATER_FIELDS = {"kd_target": "raw", "holdout_seed": None, "masked_view_alignment": (), "teacher_views": "cached",
                "scene_augment": False, "mix_probability": 0.0}


@dataclass(frozen=True)
class TrainConfig:
    """Template-level distillation (MaskInv) and its ablations, for the teacher's own network or a MobileFaceNet.

    Per sample the student sees the aligned face, masked with probability `mask_probability` (masks composited
    from the pool's precomputed layers), and the loss is
        arc_weight * ElasticFace-Arc(student, identity)               (s, margin ~ N(arc_margin, arc_margin_std))
      + mse_weight * mean squared error(student, teacher(clean face)) (raw descriptors; "lambda")
                                                                      (or standardized ones: `kd_target`)
      + cosine_weight * mean(1 - cos(student, teacher(clean face)))   (the earlier cosine-KD objective)
    `mse_schedule="hard"` (MaskInv-HG) raises lambda from `mse_weight` to `mse_weight_high` once the
    classification loss has stabilised. `stage="triplet"` trains a new embedding layer on the frozen network of
    `init_checkpoint` with the triplet loss plus an MSE between masked and unmasked embeddings of the same face.
    """

    name: str
    arch: str = "mfn_s"
    activation: str = "relu"
    embedding_size: int = 128
    teacher_projection: bool = False  # regress a teacher of another size through a dropped linear projection
    init: str = "scratch"  # "scratch", "teacher" (dlib_resnet only) or "checkpoint" (init_checkpoint)
    init_checkpoint: str | None = None  # a best.pt, or the name of an earlier run in out_dir
    # dlib_resnet only: residual units (indices 0-13) left out, a cheaper network that keeps the teacher's
    # resolution; only units that keep their input's shape (no downsampling) can go
    drop_units: tuple[int, ...] = ()
    stage: str = "classify"  # or "triplet"
    # data
    pool: str = "runs/pool_celeba.npz"
    input_size: int = 112  # network input side: the pool's crop size, or any side for dlib_resnet (crops resized)
    holdout_identity_fraction: float = 0.08  # identity-disjoint, for selection during training
    mask_probability: float = 0.5
    mask_jitter: float = 0.04  # placement jitter of a mask layer, fraction of the crop side
    # Masked views moved as a masked photo's own points align them: mean then standard deviation of shift x,
    # shift y (fractions of the side), log-scale, angle (degrees); empty: where the clean points put them
    masked_view_alignment: tuple[float, ...] = ()
    flip: bool = True
    # "cached": KD targets are the pool's teacher templates of the unaugmented crop (and its mirror); "online":
    # the teacher embeds every training view (without its mask) as the student sees it, so the targets follow
    # scene changes and blends. With 15.9k faces a student fits the cached targets of its training faces and
    # stops generalising (stop 24); every new view is a new point of the teacher's function to match.
    teacher_views: str = "cached"
    scene_augment: bool = False  # shift, scale, rotation, light, colour and grey views (needs online targets)
    mix_probability: float = 0.0  # views blended with another face of the batch (needs online targets, no arc)
    sampler: str = "random"  # or "pk": batch_size / 4 identities x 4 faces (triplets need positives)
    # losses
    arc_weight: float = 1.0
    arc_scale: float = 64.0
    arc_margin: float = 0.5
    arc_margin_std: float = 0.05
    mse_weight: float = 0.0
    mse_schedule: str = "fixed"  # or "hard"
    mse_weight_high: float = 0.0
    hard_after_steps: int = 0  # "hard": raise lambda once the arc loss has not improved by 2% for this many steps
    cosine_weight: float = 0.0
    # "raw": the teacher's descriptors as they are; "standardized": minus their mean over the training faces,
    # divided by their standard deviation per dimension. The teacher's templates of different people share most
    # of their direction (mean cosine 0.84), so a raw target is mostly one constant vector; a network trained from
    # scratch is then asked for the part that tells people apart at a fraction of the loss's scale.
    kd_target: str = "raw"
    triplet_margin: float = 0.2
    pair_mse_weight: float = 0.0
    # optimisation
    steps: int = 1000
    batch_size: int = 128
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9)
    lr: float = 1e-3
    head_lr: float = 1e-2
    head_warmup_steps: int = 0  # only the margin head learns at first (the backbone's lr is 0)
    weight_decay: float = 5e-4
    warmup_steps: int = 50
    eval_every: int = 200
    # What best.pt is selected on: "student" (the network on its own: mean of its um and mm hold-out TPR, its uu
    # within 0.01 of the start's) or "masked_route" (a network for the masked route of a two-network package:
    # its masked faces against the teacher's clean templates, the comparison a masked unlock makes)
    selection: str = "student"
    seed: int = 0
    # The hold-out's identities and masks (None: `seed`). Runs that differ only in `seed` (initialisation of the
    # head, batch order, augmentation) then train on the same identities and are measured on the same faces,
    # which weight-averaging their networks needs.
    holdout_seed: int | None = None
    # machine (RUNTIME_FIELDS: may change on resume)
    device: str = "cpu"
    amp: bool = False  # bfloat16 autocast on CUDA
    threads: int = 2
    time_budget_s: float | None = None  # stop cleanly (with a checkpoint) after this much wall time
    stop_after_steps: int | None = None  # stop cleanly at this step (an interruption on purpose); resume continues
    progress: bool = True
    out_dir: str = "runs/train"

    def __post_init__(self):
        object.__setattr__(self, "drop_units", tuple(sorted({int(u) for u in self.drop_units})))
        object.__setattr__(self, "masked_view_alignment", tuple(float(v) for v in self.masked_view_alignment))
        checks = [
            (self.arch in ARCHES, f"arch must be one of {ARCHES}, got {self.arch!r}"),
            (self.init in ("scratch", "teacher", "checkpoint"),
             f"init must be scratch|teacher|checkpoint, got {self.init!r}"),
            (self.init != "teacher" or self.arch == "dlib_resnet", "init='teacher' needs arch='dlib_resnet'"),
            (self.init != "checkpoint" or self.init_checkpoint, "init='checkpoint' needs init_checkpoint"),
            (not self.drop_units or self.arch == "dlib_resnet", "drop_units needs arch='dlib_resnet'"),
            (self.stage in ("classify", "triplet"), f"stage must be classify|triplet, got {self.stage!r}"),
            (self.stage != "triplet" or self.init == "checkpoint",
             "stage='triplet' trains on a pre-trained checkpoint"),
            (self.sampler in ("random", "pk"), f"sampler must be random|pk, got {self.sampler!r}"),
            (self.mse_schedule in ("fixed", "hard"), f"mse_schedule must be fixed|hard, got {self.mse_schedule!r}"),
            (self.kd_target in ("raw", "standardized"), f"kd_target must be raw|standardized, got {self.kd_target!r}"),
            (self.kd_target == "raw" or self.selection == "student",
             "kd_target='standardized' leaves the teacher's space: selection must be 'student'"),
            (self.selection in SELECTIONS, f"selection must be one of {SELECTIONS}, got {self.selection!r}"),
            (self.teacher_views in ("cached", "online"),
             f"teacher_views must be cached|online, got {self.teacher_views!r}"),
            (self.teacher_views == "online" or not (self.scene_augment or self.mix_probability > 0),
             "scene_augment and mix_probability change the pixels the cached teacher templates were computed "
             "on: they need teacher_views='online'"),
            (self.teacher_views == "cached" or (self.stage == "classify" and (
                self.mse_weight > 0 or self.mse_weight_high > 0 or self.cosine_weight > 0)),
             "teacher_views='online' computes KD targets: it needs mse_weight or cosine_weight > 0 and "
             "stage='classify'"),
            (0.0 <= self.mix_probability <= 1.0 and (self.mix_probability == 0 or self.arc_weight == 0),
             "mix_probability must be in [0, 1], and a blend of two faces has no identity: it needs arc_weight=0"),
            (self.optimizer in ("sgd", "adamw"), f"optimizer must be sgd|adamw, got {self.optimizer!r}"),
            (0.0 <= self.mask_probability <= 1.0, "mask_probability must be in [0, 1]"),
            (len(self.masked_view_alignment) in (0, 8) and all(v >= 0 for v in self.masked_view_alignment[4:]),
             "masked_view_alignment takes 8 numbers (the mean of shift x, shift y, log-scale, degrees, then "
             "their standard deviations, not negative) or none"),
            (0.0 < self.holdout_identity_fraction < 1.0, "holdout_identity_fraction must be in (0, 1)"),
            (self.batch_size >= 4 and self.batch_size % 4 == 0, "batch_size must be a positive multiple of 4"),
            (self.steps > 0 and self.lr > 0, "steps and lr must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"config {self.name!r}: {message}")

    @property
    def split_seed(self) -> int:
        """The seed of the hold-out split and of its masks."""
        return self.seed if self.holdout_seed is None else self.holdout_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def result_hash(self) -> str:
        """Hash of every field that changes what the run computes (not RUNTIME_FIELDS)."""
        fields = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS
                  and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown config keys {unknown}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def with_overrides(self, overrides: list[str]) -> "TrainConfig":
        """Apply `key=value` strings, parsed by the field's declared type ("none" for optional fields)."""
        fields = {f.name: str(f.type) for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep or key not in fields:
                raise InputError(f"override {item!r}: expected key=value with key one of {', '.join(fields)}")
            kind = fields[key]
            try:
                if text.lower() == "none" and "None" in kind:
                    changes[key] = None
                elif kind == "bool":
                    changes[key] = {"true": True, "false": False}[text.lower()]
                elif kind.startswith("int"):
                    changes[key] = int(text)
                elif kind.startswith("float"):
                    changes[key] = float(text)
                elif kind.startswith("tuple[int"):
                    changes[key] = tuple(int(v) for v in text.split(",") if v.strip())
                elif kind.startswith("tuple[float"):
                    changes[key] = tuple(float(v) for v in text.split(",") if v.strip())
                else:
                    changes[key] = text
            except (KeyError, ValueError):
                raise InputError(f"override {item!r}: {text!r} is not a valid {kind}") from None
        return dataclasses.replace(self, **changes)


def load_config(name_or_path: str) -> TrainConfig:
    """A config by name (edge_mfr/train/configs/NAME.py) or by path to a .py file defining `config`."""
    path = Path(name_or_path)
    if path.suffix == ".py":
        if not path.is_file():
            raise InputError(f"config file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"edge_mfr_train_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except TypeError as exc:  # TrainConfig(unknown_key=...)
            raise InputError(f"{path}: {exc}") from None
    else:
        try:
            module = importlib.import_module(f"edge_mfr.train.configs.{name_or_path}")
        except TypeError as exc:  # TrainConfig(unknown_key=...)
            raise InputError(f"config {name_or_path}: {exc}") from None
        except ModuleNotFoundError:
            known = sorted(p.stem for p in (Path(__file__).parent / "configs").glob("[!_]*.py"))
            raise InputError(f"no training config {name_or_path!r}; known: {', '.join(known)}") from None
    config = getattr(module, "config", None)
    if not isinstance(config, TrainConfig):
        raise InputError(f"{name_or_path} does not define `config = TrainConfig(...)`")
    return config
