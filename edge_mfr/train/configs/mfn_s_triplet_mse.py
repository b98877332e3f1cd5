"""'My eyes are up here' stage 2: a new embedding layer on the frozen mfn_s_arc_masks network, batch-hard triplet (margin 0.2) + MSE between masked and unmasked embeddings of the same face."""
from edge_mfr.train.config import TrainConfig

config = TrainConfig(
    name='mfn_s_triplet_mse',
    arch='mfn_s',
    init='checkpoint',
    input_size=112,
    steps=1500,
    batch_size=256,
    lr=0.001,
    head_lr=0.002,
    warmup_steps=200,
    weight_decay=0.0,
    eval_every=500,
    init_checkpoint='mfn_s_arc_masks',
    stage='triplet',
    arc_weight=0.0,
    sampler='pk',
    pair_mse_weight=10.0,
    triplet_margin=0.2,
)
