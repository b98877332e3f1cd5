"""Weight interpolation of fine-tunes of one pre-trained network (WiSE-FT, model soups).

Two runs that start from the same weights and move little (a low rate, a few thousand steps) stay in one basin, so
every point on the straight line between their weights is a working network. Squared-error KD keeps the teacher's
space, which transfers to other faces; an identity loss fits the pool's own identities better: a point between
them can keep some of both, at no cost at run time (the network is the same size). The interpolated network is
measured on the pool's identity-disjoint hold-out exactly as `fit` measures its checkpoints. Runs of one config
that differ only in `seed` (same `holdout_seed`) average into a uniform soup the same way.
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


def interpolate_records(records: list[dict], weights: list[float], name: str) -> dict:
    """A record whose network is sum_i weights[i] x records[i]'s (the hold-out metrics still to come): a point
    on the line between two fine-tunes, or a uniform soup of several runs of one config with other seeds."""
    if len(records) < 2 or len(weights) != len(records):
        raise InputError(f"interpolation needs two or more networks and one weight each, got {len(records)} "
                         f"networks and {len(weights)} weights")
    if any(not 0.0 <= w <= 1.0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise InputError(f"interpolation weights must be in [0, 1] and sum to 1, got {weights}")
    configs = [TrainConfig.from_dict(r["config"]) for r in records]  # normalised: drop_units a tuple
    a = configs[0]
    if a.init == "scratch":  # `init` is one of SAME_NETWORK_FIELDS: the others agree or are refused below
        raise InputError(f"{a.name} was trained from scratch: weight interpolation needs fine-tunes of one "
                         "pre-trained network (independent runs do not share a basin)")
    for b, record in zip(configs[1:], records[1:]):
        for field in SAME_NETWORK_FIELDS:
            if getattr(a, field) != getattr(b, field):
                raise InputError(f"{a.name} and {b.name} are not one network from one start: {field} is "
                                 f"{getattr(a, field)!r} against {getattr(b, field)!r}")
        if (a.split_seed, a.holdout_identity_fraction) != (b.split_seed, b.holdout_identity_fraction):
            raise InputError(f"{a.name} and {b.name} held out different identities (hold-out seed {a.split_seed} "
                             f"against {b.split_seed}): set holdout_seed to train both on the same identities")
        if records[0]["pool_meta"]["teacher_fingerprint"] != record["pool_meta"]["teacher_fingerprint"]:
            raise InputError(f"{a.name} and {b.name} learned from different teachers")
        net_a, net_b = records[0]["network"], record["network"]
        if net_a.keys() != net_b.keys() or any(net_a[k].shape != net_b[k].shape for k in net_a):
            raise InputError(f"{a.name} and {b.name} have different parameters")
    network = {}
    for key, value in records[0]["network"].items():
        if value.is_floating_point():
            network[key] = sum(w * r["network"][key].float() for w, r in zip(weights, records))
        else:  # counters (BatchNorm's num_batches_tracked): the first run's
            network[key] = value.clone()
    config = TrainConfig.from_dict({**records[0]["config"], "name": name})
    return {**records[0], "config": config.to_dict(), "config_hash": config.result_hash(), "network": network,
            "metrics": None, "step": None,
            "interpolation": {"weights": [float(w) for w in weights], "from": [
                {"config": r["config"], "config_hash": r["config_hash"], "step": r["step"],
                 "holdout_metrics": r["metrics"]} for r in records]}}


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


def interpolate_checkpoints(checkpoints: list[str | Path], weights: list[float] | None, out: str | Path,
                            pool: str | Path, name: str | None = None, threads: int = 2) -> dict:
    """Write the interpolated network as a `best.pt`-style record (`export` makes it a package); returns it.
    `weights` None: a uniform soup."""
    records = [weights_record(load_train_checkpoint(path), path) for path in checkpoints]
    weights = [1.0 / len(records)] * len(records) if weights is None else weights
    out = Path(out)
    record = interpolate_records(records, weights, name=name or out.stem)
    record["metrics"] = holdout_of(record, TrainingPool.load(pool), threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_record(out, record)
    return record
