"""``bcc db upgrade|current`` and ``bcc config``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import SETTINGS, markdown_table
from ..store import safe_url
from .common import emit, settings

__all__ = ["register"]


def _emit_revision(args: argparse.Namespace, url: str, rev: str | None, shown: str) -> int:
    """The database (password masked) and its schema revision; ``shown`` is the revision in words."""
    emit(
        args, {"database": safe_url(url), "revision": rev}, f"database {safe_url(url)} is at revision {shown}"
    )
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from ..store import upgrade

    s = settings(args)
    rev = upgrade(s.database_url, home=s.home)
    return _emit_revision(args, s.database_url, rev, rev)


def cmd_db_current(args: argparse.Namespace) -> int:
    from ..store import current_revision

    s = settings(args)
    rev = current_revision(s.database_url)
    return _emit_revision(args, s.database_url, rev, rev or "(none: run `bcc db upgrade`)")


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    s = settings(args)
    data = s.as_dict()
    data["database_url"] = safe_url(s.database_url)

    def human() -> None:
        for k, v in data.items():
            print(f"{k:22s} {v}  ({s.sources.get(k, 'default')}, {SETTINGS[k].env})")

    emit(
        args,
        {"settings": data, "sources": dict(s.sources), "env": {k: spec.env for k, spec in SETTINGS.items()}},
        human,
    )
    return 0


def register(sub: Any, add: Any) -> None:
    db = sub.add_parser("db", help="project database schema")
    dbsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = dbsub.add_parser("upgrade", help="apply migrations up to the newest schema")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=cmd_db_upgrade)
    cur = dbsub.add_parser("current", help="show the schema revision")
    cur.add_argument("--json", action="store_true")
    cur.set_defaults(func=cmd_db_current)
    sp = add("config", cmd_config, "show the effective settings and where each came from", profile=True)
    sp.add_argument("--markdown", action="store_true", help="print the README's table of all settings")
