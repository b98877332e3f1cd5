"""MaskInv-HG: as LG, lambda raised once the classification loss is stable."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import DLIB_FROM_TEACHER

config = TrainConfig(**{
    **DLIB_FROM_TEACHER,
    "name": "dlib_maskinv_hg",
    "mse_weight": 100.0,
    "mse_schedule": "hard",
    "mse_weight_high": 3000.0,
    "hard_after_steps": 300,
})
