"""MaskInv-HG for mfn_s: lambda raised once the classification loss is stable."""
from edge_mfr.train.config import TrainConfig

config = TrainConfig(
    name='mfn_s_maskinv_hg',
    arch='mfn_s',
    init='scratch',
    input_size=112,
    steps=6000,
    batch_size=256,
    lr=0.002,
    head_lr=0.002,
    warmup_steps=200,
    weight_decay=0.0005,
    eval_every=500,
    mse_weight=100.0,
    mse_schedule='hard',
    mse_weight_high=3000.0,
    hard_after_steps=500,
)
