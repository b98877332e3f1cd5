"""lambda = 0: ElasticFace-Arc with mask augmentation only (also stage 1 of the triplet recipe)."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import MFN_S_FROM_SCRATCH

config = TrainConfig(**{
    **MFN_S_FROM_SCRATCH,
    "name": "mfn_s_arc_masks",
    "mse_weight": 0.0,
})
