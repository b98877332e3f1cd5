"""Encrypted on-device gallery of enrolled face templates.

One gallery is one file holding, per user, float32 templates (embeddings) and small per-template
metadata; never images. It is encrypted with AES-256-GCM under a key derived from a passphrase (scrypt)
or from a key file (HKDF-SHA256), and bound to the model whose embeddings it holds.

On-disk format, version 1 (all integers little-endian)::

    offset size  field
    0      7     magic b"EMFRGAL"
    7      1     format version (1)
    8      1     KDF id: 1 = scrypt(passphrase), 2 = HKDF-SHA256(key file)
    9      1     scrypt log2(N)  (0 for HKDF)
    10     4     scrypt r        (0 for HKDF)
    14     4     scrypt p        (0 for HKDF)
    18     16    salt (random per gallery; input to either KDF)
    34     12    AES-GCM nonce (random per write)
    46     8     ciphertext length in bytes, tag included
    54     32    model fingerprint (raw sha256 of the model's ONNX bytes)
    86     ...   AES-256-GCM ciphertext of the payload, 16-byte tag at the end

The 86 header bytes are in clear (they are needed to derive the key) and are the AEAD associated data, so
changing any of them makes decryption fail. Key: scrypt(passphrase UTF-8 NFC, salt, N, r, p, 32 bytes),
or HKDF-SHA256(key-file key, salt, info=b"edge-mfr gallery key v1", 32 bytes) where a key file holds 32
raw bytes or 64 hex digits.

Payload (plaintext), schema 1::

    u32   length L of the metadata
    L     metadata, UTF-8 JSON: {"schema": 1, "model_fingerprint": hex, "embedding_size": D or null,
          "created_at": iso, "updated_at": iso, "num_rows": M,
          "users": [{"name", "enrolled_at", "updated_at", "first_row",
                     "templates": [{"masked", "synthetic", "quality", "enrolled_at", ...}, ...]}, ...]}
    M*D*4 templates, float32 little-endian, row-major; user u owns rows
          first_row .. first_row + len(templates) - 1

The model fingerprint sits in both the header (so the associated data binds it) and the payload.
The metadata may also hold "generation": a counter raised by every write (absent in files written before it
existed, read as 0), which a rollback counter kept outside the file compares against (see docs/security.md).

Bounded reads: the file must be a regular file (a FIFO or a device is refused without blocking), the
header is read first and the ciphertext length it declares must be at most MAX_GALLERY_BYTES, so no file
makes `open` read or allocate more than that; scrypt parameters are accepted only within the limits
ScryptParams enforces when writing.

Durability and concurrency: every write goes to a temporary file in the gallery's directory, is fsynced,
renamed over the gallery and the directory is fsynced, so a crash or a full disk leaves either the old or
the new gallery, never a mix; temporary files left by a killed writer are removed by the next write.
There is deliberately no `.bak` copy: the rename already keeps the old version valid until the new one is
durable, and a backup would keep the templates of a removed user on disk. Writers hold an exclusive
`fcntl.flock` on `PATH.lock` (an empty file that stays beside the gallery, opened without following
symlinks) across read-modify-write. Readers take no lock: the atomic rename means they always read one
whole version, and reading needs no write access, so a gallery on a read-only filesystem can be used for
verify and identify. A gallery path that is a symlink is resolved once when the gallery is opened, so
writes replace the real file, never the link. File locking is POSIX-only.
"""
from __future__ import annotations

import copy
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import struct
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from edge_mfr.atomic import write_atomically
from edge_mfr.errors import GalleryError, InputError
from edge_mfr.match import route_rows

MAGIC = b"EMFRGAL"
FORMAT_VERSION = 1
PAYLOAD_SCHEMA = 1
KDF_SCRYPT = 1
KDF_KEY_FILE = 2
HKDF_INFO = b"edge-mfr gallery key v1"
HEADER = struct.Struct("<7sBBBII16s12sQ32s")
HEADER_SIZE = HEADER.size
PAYLOAD_PREFIX = struct.Struct("<I")
KEY_SIZE = 32
SALT_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16

# Largest ciphertext accepted on open and written: about 130k templates of 128 floats, far beyond an
# on-device gallery. It bounds what a damaged or hostile file can make `open` read and allocate.
MAX_GALLERY_BYTES = 64 * 1024 * 1024
# New galleries need a passphrase of at least this many characters; existing ones still open with theirs.
MIN_PASSPHRASE_LENGTH = 8
MAX_KEY_FILE_BYTES = 4096
# scrypt limits, for writing and for opening alike: a header cannot make `open` spend more than this.
SCRYPT_MAX_N = 2**17
SCRYPT_MAX_MEMORY = 128 * 1024 * 1024   # 128 * n * r bytes
SCRYPT_MAX_WORK = 256 * 1024 * 1024     # 128 * n * r * p: 8 times the default's work
MAX_NAME_LENGTH = 128
# Per-template metadata is for flags and quality numbers; the cap makes storing an image there impossible.
MAX_TEMPLATE_INFO_BYTES = 8192
DEFAULT_LOCK_TIMEOUT_S = 10.0
_LOCK_POLL_S = 0.02
_TEMP_SUFFIX = ".tmp"
_WRONG_KEY = ("wrong passphrase or key, or the file was tampered with "
              "(AES-GCM authentication cannot tell these apart)")
_FINGERPRINT_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
_HEX_KEY_PATTERN = re.compile(rb"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class ScryptParams:
    """Cost of the passphrase KDF; stored in each gallery's header, so the defaults can change later.

    The default (N=2**15, r=8, p=1: 32 MiB, ~0.1 s) follows common interactive-login guidance. The same
    limits apply when writing and when opening, so the library opens every gallery it writes, and a
    tampered header cannot make `open` spend more than SCRYPT_MAX_MEMORY and SCRYPT_MAX_WORK before
    authentication fails.
    """

    n: int = 2**15
    r: int = 8
    p: int = 1

    def __post_init__(self):
        if not (2 <= self.n <= SCRYPT_MAX_N and self.n & (self.n - 1) == 0):
            raise InputError(f"scrypt n must be a power of two in [2, 2**{SCRYPT_MAX_N.bit_length() - 1}], "
                             f"got {self.n}")
        if not 1 <= self.r <= 32:
            raise InputError(f"scrypt r must be in [1, 32], got {self.r}")
        if not 1 <= self.p <= 16:
            raise InputError(f"scrypt p must be in [1, 16], got {self.p}")
        if 128 * self.n * self.r > SCRYPT_MAX_MEMORY:
            raise InputError(f"scrypt n={self.n}, r={self.r} needs more than {SCRYPT_MAX_MEMORY >> 20} MiB of memory")
        if 128 * self.n * self.r * self.p > SCRYPT_MAX_WORK:
            raise InputError(f"scrypt n={self.n}, r={self.r}, p={self.p} costs more than the work limit "
                             f"(128*n*r*p <= {SCRYPT_MAX_WORK >> 20} Mi)")


@dataclass(frozen=True)
class _Header:
    kdf_id: int
    scrypt: ScryptParams | None
    salt: bytes
    nonce: bytes
    ciphertext_length: int
    model_fingerprint: str

    def pack(self) -> bytes:
        scrypt_fields = ((self.scrypt.n.bit_length() - 1, self.scrypt.r, self.scrypt.p)
                         if self.scrypt else (0, 0, 0))
        return HEADER.pack(MAGIC, FORMAT_VERSION, self.kdf_id, *scrypt_fields, self.salt, self.nonce,
                           self.ciphertext_length, bytes.fromhex(self.model_fingerprint))

    @classmethod
    def parse(cls, data: bytes, path: Path, file_size: int | None = None) -> _Header:
        """Parse and check the header; `file_size` (default len(data)) is the size of the whole file."""
        file_size = len(data) if file_size is None else file_size
        prefix = data[:len(MAGIC)]
        if prefix != MAGIC[:len(prefix)]:
            raise GalleryError(f"{path} is not an edge-mfr gallery (bad magic {prefix!r})")
        if len(data) > len(MAGIC) and data[len(MAGIC)] != FORMAT_VERSION:
            raise GalleryError(f"gallery {path} has unsupported format version {data[len(MAGIC)]} "
                               f"(this edge-mfr reads version {FORMAT_VERSION})")
        if file_size < HEADER_SIZE:
            raise GalleryError(f"gallery {path} is truncated: {file_size} bytes, header needs {HEADER_SIZE}")
        (_, _, kdf_id, log2_n, r, p, salt, nonce, ciphertext_length,
         fingerprint) = HEADER.unpack_from(data)
        if kdf_id == KDF_SCRYPT:
            try:
                scrypt = ScryptParams(1 << log2_n, r, p)
            except InputError as exc:
                raise GalleryError(f"gallery {path} has unusable scrypt parameters in its header ({exc}); "
                                   "the file is damaged or was tampered with") from None
        elif kdf_id == KDF_KEY_FILE:
            scrypt = None
        else:
            raise GalleryError(f"gallery {path} names unknown KDF id {kdf_id}; "
                               "the file is damaged or was tampered with")
        if ciphertext_length > MAX_GALLERY_BYTES:
            raise GalleryError(f"gallery {path} declares a {ciphertext_length}-byte ciphertext, above the "
                               f"{MAX_GALLERY_BYTES >> 20} MiB limit; the file is damaged or was tampered with")
        expected_size = HEADER_SIZE + ciphertext_length
        if file_size < expected_size:
            raise GalleryError(f"gallery {path} is truncated: {file_size} bytes, header needs {expected_size}")
        if file_size > expected_size:
            raise GalleryError(f"gallery {path} has {file_size - expected_size} unexpected trailing bytes "
                               "after the ciphertext; the file is damaged or was tampered with")
        return cls(kdf_id, scrypt, salt, nonce, ciphertext_length, fingerprint.hex())


@dataclass
class _UserRecord:
    enrolled_at: str
    updated_at: str
    templates: np.ndarray  # (T, D) float32, read-only
    template_info: list[dict]


@dataclass
class _State:
    model_fingerprint: str
    embedding_size: int | None  # fixed by the first enrolment
    created_at: str
    updated_at: str
    users: dict[str, _UserRecord]
    generation: int = 0  # raised by every write; compared with a rollback counter kept outside the file


class Gallery:
    """Handle on one encrypted gallery file; build it with `create` or `open`.

    Read methods serve the snapshot loaded by `open`, `reload` or this handle's last write. Each mutating
    call re-reads the file under an exclusive lock, applies its change and rewrites the file atomically,
    so concurrent writers in other processes never lose each other's updates.
    """

    def __init__(self, path: Path, key: bytes, kdf_id: int, scrypt: ScryptParams | None, salt: bytes,
                 state: _State, lock_timeout: float, rollback_counter: RollbackCounter | None = None):
        self._path = path
        # Where reads and writes go: a symlinked path is resolved once, so a write replaces the real
        # gallery (and locks beside it) instead of turning the link into a file of its own.
        self._file = Path(os.path.realpath(path))
        self._key = key
        self._kdf_binding = (kdf_id, scrypt, salt)
        self._state = state
        self._lock_timeout = lock_timeout
        self._rollback_counter = rollback_counter

    # ----------------------------------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, path: str | os.PathLike, model_fingerprint: str, passphrase: str | bytes | None = None,
               key_file: str | os.PathLike | None = None, *, scrypt: ScryptParams = ScryptParams(),
               lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
               rollback_counter: RollbackCounter | None = None) -> Gallery:
        """Create an empty gallery at `path` for the model with `model_fingerprint` (sha256 hex).

        Protect it with exactly one of `passphrase` (at least MIN_PASSPHRASE_LENGTH characters) or
        `key_file`; refuses to overwrite an existing file or to create through a symlink. With
        `rollback_counter`, the counter is bound to this new gallery (see `open`).
        """
        path = Path(path)
        fingerprint = _normalise_fingerprint(model_fingerprint)
        _require_one_secret(passphrase, key_file)
        if path.is_symlink():
            raise GalleryError(f"cannot create gallery {path}: the path is a symlink; give the real path")
        if not path.parent.is_dir():
            raise GalleryError(f"cannot create gallery {path}: directory {path.parent} does not exist")
        salt = os.urandom(SALT_SIZE)
        if passphrase is not None:
            kdf_id, secret = KDF_SCRYPT, _passphrase_bytes(passphrase)
            if len(unicodedata.normalize("NFC", passphrase) if isinstance(passphrase, str) else passphrase) \
                    < MIN_PASSPHRASE_LENGTH:
                raise InputError(f"the passphrase of a new gallery needs at least {MIN_PASSPHRASE_LENGTH} "
                                 "characters (a key file is the stronger choice for unattended devices)")
        else:
            kdf_id, secret, scrypt = KDF_KEY_FILE, _read_key_file(key_file), None
        key = _derive_key(kdf_id, scrypt, salt, secret)
        now = _utc_now()
        state = _State(fingerprint, None, now, now, {}, generation=1)
        gallery = cls(path, key, kdf_id, scrypt, salt, state, lock_timeout)
        with _file_lock(path, exclusive=True, timeout=lock_timeout):
            if os.path.lexists(path):
                raise GalleryError(f"cannot create gallery {path}: the file already exists")
            gallery._write_state(state)
            if rollback_counter is not None:
                _advance_counter(rollback_counter, gallery.gallery_id, state.generation, path, reset=True)
        gallery._rollback_counter = rollback_counter
        return gallery

    @classmethod
    def open(cls, path: str | os.PathLike, passphrase: str | bytes | None = None,
             key_file: str | os.PathLike | None = None, model_fingerprint: str | None = None, *,
             lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
             rollback_counter: RollbackCounter | None = None) -> Gallery:
        """Open and decrypt an existing gallery; reading needs no lock and no write access.

        With `model_fingerprint`, refuse a gallery enrolled with another model: its templates live in a
        different embedding space and would never match (or, worse, match the wrong person).
        With `rollback_counter` (see FileRollbackCounter), refuse a gallery older than the last generation
        the counter recorded, i.e. an old copy put back; every write then advances the counter.
        """
        path = Path(path)
        expected_fingerprint = None if model_fingerprint is None else _normalise_fingerprint(model_fingerprint)
        _require_one_secret(passphrase, key_file)
        data = _read_gallery_bytes(Path(os.path.realpath(path)), path)
        header = _Header.parse(data, path)
        if header.kdf_id == KDF_SCRYPT and passphrase is None:
            raise GalleryError(f"gallery {path} is protected by a passphrase, not a key file")
        if header.kdf_id == KDF_KEY_FILE and key_file is None:
            raise GalleryError(f"gallery {path} is protected by a key file, not a passphrase")
        secret = _passphrase_bytes(passphrase) if passphrase is not None else _read_key_file(key_file)
        key = _derive_key(header.kdf_id, header.scrypt, header.salt, secret)
        state = _decrypt_state(data, header, key, path)
        if expected_fingerprint is not None and expected_fingerprint != state.model_fingerprint:
            raise GalleryError(
                f"gallery was enrolled with model {state.model_fingerprint[:12]}, not "
                f"{expected_fingerprint[:12]} ({path}); templates from different models cannot be "
                "compared, so enrol the users again with this model")
        gallery = cls(path, key, header.kdf_id, header.scrypt, header.salt, state, lock_timeout, rollback_counter)
        gallery._check_rollback(state)
        return gallery

    @staticmethod
    def generate_key_file(path: str | os.PathLike) -> Path:
        """Write a new random 256-bit key as 64 hex digits to `path` (mode 0600); never overwrites."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise GalleryError(f"key file {path} already exists; refusing to overwrite a key that may "
                               "protect a gallery") from None
        except OSError as exc:
            raise GalleryError(f"cannot create key file {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "w") as key_file:
            os.fchmod(fd, 0o600)  # the umask could have cleared owner bits; the documented mode is exact
            key_file.write(os.urandom(KEY_SIZE).hex() + "\n")
            key_file.flush()
            os.fsync(fd)
        return path

    def reload(self) -> None:
        """Refresh the snapshot from disk, picking up other processes' changes."""
        self._state = self._read_current_state()

    # --------------------------------------------------------------------------------------------- reads
    @property
    def path(self) -> Path:
        return self._path

    @property
    def model_fingerprint(self) -> str:
        return self._state.model_fingerprint

    @property
    def generation(self) -> int:
        """Write counter of the loaded version: 1 after create, +1 per write (0 for files from before it)."""
        return self._state.generation

    @property
    def gallery_id(self) -> str:
        """Stable identity of this gallery file across writes (derived from its per-gallery salt)."""
        return hashlib.sha256(b"edge-mfr gallery id\0" + self._kdf_binding[2]).hexdigest()[:32]

    @property
    def embedding_size(self) -> int | None:
        """Template dimension D, fixed by the first enrolment; None while nobody was ever enrolled."""
        return self._state.embedding_size

    def users(self) -> list[str]:
        return sorted(self._state.users)

    def user_info(self, name: str) -> dict:
        """Enrolment dates, template counts and per-template metadata (no templates) of one user."""
        name, record = self._user(name)
        return {
            "name": name,
            "enrolled_at": record.enrolled_at,
            "updated_at": record.updated_at,
            "num_templates": len(record.template_info),
            "num_masked": sum(info["masked"] for info in record.template_info),
            "num_synthetic": sum(info["synthetic"] for info in record.template_info),
            "templates": copy.deepcopy(record.template_info),
        }

    def templates(self, name: str, route: str | None = None, masked_probe_templates: str = "all") -> np.ndarray:
        """(T, D) float32 copy of one user's templates; with a probe `route`, those `match.route_rows`
        scores such a probe against (under the model's `masked_probe_templates` rule)."""
        return _route_templates(self._user(name)[1], route, masked_probe_templates).copy()

    def all_templates(self, route: str | None = None,
                      masked_probe_templates: str = "all") -> tuple[list[str], np.ndarray]:
        """(owner name per row, (M, D) float32 templates of every user), for matching; `route` as in
        `templates`."""
        names: list[str] = []
        blocks = []
        for name, record in self._state.users.items():
            rows = _route_templates(record, route, masked_probe_templates)
            names.extend([name] * len(rows))
            blocks.append(rows)
        if not blocks:
            return names, np.zeros((0, self._state.embedding_size or 0), dtype=np.float32)
        return names, np.concatenate(blocks)

    def __repr__(self) -> str:
        return (f"Gallery({str(self._path)!r}, {len(self._state.users)} users, "
                f"model {self._state.model_fingerprint[:12]})")

    # ------------------------------------------------------------------------------------------- writes
    def add_user(self, name: str, templates: np.ndarray, template_info: Sequence[dict] | None = None,
                 replace: bool = False) -> None:
        """Enrol `name` with (T, D) templates and one metadata dict per row (see `_template_records`).

        An existing user is an error unless `replace`, which re-enrols them with only these templates.
        """
        name = _validate_name(name)
        rows = _template_matrix(templates)
        now = _utc_now()
        records = _template_records(template_info, len(rows), now)

        def apply(state: _State) -> None:
            if name in state.users and not replace:
                raise GalleryError(f"user {name!r} already exists in gallery {self._path}; to enrol them "
                                   "again, ask for it explicitly (--replace on the command line, "
                                   "replace=True in Python)")
            _fix_embedding_size(state, rows)
            state.users[name] = _UserRecord(now, now, rows, records)

        self._commit(apply)

    def add_templates(self, name: str, templates: np.ndarray,
                      template_info: Sequence[dict] | None = None) -> None:
        """Append (T, D) templates to an enrolled user, e.g. masked captures added after enrolment."""
        name = _validate_name(name)
        rows = _template_matrix(templates)
        now = _utc_now()
        records = _template_records(template_info, len(rows), now)

        def apply(state: _State) -> None:
            record = state.users.get(name)
            if record is None:
                raise GalleryError(f"no user {name!r} in gallery {self._path}")
            _fix_embedding_size(state, rows)
            merged = np.concatenate([record.templates, rows])
            merged.setflags(write=False)
            state.users[name] = _UserRecord(record.enrolled_at, now, merged, record.template_info + records)

        self._commit(apply)

    def remove_user(self, name: str) -> None:
        """Delete a user and their templates from the gallery file."""
        name = _validate_name(name)

        def apply(state: _State) -> None:
            if state.users.pop(name, None) is None:
                raise GalleryError(f"no user {name!r} in gallery {self._path}")

        self._commit(apply)

    # -------------------------------------------------------------------------------------------- internals
    def _user(self, name: str) -> tuple[str, _UserRecord]:
        name = _validate_name(name)
        record = self._state.users.get(name)
        if record is None:
            raise GalleryError(f"no user {name!r} in gallery {self._path}")
        return name, record

    def _commit(self, apply: Callable[[_State], None]) -> None:
        with _file_lock(self._file, exclusive=True, timeout=self._lock_timeout):
            state = self._read_current_state()
            apply(state)
            state.updated_at = _utc_now()
            state.generation += 1
            self._write_state(state)
            if self._rollback_counter is not None:
                _advance_counter(self._rollback_counter, self.gallery_id, state.generation, self._path)
        self._state = state

    def _check_rollback(self, state: _State) -> None:
        """Refuse a version older than the counter's record; bring the counter up to a newer one."""
        if self._rollback_counter is None:
            return
        try:
            recorded = self._rollback_counter.load(self.gallery_id)
        except OSError as exc:
            raise GalleryError(f"cannot read the rollback counter for gallery {self._path}: {exc}") from exc
        if recorded is not None and state.generation < recorded:
            raise GalleryError(
                f"gallery {self._path} is generation {state.generation}, older than generation {recorded} "
                "recorded by its rollback counter: an old copy of the file was put back (a removed user "
                "could be restored this way); refusing it")
        if recorded is None or state.generation > recorded:
            _advance_counter(self._rollback_counter, self.gallery_id, state.generation, self._path)

    def _read_current_state(self) -> _State:
        data = _read_gallery_bytes(self._file, self._path)
        header = _Header.parse(data, self._path)
        if (header.kdf_id, header.scrypt, header.salt) != self._kdf_binding:
            raise GalleryError(f"gallery {self._path} was replaced by a different gallery since it was "
                               "opened; open it again")
        state = _decrypt_state(data, header, self._key, self._path)
        if state.model_fingerprint != self._state.model_fingerprint:
            raise GalleryError(f"gallery {self._path} was replaced by a gallery for model "
                               f"{state.model_fingerprint[:12]} since it was opened; open it again")
        self._check_rollback(state)
        return state

    def _write_state(self, state: _State) -> None:
        """Encrypt `state` under a fresh nonce and atomically replace the file; caller holds the lock."""
        plaintext = _encode_payload(state)
        if len(plaintext) + TAG_SIZE > MAX_GALLERY_BYTES:
            raise GalleryError(f"gallery {self._path} would grow to {len(plaintext) + TAG_SIZE} bytes, above the "
                               f"{MAX_GALLERY_BYTES >> 20} MiB limit; remove users or templates first")
        kdf_id, scrypt, salt = self._kdf_binding
        nonce = os.urandom(NONCE_SIZE)
        header = _Header(kdf_id, scrypt, salt, nonce, len(plaintext) + TAG_SIZE, state.model_fingerprint)
        header_bytes = header.pack()
        blob = header_bytes + AESGCM(self._key).encrypt(nonce, plaintext, header_bytes)
        _remove_stale_temp_files(self._file)
        try:
            write_atomically(self._file, blob, prefix=_temp_prefix(self._file), suffix=_TEMP_SUFFIX)
        except OSError as exc:
            raise GalleryError(f"could not write gallery {self._path} ({exc.strerror or exc}); "
                               "the previous version of the file is unchanged") from exc
        try:
            _fsync_directory(self._file.parent)
        except OSError as exc:
            raise GalleryError(f"gallery {self._path} was written but syncing its directory failed "
                               f"({exc.strerror}); the change may not survive a power loss") from exc


# ------------------------------------------------------------------------------------- rollback counter
class RollbackCounter(Protocol):
    """Where the last generation of a gallery is recorded, outside the gallery file.

    Putting an old copy of the gallery file back restores removed users; the file's own authentication
    cannot notice, because the old copy was genuine. A counter the attacker cannot roll back with the
    file (a TPM NV counter, a keystore entry, a file on a separate protected partition) can: implement
    these two methods over it, or use FileRollbackCounter.
    """

    def load(self, gallery_id: str) -> int | None:
        """The last generation recorded for `gallery_id`, None if none; raise GalleryError if the counter
        is bound to another gallery."""

    def advance(self, gallery_id: str, generation: int, rebind: bool = False) -> None:
        """Record `generation` for `gallery_id`, never lowering it; `rebind` (on create) replaces a
        counter bound to another gallery."""


class FileRollbackCounter:
    """A RollbackCounter in a small JSON state file, written atomically; bind it to storage an attacker
    who can replace the gallery file cannot also roll back (see docs/security.md)."""

    FORMAT = "edge-mfr rollback counter"

    def __init__(self, path: str | os.PathLike, lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S):
        self.path = Path(path)
        self._lock_timeout = lock_timeout

    def _read(self) -> dict | None:
        try:
            raw = _read_regular_file(self.path, 4096)
        except FileNotFoundError:
            return None
        except _NotRegularFile as exc:
            raise GalleryError(f"rollback counter {self.path}: {exc}") from None
        try:
            record = json.loads(raw.decode("utf-8"))
            if (record.get("format") != self.FORMAT or not isinstance(record.get("gallery_id"), str)
                    or not isinstance(record.get("generation"), int)):
                raise ValueError("unexpected fields")
        except (ValueError, AttributeError) as exc:
            raise GalleryError(f"rollback counter {self.path} is malformed ({exc}); refusing to guess its "
                               "value") from None
        return record

    def load(self, gallery_id: str) -> int | None:
        record = self._read()
        if record is None:
            return None
        if record["gallery_id"] != gallery_id:
            raise GalleryError(f"rollback counter {self.path} belongs to gallery {record['gallery_id']}, not "
                               f"{gallery_id}; if the gallery was re-created on purpose, remove the counter file")
        return record["generation"]

    def advance(self, gallery_id: str, generation: int, rebind: bool = False) -> None:
        with _file_lock(self.path, exclusive=True, timeout=self._lock_timeout):
            record = self._read()
            if record is not None and record["gallery_id"] == gallery_id and record["generation"] >= generation:
                return
            if record is not None and record["gallery_id"] != gallery_id and not rebind:
                self.load(gallery_id)  # raises the mismatch error
            data = json.dumps({"format": self.FORMAT, "gallery_id": gallery_id, "generation": generation})
            write_atomically(self.path, data.encode("utf-8") + b"\n")
            _fsync_directory(self.path.parent)


def _advance_counter(counter: RollbackCounter, gallery_id: str, generation: int, path: Path,
                     reset: bool = False) -> None:
    try:
        counter.advance(gallery_id, generation, rebind=reset)
    except OSError as exc:
        raise GalleryError(f"gallery {path} is at generation {generation} but its rollback counter could not "
                           f"record it ({exc.strerror or exc})") from exc


# ------------------------------------------------------------------------------------------ validation
def _normalise_fingerprint(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not _FINGERPRINT_PATTERN.fullmatch(fingerprint):
        raise InputError(f"model_fingerprint must be a sha256 hex digest (64 hex digits), got {fingerprint!r}")
    return fingerprint.lower()


def _validate_name(name: str) -> str:
    if not isinstance(name, str):
        raise InputError(f"user name must be a string, got {type(name).__name__}")
    # NFC so that the same name typed with composed or decomposed accents is the same user.
    name = unicodedata.normalize("NFC", name)
    if not name or name != name.strip():
        raise InputError(f"user name {name!r} must be non-empty, without leading or trailing whitespace")
    if len(name) > MAX_NAME_LENGTH:
        raise InputError(f"user name is {len(name)} characters long, the limit is {MAX_NAME_LENGTH}")
    if not name.isprintable():
        raise InputError(f"user name {name!r} contains non-printable characters")
    return name


def _route_templates(record: _UserRecord, route: str | None, masked_probe_templates: str = "all") -> np.ndarray:
    if route is None:
        return record.templates
    return record.templates[route_rows([info["masked"] for info in record.template_info], route,
                                       masked_probe_templates)]


def _template_matrix(templates: np.ndarray) -> np.ndarray:
    array = np.asarray(templates)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"templates must be a (T, D) array with T, D >= 1, got shape {array.shape}")
    if array.dtype.kind not in "fiu":
        raise InputError(f"templates must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InputError("templates contain NaN or infinite values")
    array.setflags(write=False)
    return array


def _fix_embedding_size(state: _State, rows: np.ndarray) -> None:
    size = rows.shape[1]
    if state.embedding_size is None:
        state.embedding_size = size
    elif size != state.embedding_size:
        raise GalleryError(f"templates have dimension {size}, but this gallery stores "
                           f"{state.embedding_size}-dimensional templates")


def _template_records(template_info: Sequence[dict] | None, count: int, now: str) -> list[dict]:
    """One metadata dict per template row, with defaults filled in.

    Known keys: `masked` (bool, default False), `synthetic` (bool: a synthetic mask was drawn on the
    capture; default False), `quality` (number, dict such as QualityReport.to_dict(), or None) and
    `enrolled_at` (ISO 8601, default now). Other keys are kept if they are small JSON values; arrays and
    bytes are refused so that no image can end up in the gallery.
    """
    if template_info is None:
        template_info = [{}] * count
    if isinstance(template_info, dict) or len(template_info) != count:
        raise InputError(f"template_info needs one dict per template row ({count}), "
                         f"got {1 if isinstance(template_info, dict) else len(template_info)}")
    records = []
    for index, info in enumerate(template_info):
        where = f"template_info[{index}]"
        if not isinstance(info, dict):
            raise InputError(f"{where} must be a dict, got {type(info).__name__}")
        record = {"masked": False, "synthetic": False, "quality": None, "enrolled_at": now}
        record.update(_plain_json(info, where))
        for flag in ("masked", "synthetic"):
            if not isinstance(record[flag], bool):
                raise InputError(f"{where}[{flag!r}] must be a bool, got {record[flag]!r}")
        try:
            datetime.fromisoformat(record["enrolled_at"])
        except (TypeError, ValueError):
            raise InputError(f"{where}['enrolled_at'] must be an ISO 8601 timestamp, "
                             f"got {record['enrolled_at']!r}") from None
        size = len(json.dumps(record))
        if size > MAX_TEMPLATE_INFO_BYTES:
            raise InputError(f"{where} is {size} bytes as JSON, the limit is {MAX_TEMPLATE_INFO_BYTES}: "
                             "template info holds small metadata, never images")
        records.append(record)
    return records


def _plain_json(value, where: str):
    """`value` with NumPy scalars turned into Python ones; anything but plain JSON data is refused."""
    if isinstance(value, np.ndarray):
        raise InputError(f"{where} holds an array; template info stores small metadata, never images")
    if isinstance(value, np.generic):
        return _plain_json(value.item(), where)
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise InputError(f"{where} has a non-string key {key!r}")
        return {key: _plain_json(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InputError(f"{where} holds a {type(value).__name__}, which is not JSON metadata")


# ---------------------------------------------------------------------------------------------- keys
def _require_one_secret(passphrase, key_file) -> None:
    if (passphrase is None) == (key_file is None):
        raise InputError("give exactly one of passphrase or key_file")


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    if isinstance(passphrase, str):
        # NFC so that the same passphrase typed through different input methods derives the same key.
        passphrase = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    if not isinstance(passphrase, bytes) or not passphrase:
        raise InputError("passphrase must be a non-empty str or bytes")
    return passphrase


def _read_key_file(key_file: str | os.PathLike) -> bytes:
    path = Path(key_file)
    try:
        raw = _read_regular_file(path, MAX_KEY_FILE_BYTES)
    except OSError as exc:
        raise GalleryError(f"cannot read key file {path}: {exc.strerror}") from exc
    except _NotRegularFile as exc:
        raise GalleryError(f"cannot read key file {path}: {exc}") from None
    if len(raw) == KEY_SIZE:
        return raw
    if _HEX_KEY_PATTERN.fullmatch(raw.strip()):
        return bytes.fromhex(raw.strip().decode("ascii"))
    raise GalleryError(f"key file {path} must hold {KEY_SIZE} raw bytes or {2 * KEY_SIZE} hex digits, "
                       f"found {len(raw)} bytes of something else")


def _derive_key(kdf_id: int, scrypt: ScryptParams | None, salt: bytes, secret: bytes) -> bytes:
    if kdf_id == KDF_SCRYPT:
        return Scrypt(salt=salt, length=KEY_SIZE, n=scrypt.n, r=scrypt.r, p=scrypt.p).derive(secret)
    # The key file is already uniformly random; HKDF with the per-gallery salt gives each gallery its own key.
    return HKDF(algorithm=SHA256(), length=KEY_SIZE, salt=salt, info=HKDF_INFO).derive(secret)


# ------------------------------------------------------------------------------------------- payload
def _encode_payload(state: _State) -> bytes:
    users = []
    first_row = 0
    for name, record in state.users.items():
        users.append({"name": name, "enrolled_at": record.enrolled_at, "updated_at": record.updated_at,
                      "first_row": first_row, "templates": record.template_info})
        first_row += len(record.template_info)
    metadata = json.dumps({
        "schema": PAYLOAD_SCHEMA,
        "model_fingerprint": state.model_fingerprint,
        "embedding_size": state.embedding_size,
        "created_at": state.created_at,
        "updated_at": state.updated_at,
        "num_rows": first_row,
        "generation": state.generation,
        "users": users,
    }, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    matrix = b"".join(record.templates.astype("<f4").tobytes() for record in state.users.values())
    return PAYLOAD_PREFIX.pack(len(metadata)) + metadata + matrix


def _decrypt_state(data: bytes, header: _Header, key: bytes, path: Path) -> _State:
    header_bytes = data[:HEADER_SIZE]
    try:
        plaintext = AESGCM(key).decrypt(header.nonce, data[HEADER_SIZE:], header_bytes)
    except InvalidTag:
        raise GalleryError(f"cannot decrypt gallery {path}: {_WRONG_KEY}") from None
    state = _decode_payload(plaintext, path)
    if state.model_fingerprint != header.model_fingerprint:
        raise GalleryError(f"gallery {path} is inconsistent: its header and payload name different models")
    return state


def _decode_payload(plaintext: bytes, path: Path) -> _State:
    # The payload authenticated, so a failure here means a buggy or newer writer, not an attacker.
    try:
        (metadata_length,) = PAYLOAD_PREFIX.unpack_from(plaintext)
        matrix_start = PAYLOAD_PREFIX.size + metadata_length
        metadata = json.loads(plaintext[PAYLOAD_PREFIX.size:matrix_start].decode("utf-8"))
        if metadata["schema"] != PAYLOAD_SCHEMA:
            raise GalleryError(f"gallery {path} has unsupported payload schema {metadata['schema']} "
                               f"(this edge-mfr reads schema {PAYLOAD_SCHEMA})")
        embedding_size = metadata["embedding_size"]
        num_rows = metadata["num_rows"]
        matrix_bytes = plaintext[matrix_start:]
        if len(matrix_bytes) != num_rows * (embedding_size or 0) * 4:
            raise ValueError(f"{len(matrix_bytes)} template bytes for {num_rows} rows of {embedding_size}")
        matrix = np.frombuffer(matrix_bytes, dtype="<f4").astype(np.float32).reshape(num_rows,
                                                                                      embedding_size or 0)
        matrix.setflags(write=False)
        users = {}
        for entry in metadata["users"]:
            first, count = entry["first_row"], len(entry["templates"])
            if not (0 <= first and count >= 1 and first + count <= num_rows):
                raise ValueError(f"user {entry['name']!r} owns rows {first}..{first + count - 1} of {num_rows}")
            users[entry["name"]] = _UserRecord(entry["enrolled_at"], entry["updated_at"],
                                               matrix[first:first + count], entry["templates"])
        generation = metadata.get("generation", 0)
        if not isinstance(generation, int) or generation < 0:
            raise ValueError(f"generation {generation!r}")
        return _State(metadata["model_fingerprint"], embedding_size, metadata["created_at"],
                      metadata["updated_at"], users, generation)
    except (KeyError, TypeError, ValueError, struct.error) as exc:
        raise GalleryError(f"gallery {path} decrypted but its payload is malformed ({exc})") from None


# ------------------------------------------------------------------------------------------ file I/O
def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextmanager
def _file_lock(path: Path, exclusive: bool, timeout: float) -> Iterator[None]:
    """Hold a flock on `path`.lock; polls so that a stuck holder becomes a clear error, not a hang."""
    lock_path = _lock_path(path)
    try:
        # O_NOFOLLOW: a symlink planted at the lock path must not make us create or lock another file.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        reason = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise GalleryError(f"cannot open lock file {lock_path}: {reason}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise GalleryError(f"lock file {lock_path} is not a regular file; refusing to use it")
        operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, operation)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise GalleryError(f"gallery {path} is locked by another process (gave up after "
                                       f"{timeout:g} s); retry when the other enrolment finishes") from None
                time.sleep(_LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class _NotRegularFile(Exception):
    pass


def _read_regular_file(path: Path, max_bytes: int, header_check: Callable[[bytes, int], None] | None = None) -> bytes:
    """At most `max_bytes` (+1, to notice growth) of a regular file, opened without blocking.

    A FIFO, a device (/dev/zero) or a directory raises _NotRegularFile instead of hanging or filling
    memory. `header_check(first bytes, file size)` may refuse the file before the rest is read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _NotRegularFile("not a regular file (a FIFO, device or directory)")
        head = b""
        if header_check is not None:
            head = handle.read(HEADER_SIZE)
            header_check(head, info.st_size)
        return head + handle.read(max_bytes + 1 - len(head))


def _read_gallery_bytes(file: Path, shown: Path | None = None) -> bytes:
    """The whole gallery file, bounded by the size its header declares (at most MAX_GALLERY_BYTES)."""
    shown = shown or file

    def check_header(head: bytes, size: int) -> None:
        _Header.parse(head, shown, file_size=size)

    try:
        return _read_regular_file(file, HEADER_SIZE + MAX_GALLERY_BYTES, check_header)
    except FileNotFoundError:
        raise GalleryError(f"no gallery at {shown}") from None
    except OSError as exc:
        raise GalleryError(f"cannot read gallery {shown}: {exc.strerror}") from exc
    except _NotRegularFile as exc:
        raise GalleryError(f"cannot read gallery {shown}: {exc}; refusing it") from None


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _remove_stale_temp_files(path: Path) -> None:
    """Delete temp files of writers that died mid-write; safe because the caller holds the write lock."""
    prefix = _temp_prefix(path)
    for entry in path.parent.iterdir():
        if entry.name.startswith(prefix) and entry.name.endswith(_TEMP_SUFFIX):
            with suppress(FileNotFoundError):
                entry.unlink()


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable: without this a power loss can bring back the old directory entry."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
