"""Squared-error KD only: student (masked or clean view) -> teacher's raw clean template."""
from edge_mfr.train.config import TrainConfig

config = TrainConfig(
    name='dlib_sqkd',
    arch='dlib_resnet',
    init='teacher',
    input_size=150,
    steps=3000,
    batch_size=256,
    lr=1e-05,
    head_lr=0.01,
    head_warmup_steps=0,
    warmup_steps=100,
    weight_decay=0.0,
    eval_every=250,
    arc_weight=0.0,
    mse_weight=100.0,
)
