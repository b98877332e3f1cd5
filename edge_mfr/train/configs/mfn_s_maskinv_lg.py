"""MaskInv-LG for mfn_s from scratch: ElasticFace-Arc + fixed lambda x MSE, p=0.5."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import MFN_S_FROM_SCRATCH

config = TrainConfig(**{
    **MFN_S_FROM_SCRATCH,
    "name": "mfn_s_maskinv_lg",
    "mse_weight": 100.0,
})
