"""A compact student: the teacher's network at 112 px, MaskInv-LG (ElasticFace-Arc + fixed lambda x MSE to the
teacher's clean template, p=0.5)."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import DLIB112_FROM_TEACHER

config = TrainConfig(**{
    **DLIB112_FROM_TEACHER,
    "name": "dlib112_maskinv_lg",
    "mse_weight": 100.0,
})
