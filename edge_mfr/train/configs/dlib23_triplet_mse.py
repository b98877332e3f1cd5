"""'My eyes are up here' on the bundled student's network. Stage 1, classification pre-training with masks, is
`dlib23_arc_masks`; this is stage 2: a new embedding layer on its frozen network, batch-hard triplet (margin 0.2)
+ MSE between the masked and unmasked embeddings of the same face, P x K batches of 32."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs.dlib23_arc_masks import config as dlib23_arc_masks

config = TrainConfig(**{
    **dlib23_arc_masks.to_dict(),
    "name": "dlib23_triplet_mse",
    "init": "checkpoint",
    "init_checkpoint": "dlib23_arc_masks",
    "stage": "triplet",
    "arc_weight": 0.0,
    "mse_weight": 0.0,
    "sampler": "pk",
    "pair_mse_weight": 10.0,
    "triplet_margin": 0.2,
    "steps": 1500,
    "lr": 1e-3,
    "head_warmup_steps": 0,
    "weight_decay": 0.0,
})
