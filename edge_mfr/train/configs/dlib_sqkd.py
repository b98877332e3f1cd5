"""Squared-error KD only: student (masked or clean view) -> teacher's raw clean template."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import DLIB_FROM_TEACHER

config = TrainConfig(**{
    **DLIB_FROM_TEACHER,
    "name": "dlib_sqkd",
    "arc_weight": 0.0,
    "mse_weight": 100.0,
    "head_warmup_steps": 0,
})
