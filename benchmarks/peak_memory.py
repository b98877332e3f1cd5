"""Peak memory (max RSS) of `edge-mfr verify` on a 12000x12000 JPEG and of `edge-mfr enroll` with 1 and 8 of them.

Each command runs in a fresh child process; its peak resident set size comes from the kernel (wait4's
ru_maxrss), so it includes the interpreter, ONNX Runtime and the model. The same commands on the 640x512
demo photos run in the same session as the peer: the difference is what the large images cost.

The 12000x12000 images are real faces: the demo photos (public domain) upscaled and saved as baseline
JPEG (quality 90), one face per image.

Run:   OMP_NUM_THREADS=1 python benchmarks/peak_memory.py [--tree PATH] [--workdir DIR]
--tree measures another checkout of the source (for example the commit before a change, made with
`git worktree add /tmp/before COMMIT`); the compiled extension is taken from the installed package.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "edge_mfr" / "demo_data"
SIDE = 12000
PASSPHRASE = "peak memory benchmark passphrase"

# Runs the CLI from `tree`, bypassing the editable install's import redirect (which points at this repo).
LAUNCHER = """
import sys
tree = sys.argv.pop(1)
sys.meta_path = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable")]
sys.path.insert(0, tree)
import edge_mfr
assert edge_mfr.__file__.startswith(tree), edge_mfr.__file__
from edge_mfr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def native_extension_for(tree: Path) -> None:
    """A bare checkout has no compiled extension: link the installed one into it."""
    from importlib.util import find_spec

    native = find_spec("edge_mfr._native").origin
    target = tree / "edge_mfr" / Path(native).name
    if not target.exists():
        target.symlink_to(native)


def make_large_jpegs(workdir: Path) -> list[Path]:
    import cv2

    photos = sorted(DEMO.glob("person_a_*.jpg"))
    paths = []
    for index in range(8):
        image = cv2.imread(str(photos[index % len(photos)]))
        if index >= len(photos):
            image = cv2.flip(image, 1)  # a different capture of the same face
        if index >= 2 * len(photos):
            image = cv2.GaussianBlur(image, (3, 3), 0)
        scale = SIDE / max(image.shape[:2])
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        canvas = cv2.copyMakeBorder(image, 0, SIDE - image.shape[0], 0, SIDE - image.shape[1],
                                    cv2.BORDER_REPLICATE)
        path = workdir / f"large_{index}.jpg"
        cv2.imwrite(str(path), canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    # The same image with one fill byte (0xFF, legal before any marker: ITU-T T.81 B.1.1.2) after SOI.
    data = paths[2].read_bytes()
    (workdir / "large_fill_byte.jpg").write_bytes(data[:2] + b"\xff" + data[2:])
    return paths


def measure(tree: Path, args: list[str]) -> tuple[int, float, float, str]:
    """(exit code, peak RSS in MiB, wall seconds, last stderr line) of one CLI run in a fresh process."""
    env = dict(os.environ, EDGE_MFR_PASSPHRASE=PASSPHRASE, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tree), *args],
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        lines = stderr.read().decode(errors="replace").strip().splitlines()
    return process.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start, (lines[-1] if lines else "")


def parent_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=REPO, help="source tree to measure (default: this one)")
    parser.add_argument("--workdir", type=Path, help="where to write the images and galleries (default: a temp dir)")
    parser.add_argument("--make-images", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_images:
        make_large_jpegs(args.make_images)
        return 0
    tree = args.tree.resolve()
    if tree != REPO:
        native_extension_for(tree)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        # In a child: the parent must stay small, because a child's peak RSS counts its parent's memory
        # at the time of the fork (the kernel keeps the high-water mark across exec).
        subprocess.run([sys.executable, __file__, "--make-images", str(workdir)], check=True)
        large = [workdir / f"large_{index}.jpg" for index in range(8)]
        small = sorted(str(p) for p in DEMO.glob("person_a_*.jpg"))
        gallery = str(workdir / "bench.emfr")
        common = ["--gallery", gallery, "--threads", "1"]
        runs = [
            ("enroll, 2 demo photos 640x512 (peer)", ["enroll", *common, "--user", "alice", *small[:2]]),
            ("verify, demo photo 640x512 (peer)", ["verify", *common, "--user", "alice", small[2]]),
            (f"verify, {SIDE}x{SIDE} JPEG", ["verify", *common, "--user", "alice", str(large[2])]),
            (f"verify, {SIDE}x{SIDE} JPEG, fill byte", ["verify", *common, "--user", "alice",
                                                        str(workdir / "large_fill_byte.jpg")]),
            # One image, then eight: the difference is what each further image costs.
            (f"enroll, 1 x {SIDE}x{SIDE} JPEG", ["enroll", *common, "--user", "carol", str(large[0])]),
            (f"enroll, 8 x {SIDE}x{SIDE} JPEG", ["enroll", *common, "--user", "bob", *map(str, large)]),
        ]
        git = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "edge_mfr"],
                               capture_output=True, text=True).stdout.strip()
        print(f"tree {tree} at {git.stdout.strip() or '?'}{' + uncommitted changes' if dirty else ''}; "
              f"python {sys.version.split()[0]}; parent RSS {parent_rss_mib():.1f} MiB")
        print(f"{'command':42s} {'exit':>4s} {'peak RSS MiB':>12s} {'wall s':>7s}")
        for label, argv in runs:
            code, peak_mib, wall, last = measure(tree, argv)
            print(f"{label:42s} {code:4d} {peak_mib:12.1f} {wall:7.1f}" + (f"   ({last})" if code == 2 else ""),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
