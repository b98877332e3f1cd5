"""lambda = 0: ElasticFace-Arc with mask augmentation only."""
from edge_mfr.train.config import TrainConfig

config = TrainConfig(
    name='dlib_arc_masks',
    arch='dlib_resnet',
    init='teacher',
    input_size=150,
    steps=3000,
    batch_size=256,
    lr=1e-05,
    head_lr=0.01,
    head_warmup_steps=300,
    warmup_steps=100,
    weight_decay=0.0,
    eval_every=250,
    mse_weight=0.0,
)
