"""MaskInv-LG for mfn_s from scratch: ElasticFace-Arc + fixed lambda x MSE, p=0.5."""
from edge_mfr.train.config import TrainConfig

config = TrainConfig(
    name='mfn_s_maskinv_lg',
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
)
