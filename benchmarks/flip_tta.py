"""Does embedding each face together with its mirror image help the unlock? Test-time flipping
(`ModelPackage.test_time_flip`, `edge-mfr models test-time-flip`) averages the network's embeddings of the aligned
face and of its horizontal mirror, before any masked-route map (twice the network's work per face). This runs the
unlock calibration of `edge-mfr calibrate` (celeba_test `calib`, enrollment with synthetic masked copies, masked
probes detected afresh) on two copies of a package, one with test-time flipping off and one with it on, and prints
FNMR per route and per drawn variant (people with and without a mask, whichever route the gate sent them to)
at the package's aggregation, each setting with its own thresholds.

    OMP_NUM_THREADS=1 python benchmarks/flip_tta.py [--model dlib_resnet_v1_masked_route]

About 4 minutes of one core per model.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.eval.calibrate import read_labelled_images  # noqa: E402
from edge_mfr.eval.unlock_calibration import calibrate_unlock  # noqa: E402
from edge_mfr.models.package import load_package  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def copy_with_flip(package, folder: Path, enabled: bool):
    folder.mkdir(parents=True)
    for path in package.files:
        shutil.copyfile(path, folder / path.name)
    return load_package(folder / package.onnx_path.name).with_test_time_flip(enabled)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dlib_resnet_v1_masked_route")
    args = parser.parse_args()
    package = load_package(args.model)
    calib = DATA / "celeba_test"
    images = read_labelled_images(calib / "images", calib / "identities.txt", split="calib")
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, enabled in (("off", False), ("on", True)):
            copy = copy_with_flip(package, Path(scratch) / label.replace(" ", "_"), enabled)
            result = calibrate_unlock(copy, images, calib / "images", split="calib", threads=1, progress=False)
            rows[label] = result["calibration"]["evidence"][package.aggregation]
    print(f"{package.name} ({package.fingerprint[:12]}), aggregation {package.aggregation}, celeba_test calib\n")
    columns = [("route unmasked", "0.001"), ("route unmasked", "0.0001"), ("route masked", "0.001"),
               ("route masked", "0.0001"), ("route masked", "1e-05"), ("drawn unmasked", "0.0001"),
               ("drawn masked", "0.0001")]
    names = {"route unmasked": "unmasked route", "route masked": "masked route", "drawn unmasked": "people without a mask",
             "drawn masked": "people with a mask"}
    print("| test-time flip | " + " | ".join(f"{names[key]} at FMR {t}" for key, t in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for label, evidence in rows.items():
        print(f"| {label} | " + " | ".join(f"{100 * evidence[t][key]['fnmr']:.1f}%" for key, t in columns) + " |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
