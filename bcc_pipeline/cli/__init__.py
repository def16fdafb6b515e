"""``bcc``: the command line. Each command calls the same library functions the Airflow tasks call.

Every reporting command takes ``--json`` (one JSON document on stdout); progress goes to stderr.
Errors exit non-zero with a one-line message (``BCC_DEBUG=1`` shows the traceback).

One module per group of commands: :mod:`.admin` (db, config), :mod:`.data` (intake, demo-data, holdout),
:mod:`.models` (train, demo, models, model-card, promote, rollback, status, model-info, validate-backends),
:mod:`.scoring` (score, predictions); :mod:`.common` holds what they share.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from ..config import PROFILES
from ..errors import BCCError
from . import admin, data, models, scoring

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bcc", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        func: Callable[[argparse.Namespace], int],
        help: str,
        *,
        json_flag: bool = True,
        profile: bool = False,
        training: bool = False,
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print one JSON document")
        if profile or training:
            sp.add_argument(
                "--profile",
                choices=list(PROFILES),
                help="named settings profile (default: BCC_PROFILE or seed)",
            )
        if training:
            sp.add_argument("--epochs", type=int, help="override the number of epochs")
            sp.add_argument("--image-size", type=int, help="override the input size in pixels")
            sp.add_argument("--base-weights", help="imagenet | none | PATH to a weights file")
            sp.add_argument("--batch-size", type=int, help="override the batch size")
            sp.add_argument("--seed", type=int, help="override the random seed")
        return sp

    for group in (admin, data, models, scoring):
        group.register(sub, add)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("absl", "tensorflow", "h5py", "alembic", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except BCCError as exc:
        if os.environ.get("BCC_DEBUG"):
            traceback.print_exc()
        print(f"bcc: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bcc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for people, the traceback on request
        if os.environ.get("BCC_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"bcc: unexpected error: {type(exc).__name__}: {msg} (set BCC_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
