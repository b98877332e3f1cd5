"""Training throughput on this machine: the data path alone (crop decode, mirror + mask compositing) and whole
training steps (forward + backward + optimizer) of each architecture, in faces per second.

    python benchmarks/train_throughput.py --pool runs/pool_celeba.npz --threads 2

For comparison: drawing a mask from scratch per face (`edge_mfr.masks.apply_mask_aligned`) is timed on the same
crops, since that was the data path's bottleneck before precomputed layers.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch


def rate(function, faces: int, repeats: int) -> float:
    function()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return faces * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="runs/pool_celeba.npz")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from edge_mfr.masks import apply_mask_aligned
    from edge_mfr.train.augment import BatchAugment, step_generator, student_input
    from edge_mfr.train.config import TrainConfig
    from edge_mfr.train.data import TrainingPool, chip_template
    from edge_mfr.train.losses import ElasticArcHead, squared_error
    from edge_mfr.train.trainer import network_skeleton

    pool = TrainingPool.load(args.pool)
    rows = np.arange(args.batch * 8)
    print(f"pool: {len(pool)} faces, {args.threads} torch threads, batch {args.batch}")
    decode = rate(lambda: pool.decode(rows), len(rows), 2)
    crops = torch.from_numpy(pool.decode(rows[:args.batch]))
    augment = BatchAugment(pool.mask_colour, pool.mask_alpha, pool.mask_lit, 0.5, 0.04, True, torch.device("cpu"))
    choice = augment.draw(args.batch, step_generator(0, 0))
    composite = rate(lambda: augment.apply(crops, choice), args.batch, args.repeats * 4)
    rng = np.random.default_rng(0)
    numpy_crops = crops.numpy()
    drawn = rate(lambda: [apply_mask_aligned(c, "surgical", rng, template=chip_template(112)) for c in numpy_crops[:8]],
                 8, 1)
    print(f"data path: decode {decode:.0f} faces/s; mirror + layer masks (p=0.5) {composite:.0f} faces/s; "
          f"a mask drawn from scratch per face {drawn:.1f} faces/s")

    mean_rgb = pool.meta["teacher_layout"]["mean_rgb"]
    labels = torch.from_numpy(pool.labels[rows[:args.batch]] % 100)
    targets = torch.from_numpy(pool.teacher[rows[:args.batch]]) if pool.has_templates else torch.zeros(args.batch, 128)
    for arch in ("dlib_resnet", "mfn_s"):
        config = TrainConfig(name="throughput", arch=arch, input_size=150 if arch == "dlib_resnet" else 112)
        network = network_skeleton(config, pool.meta).train()
        head = ElasticArcHead(128, 100)
        optimizer = torch.optim.AdamW(list(network.parameters()) + list(head.parameters()), lr=1e-6)

        def step():
            x = student_input(augment.apply(crops, choice), arch, mean_rgb, config.input_size)
            embedding = network(x)
            loss = torch.nn.functional.cross_entropy(head(embedding, labels, torch.zeros(len(labels))), labels)
            loss = loss + squared_error(embedding, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        print(f"training step {arch}: {rate(step, args.batch, args.repeats):.1f} faces/s "
              f"({dataclasses.replace(config).input_size} px input)")


if __name__ == "__main__":
    main()
