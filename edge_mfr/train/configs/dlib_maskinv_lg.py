"""MaskInv-LG: ElasticFace-Arc + fixed lambda x MSE to the teacher's clean template, p=0.5."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import DLIB_FROM_TEACHER

config = TrainConfig(**{
    **DLIB_FROM_TEACHER,
    "name": "dlib_maskinv_lg",
    "mse_weight": 100.0,
})
