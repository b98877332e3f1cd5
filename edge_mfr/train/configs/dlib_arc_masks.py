"""lambda = 0: ElasticFace-Arc with mask augmentation only."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import DLIB_FROM_TEACHER

config = TrainConfig(**{
    **DLIB_FROM_TEACHER,
    "name": "dlib_arc_masks",
    "mse_weight": 0.0,
})
