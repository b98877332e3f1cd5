"""What the kiosk keeps between restarts: the operator PIN's hash and the lockout counters.

One small JSON file beside the gallery (`GALLERY.kiosk.json`, mode 0600, replaced atomically). The PIN is
never stored: only a salted scrypt hash (hashlib.scrypt, N=2**15, r=8, p=1: 32 MiB and ~0.1 s per try,
the same cost as the gallery's passphrase KDF), so a copied file costs an attacker that much per guess.

Lockouts follow phone unlock: after MAX_FAILURES failures in a row the action is refused for LOCKOUT_S
seconds; a success resets the count. They are kept in the same file so a restart does not clear them.
Their clock is the wall clock (a monotonic clock does not survive a reboot); a lockout never lasts more
than LOCKOUT_S from now, so setting the clock forwards or back cannot lock the kiosk for longer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_mfr.atomic import write_atomically
from edge_mfr.errors import EdgeMfrError, InputError

STATE_SCHEMA = 1
MAX_FAILURES = 5
LOCKOUT_S = 30.0
PIN_MIN_DIGITS = 6
PIN_MAX_DIGITS = 32
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
SALT_BYTES = 16
# The two things a stranger at the kiosk can try repeatedly; each has its own counter.
LOCKOUT_KINDS = ("unlock", "pin")


class KioskStateError(EdgeMfrError):
    """The kiosk state file cannot be read or written."""


def state_path_for(gallery: str | os.PathLike) -> Path:
    gallery = Path(gallery)
    return gallery.with_name(gallery.name + ".kiosk.json")


def check_pin_format(pin: str) -> str:
    """A PIN is PIN_MIN_DIGITS..PIN_MAX_DIGITS decimal digits; returns it, or raises InputError saying why."""
    if not isinstance(pin, str) or not pin.isascii() or not pin.isdigit():
        raise InputError("the operator PIN must be digits only")
    if not PIN_MIN_DIGITS <= len(pin) <= PIN_MAX_DIGITS:
        raise InputError(f"the operator PIN must have {PIN_MIN_DIGITS} to {PIN_MAX_DIGITS} digits, got {len(pin)}")
    return pin


def _hash_pin(pin: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(pin.encode("ascii"), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)


@dataclass(frozen=True)
class Lockout:
    """Where one counter stands: failures in a row, and seconds left of a lockout (0 when not locked)."""

    failures: int
    locked_for_s: float

    @property
    def locked(self) -> bool:
        return self.locked_for_s > 0

    @property
    def tries_left(self) -> int:
        return max(MAX_FAILURES - self.failures, 0)


class KioskState:
    """The kiosk state file; every change is written through at once. Thread-safe."""

    def __init__(self, path: str | os.PathLike, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._data = self._load()

    # ---------------------------------------------------------------------------------------- PIN
    @property
    def pin_is_set(self) -> bool:
        return self._data.get("pin") is not None

    def set_pin(self, pin: str) -> None:
        """Store a new operator PIN (its salted scrypt hash) and clear the PIN lockout."""
        check_pin_format(pin)
        salt = os.urandom(SALT_BYTES)
        record = {"kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex(),
                  "hash": _hash_pin(pin, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P).hex()}
        with self._lock:
            self._data["pin"] = record
            self._data["lockouts"]["pin"] = {"failures": 0, "locked_until": 0.0}
            self._save()

    def pin_matches(self, pin: str) -> bool:
        """Constant-time comparison of `pin`'s hash with the stored one; counts nothing (see record_*)."""
        record = self._data.get("pin")
        if record is None:
            raise KioskStateError("no operator PIN is set; start the kiosk from a terminal to set one")
        if not isinstance(pin, str) or not pin.isascii() or not pin.isdigit() or len(pin) > PIN_MAX_DIGITS:
            return False
        digest = _hash_pin(pin, bytes.fromhex(record["salt"]), record["n"], record["r"], record["p"])
        return hmac.compare_digest(digest, bytes.fromhex(record["hash"]))

    # ----------------------------------------------------------------------------------- lockouts
    def lockout(self, kind: str) -> Lockout:
        with self._lock:
            entry = self._entry(kind)
            return Lockout(entry["failures"], self._remaining(entry))

    def record_failure(self, kind: str) -> Lockout:
        """Count one failure; the MAX_FAILURES-th in a row starts a LOCKOUT_S lockout."""
        with self._lock:
            entry = self._entry(kind)
            if self._remaining(entry) == 0 and entry["locked_until"]:
                entry.update(failures=0, locked_until=0.0)  # the previous lockout ran out: start afresh
            entry["failures"] += 1
            if entry["failures"] >= MAX_FAILURES:
                entry["locked_until"] = self._clock() + LOCKOUT_S
            self._save()
            return Lockout(entry["failures"], self._remaining(entry))

    def record_success(self, kind: str) -> None:
        with self._lock:
            entry = self._entry(kind)
            if entry["failures"] or entry["locked_until"]:
                entry.update(failures=0, locked_until=0.0)
                self._save()

    # ----------------------------------------------------------------------------------- internals
    def _entry(self, kind: str) -> dict:
        if kind not in LOCKOUT_KINDS:
            raise InputError(f"lockout kind must be one of {LOCKOUT_KINDS}, got {kind!r}")
        return self._data["lockouts"][kind]

    def _remaining(self, entry: dict) -> float:
        left = entry["locked_until"] - self._clock()
        return min(max(left, 0.0), LOCKOUT_S)

    def _load(self) -> dict:
        empty = {"schema": STATE_SCHEMA, "pin": None,
                 "lockouts": {kind: {"failures": 0, "locked_until": 0.0} for kind in LOCKOUT_KINDS}}
        if not self.path.exists():
            return empty
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("schema") != STATE_SCHEMA:
                raise ValueError(f"schema {data.get('schema')!r}, this edge-mfr reads {STATE_SCHEMA}")
            pin = data.get("pin")
            if pin is not None:
                if not (bytes.fromhex(pin["salt"]) and bytes.fromhex(pin["hash"])):
                    raise ValueError("PIN record has an empty salt or hash")
                if pin.get("kdf") != "scrypt" or not all(isinstance(pin[k], int) for k in "nrp"):
                    raise ValueError("PIN record is not a scrypt hash")
            for kind in LOCKOUT_KINDS:
                entry = data["lockouts"][kind]
                entry["failures"] = int(entry["failures"])
                entry["locked_until"] = float(entry["locked_until"])
        except OSError as exc:
            raise KioskStateError(f"cannot read kiosk state {self.path}: {exc.strerror}") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Never fall back to "no PIN": that would let anyone who can damage the file set a new one.
            raise KioskStateError(f"kiosk state {self.path} is damaged ({exc}); delete it to set a new operator "
                                  "PIN (this also clears the lockouts)") from None
        return data

    def _save(self) -> None:
        blob = json.dumps(self._data, indent=1).encode("utf-8")
        try:
            write_atomically(self.path, blob, suffix=".tmp", mode=0o600)
        except OSError as exc:
            raise KioskStateError(f"cannot write kiosk state {self.path}: {exc.strerror or exc}") from exc
