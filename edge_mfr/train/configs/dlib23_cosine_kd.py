"""The bundled student's network with the earlier cosine-KD objective: 1 - cos to the teacher's clean template,
masks p = 0.5, no identity loss, the same budget as `dlib23_sqkd` (which regresses the raw descriptors instead)."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs.dlib23_sqkd import config as dlib23_sqkd

config = TrainConfig(**{**dlib23_sqkd.to_dict(), "name": "dlib23_cosine_kd", "mse_weight": 0.0, "cosine_weight": 1.0})
