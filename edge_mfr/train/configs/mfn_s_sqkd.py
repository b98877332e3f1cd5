"""MobileFaceNet-S from scratch with squared-error KD only: regress the teacher's clean templates (raw descriptors)
from masked (p = 0.5) and clean views, no identity loss. The dense 128-d target is the signal that taught the
teacher-initialised students; here it is asked to build the network from nothing."""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import MFN_S_FROM_SCRATCH

config = TrainConfig(**{**MFN_S_FROM_SCRATCH, "name": "mfn_s_sqkd", "arc_weight": 0.0, "mse_weight": 100.0})
