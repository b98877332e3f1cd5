"""The earlier cosine-KD objective: 1 - cos to the teacher's clean template, no identity loss."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import MFN_S_FROM_SCRATCH

config = TrainConfig(**{
    **MFN_S_FROM_SCRATCH,
    "name": "mfn_s_cosine_kd",
    "arc_weight": 0.0,
    "cosine_weight": 1.0,
})
