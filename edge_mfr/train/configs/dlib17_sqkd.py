"""A compact student that keeps the teacher's resolution and loses depth: the teacher's network without six of its
ten shape-keeping residual units (0.151 GMACs at 150 px, the same as `dlib112_sqkd` at 112 px), initialised from
the teacher, squared-error KD to the teacher's clean templates with masks (p = 0.5). Which six: those whose
removal cost the least hold-out TPR together (docs/training.md, section 6)."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import DLIB112_FROM_TEACHER

config = TrainConfig(**{
    **DLIB112_FROM_TEACHER,
    "name": "dlib17_sqkd",
    "input_size": 150,
    "drop_units": (1, 5, 8, 9, 11, 12),
    "arc_weight": 0.0,
    "mse_weight": 100.0,
    "head_warmup_steps": 0,
})
