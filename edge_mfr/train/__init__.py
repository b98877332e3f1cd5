"""Training mask-invariant face embedders: the teacher's own network fine-tuned, or MobileFaceNet students,
with the MaskInv recipes and their ablations (docs/training.md).

    python -m edge_mfr.train prepare --out runs/pool_celeba.npz          # align, compress, mask layers
    python -m edge_mfr.train fit dlib_maskinv_lg [key=value ...]           # train one config (--resume)
    python -m edge_mfr.train export runs/train/dlib_maskinv_lg/best.pt --out model.onnx
    python -m edge_mfr.train route-map --model dlib_resnet_v1 --out routed.onnx --name routed

Training data: celeba299, glint24 and celeba_test split train only; LFW and celeba_test calib are never read here.
"""
