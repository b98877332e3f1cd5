"""Hostile files and resource limits: every case ends in exit 2 with one line, no traceback, gallery untouched.

The CLI runs in child processes under an address-space limit (resource.setrlimit(RLIMIT_AS)), so an
unbounded read or decode shows up as a failure here instead of as a machine running out of memory.
The limits sit above what the normal commands need on this machine (about 420 MiB for `gallery list`,
700 MiB for `verify` with the model loaded) and below what the attacks cost before the fixes.
"""

import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_mfr.errors import GalleryError, InputError
from edge_mfr.gallery import HEADER_SIZE, FileRollbackCounter, Gallery, ScryptParams
from edge_mfr.io import decode_image, load_image

DEMO = Path(__file__).resolve().parents[1] / "edge_mfr" / "demo_data"
PASSPHRASE = "correct horse battery staple"
GALLERY_LIMIT_MIB = 768
VERIFY_LIMIT_MIB = 1024


def run_cli(args, limit_mib, cwd, timeout=60, env=None, prefix=()):
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit_mib << 20, limit_mib << 20))

    environment = {**os.environ, "EDGE_MFR_PASSPHRASE": PASSPHRASE, "OMP_NUM_THREADS": "1", **(env or {})}
    environment.pop("EDGE_MFR_TRACEBACK", None)
    return subprocess.run([*prefix, sys.executable, "-m", "edge_mfr", *map(str, args)], preexec_fn=limit_memory, cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=timeout)


def assert_clean_error(result, pattern):
    """Exit 2, exactly one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert pattern.lower() in lines[0].lower(), lines[0]


def snapshot(directory):
    """Names, types, sizes and content hashes of everything in a directory (not following links)."""
    state = {}
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        info = os.lstat(path)
        digest = None
        if os.path.isfile(path) and not os.path.islink(path) and info.st_size < 50_000_000:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        state[entry] = (info.st_mode, info.st_size, digest, os.readlink(path) if os.path.islink(path) else None)
    return state


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory, model_package):
    """A real gallery with alice enrolled from a demo photo through the CLI."""
    directory = tmp_path_factory.mktemp("enrolled")
    gallery = directory / "g.emfr"
    result = run_cli(["enroll", "--gallery", gallery, "--user", "alice", DEMO / "person_a_1.jpg", "--threads", "1"],
                     4096, directory)
    assert result.returncode == 0, result.stderr
    return gallery


# ---- gallery reads ------------------------------------------------------------------------------------


def test_sparse_file_as_gallery_is_refused_without_reading_it(tmp_path):
    sparse = tmp_path / "sparse.emfr"
    with open(sparse, "wb") as handle:
        handle.truncate(2 << 30)  # 2 GiB of holes: the old code read it whole before "bad magic"
    before = snapshot(tmp_path)
    result = run_cli(["gallery", "list", "--gallery", sparse], GALLERY_LIMIT_MIB, tmp_path)
    assert_clean_error(result, "not an edge-mfr gallery")

    # a valid header declaring a 2 GiB ciphertext is refused before the rest is read
    header = b"EMFRGAL" + struct.pack("<BBBII16s12sQ32s", 1, 1, 15, 8, 1, bytes(16), bytes(12), 2 << 30, bytes(32))
    with open(sparse, "r+b") as handle:
        handle.write(header)
    before = snapshot(tmp_path)
    result = run_cli(["gallery", "list", "--gallery", sparse], GALLERY_LIMIT_MIB, tmp_path)
    assert_clean_error(result, "above the 64 MiB limit")
    assert snapshot(tmp_path) == before


def test_fifo_and_device_as_gallery_fail_at_once(tmp_path):
    fifo = tmp_path / "fifo.emfr"
    os.mkfifo(fifo)
    before = snapshot(tmp_path)
    start = time.monotonic()
    result = run_cli(["gallery", "list", "--gallery", fifo], GALLERY_LIMIT_MIB, tmp_path, timeout=30)
    assert_clean_error(result, "not a regular file")
    assert time.monotonic() - start < 20  # the old code blocked forever opening the FIFO
    assert snapshot(tmp_path) == before  # still a FIFO, and no lock file beside it

    result = run_cli(["gallery", "list", "--gallery", "/dev/zero"], GALLERY_LIMIT_MIB, tmp_path)
    assert_clean_error(result, "not a regular file")
    assert not os.path.exists("/dev/zero.lock")
    with pytest.raises(GalleryError, match="not a regular file"):
        Gallery.open(fifo, passphrase=PASSPHRASE)


def test_key_file_that_is_a_device_or_fifo_is_refused(tmp_path):
    gallery = tmp_path / "k.emfr"
    key = Gallery.generate_key_file(tmp_path / "real.key")
    Gallery.create(gallery, "0" * 64, key_file=key)
    os.mkfifo(tmp_path / "fifo.key")
    for bad_key in ("/dev/zero", tmp_path / "fifo.key"):
        result = run_cli(["gallery", "list", "--gallery", gallery, "--key-file", bad_key], GALLERY_LIMIT_MIB,
                         tmp_path, timeout=30)
        assert_clean_error(result, "not a regular file")


def test_scrypt_parameters_in_a_tampered_header_are_bounded(enrolled, tmp_path):
    gallery = tmp_path / "g.emfr"
    shutil.copy(enrolled, gallery)
    data = bytearray(gallery.read_bytes())
    struct.pack_into("<BII", data, 9, 20, 8, 16)  # log2 N = 20, r = 8, p = 16: 1 GiB and ~35 s per open
    gallery.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    start = time.monotonic()
    result = run_cli(["gallery", "list", "--gallery", gallery], GALLERY_LIMIT_MIB, tmp_path)
    assert_clean_error(result, "unusable scrypt parameters")
    assert time.monotonic() - start < 10
    assert snapshot(tmp_path) == before
    with pytest.raises(InputError, match="power of two"):
        ScryptParams(n=2**18)


# ---- images ---------------------------------------------------------------------------------------------


def _jpeg_claiming(width, height, fill_byte=False, stray_byte=False, quality=90):
    """A real photo as baseline JPEG whose start-of-frame claims width x height (the scan stays small)."""
    data = bytearray(cv2.imencode(".jpg", cv2.imread(str(DEMO / "person_a_1.jpg")),
                                  [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    if stray_byte:
        data[sof:sof] = b"\x00"  # one stray byte before the marker: libjpeg skips it with a warning
    if fill_byte:
        data[sof:sof] = b"\xff"  # a fill byte, legal before any marker (ITU-T T.81 B.1.1.2)
    return bytes(data)


def _webp_with_canvas(width, height):
    """A real lossy WebP of a demo photo whose VP8 frame header claims a width x height canvas (~10 KB)."""
    data = bytearray(cv2.imencode(".webp", cv2.imread(str(DEMO / "person_c_1.jpg")),
                                  [cv2.IMWRITE_WEBP_QUALITY, 20])[1].tobytes())
    assert data[12:16] == b"VP8 "
    struct.pack_into("<HH", data, 26, width & 0x3FFF, height & 0x3FFF)
    return bytes(data)


def _deflate_tiff(width, height, rows_per_strip=1000):
    """A valid deflate-compressed greyscale TIFF: every strip is the same compressed block of zeros."""
    strips = -(-height // rows_per_strip)
    block = zlib.compress(bytes(width * rows_per_strip), 9)
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
               (273, 4, strips, None), (277, 3, 1, 1), (278, 4, 1, rows_per_strip), (279, 4, strips, None)]
    ifd_offset = 8
    arrays_offset = ifd_offset + 2 + 12 * len(entries) + 4
    data_offset = arrays_offset + 8 * strips
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        if tag == 273:
            value = arrays_offset
        elif tag == 279:
            value = arrays_offset + 4 * strips
        ifd += struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 and count == 1
                                                        else struct.pack("<I", value))
    arrays = struct.pack(f"<{strips}I", *([data_offset] * strips)) + struct.pack(f"<{strips}I", *([len(block)] * strips))
    return b"II*\x00" + struct.pack("<I", ifd_offset) + ifd + b"\x00" * 4 + arrays + block


CRAFTED = {
    "fill_byte_65000.jpg": (lambda: _jpeg_claiming(65000, 65000, fill_byte=True), "above the 200 MP limit"),
    "stray_byte_65000.jpg": (lambda: _jpeg_claiming(65000, 65000, stray_byte=True), "above the 200 MP limit"),
    "canvas_16383.webp": (lambda: _webp_with_canvas(16383, 16383), "16383x16383 WebP image is above the 50 MP"),
    "deflate_20000.tif": (lambda: _deflate_tiff(20000, 20000), "20000x20000 TIFF image is above the 50 MP"),
    "animation.gif": (lambda: b"GIF89a" + struct.pack("<HH", 65000, 65000) + bytes(64), "not a readable image"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_images_are_refused_from_their_header(name, enrolled, tmp_path):
    make, message = CRAFTED[name]
    image = tmp_path / name
    image.write_bytes(make())
    assert image.stat().st_size < 2_000_000  # small files, huge claims
    with pytest.raises(InputError, match=message.split(" is ")[0]):
        load_image(image)
    gallery_dir = enrolled.parent
    before = snapshot(gallery_dir)
    result = run_cli(["verify", "--gallery", enrolled, "--user", "alice", image, "--threads", "1"],
                     VERIFY_LIMIT_MIB, tmp_path)
    assert_clean_error(result, message)
    assert snapshot(gallery_dir) == before


def test_the_crafted_tiff_is_a_real_deflate_tiff():
    """The decoder accepts the hand-built TIFF at a size within the limit, so the refusal above is the limit's."""
    image = decode_image(_deflate_tiff(640, 480, rows_per_strip=100))
    assert image.shape == (480, 640, 3) and image.max() == 0


def test_fill_byte_no_longer_hides_the_size_of_a_large_jpeg(enrolled, tmp_path):
    """12000x12000 with a fill byte is decoded at 1/2 scale like without it, under the memory limit."""
    plain = decode_image(_jpeg_claiming(12000, 12000))
    filled = decode_image(_jpeg_claiming(12000, 12000, fill_byte=True))
    assert plain.shape == filled.shape == (6000, 6000, 3)
    with pytest.raises(InputError, match="above the 64 MP limit"):  # even 1/8 scale would not fit 1 MP
        decode_image(_jpeg_claiming(12000, 12000, fill_byte=True), max_pixels=1_000_000)
    image = tmp_path / "fill_byte_12000.jpg"
    image.write_bytes(_jpeg_claiming(12000, 12000, fill_byte=True))
    before = snapshot(enrolled.parent)
    result = run_cli(["verify", "--gallery", enrolled, "--user", "alice", image, "--threads", "1", "--json"],
                     VERIFY_LIMIT_MIB, tmp_path)
    # Decoded, so this is a decision (the photo fills a corner of a mostly empty frame), never an error.
    assert result.returncode in (0, 1), result.stderr
    assert json.loads(result.stdout)["decision"] in ("accepted", "rejected")
    assert "Traceback" not in result.stderr
    assert snapshot(enrolled.parent) == before


def test_fifo_and_device_as_image_fail_at_once(enrolled, tmp_path):
    os.mkfifo(tmp_path / "probe.jpg")
    for probe, message in ((tmp_path / "probe.jpg", "not a regular file"), ("/dev/zero", "not a regular file")):
        result = run_cli(["verify", "--gallery", enrolled, "--user", "alice", probe], VERIFY_LIMIT_MIB, tmp_path,
                         timeout=60)
        assert_clean_error(result, message)


def test_out_of_memory_is_exit_2_in_one_line(enrolled, tmp_path):
    """A legitimate but large input under a limit too small for it: an error (2), never a rejection (1)."""
    image = tmp_path / "large.jpg"
    image.write_bytes(_jpeg_claiming(12000, 12000))
    before = snapshot(enrolled.parent)
    result = run_cli(["verify", "--gallery", enrolled, "--user", "alice", image, "--threads", "1", "--json"],
                     640, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert json.loads(result.stdout)["decision"] == "error"  # --json reports errors as JSON too
    assert snapshot(enrolled.parent) == before


# ---- locks, symlinks, read-only use, rollback -------------------------------------------------------------


def test_lock_file_symlink_is_refused_and_its_target_untouched(enrolled, tmp_path):
    gallery = tmp_path / "g.emfr"
    shutil.copy(enrolled, gallery)
    target = tmp_path / "elsewhere"
    (tmp_path / "g.emfr.lock").symlink_to(target)
    before = snapshot(tmp_path)
    result = run_cli(["gallery", "remove", "--gallery", gallery, "--user", "alice"], GALLERY_LIMIT_MIB, tmp_path)
    assert_clean_error(result, "is a symlink")
    assert not target.exists() and snapshot(tmp_path) == before


def test_reading_creates_nothing_beside_the_gallery(enrolled, tmp_path):
    """verify, identify and list need no lock file, so they work where the gallery cannot be written."""
    gallery = tmp_path / "g.emfr"
    shutil.copy(enrolled, gallery)
    before = snapshot(tmp_path)
    for args in (["gallery", "list", "--gallery", gallery],
                 ["verify", "--gallery", gallery, "--user", "alice", DEMO / "person_a_2.jpg", "--threads", "1"]):
        result = run_cli(args, VERIFY_LIMIT_MIB, tmp_path)
        assert result.returncode in (0, 1), result.stderr
    assert snapshot(tmp_path) == before


def test_verify_identify_and_list_work_on_a_read_only_filesystem(enrolled, tmp_path):
    """A read-only bind mount in a private mount namespace (unshare), so the filesystem really refuses writes."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    shutil.copy(enrolled, read_only / "g.emfr")
    mount_then_run = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    prefix = ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount_then_run, str(read_only))
    if shutil.which("unshare") is None or subprocess.run(
            [*prefix, "sh", "-c", f'! touch "{read_only}/probe" 2>/dev/null'], capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only bind mount here (needs unshare and user namespaces)")
    before = snapshot(read_only)
    gallery = read_only / "g.emfr"
    for args in (["gallery", "list", "--gallery", gallery],
                 ["verify", "--gallery", gallery, "--user", "alice", DEMO / "person_a_2.jpg", "--threads", "1"],
                 ["identify", "--gallery", gallery, DEMO / "person_a_2.jpg", "--threads", "1"]):
        result = run_cli(args, VERIFY_LIMIT_MIB, tmp_path, prefix=prefix)
        assert result.returncode in (0, 1), result.stderr
    result = run_cli(["gallery", "remove", "--gallery", gallery, "--user", "alice"], GALLERY_LIMIT_MIB, tmp_path,
                     prefix=prefix)
    assert_clean_error(result, "read-only file system")
    assert snapshot(read_only) == before


def test_writing_through_a_symlinked_gallery_updates_the_real_file(enrolled, tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    real = real_dir / "g.emfr"
    shutil.copy(enrolled, real)
    link = tmp_path / "link.emfr"
    link.symlink_to(real)
    result = run_cli(["gallery", "remove", "--gallery", link, "--user", "alice"], GALLERY_LIMIT_MIB, tmp_path)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert Gallery.open(real, passphrase=PASSPHRASE).users() == []
    assert (real_dir / "g.emfr.lock").exists() and not (tmp_path / "link.emfr.lock").exists()
    (tmp_path / "dangling.emfr").symlink_to(tmp_path / "nowhere")
    with pytest.raises(GalleryError, match="symlink"):
        Gallery.create(tmp_path / "dangling.emfr", "0" * 64, passphrase=PASSPHRASE)
    assert not (tmp_path / "nowhere").exists()


def test_rollback_counter_refuses_an_old_copy(tmp_path):
    counter_path = tmp_path / "state" / "counter.json"
    counter_path.parent.mkdir()
    counter = FileRollbackCounter(counter_path)
    gallery = Gallery.create(tmp_path / "g.emfr", "0" * 64, passphrase=PASSPHRASE,
                             scrypt=ScryptParams(n=16), rollback_counter=counter)
    gallery.add_user("alice", np.eye(4, dtype=np.float32)[:1])
    gallery.add_user("bob", np.eye(4, dtype=np.float32)[1:2])
    old_copy = gallery.path.read_bytes()
    gallery.remove_user("bob")
    assert gallery.generation == 4 and json.loads(counter_path.read_text())["generation"] == 4

    gallery.path.write_bytes(old_copy)  # the attacker puts bob back
    assert Gallery.open(gallery.path, passphrase=PASSPHRASE).users() == ["alice", "bob"]  # without a counter
    with pytest.raises(GalleryError, match="older than generation 4"):
        Gallery.open(gallery.path, passphrase=PASSPHRASE, rollback_counter=counter)
    result = run_cli(["gallery", "list", "--gallery", gallery.path, "--rollback-state", counter_path],
                     GALLERY_LIMIT_MIB, tmp_path)
    assert_clean_error(result, "rollback counter")
    with pytest.raises(GalleryError, match="older than generation 4"):
        gallery.add_user("carol", np.eye(4, dtype=np.float32)[2:3])
    assert gallery.path.read_bytes() == old_copy

    # a different gallery is not silently accepted by a counter bound to this one
    other = Gallery.create(tmp_path / "other.emfr", "0" * 64, passphrase=PASSPHRASE, scrypt=ScryptParams(n=16))
    with pytest.raises(GalleryError, match="belongs to gallery"):
        Gallery.open(other.path, passphrase=PASSPHRASE, rollback_counter=counter)


# ---- small things ---------------------------------------------------------------------------------------


def test_short_passphrase_negative_threads_and_duplicate_enroll(enrolled, tmp_path):
    with pytest.raises(InputError, match="at least 8 characters"):
        Gallery.create(tmp_path / "short.emfr", "0" * 64, passphrase="x")
    result = run_cli(["enroll", "--gallery", tmp_path / "new.emfr", "--user", "bob", DEMO / "person_c_1.jpg",
                      "--threads", "1"], VERIFY_LIMIT_MIB, tmp_path, env={"EDGE_MFR_PASSPHRASE": "x"})
    assert_clean_error(result, "at least 8 characters")
    assert not (tmp_path / "new.emfr").exists()

    result = run_cli(["verify", "--gallery", enrolled, "--user", "alice", DEMO / "person_a_2.jpg", "--threads", "-5"],
                     VERIFY_LIMIT_MIB, tmp_path)
    assert result.returncode == 2 and "expected a positive integer, got -5" in result.stderr

    gallery = tmp_path / "g.emfr"
    shutil.copy(enrolled, gallery)
    result = run_cli(["enroll", "--gallery", gallery, "--user", "alice", DEMO / "person_a_2.jpg", "--threads", "1"],
                     VERIFY_LIMIT_MIB, tmp_path)
    assert_clean_error(result, "--replace")
    assert "replace=True" not in result.stderr.split("--replace")[0]


# ---- what a rejected probe may reveal ----------------------------------------------------------------------


def test_rejected_identify_names_nobody_unless_the_operator_opts_in(enrolled, tmp_path):
    stranger = DEMO / "person_c_1.jpg"
    result = run_cli(["identify", "--gallery", enrolled, stranger, "--json", "--threads", "1"], VERIFY_LIMIT_MIB, tmp_path)
    decision = json.loads(result.stdout)
    assert result.returncode == 1 and decision["decision"] == "rejected"
    assert decision["user"] is None and decision["candidates"] == []
    result = run_cli(["identify", "--gallery", enrolled, stranger, "--json", "--threads", "1",
                      "--candidates-on-rejection"], VERIFY_LIMIT_MIB, tmp_path)
    assert result.returncode == 1 and [c["user"] for c in json.loads(result.stdout)["candidates"]] == ["alice"]


def test_verify_unknown_user_is_an_error_in_json_too(enrolled, tmp_path):
    result = run_cli(["verify", "--gallery", enrolled, "--user", "mallory", DEMO / "person_a_2.jpg", "--json",
                      "--threads", "1"], VERIFY_LIMIT_MIB, tmp_path)
    assert_clean_error(result, "no user 'mallory'")
    assert json.loads(result.stdout) == {"decision": "error", "error": json.loads(result.stdout)["error"],
                                         "exit_code": 2}
