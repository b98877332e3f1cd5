"""'My eyes are up here' stage 2: a new embedding layer on the frozen mfn_s_arc_masks network, batch-hard
triplet (margin 0.2) + MSE between masked and unmasked embeddings of the same face."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import MFN_S_FROM_SCRATCH

config = TrainConfig(**{
    **MFN_S_FROM_SCRATCH,
    "name": "mfn_s_triplet_mse",
    "init": "checkpoint",
    "init_checkpoint": "mfn_s_arc_masks",
    "stage": "triplet",
    "arc_weight": 0.0,
    "sampler": "pk",
    "pair_mse_weight": 10.0,
    "triplet_margin": 0.2,
    "steps": 1500,
    "lr": 0.001,
    "weight_decay": 0.0,
})
