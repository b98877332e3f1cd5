"""The bundled student's network (the teacher without residual units 8, 9, 12) with MaskInv-LG instead of
squared-error KD: ElasticFace-Arc + fixed lambda x MSE to the teacher's clean template, p = 0.5, the same budget."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import DLIB112_FROM_TEACHER

config = TrainConfig(**{
    **DLIB112_FROM_TEACHER,
    "name": "dlib23_maskinv_lg",
    "input_size": 150,
    "drop_units": (8, 9, 12),
    "mse_weight": 100.0,
})
