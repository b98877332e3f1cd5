"""Training run configs: one module per run, each defining `config = TrainConfig(...)`.

dlib_*: the teacher's own network initialised from the imported teacher (issue: a mask-invariant default model).
mfn_s_*: MobileFaceNet students from scratch (the edge models). The same compute budget within each family.
"""
