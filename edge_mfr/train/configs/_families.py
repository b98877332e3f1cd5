"""Settings shared by the configs of one family, so that recipes in a family differ only in their losses
(the same compute budget: steps x batch)."""

# The teacher's own network initialised from it: a low backbone rate (the notes in ../shared/notes measured how
# easily the whole network is knocked off its space) and a margin-head warm-up, so a random head does not push it.
DLIB_FROM_TEACHER = dict(arch="dlib_resnet", init="teacher", input_size=150, steps=3000, batch_size=256, lr=1e-5,
                         head_lr=1e-2, head_warmup_steps=300, warmup_steps=100, weight_decay=0.0, eval_every=250)
# The teacher's network at 112 px (the pool's crops as they are, no upscaling): about half its multiply-adds at
# 150 px, initialised from the teacher, which has to relearn its space at the lower resolution first. Sized for
# this 2-core machine (one thread per run, about an hour); the GPU budget raises `steps` and `batch_size`.
DLIB112_FROM_TEACHER = dict(DLIB_FROM_TEACHER, input_size=112, steps=4000, batch_size=32, lr=3e-5, warmup_steps=50,
                            eval_every=500)
# MobileFaceNet-S from scratch on the pool's 112 px crops.
MFN_S_FROM_SCRATCH = dict(arch="mfn_s", init="scratch", input_size=112, steps=6000, batch_size=256, lr=2e-3,
                          head_lr=2e-3, warmup_steps=200, weight_decay=5e-4, eval_every=500)
