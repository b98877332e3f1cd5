"""A compact student: the teacher's network at 112 px, squared-error KD to the teacher's clean template
(masked or clean view, p=0.5)."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import DLIB112_FROM_TEACHER

config = TrainConfig(**{
    **DLIB112_FROM_TEACHER,
    "name": "dlib112_sqkd",
    "arc_weight": 0.0,
    "mse_weight": 100.0,
    "head_warmup_steps": 0,
})
