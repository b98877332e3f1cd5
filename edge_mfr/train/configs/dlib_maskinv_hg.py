"""MaskInv-HG: as LG, lambda raised once the classification loss is stable."""
from edge_mfr.train.config import TrainConfig

config = TrainConfig(
    name='dlib_maskinv_hg',
    arch='dlib_resnet',
    init='teacher',
    input_size=150,
    steps=3000,
    batch_size=256,
    lr=1e-05,
    head_lr=0.01,
    head_warmup_steps=300,
    warmup_steps=100,
    weight_decay=0.0,
    eval_every=250,
    mse_weight=100.0,
    mse_schedule='hard',
    mse_weight_high=3000.0,
    hard_after_steps=300,
)
