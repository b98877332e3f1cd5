"""`edge-mfr enroll | verify | identify | gallery`: the unlock job from the command line.

The gallery secret comes from the EDGE_MFR_PASSPHRASE environment variable or --key-file, never from
an argument (arguments are visible to every user of the machine through the process list).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import GalleryError, InputError
from ..io import expand_sources, iter_frames

PASSPHRASE_ENV = "EDGE_MFR_PASSPHRASE"


def _secret(args) -> dict:
    if args.key_file:
        return {"key_file": args.key_file}
    passphrase = os.environ.get(PASSPHRASE_ENV)
    if not passphrase:
        raise InputError(f"set {PASSPHRASE_ENV} or pass --key-file to unlock the gallery")
    return {"passphrase": passphrase}


def _rollback_counter(args):
    if not args.rollback_state:
        return None
    from ..gallery import FileRollbackCounter

    return FileRollbackCounter(args.rollback_state)


def _unlock(args):
    from ..unlock import FaceUnlock

    return FaceUnlock(model=args.model, gallery=args.gallery, fmr=args.fmr, aggregation=args.aggregation,
                      threads=args.threads, rollback_counter=_rollback_counter(args),
                      candidates_on_rejection=getattr(args, "candidates_on_rejection", False), **_secret(args))


def _frames(sources: list[str]):
    for source in expand_sources(sources):
        yield from iter_frames(source)


def _print_decision(decision, as_json: bool) -> int:
    if as_json:
        print(json.dumps(decision.to_dict(), indent=2))
    else:
        verdict = "ACCEPTED" if decision.accepted else "REJECTED"
        score = "n/a" if decision.score is None else f"{decision.score:.4f}"
        who = f" as {decision.user}" if decision.user else ""
        print(f"{verdict}{who}: score {score}, threshold {decision.threshold:.4f} (FMR {decision.fmr:g}); "
              f"{decision.reason}; {decision.latency_ms.get('total', 0.0):.1f} ms")
    return 0 if decision.accepted else 1


def run_enroll(args) -> int:
    report = _unlock(args).enroll(args.user, _frames(args.images), replace=args.replace)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"enrolled {report.user!r}: {len(report.accepted)} capture(s), {report.templates} templates "
              f"({report.masked_templates} masked, {report.synthetic_templates} synthetic)")
        for label, reasons in report.refused.items():
            print(f"  refused {label}: {'; '.join(reasons)}", file=sys.stderr)
    return 0


def run_verify(args) -> int:
    return _print_decision(_unlock(args).verify_stream(args.user, _frames([args.image])), args.json)


def run_identify(args) -> int:
    return _print_decision(_unlock(args).identify_stream(_frames([args.image])), args.json)


def _open_gallery(args):
    from ..gallery import Gallery

    if not os.path.exists(args.gallery):
        raise GalleryError(f"{args.gallery}: no gallery here")
    return Gallery.open(args.gallery, rollback_counter=_rollback_counter(args), **_secret(args))


def run_gallery_list(args) -> int:
    gallery = _open_gallery(args)
    users = [gallery.user_info(name) for name in gallery.users()]
    if args.json:
        print(json.dumps({"model_fingerprint": gallery.model_fingerprint, "users": users}, indent=2, default=str))
        return 0
    print(f"gallery {args.gallery}: model {gallery.model_fingerprint[:12]}, {len(users)} user(s)")
    for info in users:
        print(f"  {info['name']}: {info['num_templates']} templates ({info['num_masked']} masked, "
              f"{info['num_synthetic']} synthetic), enrolled {info['enrolled_at']}")
    return 0


def run_gallery_remove(args) -> int:
    _open_gallery(args).remove_user(args.user)
    print(f"removed {args.user!r} from {args.gallery}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _common(parser, model: bool = True) -> None:
    parser.add_argument("--gallery", required=True, help="encrypted gallery file")
    parser.add_argument("--key-file", help=f"32-byte key file (otherwise ${PASSPHRASE_ENV} is the passphrase)")
    parser.add_argument("--json", action="store_true", help="machine-readable output (errors too)")
    parser.add_argument("--rollback-state", metavar="FILE",
                        help="rollback counter file: refuse an older copy of the gallery put back in place "
                             "(keep it where whoever can replace the gallery cannot; docs/security.md)")
    if model:
        parser.add_argument("--model", help="model package (.onnx/.json/dir or bundled name); default: best bundled")
        parser.add_argument("--fmr", type=float, default=1e-4, help="target false match rate (default 1e-4)")
        parser.add_argument("--aggregation", choices=("max", "mean"), default=None,
                            help="score over a user's templates (default: the one the model's calibration "
                                 "found best, else max)")
        parser.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime intra-op threads")


def register(subparsers) -> None:
    enroll = subparsers.add_parser("enroll", help="enroll a user from images, folders, videos or a camera index")
    _common(enroll)
    enroll.add_argument("--user", required=True)
    enroll.add_argument("--replace", action="store_true", help="replace an existing user's templates")
    enroll.add_argument("images", nargs="+", metavar="IMAGE")
    enroll.set_defaults(func=run_enroll)

    verify = subparsers.add_parser("verify", help="1:1: is this the user? exit 0 accepted, 1 rejected, 2 error")
    _common(verify)
    verify.add_argument("--user", required=True)
    verify.add_argument("image", metavar="IMAGE", help="image, video file or camera index")
    verify.set_defaults(func=run_verify)

    identify = subparsers.add_parser("identify", help="1:N: who is this? exit 0 identified, 1 nobody, 2 error")
    _common(identify)
    identify.add_argument("--candidates-on-rejection", action="store_true",
                          help="list the nearest enrolled users and scores when nobody is identified (operator "
                               "use only: it tells whoever holds the probe who is enrolled)")
    identify.add_argument("image", metavar="IMAGE", help="image, video file or camera index")
    identify.set_defaults(func=run_identify)

    gallery = subparsers.add_parser("gallery", help="list or remove enrolled users")
    actions = gallery.add_subparsers(dest="gallery_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list enrolled users")
    _common(listing, model=False)
    listing.set_defaults(func=run_gallery_list)
    remove = actions.add_parser("remove", help="remove a user")
    _common(remove, model=False)
    remove.add_argument("--user", required=True)
    remove.set_defaults(func=run_gallery_remove)
