"""The earlier cosine-KD objective: 1 - cos to the teacher's clean template, no identity loss."""
from edge_mfr.train.config import TrainConfig

config = TrainConfig(
    name='mfn_s_cosine_kd',
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
    arc_weight=0.0,
    cosine_weight=1.0,
)
