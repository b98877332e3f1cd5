"""`dlib17_sqkd`'s network (six residual units fewer, 0.151 GMACs) with lambda = 0: ElasticFace-Arc with mask
augmentation only and the family's margin-head warm-up, the same budget; the other end of an interpolation with
`dlib17_sqkd` (`python -m edge_mfr.train interpolate`)."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs.dlib23_arc_masks import config as dlib23_arc_masks

config = TrainConfig(**{**dlib23_arc_masks.to_dict(), "name": "dlib17_arc_masks", "drop_units": (1, 5, 8, 9, 11, 12)})
