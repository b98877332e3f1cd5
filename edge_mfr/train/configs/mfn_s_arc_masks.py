"""lambda = 0: ElasticFace-Arc with mask augmentation only (also stage 1 of the triplet recipe)."""
from edge_mfr.train.config import TrainConfig

config = TrainConfig(
    name='mfn_s_arc_masks',
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
    mse_weight=0.0,
)
