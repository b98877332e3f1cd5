"""The training loop: one `TrainConfig`, one process or several under torchrun, exact resume.

Data: the whole pool is decoded once and kept on the training device as uint8; each step takes a global batch of
rows (a seeded permutation per epoch, or P identities x K faces), draws its augmentation for the whole global
batch from a generator seeded by (seed, step), and each process takes its slice [rank::world]. Gradients are
averaged by DistributedDataParallel (SyncBatchNorm for MobileFaceNets), so N processes compute what one does, up
to floating-point order. A checkpoint holds the model, head, optimizer, scheduler, step, lambda schedule state
and history; nothing else is random, so a resumed run continues the same sequence.

Selection: every `eval_every` steps, on an identity-disjoint hold-out of the pool, TPR at FMR 1e-3 for clean-clean
(uu), clean-masked (um) and masked-masked (mm) pairs with fixed masks. `best.pt` keeps the weights with the best
mean of um and mm among those whose uu stays within 0.01 of the starting network's (for a teacher-initialised
run: the teacher's), never the lowest loss. A network for the masked route of a two-network package
(`selection="masked_route"`) is selected on the masked route of an unlock simulated on the hold-out instead
(`masked_route_tpr`): its own clean faces are never used there.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge_mfr.errors import InputError
from edge_mfr.train.augment import BatchAugment, step_generator, student_input
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.data import TrainingPool
from edge_mfr.train.losses import ElasticArcHead, batch_hard_triplet, cosine_distance, squared_error
from edge_mfr.train.teacher import chip_input

CHECKPOINT_FORMAT = "edge-mfr-train-checkpoint/1"
HOLDOUT_SEED_STEP = 10**9  # the hold-out's masks: a step number no run reaches
SELECTION_FMR = 1e-3
UU_TOLERANCE = 0.01
PK_FACES = 4


class TrainModule(nn.Module):
    """Network + the parts dropped after training (margin head, teacher projection), one forward for DDP."""

    def __init__(self, network: nn.Module, head: nn.Module | None, projection: nn.Module | None):
        super().__init__()
        self.network, self.head, self.projection = network, head, projection

    def forward(self, x, labels=None, margin_noise=None):
        embedding = self.network(x)
        logits = self.head(embedding, labels, margin_noise) if self.head is not None and labels is not None else None
        regressed = self.projection(embedding) if self.projection is not None else embedding
        return embedding, logits, regressed


class EmbeddingStack(nn.Module):
    """A frozen pre-trained network with a new embedding layer on top ("My eyes are up here", stage 2)."""

    def __init__(self, backbone: nn.Module, embedding_size: int):
        super().__init__()
        self.backbone = backbone
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        width = _embedding_width(backbone)
        self.embedding = nn.Linear(width, embedding_size)
        with torch.no_grad():  # start as the identity where sizes allow: the stage begins at the backbone's space
            self.embedding.weight.copy_(torch.eye(embedding_size, width))
            self.embedding.bias.zero_()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: BN statistics stay as pre-trained
        return self

    def forward(self, x):
        with torch.no_grad():
            features = self.backbone(x)
        return self.embedding(features)


def _embedding_width(network: nn.Module) -> int:
    return int(getattr(network, "embedding_size", 0) or network.embedding.weight.shape[0])


# --- construction ---------------------------------------------------------------------------------------

def network_skeleton(config: TrainConfig, pool_meta: dict) -> nn.Module:
    """The config's network with untrained weights (no stage-2 layer)."""
    if config.arch == "dlib_resnet":
        from edge_mfr.train.teacher import network_from_layout

        network = network_from_layout(pool_meta["teacher_layout"])
        if config.embedding_size != network.embedding.weight.shape[0]:
            raise InputError(f"dlib_resnet embeds in {network.embedding.weight.shape[0]} dimensions, "
                             f"the config asks for {config.embedding_size}")
        return drop_residual_units(network, config.drop_units)
    from edge_mfr.models.mobilefacenet import build_student

    if config.input_size != pool_meta["crop_size"]:
        raise InputError(f"config {config.name!r} wants {config.input_size}x{config.input_size} input, the pool "
                         f"holds {pool_meta['crop_size']}x{pool_meta['crop_size']} crops: rebuild the pool or fix "
                         "input_size")
    return build_student(config.arch, embedding_size=config.embedding_size, activation=config.activation,
                         input_size=(config.input_size, config.input_size))


def keeps_input_shape(unit: nn.Module) -> bool:
    """A residual unit whose output has its input's shape (no downsampling): the only kind that can be left out."""
    return isinstance(unit.shortcut, nn.Identity) and unit.conv1.in_channels == unit.conv2.out_channels


def drop_residual_units(network: nn.Module, units: tuple[int, ...]) -> nn.Module:
    """The teacher's network without the residual units `units` (identities in their place, so the other
    units keep their parameter names and load the teacher's weights)."""
    for index in units:
        if not 0 <= index < len(network.units):
            raise InputError(f"drop_units: the network has residual units 0-{len(network.units) - 1}, not {index}")
        if not keeps_input_shape(network.units[index]):
            raise InputError(f"drop_units: unit {index} changes its input's shape (a downsampling unit) and "
                             "cannot be left out")
        network.units[index] = nn.Identity()
    return network


def build_network(config: TrainConfig, pool: TrainingPool) -> nn.Module:
    """The network a run starts from: untrained, the teacher, or a checkpoint's (plus a new layer for stage 2)."""
    network = network_skeleton(config, pool.meta)
    if config.init == "teacher":
        from edge_mfr.train.teacher import load_bundled_teacher

        load_bundled_teacher(network, pool.meta["teacher_fingerprint"])
    elif config.init == "checkpoint":
        path = init_checkpoint_path(config)
        record = load_train_checkpoint(path)
        if record["config"]["arch"] != config.arch or "network" not in record:
            raise InputError(f"{path} does not hold a trained {config.arch} (best.pt of a run)")
        network.load_state_dict(record["network"])
    if config.stage == "triplet":
        network = EmbeddingStack(network, config.embedding_size)
    return network


def init_checkpoint_path(config: TrainConfig) -> Path:
    """init_checkpoint is a file, or the name of an earlier run in the same out_dir (its best.pt)."""
    given = Path(config.init_checkpoint)
    return given if given.suffix == ".pt" else Path(config.out_dir) / config.init_checkpoint / "best.pt"


def weights_record(record: dict, path) -> dict:
    """The network record of a checkpoint: `best.pt` and `final.pt` are one; `last.pt` (the resume state, where
    a run stopped early by its time budget left its latest network) is reduced to one."""
    if "module" not in record:
        return record
    if "pool_meta" not in record:
        raise InputError(f"{path} is a resume checkpoint written without the pool's metadata (before it was "
                         "stored there): resume the run (fit --resume) to rewrite it, or export best.pt")
    return {"format": record["format"], "config": record["config"], "config_hash": record["config_hash"],
            "network": {k[len("network."):]: v for k, v in record["module"].items() if k.startswith("network.")},
            "metrics": record["state"]["evals"][-1], "step": record["state"]["step"], "pool_meta": record["pool_meta"],
            "pool_faces": record["pool_faces"], "pool_identities": record["pool_identities"]}


def build_network_from_record(record: dict) -> nn.Module:
    """The trained network of a `best.pt` record."""
    config = TrainConfig.from_dict(record["config"])
    network = network_skeleton(config, record["pool_meta"])
    if config.stage == "triplet":
        network = EmbeddingStack(network, config.embedding_size)
    network.load_state_dict(record["network"])
    return network


def load_train_checkpoint(path) -> dict:
    from edge_mfr.models.export import read_checkpoint_file

    state = read_checkpoint_file(path, error=InputError)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not an edge-mfr training checkpoint")
    if "network_delta_fp16" in state:  # packed by run_all for the trip back from a GPU machine
        from edge_mfr.train.teacher import undelta

        return undelta(state)
    return state


def pool_augment(pool: TrainingPool, config: TrainConfig, device: torch.device) -> BatchAugment:
    """The config's mirror and mask draws over the pool's mask layers (training batches and the hold-out)."""
    return BatchAugment(pool.mask_colour, pool.mask_alpha, pool.mask_lit, config.mask_probability,
                        config.mask_jitter, config.flip, device, config.masked_view_alignment,
                        config.scene_augment, config.mix_probability)


def split_holdout(pool: TrainingPool, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, hold-out), split by identity."""
    identities = np.unique(pool.labels)
    rng = np.random.default_rng(seed)
    held = rng.permutation(identities)[:max(2, int(round(len(identities) * fraction)))]
    is_held = np.isin(pool.labels, held)
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


# --- measuring ------------------------------------------------------------------------------------------

def tpr_at_fmr(scores: torch.Tensor, genuine: torch.Tensor, fmr: float) -> float:
    impostor = scores[~genuine]
    if impostor.numel() == 0 or not bool(genuine.any()):
        return float("nan")
    k = max(1, int(math.floor(fmr * impostor.numel())))
    threshold = torch.topk(impostor, k).values[-1]
    return float((scores[genuine] > threshold).float().mean())


@torch.no_grad()
def holdout_metrics(network: nn.Module, crops: torch.Tensor, labels: torch.Tensor, augment: BatchAugment,
                    config: TrainConfig, mean_rgb, teacher_templates: torch.Tensor, batch: int = 256) -> dict[str, float]:
    """Hold-out TPR at FMR 1e-3: uu, um, mm of the network with itself, and masked_route (`masked_route_tpr`, the
    network as the masked route of a two-network package whose other network made `teacher_templates`)."""
    was_training = network.training
    network.eval()
    choice = augment.draw(len(crops), step_generator(config.split_seed, HOLDOUT_SEED_STEP), training=False)
    choice["flip"][:] = False
    views = {}
    for masked in (False, True):
        choice["masked"][:] = masked
        out = []
        for start in range(0, len(crops), batch):
            part = {k: v[start:start + batch] for k, v in choice.items()}
            x = student_input(augment.apply(crops[start:start + batch], part), config.arch, mean_rgb,
                              config.input_size)
            with _autocast(config):
                out.append(F.normalize(network(x).float(), dim=1))
        views[masked] = torch.cat(out)
    network.train(was_training)
    n = len(crops)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=crops.device), 1)
    genuine = (labels[:, None] == labels[None, :])[upper]
    # um pairs: every ordered pair (i clean, j masked) with i != j; uu and mm: each unordered pair once.
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=crops.device)
    return {
        "tpr_uu": tpr_at_fmr((views[False] @ views[False].T)[upper], genuine, SELECTION_FMR),
        "tpr_um": tpr_at_fmr((views[False] @ views[True].T)[off_diagonal],
                             (labels[:, None] == labels[None, :])[off_diagonal], SELECTION_FMR),
        "tpr_mm": tpr_at_fmr((views[True] @ views[True].T)[upper], genuine, SELECTION_FMR),
        "tpr_masked_route": (masked_route_tpr(F.normalize(teacher_templates.float(), dim=1), views[True], labels)
                             if teacher_templates.shape[1] == views[True].shape[1] else float("nan")),
    }


def masked_route_tpr(teacher_clean: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor,
                     enrolled: int = 2) -> float:
    """TPR at FMR 1e-3 of the masked route of an unlock simulated on the hold-out, with `masked` (N, D) as the
    masked-route network's embeddings of masked faces and `teacher_clean` (N, D) the other network's of the same
    faces clean: each identity enrolls its first `enrolled` faces (their clean templates by the teacher and
    their masked templates by the masked-route network, as enrollment synthesises them), its other faces probe
    masked; a probe's score for an identity is the max over its templates, and every other identity is an
    impostor attempt. This is what the masked route compares: a network drifting from the teacher's space
    loses where its probes meet clean templates, one that separates masked faces well gains on masked ones."""
    n = len(labels)
    rank = torch.zeros(n, dtype=torch.long, device=labels.device)
    for label in torch.unique(labels):
        rows = torch.nonzero(labels == label).flatten()
        rank[rows] = torch.arange(len(rows), device=labels.device)
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    usable = counts[inverse] > enrolled
    is_template = usable & (rank < enrolled)
    probes = torch.nonzero(usable & (rank >= enrolled)).flatten()
    templates = torch.cat([teacher_clean[is_template], masked[is_template]])
    identities, owner = torch.unique(torch.cat([labels[is_template]] * 2), return_inverse=True)
    scores = masked[probes] @ templates.T
    per_identity = torch.full((len(probes), len(identities)), -2.0, device=scores.device).scatter_reduce(
        1, owner.expand(len(probes), -1), scores, reduce="amax")
    genuine = labels[probes][:, None] == identities[None, :]
    return tpr_at_fmr(per_identity.flatten(), genuine.flatten(), SELECTION_FMR)


def selection_score(metrics: dict[str, float], config: TrainConfig, start_uu: float) -> float | None:
    """The hold-out score `best.pt` is selected on (higher is better), or None where the step is not eligible
    (a student whose clean-clean TPR fell more than UU_TOLERANCE below the start's)."""
    if config.selection == "masked_route":
        return metrics["tpr_masked_route"]
    if metrics["tpr_uu"] < start_uu - UU_TOLERANCE:
        return None
    return (metrics["tpr_um"] + metrics["tpr_mm"]) / 2


def _autocast(config: TrainConfig):
    enabled = config.amp and config.device.startswith("cuda")
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# --- the loop -------------------------------------------------------------------------------------------

class BatchOrder:
    """Global batch rows of step s: a seeded permutation per epoch (drop-last), or P identities x K faces."""

    def __init__(self, rows: np.ndarray, labels: np.ndarray, config: TrainConfig):
        self.rows, self.labels, self.config = rows, labels, config
        self.per_epoch = len(rows) - len(rows) % config.batch_size
        by_identity: dict[int, list[int]] = {}
        for row in rows:
            by_identity.setdefault(int(labels[row]), []).append(int(row))
        self.by_identity = [np.array(v) for v in by_identity.values() if len(v) >= 2]

    def __call__(self, step: int) -> np.ndarray:
        b = self.config.batch_size
        if self.config.sampler == "pk":
            rng = np.random.default_rng([self.config.seed, step, 2])
            chosen = rng.choice(len(self.by_identity), b // PK_FACES, replace=False)
            return np.concatenate([rng.choice(self.by_identity[i], PK_FACES,
                                              replace=len(self.by_identity[i]) < PK_FACES) for i in chosen])
        position = step * b
        epoch, offset = divmod(position, self.per_epoch)
        order = np.random.default_rng([self.config.seed, epoch, 1]).permutation(len(self.rows))[:self.per_epoch]
        return self.rows[order[offset:offset + b]]


def _lr_lambdas(config: TrainConfig):
    def cosine(step: int, start: int) -> float:
        if step < start:
            return 0.0
        local = step - start
        if local < config.warmup_steps:
            return (local + 1) / config.warmup_steps
        progress = (local - config.warmup_steps) / max(1, config.steps - start - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return [lambda s: cosine(s, config.head_warmup_steps), lambda s: cosine(s, 0)]


def kd_standardizer(config: TrainConfig, teacher: torch.Tensor, train_rows: np.ndarray) -> Callable:
    """The KD target made of raw teacher templates: as they are, or (`kd_target="standardized"`) minus the
    training faces' mean template, over its per-dimension deviation (statistics of the cached clean templates of
    the training rows only, so the hold-out stays unseen; online targets use the same statistics)."""
    if config.kd_target == "raw":
        return lambda templates: templates
    fitted = teacher[torch.from_numpy(np.asarray(train_rows)).to(teacher.device)].double()
    mean, std = fitted.mean(dim=0), fitted.std(dim=0).clamp_min(1e-6)
    return lambda templates: ((templates.double() - mean) / std).to(templates.dtype)


def _parameter_groups(module: TrainModule, config: TrainConfig):
    def split(params):
        params = [p for p in params if p.requires_grad]
        return ([p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1])

    net_decay, net_plain = split(module.network.parameters())
    extra = [p for m in (module.head, module.projection) if m is not None for p in m.parameters()]
    extra_decay, extra_plain = split(extra)
    # Two schedules (backbone, head), each with and without weight decay: 1-D parameters (biases, BN) get none.
    return [
        {"params": net_decay, "weight_decay": config.weight_decay, "lr": config.lr},
        {"params": extra_decay, "weight_decay": config.weight_decay, "lr": config.head_lr},
        {"params": net_plain, "weight_decay": 0.0, "lr": config.lr},
        {"params": extra_plain, "weight_decay": 0.0, "lr": config.head_lr},
    ]


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def fit(config: TrainConfig, resume: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train one config; returns the run folder (last.pt, best.pt, history.json, loss_curve.png)."""
    rank, world = _distributed()
    if config.batch_size % world:
        raise InputError(f"batch_size {config.batch_size} does not split over {world} processes")
    device = torch.device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    log = log if rank == 0 else (lambda _message: None)

    pool = TrainingPool.load(config.pool)
    if not pool.has_templates or (config.flip and not pool.has_mirrored_templates):
        started = time.perf_counter()  # computed once on the training device, then cached in the pool file
        pool.add_teacher_templates(str(device), mirrored=config.flip)
        if rank == 0:
            pool.save(config.pool)
        log(f"teacher templates of {len(pool)} faces (and mirrors) in {time.perf_counter() - started:.1f} s")
    train_rows, held_rows = split_holdout(pool, config.holdout_identity_fraction, config.split_seed)
    classes = {int(c): i for i, c in enumerate(np.unique(pool.labels[train_rows]))}
    class_of_row = np.full(len(pool), -1, np.int64)
    class_of_row[train_rows] = [classes[int(label)] for label in pool.labels[train_rows]]
    started = time.perf_counter()
    crops = torch.from_numpy(pool.decode()).to(device)
    decode_s = time.perf_counter() - started
    teacher = torch.from_numpy(pool.teacher).to(device)
    teacher_flipped = torch.from_numpy(pool.teacher_flipped if config.flip else pool.teacher).to(device)
    standardize = kd_standardizer(config, teacher, train_rows)
    teacher, teacher_flipped = standardize(teacher), standardize(teacher_flipped)
    online_teacher = None
    if config.teacher_views == "online":
        from edge_mfr.train.teacher import bundled_teacher_network

        online_teacher = bundled_teacher_network(pool.meta["teacher_layout"], pool.meta["teacher_fingerprint"])
        online_teacher = online_teacher.to(device).eval().requires_grad_(False)
    row_class = torch.from_numpy(class_of_row).to(device)
    mean_rgb = pool.meta["teacher_layout"]["mean_rgb"]
    augment = pool_augment(pool, config, device)

    network = build_network(config, pool)
    teacher_dim = pool.teacher.shape[1]
    regresses = config.mse_weight > 0 or config.mse_weight_high > 0 or config.cosine_weight > 0
    if config.selection == "masked_route" and _embedding_width(network) != teacher_dim:
        raise InputError(f"selection='masked_route' scores the network's masked faces against the teacher's "
                         f"{teacher_dim}-d templates; the network gives {_embedding_width(network)}-d embeddings")
    projection = None
    if regresses and _embedding_width(network) != teacher_dim:
        if not config.teacher_projection:
            raise InputError(f"the teacher's templates are {teacher_dim}-d, the student's "
                             f"{_embedding_width(network)}-d: set embedding_size to match or teacher_projection=true")
        projection = nn.Linear(_embedding_width(network), teacher_dim, bias=False)
    head = (ElasticArcHead(_embedding_width(network), len(classes), config.arc_scale, config.arc_margin,
                           config.arc_margin_std) if config.arc_weight > 0 else None)
    module = TrainModule(network, head, projection).to(device).train()
    if world > 1 and config.arch != "dlib_resnet":
        if device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        else:  # PyTorch's SyncBatchNorm is CUDA-only: on CPU each process normalises over its own slice
            log(f"note: {config.arch} has batch norm; on CPU its statistics are per process, so {world} processes "
                "differ slightly from one (the dlib network has none)")
    optimizer = (torch.optim.AdamW(_parameter_groups(module, config)) if config.optimizer == "adamw"
                 else torch.optim.SGD(_parameter_groups(module, config), momentum=0.9))
    backbone_schedule, head_schedule = _lr_lambdas(config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [backbone_schedule, head_schedule, backbone_schedule, head_schedule])
    wrapped = (torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
               if world > 1 else module)

    out_dir = Path(config.out_dir) / config.name
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {"step": 0, "history": [], "evals": [], "best_score": -math.inf, "start_uu": None,
             "lambda_high_from": None, "arc_best": math.inf, "arc_best_step": 0, "train_s": 0.0, "data_s": 0.0}
    if resume and (out_dir / "last.pt").is_file():
        saved = load_train_checkpoint(out_dir / "last.pt")
        if saved["config_hash"] != config.result_hash():
            raise InputError(f"{out_dir / 'last.pt'} belongs to another config ({saved['config']['name']}, hash "
                             f"{saved['config_hash']}); resume needs the same config (hash {config.result_hash()})")
        module.load_state_dict(saved["module"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.update(saved["state"])
        log(f"resumed {config.name} at step {state['step']}")
    elif resume:
        log(f"no checkpoint in {out_dir}: starting {config.name} from the beginning")

    if len(train_rows) < config.batch_size:
        raise InputError(f"{len(train_rows)} training faces cannot fill a batch of {config.batch_size}")
    order = BatchOrder(train_rows, pool.labels, config)
    held_crops = crops[torch.from_numpy(held_rows).to(device)]
    held_labels = torch.from_numpy(pool.labels[held_rows]).to(device)
    held_teacher = teacher[torch.from_numpy(held_rows).to(device)]
    log(f"{config.name}: {config.arch}, {len(train_rows)} train faces ({len(classes)} ids), {len(held_rows)} hold-out "
        f"faces, {config.steps} steps of {config.batch_size} on {world} x {device}; pool decoded in {decode_s:.1f} s")

    def evaluate_and_save() -> None:
        if rank == 0 and not (state["evals"] and state["evals"][-1]["step"] == state["step"]):
            metrics = holdout_metrics(module.network, held_crops, held_labels, augment, config, mean_rgb,
                                      held_teacher)
            metrics["step"] = state["step"]
            state["evals"].append(metrics)
            if state["start_uu"] is None:
                state["start_uu"] = metrics["tpr_uu"] if config.init != "scratch" else -math.inf
            score = selection_score(metrics, config, state["start_uu"])
            best = score is not None and score > state["best_score"]
            if best:
                state["best_score"] = score
                torch.save(_weights_record(module.network, config, pool, state, metrics), out_dir / "best.pt")
            log(f"step {state['step']} hold-out TPR@FMR1e-3 uu {metrics['tpr_uu']:.4f} um {metrics['tpr_um']:.4f} "
                f"mm {metrics['tpr_mm']:.4f} masked_route {metrics['tpr_masked_route']:.4f}{' (best)' if best else ''}")
            _save_last(out_dir / "last.pt", module, optimizer, scheduler, config, state, pool)
            (out_dir / "history.json").write_text(json.dumps({"config": config.to_dict(), **state}, indent=1))
            plot_history(state, out_dir / "loss_curve.png", config.name)
        if world > 1:
            torch.distributed.barrier()

    if state["step"] == 0:
        evaluate_and_save()
    from tqdm import tqdm

    bar = tqdm(total=config.steps, initial=state["step"], desc=config.name, disable=not config.progress or rank != 0,
               mininterval=10)
    loop_started = time.perf_counter()
    # a run resumed at (or asked to stop at) a step it has already reached takes no step more
    stopped_early = config.stop_after_steps is not None and state["step"] >= config.stop_after_steps
    while state["step"] < config.steps and not stopped_early:
        step = state["step"]
        data_started = time.perf_counter()
        rows = torch.from_numpy(order(step)).to(device)
        generator = step_generator(config.seed, step, salt=1)
        choice = augment.draw(len(rows), generator)
        margin_noise = torch.randn(len(rows), generator=generator)
        mine = torch.arange(rank, len(rows), world)
        local_rows, local_choice = rows[mine.to(device)], {k: v[mine] for k, v in choice.items()}
        labels = row_class[local_rows]
        if online_teacher is not None:
            partners = crops[rows[choice["mix_partner"][mine].to(device)]] if "mix_partner" in choice else None
            clean, student_view = augment.views(crops[local_rows], local_choice, partners)
            with torch.no_grad(), _autocast(config):
                target = standardize(online_teacher(chip_input(clean, mean_rgb)).float())
            x = student_input(student_view, config.arch, mean_rgb, config.input_size)
        else:
            flipped = local_choice["flip"].to(device)
            target = torch.where(flipped[:, None], teacher_flipped[local_rows], teacher[local_rows])
            if config.stage == "triplet":
                clean = dict(local_choice, masked=torch.zeros_like(local_choice["masked"]))
                masked = dict(local_choice, masked=torch.ones_like(local_choice["masked"]))
                x = torch.cat([student_input(augment.apply(crops[local_rows], c), config.arch, mean_rgb,
                                             config.input_size) for c in (clean, masked)])
            else:
                x = student_input(augment.apply(crops[local_rows], local_choice), config.arch, mean_rgb,
                                  config.input_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state["data_s"] += time.perf_counter() - data_started

        lam = config.mse_weight if state["lambda_high_from"] is None else config.mse_weight_high
        with _autocast(config):
            if config.stage == "triplet":
                embedding, _, _ = wrapped(x)
                both_labels = labels.repeat(2)
                triplet = batch_hard_triplet(embedding, both_labels, config.triplet_margin)
                half = len(labels)
                pair = squared_error(F.normalize(embedding[half:].float(), dim=1),
                                     F.normalize(embedding[:half].float(), dim=1))
                losses = {"triplet": triplet, "pair_mse": pair}
                loss = triplet + config.pair_mse_weight * pair
            else:
                embedding, logits, regressed = wrapped(x, labels, margin_noise[mine].to(device))
                losses, loss = {}, torch.zeros((), device=device)
                if logits is not None:
                    losses["arc"] = F.cross_entropy(logits.float(), labels)
                    loss = loss + config.arc_weight * losses["arc"]
                if lam > 0:
                    losses["mse"] = squared_error(regressed, target)
                    loss = loss + lam * losses["mse"]
                if config.cosine_weight > 0:
                    losses["cos"] = cosine_distance(regressed, target)
                    loss = loss + config.cosine_weight * losses["cos"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        state["step"] = step + 1
        bar.update(1)
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in losses.values())])
        if world > 1:  # the logged losses are those of the whole global batch, as one process would see them
            torch.distributed.all_reduce(values)
            values /= world
        record = dict(zip(["loss", *losses], values.tolist()))
        record.update(step=state["step"], lam=lam)
        state["history"].append(record)
        _update_hard_schedule(state, record, config, log)
        if state["step"] % config.eval_every == 0 or state["step"] == config.steps:
            state["train_s"] += time.perf_counter() - loop_started
            state["faces_per_s"] = (state["step"] * config.batch_size) / max(state["train_s"], 1e-9)
            evaluate_and_save()
            loop_started = time.perf_counter()
        if (config.time_budget_s is not None and time.perf_counter() - started > config.time_budget_s) or (
                config.stop_after_steps is not None and state["step"] >= config.stop_after_steps):
            stop = torch.tensor([1.0], device=device)
        else:
            stop = torch.tensor([0.0], device=device)
        if world > 1:
            torch.distributed.all_reduce(stop)
        if stop.item() > 0 and state["step"] < config.steps:
            state["train_s"] += time.perf_counter() - loop_started
            stopped_early = True
            evaluate_and_save()
            break
    bar.close()
    if rank == 0 and state["step"] == config.steps:  # the network at the end of its schedule, next to the selected one
        torch.save(_weights_record(module.network, config, pool, state, state["evals"][-1]), out_dir / "final.pt")
    log(f"{config.name}: {'stopped early at' if stopped_early else 'done after'} step "
        f"{state['step']}; {state.get('faces_per_s', 0):.0f} faces/s; best hold-out score {state['best_score']:.4f}")
    return out_dir


def _update_hard_schedule(state: dict, record: dict, config: TrainConfig, log) -> None:
    """MaskInv-HG: raise lambda once the classification loss has stopped improving (by 2%) for a while."""
    if config.mse_schedule != "hard" or state["lambda_high_from"] is not None or "arc" not in record:
        return
    smoothed = record["arc"] if state.get("arc_ema") is None else 0.95 * state["arc_ema"] + 0.05 * record["arc"]
    state["arc_ema"] = smoothed
    if smoothed < 0.98 * state["arc_best"]:
        state["arc_best"], state["arc_best_step"] = smoothed, record["step"]
    elif record["step"] - state["arc_best_step"] >= config.hard_after_steps:
        state["lambda_high_from"] = record["step"]
        log(f"step {record['step']}: classification loss stable at {smoothed:.3f}: lambda "
            f"{config.mse_weight} -> {config.mse_weight_high}")


def _weights_record(network: nn.Module, config: TrainConfig, pool: TrainingPool, state: dict, metrics: dict) -> dict:
    return {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "config_hash": config.result_hash(),
            "network": {k: v.detach().float().cpu() for k, v in network.state_dict().items()},
            "metrics": metrics, "step": state["step"], "pool_meta": json.loads(json.dumps(pool.meta)),
            "pool_faces": len(pool), "pool_identities": len(pool.identities)}


def _save_last(path: Path, module: nn.Module, optimizer, scheduler, config: TrainConfig, state: dict,
               pool: TrainingPool) -> None:
    record = {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "config_hash": config.result_hash(),
              "module": module.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
              "state": json.loads(json.dumps(state, default=float)), "pool_meta": json.loads(json.dumps(pool.meta)),
              "pool_faces": len(pool), "pool_identities": len(pool.identities)}
    save_record(path, record)


def save_record(path: Path, record: dict) -> None:
    """torch.save through a temporary file beside `path`: an interrupted write leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(record, tmp)
    os.replace(tmp, path)


def plot_history(state: dict, path: Path, title: str) -> None:
    """Training losses and hold-out TPRs against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    history = state["history"]
    for key in ("loss", "arc", "mse", "cos", "triplet", "pair_mse"):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            steps, values = zip(*points)
            left.plot(steps, values, label=key, lw=1)
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_title(f"{title}: training losses")
    if left.lines:
        left.legend(fontsize=7)
    for key in ("tpr_uu", "tpr_um", "tpr_mm", "tpr_masked_route"):
        points = [(e["step"], e[key]) for e in state["evals"] if key in e]
        if points:
            steps, values = zip(*points)
            right.plot(steps, values, marker=".", label=key)
    right.set_xlabel("step")
    right.set_title("hold-out TPR at FMR 1e-3")
    if right.lines:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
