"""`edge-mfr kiosk`: serve the local enrollment and unlock station to a browser on this device.

The gallery secret comes from EDGE_MFR_PASSPHRASE or --key-file as for the other commands. The operator
PIN is set at first start: typed twice at the terminal, or taken from EDGE_MFR_KIOSK_PIN when there is no
terminal (a service); only its salted scrypt hash is kept, in GALLERY.kiosk.json.
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import socket
import sys

from ..errors import BackendUnavailableError, InputError
from .unlock import _secret

PIN_ENV = "EDGE_MFR_KIOSK_PIN"
DEFAULT_PORT = 8750
# The keys of edge_mfr.kiosk.liveness.LIVENESS_CHECKS, spelled out so `edge-mfr --help` need not import the pipeline.
LIVENESS_NAMES = ("none", "head-turn")
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")


def _read_new_pin() -> str:
    from ..kiosk.state import PIN_MAX_DIGITS, PIN_MIN_DIGITS, check_pin_format

    if os.environ.get(PIN_ENV):
        return check_pin_format(os.environ[PIN_ENV])
    if not sys.stdin.isatty():
        raise InputError(f"no operator PIN is set yet: run the kiosk once from a terminal to type one, or set {PIN_ENV}")
    pin = getpass.getpass(f"new operator PIN ({PIN_MIN_DIGITS}-{PIN_MAX_DIGITS} digits): ")
    check_pin_format(pin)
    if getpass.getpass("the same PIN again: ") != pin:
        raise InputError("the two PINs differ; nothing was changed")
    return pin


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _allowed_hosts(host: str) -> tuple[str, ...] | None:
    from ..kiosk.app import LOOPBACK_HOSTS

    if host in WILDCARD_HOSTS:
        return None  # any address of this machine: the Host check cannot know them all
    bare = host.strip("[]")
    named = f"[{bare}]" if ":" in bare else bare
    return LOOPBACK_HOSTS if _is_loopback(host) else (named.lower(),) + LOOPBACK_HOSTS


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(64)
    return sock


def run(args) -> int:
    try:
        import uvicorn

        from ..kiosk.app import create_app
    except ImportError as exc:
        raise BackendUnavailableError(f"the kiosk needs the [kiosk] extra ({exc.name} is missing): "
                                      "pip install 'edge-mfr[kiosk]'") from None
    from ..kiosk.liveness import LIVENESS_CHECKS
    from ..kiosk.state import KioskState, state_path_for
    from ..kiosk.station import Station
    from ..unlock import FaceUnlock

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be 0-65535, got {args.port}")
    secret = _secret(args)
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.gallery))):
        raise InputError(f"{args.gallery}: its folder does not exist")
    unlock = FaceUnlock(model=args.model, gallery=args.gallery, fmr=args.fmr, threads=args.threads, **secret)
    state = KioskState(state_path_for(args.gallery))
    new_pin = _read_new_pin() if not state.pin_is_set or args.set_pin else None
    # Open or create the gallery before saving a PIN: a wrong secret, a short passphrase or another model's
    # gallery stops the command here, with exit 2, instead of failing later in the page.
    existed = unlock.gallery_path.exists()
    users = unlock.gallery(create=True).users()
    print(f"gallery {args.gallery}: {len(users)} enrolled" if existed else f"gallery {args.gallery}: created, empty")
    if new_pin is not None:
        state.set_pin(new_pin)
        print(f"operator PIN set (salted scrypt hash in {state.path})")
    station = Station(unlock, state, liveness=LIVENESS_CHECKS[args.liveness](),
                      enroll_captures=args.captures, masked_captures=args.masked_captures)
    if not _is_loopback(args.host):
        print(f"WARNING: serving on {args.host}, not on this device's loopback: other machines on the network "
              "can reach the kiosk page and API (the PIN still guards enrollment)"
              + (", and the Host check against DNS rebinding is off for a wildcard address" if args.host in WILDCARD_HOSTS
                 else "")
              + ". Browsers allow the camera only on https or localhost pages. Use --host 127.0.0.1 unless you "
              "need this.", file=sys.stderr)
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    if args.host in WILDCARD_HOSTS:
        shown = "127.0.0.1"  # the kiosk's own browser reaches a wildcard bind through loopback
    else:
        shown = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    print(f"edge-mfr kiosk: open http://{shown}:{port}/ in the kiosk's browser (Ctrl+C stops); "
          f"liveness: {station.liveness.description}", flush=True)
    config = uvicorn.Config(create_app(station, _allowed_hosts(args.host)), log_level="warning", access_log=False,
                            server_header=False, limit_concurrency=32, timeout_keep_alive=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful shutdown: the normal way to stop
        pass
    print("edge-mfr kiosk: stopped")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("kiosk", help="local enrollment and unlock station in the browser (localhost)")
    parser.add_argument("--gallery", required=True, help="encrypted gallery file (created empty if missing)")
    parser.add_argument("--key-file", help="32-byte key file (otherwise $EDGE_MFR_PASSPHRASE is the passphrase)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this device only; others print a warning)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0 = any free)")
    parser.add_argument("--model", help="model package (.onnx/.json/dir or bundled name); default: best bundled")
    parser.add_argument("--fmr", type=float, default=1e-4, help="target false match rate (default 1e-4)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--liveness", choices=LIVENESS_NAMES, default="none",
                        help="liveness check before matching (default none: documented no-op; see docs/kiosk.md)")
    parser.add_argument("--captures", type=int, default=3, help="unmasked captures per enrollment (default 3)")
    parser.add_argument("--masked-captures", type=int, default=2,
                        help="masked captures when the operator asks for them (default 2)")
    parser.add_argument("--set-pin", action="store_true", help="set a new operator PIN before serving")
    parser.set_defaults(func=run)
