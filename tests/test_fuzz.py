"""Mutation fuzzing of real image files and a real gallery file, through the Python API and the CLI.

Seeds: the demo photos re-encoded as JPEG (baseline and progressive), PNG and WebP (lossy and lossless),
and a gallery enrolled from a demo photo. Each case is a seed with random mutations (bit flips, random
bytes, header fields set to boundary values, inserted fill bytes, deleted or duplicated spans,
truncation). Every case must end in a result or a refusal the SDK raises on purpose (InputError,
GalleryError), every CLI run in exit code 0, 1 or 2 with no traceback, all inside an address-space limit.

CI runs a short fuzz campaign (test below, well under a minute). A longer campaign, same code:

    OMP_NUM_THREADS=1 python tests/test_fuzz.py --images 20000 --galleries 5000 --cli 200 --seed 1

prints the counts as JSON (see docs/security.md for a recorded run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "edge_mfr" / "demo_data"
PASSPHRASE = "correct horse battery staple"
MEMORY_LIMIT_MIB = 1536
BOUNDARY_VALUES = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff", b"\x00\x00", b"\xff\xff\xff\xff",
                   b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00", b"\x3f\xff")


def image_seeds() -> dict[str, bytes]:
    import cv2

    seeds = {}
    for path in sorted(DEMO.glob("person_*.jpg"))[:3]:
        image = cv2.imread(str(path))
        small = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2))
        seeds[f"{path.stem}.jpg"] = path.read_bytes()
        seeds[f"{path.stem}.progressive.jpg"] = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
        seeds[f"{path.stem}.png"] = cv2.imencode(".png", small)[1].tobytes()
        seeds[f"{path.stem}.webp"] = cv2.imencode(".webp", small, [cv2.IMWRITE_WEBP_QUALITY, 60])[1].tobytes()
        seeds[f"{path.stem}.lossless.webp"] = cv2.imencode(".webp", small[:64, :64], [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()
    return seeds


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1 to 4 random mutations, biased towards the header where sizes and lengths live."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not out:
            out = bytearray(b"\xff")
        head = min(len(out), 512)
        position = rng.randrange(head) if rng.random() < 0.7 else rng.randrange(len(out))
        kind = rng.randrange(7)
        if kind == 0:
            out[position] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[position] = rng.randrange(256)
        elif kind == 2:
            value = rng.choice(BOUNDARY_VALUES)
            out[position:position + len(value)] = value
        elif kind == 3:
            out[position:position] = b"\xff" * rng.randint(1, 3)
        elif kind == 4:
            del out[position:position + rng.randint(1, 64)]
        elif kind == 5:
            span = bytes(out[position:position + rng.randint(1, 256)])
            out[position:position] = span
        else:
            out = out[:rng.randrange(len(out) + 1)]
    return bytes(out)


def fuzz_images(seeds: dict[str, bytes], count: int, rng: random.Random) -> Counter:
    from edge_mfr.errors import InputError
    from edge_mfr.io import MAX_PIXELS, decode_image

    outcomes = Counter()
    names = sorted(seeds)
    for _ in range(count):
        name = rng.choice(names)
        data = mutate(seeds[name], rng)
        try:
            image = decode_image(data, name)
        except InputError:
            outcomes["refused"] += 1
            continue
        assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[0] * image.shape[1] <= MAX_PIXELS
        outcomes["decoded"] += 1
    return outcomes


def make_gallery(directory: Path) -> Path:
    """A real gallery: the demo person enrolled with real embeddings, passphrase-protected at full scrypt cost."""
    from edge_mfr.cli import main

    path = directory / "seed.emfr"
    os.environ["EDGE_MFR_PASSPHRASE"] = PASSPHRASE
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["enroll", "--gallery", str(path), "--user", "alice", str(DEMO / "person_a_1.jpg"),
                     "--threads", "1"]) == 0
    return path


def fuzz_galleries(seed_gallery: Path, count: int, rng: random.Random, directory: Path) -> Counter:
    from edge_mfr.errors import EdgeMfrError
    from edge_mfr.gallery import Gallery

    outcomes = Counter()
    original = seed_gallery.read_bytes()
    target = directory / "mutated.emfr"
    for _ in range(count):
        target.write_bytes(mutate(original, rng))
        try:
            gallery = Gallery.open(target, passphrase=PASSPHRASE)
        except EdgeMfrError:
            outcomes["refused"] += 1
            continue
        gallery.users()
        outcomes["opened"] += 1
    return outcomes


def fuzz_cli(seeds: dict[str, bytes], seed_gallery: Path, count: int, rng: random.Random, directory: Path) -> Counter:
    """`main()` in this process: verify on a mutated image, or `gallery list` on a mutated gallery."""
    from edge_mfr.cli import main

    outcomes = Counter()
    names = sorted(seeds)
    original = seed_gallery.read_bytes()
    os.environ["EDGE_MFR_PASSPHRASE"] = PASSPHRASE
    for index in range(count):
        stderr = io.StringIO()
        if index % 2 == 0:
            name = rng.choice(names)
            probe = directory / f"probe{Path(name).suffix}"
            probe.write_bytes(mutate(seeds[name], rng))
            argv = ["verify", "--gallery", str(seed_gallery), "--user", "alice", str(probe), "--threads", "1"]
        else:
            mutated = directory / "cli.emfr"
            mutated.write_bytes(mutate(original, rng))
            argv = ["gallery", "list", "--gallery", str(mutated)]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            code = main(argv)
        assert code in (0, 1, 2), (argv, code)
        assert "Traceback" not in stderr.getvalue(), stderr.getvalue()
        if code == 2:
            assert len(stderr.getvalue().strip().splitlines()) == 1, stderr.getvalue()
        outcomes[f"{argv[0]}:exit{code}"] += 1
    assert seed_gallery.read_bytes() == original
    return outcomes


def campaign(images: int, galleries: int, cli: int, seed: int) -> dict:
    rng = random.Random(seed)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        seeds = image_seeds()
        seed_gallery = make_gallery(directory)
        result = {
            "seed": seed,
            "image_seeds": len(seeds),
            "images": dict(fuzz_images(seeds, images, rng)),
            "galleries": dict(fuzz_galleries(seed_gallery, galleries, rng, directory)),
            "cli": dict(fuzz_cli(seeds, seed_gallery, cli, rng, directory)),
        }
    result["seconds"] = round(time.monotonic() - start, 1)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["address_space_limit_mib"] = resource.getrlimit(resource.RLIMIT_AS)[0] >> 20
    return result


def run_campaign(images: int, galleries: int, cli: int, seed: int, timeout: float) -> dict:
    """The campaign in a child process under the address-space limit; its JSON result."""
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_MIB << 20, MEMORY_LIMIT_MIB << 20))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, __file__, "--images", str(images), "--galleries", str(galleries),
                             "--cli", str(cli), "--seed", str(seed)], preexec_fn=limit_memory, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fuzz_images_galleries_and_cli(model_package):
    counts = run_campaign(images=500, galleries=100, cli=12, seed=12, timeout=120)
    assert sum(counts["images"].values()) == 500 and counts["images"].get("refused", 0) > 0
    assert sum(counts["galleries"].values()) == 100 and counts["galleries"].get("refused", 0) > 0
    assert sum(counts["cli"].values()) == 12


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--galleries", type=int, default=100)
    parser.add_argument("--cli", type=int, default=12)
    parser.add_argument("--seed", type=int, default=12)
    arguments = parser.parse_args()
    if resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_MIB << 20, MEMORY_LIMIT_MIB << 20))
    print(json.dumps(campaign(arguments.images, arguments.galleries, arguments.cli, arguments.seed)))
