"""What every ``bcc`` command shares: the settings (with the permission policy applied), one JSON document
or the human text on stdout, progress on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from ..config import Settings, load_settings
from ..files import apply_umask

__all__ = ["add_decision_args", "emit", "progress", "settings"]

log = logging.getLogger("bcc_pipeline.cli")


def emit(args: argparse.Namespace, payload: Any, human: Callable[[], None] | str) -> None:
    """``payload`` as one JSON document with ``--json``; otherwise ``human`` (a text, or a function that prints)."""
    if getattr(args, "json", False):
        json.dump(payload, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    elif callable(human):
        human()
    else:
        print(human)


def settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    """The settings for a command: its profile and flags over ``BCC_*`` over the profile; the umask applied
    (the permission policy, for everything the command creates)."""
    names = ("epochs", "image_size", "base_weights", "batch_size", "seed")
    flags = {name: getattr(args, name, None) for name in names}
    s = load_settings(profile=getattr(args, "profile", None), overrides={**flags, **overrides})
    apply_umask(s.umask)
    return s


def progress(msg: str) -> None:
    log.info(msg)


def add_decision_args(sp: argparse.ArgumentParser, log: str) -> None:
    """``--reason`` (required) and ``--actor`` of a command whose decision is recorded in ``log``."""
    sp.add_argument("--reason", required=True, help=f"why (recorded in the {log} log)")
    sp.add_argument("--actor", help="who (default: user@host)")
