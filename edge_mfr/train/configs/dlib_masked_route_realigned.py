"""The masked-route network's recipe (dlib_masked_route) with its masked views moved as an unlock's re-detection
moves them: the points found on a masked photo align the face differently from the clean photo's points, by a
median 1.6% of the chip side, 5.4% of scale and 2.2 degrees (and a bias: 3.4% larger), while the clean
templates it must meet come from clean points. Measured on 2,000 celeba_test `train` photos with the default
detector, template and NIST masks:

    OMP_NUM_THREADS=1 python benchmarks/masked_alignment_error.py --faces 2000
"""
from edge_mfr.train.config import TrainConfig
from edge_mfr.train.configs.dlib_masked_route import config as masked_route

# mean, then standard deviation, of shift x, shift y (fractions of the side), log-scale, angle (degrees)
MEASURED_MASKED_ALIGNMENT = (-0.0113, 0.0097, 0.0342, 0.48, 0.0339, 0.0308, 0.0790, 3.84)

config = TrainConfig(**{**masked_route.to_dict(), "name": "dlib_masked_route_realigned",
                        "masked_view_alignment": MEASURED_MASKED_ALIGNMENT})
