"""MaskInv-HG for mfn_s: lambda raised once the classification loss is stable."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import MFN_S_FROM_SCRATCH

config = TrainConfig(**{
    **MFN_S_FROM_SCRATCH,
    "name": "mfn_s_maskinv_hg",
    "mse_weight": 100.0,
    "mse_schedule": "hard",
    "mse_weight_high": 3000.0,
    "hard_after_steps": 500,
})
