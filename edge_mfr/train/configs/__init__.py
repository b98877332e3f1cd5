"""Training run configs: one module per run, each defining `config = TrainConfig(...)`.

dlib_*: the teacher's own network initialised from the imported teacher (issue: a mask-invariant default model).
dlib112_*: the same network at 112 px, a compact student initialised from the teacher.
mfn_s_*: MobileFaceNet students from scratch (the edge models). The same compute budget within each family.
"""
