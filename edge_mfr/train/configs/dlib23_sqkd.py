"""`dlib17_sqkd`'s recipe with a milder cut: the teacher's network without the three shape-keeping residual units
whose removal costs the least (0.214 GMACs at 150 px, 79% of the teacher's)."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs.dlib17_sqkd import config as dlib17_sqkd

config = TrainConfig(**{**dlib17_sqkd.to_dict(), "name": "dlib23_sqkd", "drop_units": (8, 9, 12)})
