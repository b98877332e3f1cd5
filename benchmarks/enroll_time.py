"""Enrollment latency by the synthetic masks it draws: `FaceUnlock.enroll` of the bundled demo photos of one person
(each capture detected, gated, embedded, then one masked copy per mask type drawn and embedded on the masked route),
repeated, for each set of enrollment mask types. Captures are decoded once, outside the timing.

    OMP_NUM_THREADS=1 python benchmarks/enroll_time.py [--model NAME] [--repeats 10] \
        [--set surgical,kn95,cloth] [--set surgical,nist_a,nist_b,nist_c,nist_d,nist_e,nist_f]

Without --set: the types in use (`unlock.SYNTHETIC_MASK_TYPES`) and none.
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mfr.io import load_image  # noqa: E402
from edge_mfr.masks import MASK_TYPES  # noqa: E402
from edge_mfr.unlock import SYNTHETIC_MASK_TYPES, FaceUnlock, synthesize_masked_copies  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "edge_mfr" / "demo_data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--set", action="append", dest="sets", help="comma-separated mask types ('' for none)")
    args = parser.parse_args()
    sets = [tuple(t for t in s.split(",") if t) for s in args.sets] if args.sets else [SYNTHETIC_MASK_TYPES, ()]
    unknown = sorted({t for types in sets for t in types} - set(MASK_TYPES))
    if unknown:
        parser.error(f"unknown mask types {unknown}; valid: {', '.join(MASK_TYPES)}")
    captures = [(p.name, load_image(p)) for p in sorted(DEMO.glob("person_a_*.jpg"))]
    print(f"{len(captures)} captures ({captures[0][1].shape[1]}x{captures[0][1].shape[0]}), {args.repeats} repeats\n")
    print("| enrollment masks | templates stored | enroll p50 | per capture |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for k, types in enumerate(sets):
            synthesizer = functools.partial(synthesize_masked_copies, mask_types=types) if types else None
            unlock = FaceUnlock(model=args.model, gallery=Path(tmp) / f"{k}.emfr", passphrase="benchmark passphrase",
                                mask_synthesizer=synthesizer, threads=1)
            unlock.enroll("warm-up", captures)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                report = unlock.enroll("alice", captures, replace=True)
                times.append(time.perf_counter() - start)
            p50 = float(np.median(times))
            print(f"| {', '.join(types) or 'none'} | {report.templates} | {1000 * p50:.0f} ms | "
                  f"{1000 * p50 / len(captures):.0f} ms |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
