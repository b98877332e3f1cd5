"""`edge-mfr` command line: one argparse tree, each command group in a module of its own."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback

from .. import __version__
from ..errors import EdgeMfrError

# Each module exposes register(subparsers); handlers return the exit code (0 ok/accepted, 1 rejected, 2 error).
COMMAND_MODULES = ("doctor", "demo", "unlock", "mask", "eval", "models", "quantize", "bench", "kiosk")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-mfr", description="On-device masked face unlock.")
    parser.add_argument("--version", action="version", version=f"edge-mfr {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except EdgeMfrError as exc:
        return _error(args, str(exc))
    except KeyboardInterrupt:
        return _error(args, "interrupted")
    except MemoryError:
        return _error(args, "out of memory (the input is too large for the memory this process may use)")
    except Exception as exc:
        # Any other failure is still an error (2), never a rejection (1), and is reported in one line;
        # EDGE_MFR_TRACEBACK=1 shows the traceback to whoever debugs it.
        if os.environ.get("EDGE_MFR_TRACEBACK") == "1":
            traceback.print_exc()
        return _error(args, f"unexpected {type(exc).__name__}: {exc}")


def _error(args, message: str) -> int:
    """Exit code 2 with one line on stderr (and a JSON object on stdout under --json)."""
    message = " ".join(message.split())[:1000]
    if getattr(args, "json", None) is True:  # `eval --json` takes a path, not a flag
        print(json.dumps({"decision": "error", "error": message, "exit_code": 2}))
    print(f"edge-mfr {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
