"""The bundled student's network with MaskInv-HG: as `dlib23_maskinv_lg`, lambda raised from 100 to 3000 once the
ElasticFace-Arc loss has stopped improving (MaskInv's high-gain schedule), the same budget."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs.dlib23_maskinv_lg import config as dlib23_maskinv_lg

config = TrainConfig(**{
    **dlib23_maskinv_lg.to_dict(),
    "name": "dlib23_maskinv_hg",
    "mse_schedule": "hard",
    "mse_weight_high": 3000.0,
    "hard_after_steps": 300,
})
