"""Whole-unlock latency, per stage and end to end, on 640x480 frames with one face (the same run as
`edge-mfr bench`, which device teams run on their hardware; docs/bench.md explains the numbers).

Run, e.g. the comparison in docs/bench.md (40 LFW faces, one thread, three detectors and face_recognition):
    OMP_NUM_THREADS=1 python benchmarks/bench_unlock.py --images DIR --detector yunet --detector mtcnn \
        --detector mtcnn-fast --compare face_recognition --iterations 120 --json out.json --plot out.png
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
