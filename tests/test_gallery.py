import errno
import fcntl
import hashlib
import json
import multiprocessing
import os
import stat
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_mfr.errors import GalleryError, InputError
from edge_mfr.gallery import HEADER_SIZE, Gallery, ScryptParams

MODEL_A = hashlib.sha256(b"model a").hexdigest()
MODEL_B = hashlib.sha256(b"model b").hexdigest()
FAST_SCRYPT = ScryptParams(n=2**4, r=8, p=1)  # production cost is 2**15; tests only need the same code path
PASSPHRASE = "correct horse battery staple"
DIM = 8


def unit_rows(seed: int, count: int, dim: int = DIM) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_gallery(tmp_path, **kwargs) -> Gallery:
    return Gallery.create(tmp_path / "gallery.emfr", MODEL_A, passphrase=PASSPHRASE, scrypt=FAST_SCRYPT, **kwargs)


def open_gallery(path, **kwargs) -> Gallery:
    return Gallery.open(path, passphrase=PASSPHRASE, **kwargs)


def with_one_user(tmp_path) -> Gallery:
    gallery = make_gallery(tmp_path)
    gallery.add_user("alice", unit_rows(0, 2), [{"masked": False}, {"masked": True, "synthetic": True}])
    return gallery


def temp_litter(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_round_trip(tmp_path):
    gallery = make_gallery(tmp_path)
    alice, bob = unit_rows(0, 3), unit_rows(1, 2)
    gallery.add_user("alice", alice, [{"masked": False, "quality": 0.9},
                                      {"masked": True, "synthetic": True, "quality": {"blur": np.float32(0.5)}},
                                      {"masked": True, "enrolled_at": "2024-05-01T12:00:00+00:00"}])
    gallery.add_user("bob", bob.astype(np.float64))
    gallery.add_templates("bob", unit_rows(2, 1), [{"masked": True}])

    reopened = open_gallery(gallery.path, model_fingerprint=MODEL_A)
    assert reopened.users() == ["alice", "bob"]
    assert reopened.model_fingerprint == MODEL_A
    assert reopened.embedding_size == DIM
    assert reopened.templates("alice").dtype == np.float32
    np.testing.assert_array_equal(reopened.templates("alice"), alice)
    np.testing.assert_array_equal(reopened.templates("bob"), np.concatenate([bob, unit_rows(2, 1)]))

    info = reopened.user_info("alice")
    assert (info["num_templates"], info["num_masked"], info["num_synthetic"]) == (3, 2, 1)
    assert info["templates"][1] == {"masked": True, "synthetic": True, "quality": {"blur": 0.5},
                                    "enrolled_at": info["templates"][1]["enrolled_at"]}
    assert info["templates"][2]["enrolled_at"] == "2024-05-01T12:00:00+00:00"
    bob_info = reopened.user_info("bob")
    assert bob_info["templates"][0] == {"masked": False, "synthetic": False, "quality": None,
                                        "enrolled_at": bob_info["enrolled_at"]}

    names, matrix = reopened.all_templates()
    assert names == ["alice"] * 3 + ["bob"] * 3
    assert matrix.shape == (6, DIM) and matrix.dtype == np.float32
    assert stat.S_IMODE(os.stat(gallery.path).st_mode) == 0o600


def test_templates_of_a_probe_route(tmp_path):
    """An unmasked probe's route selects the unmasked templates; a user with masked ones only keeps them."""
    gallery = make_gallery(tmp_path)
    alice, carol = unit_rows(1, 3), unit_rows(2, 2)
    gallery.add_user("alice", alice, [{"masked": False}, {"masked": True, "synthetic": True}, {"masked": False}])
    gallery.add_user("carol", carol, [{"masked": True}, {"masked": True}])
    reopened = open_gallery(gallery.path)
    np.testing.assert_array_equal(reopened.templates("alice", "unmasked"), alice[[0, 2]])
    np.testing.assert_array_equal(reopened.templates("alice", "masked"), alice)
    np.testing.assert_array_equal(reopened.templates("alice", "masked", "masked"), alice[[1]])  # a package's rule
    np.testing.assert_array_equal(reopened.all_templates("masked", "masked")[1], np.concatenate([alice[[1]], carol]))
    np.testing.assert_array_equal(reopened.templates("carol", "unmasked"), carol)
    names, matrix = reopened.all_templates("unmasked")
    assert names == ["alice", "alice", "carol", "carol"]
    np.testing.assert_array_equal(matrix, np.concatenate([alice[[0, 2]], carol]))
    with pytest.raises(InputError, match="route"):
        reopened.templates("alice", "sideways")


def test_empty_gallery(tmp_path):
    gallery = open_gallery(make_gallery(tmp_path).path)
    assert gallery.users() == []
    assert gallery.embedding_size is None
    names, matrix = gallery.all_templates()
    assert names == [] and matrix.shape == (0, 0)


def test_wrong_passphrase(tmp_path):
    gallery = with_one_user(tmp_path)
    with pytest.raises(GalleryError, match="wrong passphrase or key, or the file was tampered with"):
        Gallery.open(gallery.path, passphrase="incorrect horse")


def test_key_file(tmp_path):
    key_path = Gallery.generate_key_file(tmp_path / "gallery.key")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert len(bytes.fromhex(key_path.read_text().strip())) == 32
    with pytest.raises(GalleryError, match="already exists"):
        Gallery.generate_key_file(key_path)

    gallery = Gallery.create(tmp_path / "g.emfr", MODEL_A, key_file=key_path)
    gallery.add_user("carol", unit_rows(3, 1))
    assert Gallery.open(gallery.path, key_file=key_path).users() == ["carol"]
    with pytest.raises(GalleryError, match="protected by a key file, not a passphrase"):
        Gallery.open(gallery.path, passphrase=PASSPHRASE)

    raw_key = tmp_path / "raw.key"
    raw_key.write_bytes(bytes.fromhex(key_path.read_text()))
    assert Gallery.open(gallery.path, key_file=raw_key).users() == ["carol"]

    other_key = Gallery.generate_key_file(tmp_path / "other.key")
    with pytest.raises(GalleryError, match="wrong passphrase or key"):
        Gallery.open(gallery.path, key_file=other_key)
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a key")
    with pytest.raises(GalleryError, match="32 raw bytes or 64 hex digits"):
        Gallery.open(gallery.path, key_file=bad_key)
    with pytest.raises(GalleryError, match="cannot read key file"):
        Gallery.open(gallery.path, key_file=tmp_path / "missing.key")

    with pytest.raises(GalleryError, match="protected by a passphrase, not a key file"):
        Gallery.open(with_one_user(tmp_path).path, key_file=key_path)
    with pytest.raises(InputError, match="exactly one of passphrase or key_file"):
        Gallery.open(gallery.path, passphrase=PASSPHRASE, key_file=key_path)


def test_scrypt_parameters_live_in_the_header(tmp_path):
    path = tmp_path / "g.emfr"
    Gallery.create(path, MODEL_A, passphrase=PASSPHRASE, scrypt=ScryptParams(n=2**5, r=4, p=2))
    assert struct.unpack_from("<BBII", path.read_bytes(), 8) == (1, 5, 4, 2)
    assert open_gallery(path).users() == []
    with pytest.raises(InputError, match="power of two"):
        ScryptParams(n=1000)


def test_every_tampered_header_byte_is_refused(tmp_path):
    path = with_one_user(tmp_path).path
    original = path.read_bytes()
    for offset in range(HEADER_SIZE):
        tampered = bytearray(original)
        tampered[offset] ^= 0x01
        path.write_bytes(bytes(tampered))
        with pytest.raises(GalleryError):
            open_gallery(path)
    # salt, nonce and model fingerprint are only protected by authentication
    for offset in (20, 40, 60):
        tampered = bytearray(original)
        tampered[offset] ^= 0x80
        path.write_bytes(bytes(tampered))
        with pytest.raises(GalleryError, match="wrong passphrase or key, or the file was tampered with"):
            open_gallery(path)


def test_tampered_ciphertext(tmp_path):
    path = with_one_user(tmp_path).path
    tampered = bytearray(path.read_bytes())
    tampered[HEADER_SIZE + 10] ^= 0x01
    path.write_bytes(bytes(tampered))
    with pytest.raises(GalleryError, match="tampered"):
        open_gallery(path)


def test_truncated_and_extended(tmp_path):
    path = with_one_user(tmp_path).path
    original = path.read_bytes()
    path.write_bytes(original[:40])
    with pytest.raises(GalleryError, match=f"truncated: 40 bytes, header needs {HEADER_SIZE}"):
        open_gallery(path)
    path.write_bytes(b"")
    with pytest.raises(GalleryError, match="truncated: 0 bytes"):
        open_gallery(path)
    path.write_bytes(original[:-5])
    with pytest.raises(GalleryError, match=f"truncated: {len(original) - 5} bytes, header needs {len(original)}"):
        open_gallery(path)
    path.write_bytes(original + b"extra")
    with pytest.raises(GalleryError, match="5 unexpected trailing bytes"):
        open_gallery(path)


def test_not_a_gallery_and_unsupported_version(tmp_path):
    path = with_one_user(tmp_path).path
    original = path.read_bytes()
    other = tmp_path / "photo.jpg"
    other.write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    with pytest.raises(GalleryError, match="not an edge-mfr gallery"):
        open_gallery(other)
    path.write_bytes(original[:7] + bytes([2]) + original[8:])
    with pytest.raises(GalleryError, match="unsupported format version 2"):
        open_gallery(path)


def test_gallery_from_another_model(tmp_path):
    path = with_one_user(tmp_path).path
    with pytest.raises(GalleryError, match=f"gallery was enrolled with model {MODEL_A[:12]}, not {MODEL_B[:12]}"):
        open_gallery(path, model_fingerprint=MODEL_B)
    assert open_gallery(path, model_fingerprint=MODEL_A.upper()).users() == ["alice"]
    with pytest.raises(InputError, match="sha256 hex digest"):
        open_gallery(path, model_fingerprint="mobilefacenet")


def test_create_and_open_errors(tmp_path):
    path = with_one_user(tmp_path).path
    with pytest.raises(GalleryError, match="already exists"):
        Gallery.create(path, MODEL_A, passphrase=PASSPHRASE, scrypt=FAST_SCRYPT)
    assert open_gallery(path).users() == ["alice"]
    with pytest.raises(GalleryError, match="no gallery at"):
        open_gallery(tmp_path / "missing.emfr")
    assert not (tmp_path / "missing.emfr.lock").exists()
    with pytest.raises(GalleryError, match="does not exist"):
        Gallery.create(tmp_path / "no" / "dir.emfr", MODEL_A, passphrase=PASSPHRASE, scrypt=FAST_SCRYPT)


def test_duplicate_replace_and_remove(tmp_path):
    gallery = with_one_user(tmp_path)
    with pytest.raises(GalleryError, match="'alice' already exists"):
        gallery.add_user("alice", unit_rows(5, 1))
    gallery.add_user("alice", unit_rows(5, 1), replace=True)
    np.testing.assert_array_equal(open_gallery(gallery.path).templates("alice"), unit_rows(5, 1))

    gallery.add_user("bob", unit_rows(6, 1))
    gallery.remove_user("alice")
    assert gallery.users() == ["bob"]
    assert open_gallery(gallery.path).users() == ["bob"]
    for call in (lambda: gallery.remove_user("alice"), lambda: gallery.templates("alice"),
                 lambda: gallery.user_info("alice"), lambda: gallery.add_templates("alice", unit_rows(7, 1))):
        with pytest.raises(GalleryError, match="no user 'alice'"):
            call()


def test_input_validation(tmp_path):
    gallery = with_one_user(tmp_path)
    for bad_name in ("", " alice", "a\nb", "x" * 129, 42):
        with pytest.raises(InputError):
            gallery.add_user(bad_name, unit_rows(8, 1))
    # the same name with a decomposed accent is the same user
    gallery.add_user("Jos\u00e9", unit_rows(8, 1))
    with pytest.raises(GalleryError, match="already exists"):
        gallery.add_user("Jose\u0301", unit_rows(8, 1))

    with pytest.raises(GalleryError, match="dimension 4, but this gallery stores 8-dimensional"):
        gallery.add_user("dan", unit_rows(9, 1, dim=4))
    for bad_templates in (unit_rows(9, 1)[0], np.zeros((0, DIM)), np.full((1, DIM), np.nan)):
        with pytest.raises(InputError):
            gallery.add_user("dan", bad_templates)
    with pytest.raises(InputError, match="one dict per template row"):
        gallery.add_user("dan", unit_rows(9, 2), [{}])
    with pytest.raises(InputError, match="must be a bool"):
        gallery.add_user("dan", unit_rows(9, 1), [{"masked": "yes"}])
    assert gallery.users() == ["José", "alice"]


def test_no_images_in_template_info(tmp_path):
    gallery = with_one_user(tmp_path)
    crop = np.zeros((112, 112, 3), np.uint8)
    for info in ({"crop": crop}, {"crop": crop.tobytes()}, {"crop": crop.tolist()}):
        with pytest.raises(InputError):
            gallery.add_user("eve", unit_rows(10, 1), [info])
    assert gallery.users() == ["alice"]


def test_payload_holds_only_templates_and_metadata(tmp_path):
    """Decrypt with the documented format alone and account for every plaintext byte."""
    key_path = Gallery.generate_key_file(tmp_path / "k")
    gallery = Gallery.create(tmp_path / "g.emfr", MODEL_A, key_file=key_path)
    gallery.add_user("alice", unit_rows(0, 3), [{"masked": bool(i % 2), "quality": 0.8} for i in range(3)])
    gallery.add_user("bob", unit_rows(1, 2))

    data = gallery.path.read_bytes()
    magic, version, kdf_id, _, _, _, salt, nonce, length, fingerprint = struct.unpack_from(
        "<7sBBBII16s12sQ32s", data)
    assert (magic, version, kdf_id, fingerprint.hex()) == (b"EMFRGAL", 1, 2, MODEL_A)
    assert len(data) == 86 + length
    key = HKDF(algorithm=SHA256(), length=32, salt=salt, info=b"edge-mfr gallery key v1").derive(
        bytes.fromhex(key_path.read_text()))
    plaintext = AESGCM(key).decrypt(nonce, data[86:], data[:86])

    (metadata_length,) = struct.unpack_from("<I", plaintext)
    metadata = json.loads(plaintext[4:4 + metadata_length])
    assert set(metadata) == {"schema", "model_fingerprint", "embedding_size", "created_at", "updated_at",
                             "num_rows", "generation", "users"}
    assert (metadata["model_fingerprint"], metadata["num_rows"], metadata["embedding_size"]) == (MODEL_A, 5, DIM)
    assert metadata["generation"] == 3 == gallery.generation  # create, then two writes
    for user in metadata["users"]:
        assert set(user) == {"name", "enrolled_at", "updated_at", "first_row", "templates"}
        for info in user["templates"]:
            assert set(info) == {"masked", "synthetic", "quality", "enrolled_at"}
    matrix = np.frombuffer(plaintext[4 + metadata_length:], dtype="<f4")
    assert matrix.size == 5 * DIM
    np.testing.assert_array_equal(matrix.reshape(5, DIM), np.concatenate([unit_rows(0, 3), unit_rows(1, 2)]))


def test_failed_rename_keeps_old_gallery(tmp_path, monkeypatch):
    gallery = with_one_user(tmp_path)
    before = gallery.path.read_bytes()

    def crash(*args):
        raise OSError(errno.EIO, "simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(GalleryError, match="previous version of the file is unchanged"):
        gallery.add_user("bob", unit_rows(1, 1))
    monkeypatch.undo()
    assert gallery.path.read_bytes() == before
    assert gallery.users() == ["alice"]
    assert open_gallery(gallery.path).users() == ["alice"]
    assert temp_litter(tmp_path) == []


def test_disk_full_mid_write_keeps_old_gallery(tmp_path, monkeypatch):
    gallery = with_one_user(tmp_path)
    before = gallery.path.read_bytes()
    real_write = os.write

    def write_half_then_fill_disk(fd, data):
        if len(data) > 16:
            real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write_half_then_fill_disk)
    with pytest.raises(GalleryError, match="No space left on device"):
        gallery.add_user("bob", unit_rows(1, 1))
    monkeypatch.undo()
    assert gallery.path.read_bytes() == before
    assert temp_litter(tmp_path) == []
    gallery.add_user("bob", unit_rows(1, 1))
    assert open_gallery(gallery.path).users() == ["alice", "bob"]


def test_next_write_removes_temp_files_of_a_killed_writer(tmp_path):
    gallery = with_one_user(tmp_path)
    stale = tmp_path / ".gallery.emfr.abc123.tmp"
    stale.write_bytes(b"half a gallery")
    unrelated = tmp_path / "notes.tmp"
    unrelated.write_text("keep me")
    gallery.add_user("bob", unit_rows(1, 1))
    assert not stale.exists() and unrelated.exists()


def test_writes_wait_for_the_lock_and_time_out_while_reads_go_on(tmp_path):
    gallery = open_gallery(with_one_user(tmp_path).path, lock_timeout=0.2)
    with open(f"{gallery.path}.lock", "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(GalleryError, match="locked by another process"):
            gallery.add_user("bob", unit_rows(1, 1))
        # Readers take no lock: the atomic rename means they always see one whole version.
        assert open_gallery(gallery.path, lock_timeout=0.2).users() == ["alice"]
        gallery.reload()
    assert gallery.users() == ["alice"]


def test_reload_and_replaced_file(tmp_path):
    first = with_one_user(tmp_path)
    second = open_gallery(first.path)
    second.add_user("bob", unit_rows(1, 1))
    assert first.users() == ["alice"]
    first.reload()
    assert first.users() == ["alice", "bob"]
    first.add_user("carol", unit_rows(2, 1))  # re-reads under the lock, so bob survives
    assert open_gallery(first.path).users() == ["alice", "bob", "carol"]

    first.path.unlink()
    Gallery.create(first.path, MODEL_A, passphrase=PASSPHRASE, scrypt=FAST_SCRYPT)
    with pytest.raises(GalleryError, match="replaced by a different gallery"):
        first.add_user("dave", unit_rows(3, 1))


def _enrol_worker(path, key_path, prefix, barrier):
    gallery = Gallery.open(path, key_file=key_path, lock_timeout=60)
    barrier.wait()
    for index in range(10):
        gallery.add_user(f"{prefix}{index}", unit_rows(index, 2), [{"masked": True}, {"masked": False}])


def test_two_processes_enrolling_concurrently_lose_nothing(tmp_path):
    key_path = Gallery.generate_key_file(tmp_path / "k")
    path = tmp_path / "g.emfr"
    Gallery.create(path, MODEL_A, key_file=key_path)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_enrol_worker, args=(str(path), str(key_path), prefix, barrier))
               for prefix in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0]
    gallery = Gallery.open(path, key_file=key_path)
    assert gallery.users() == sorted(f"{prefix}{index}" for prefix in "ab" for index in range(10))
    assert gallery.all_templates()[1].shape == (40, DIM)
    assert temp_litter(tmp_path) == []


def test_generation_counts_writes_and_a_gallery_never_outgrows_its_read_limit(tmp_path, monkeypatch):
    gallery = with_one_user(tmp_path)
    assert gallery.generation == 2
    gallery.add_templates("alice", unit_rows(3, 1))
    assert open_gallery(gallery.path).generation == 3
    before = gallery.path.read_bytes()
    import edge_mfr.gallery as gallery_module

    monkeypatch.setattr(gallery_module, "MAX_GALLERY_BYTES", len(before) - HEADER_SIZE + 8)
    with pytest.raises(GalleryError, match="above the 0 MiB limit; remove users or templates first"):
        gallery.add_user("bob", unit_rows(4, 4))
    assert gallery.path.read_bytes() == before
    monkeypatch.setattr(gallery_module, "MAX_GALLERY_BYTES", len(before) - HEADER_SIZE - 1)
    with pytest.raises(GalleryError, match="ciphertext, above the 0 MiB limit"):
        open_gallery(gallery.path)


def test_rollback_counter_file_is_checked(tmp_path):
    from edge_mfr.gallery import FileRollbackCounter

    counter_path = tmp_path / "counter.json"
    gallery = make_gallery(tmp_path, rollback_counter=FileRollbackCounter(counter_path))
    record = json.loads(counter_path.read_text())
    assert record == {"format": "edge-mfr rollback counter", "gallery_id": gallery.gallery_id, "generation": 1}
    counter_path.write_text("{not json")
    with pytest.raises(GalleryError, match="malformed"):
        open_gallery(gallery.path, rollback_counter=FileRollbackCounter(counter_path))
    counter_path.unlink()
    os.mkfifo(counter_path)
    with pytest.raises(GalleryError, match="not a regular file"):
        open_gallery(gallery.path, rollback_counter=FileRollbackCounter(counter_path))
    counter_path.unlink()
    # a missing record is taken from the gallery as found (documented: the first open trusts what it finds)
    assert open_gallery(gallery.path, rollback_counter=FileRollbackCounter(counter_path)).users() == []
    assert json.loads(counter_path.read_text())["generation"] == 1


def test_scrypt_limits_hold_for_open_as_for_create(tmp_path):
    path = with_one_user(tmp_path).path
    data = bytearray(path.read_bytes())
    for log2_n, r, p in ((20, 8, 16), (18, 8, 1), (17, 8, 4), (16, 32, 1)):
        struct.pack_into("<BII", data, 9, log2_n, r, p)
        path.write_bytes(bytes(data))
        with pytest.raises(GalleryError, match="unusable scrypt parameters"):
            open_gallery(path)
    for n, r, p in ((2**18, 8, 1), (2**17, 8, 4), (2**16, 32, 1)):
        with pytest.raises(InputError):
            ScryptParams(n=n, r=r, p=p)
    assert ScryptParams(n=2**17, r=8, p=2) and ScryptParams()
