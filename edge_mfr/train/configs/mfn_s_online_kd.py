"""MobileFaceNet-S by squared-error KD to the teacher run on every training view ("patient and consistent"
distillation): scene changes and blends of two faces make each step's views new points of the teacher's function,
where the cached targets of 15.9k crops let a student memorise them (stop 24's KD stopped generalising at about
112,000 views). Standardized target, masks p = 0.5; no identity loss (a blend has no identity)."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import MFN_S_FROM_SCRATCH

config = TrainConfig(**{
    **MFN_S_FROM_SCRATCH,
    "name": "mfn_s_online_kd",
    "arc_weight": 0.0,
    "mse_weight": 100.0,
    "kd_target": "standardized",
    "teacher_views": "online",
    "scene_augment": True,
    "mix_probability": 0.5,
})
