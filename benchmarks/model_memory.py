"""Peak resident memory of an unlock process per model package: `FaceUnlock` loaded (detector and every graph
of the package), one demo face embedded on each route. Each package runs in a fresh child process; its
peak RSS comes from the kernel (ru_maxrss), so it includes the interpreter, ONNX Runtime and the models.

    OMP_NUM_THREADS=1 python benchmarks/model_memory.py dlib_resnet_v1 dlib_resnet_v1_masked_route
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "edge_mfr" / "demo_data" / "person_a_1.jpg"
CHILD = """
import resource, sys
from edge_mfr.io import load_image
from edge_mfr.unlock import FaceUnlock
unlock = FaceUnlock(sys.argv[1], threads=1)
image = load_image(sys.argv[2])
face = max(unlock.detector.detect(image), key=lambda d: d.area)
batch = unlock.embedder.preprocess(image, face.landmarks[None])
for route in ("unmasked", "masked"):
    unlock.embedder.embed_batch(batch, route)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="+", help="package paths or bundled names")
    args = parser.parse_args()
    print("| package | peak RSS (MiB) |\n|---|---|")
    for package in args.packages:
        out = subprocess.run([sys.executable, "-c", CHILD, package, str(DEMO)], capture_output=True, text=True,
                             check=True)
        print(f"| {package} | {float(out.stdout.strip().splitlines()[-1]):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
