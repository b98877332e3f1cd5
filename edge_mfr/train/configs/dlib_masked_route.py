"""The network of a two-network package's masked route: MaskInv-LG (ElasticFace-Arc + 100 x MSE to the teacher's
clean template) on the teacher's network, selected on the masked route of an unlock simulated on the hold-out
(masked probes against the teacher's clean templates and the network's masked ones).

Sized for the 2-core CPU (about 10 minutes on two threads): a run of 2,500 steps at this rate drifted from the
teacher's space and refused more masked people than the teacher (docs/training.md, section 5); the
masked-route selection is what keeps such a step out of best.pt.
"""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs._families import DLIB_FROM_TEACHER

config = TrainConfig(**{
    **DLIB_FROM_TEACHER,
    "name": "dlib_masked_route",
    "mse_weight": 100.0,
    "flip": False,
    "batch_size": 32,
    "steps": 1500,
    "warmup_steps": 50,
    "selection": "masked_route",
})
