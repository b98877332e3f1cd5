"""What each residual unit of the teacher is worth: the teacher's network with units left out, untrained, on the
training pool's identity-disjoint hold-out (the one `python -m edge_mfr.train fit` selects on), clean faces.

Prints, per variant, GMACs at 150 px and clean-clean TPR at FMR 1e-3, so that a compact student (`drop_units`)
leaves out the units that cost the least. Only shape-keeping units can go (`keeps_input_shape`).

Run:
    OMP_NUM_THREADS=1 python benchmarks/residual_unit_drop.py --pool runs/pool_celeba.npz \
        --drop 8,12 --drop 1,5,8,9,11,12 [--json OUT.json]
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from edge_mfr.models.complexity import torch_complexity
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.data import TrainingPool
from edge_mfr.train.teacher import TEACHER_INPUT, bundled_teacher_network, chip_input
from edge_mfr.train.trainer import SELECTION_FMR, drop_residual_units, keeps_input_shape, split_holdout, tpr_at_fmr


@torch.no_grad()
def clean_tpr(network: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    embeddings = F.normalize(torch.cat([network(inputs[i:i + 128]) for i in range(0, len(inputs), 128)]), dim=1)
    upper = torch.triu(torch.ones(len(labels), len(labels), dtype=torch.bool), 1)
    genuine = (labels[:, None] == labels[None, :])[upper]
    return tpr_at_fmr((embeddings @ embeddings.T)[upper], genuine, SELECTION_FMR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, default=Path("runs/pool_celeba.npz"))
    parser.add_argument("--drop", action="append", default=[], help="comma-separated units to leave out together")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    pool = TrainingPool.load(args.pool)
    defaults = TrainConfig(name="holdout")
    _, held = split_holdout(pool, defaults.holdout_identity_fraction, defaults.seed)
    layout = pool.meta["teacher_layout"]
    inputs = chip_input(torch.from_numpy(pool.decode(held)), layout["mean_rgb"])
    labels = torch.from_numpy(pool.labels[held])
    teacher = bundled_teacher_network(layout).eval()

    def measure(units: tuple[int, ...]) -> dict:
        network = drop_residual_units(copy.deepcopy(teacher), units)
        return {"drop_units": list(units), "tpr_uu": clean_tpr(network, inputs, labels),
                "gmacs": torch_complexity(network, (TEACHER_INPUT, TEACHER_INPUT)).gmacs}

    shape_keeping = [k for k, unit in enumerate(teacher.units) if keeps_input_shape(unit)]
    variants = [()] + [(k,) for k in shape_keeping] + [tuple(int(u) for u in d.split(",")) for d in args.drop]
    print(f"hold-out: {len(held)} faces of {len(set(labels.tolist()))} identities; clean-clean TPR at FMR "
          f"{SELECTION_FMR:g}")
    print("| units left out | GMACs | TPR |\n|---|---|---|")
    results = []
    for units in variants:
        result = measure(units)
        results.append(result)
        print(f"| {','.join(map(str, units)) or 'none (the teacher)'} | {result['gmacs']:.3f} | "
              f"{result['tpr_uu']:.3f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
