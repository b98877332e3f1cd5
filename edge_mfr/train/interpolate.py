"""Weight interpolation of two fine-tunes of one pre-trained network (WiSE-FT, model soups).

Two runs that start from the same weights and move little (a low rate, a few thousand steps) stay in one basin, so
every point on the straight line between their weights is a working network. Squared-error KD keeps the teacher's
space, which transfers to other faces; an identity loss fits the pool's own identities better: a point between
them can keep some of both, at no cost at run time (the network is the same size). The interpolated network is
measured on the pool's identity-disjoint hold-out exactly as `fit` measures its checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import torch

from edge_mfr.errors import InputError
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.data import TrainingPool
from edge_mfr.train.trainer import (build_network_from_record, holdout_metrics, load_train_checkpoint, pool_augment,
                                    save_record, split_holdout, weights_record)

# Config fields that must agree for two networks to be the same network from the same start.
SAME_NETWORK_FIELDS = ("arch", "activation", "embedding_size", "drop_units", "stage", "input_size", "init",
                       "init_checkpoint")


def interpolate_records(first: dict, second: dict, weight: float, name: str) -> dict:
    """A record whose network is (1 - weight) x first's + weight x second's (the hold-out metrics still to come)."""
    if not 0.0 <= weight <= 1.0:
        raise InputError(f"interpolation weight must be in [0, 1], got {weight}")
    a, b = (TrainConfig.from_dict(r["config"]) for r in (first, second))  # normalised: drop_units a tuple
    for field in SAME_NETWORK_FIELDS:
        if getattr(a, field) != getattr(b, field):
            raise InputError(f"{a.name} and {b.name} are not one network from one start: {field} is "
                             f"{getattr(a, field)!r} against {getattr(b, field)!r}")
    if (a.split_seed, a.holdout_identity_fraction) != (b.split_seed, b.holdout_identity_fraction):
        raise InputError(f"{a.name} and {b.name} held out different identities (hold-out seed {a.split_seed} "
                         f"against {b.split_seed}): set holdout_seed to train both on the same identities")
    if a.init == "scratch":
        raise InputError(f"{a.name} and {b.name} were trained from scratch: weight interpolation needs two "
                         "fine-tunes of one pre-trained network (independent runs do not share a basin)")
    if first["pool_meta"]["teacher_fingerprint"] != second["pool_meta"]["teacher_fingerprint"]:
        raise InputError(f"{a.name} and {b.name} learned from different teachers")
    net_a, net_b = first["network"], second["network"]
    if net_a.keys() != net_b.keys() or any(net_a[k].shape != net_b[k].shape for k in net_a):
        raise InputError(f"{a.name} and {b.name} have different parameters")
    network = {k: torch.lerp(v.float(), net_b[k].float(), weight) if v.is_floating_point() else v.clone()
               for k, v in net_a.items()}
    config = TrainConfig.from_dict({**first["config"], "name": name})
    return {**first, "config": config.to_dict(), "config_hash": config.result_hash(), "network": network,
            "metrics": None, "step": None,
            "interpolation": {"weight": weight, "from": [
                {"config": r["config"], "config_hash": r["config_hash"], "step": r["step"],
                 "holdout_metrics": r["metrics"]} for r in (first, second)]}}


def holdout_of(record: dict, pool: TrainingPool, threads: int) -> dict:
    """The record's network on its pool's identity-disjoint hold-out (the split and masks `fit` used)."""
    config = TrainConfig.from_dict(record["config"])
    if len(pool) != record["pool_faces"] or pool.meta["teacher_fingerprint"] != record["pool_meta"]["teacher_fingerprint"]:
        raise InputError(f"the pool holds {len(pool)} faces, the networks were trained on a pool of "
                         f"{record['pool_faces']}: pass the pool they were trained on")
    torch.set_num_threads(threads)
    _, held_rows = split_holdout(pool, config.holdout_identity_fraction, config.split_seed)
    augment = pool_augment(pool, config, torch.device("cpu"))
    network = build_network_from_record(record).eval()
    with torch.no_grad():
        return holdout_metrics(network, torch.from_numpy(pool.decode(held_rows)), torch.from_numpy(pool.labels[held_rows]),
                               augment, config, pool.meta["teacher_layout"]["mean_rgb"],
                               torch.from_numpy(pool.teacher[held_rows]))


def interpolate_checkpoints(first: str | Path, second: str | Path, weight: float, out: str | Path, pool: str | Path,
                            name: str | None = None, threads: int = 2) -> dict:
    """Write the interpolated network as a `best.pt`-style record (`export` makes it a package); returns it."""
    records = [weights_record(load_train_checkpoint(path), path) for path in (first, second)]
    out = Path(out)
    record = interpolate_records(*records, weight, name=name or out.stem)
    record["metrics"] = holdout_of(record, TrainingPool.load(pool), threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_record(out, record)
    return record
