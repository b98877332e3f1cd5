"""The bundled student's network with lambda = 0: ElasticFace-Arc with mask augmentation only, the same budget."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs.dlib23_maskinv_lg import config as dlib23_maskinv_lg

config = TrainConfig(**{**dlib23_maskinv_lg.to_dict(), "name": "dlib23_arc_masks", "mse_weight": 0.0})
