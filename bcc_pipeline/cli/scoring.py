"""``bcc score`` (batch scoring of the inbox) and ``bcc predictions`` (reading the prediction table)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import DEFAULTS, INFERENCE_CHOICES
from ..files import one_line
from .common import emit, progress, settings

__all__ = ["register"]


def cmd_score(args: argparse.Namespace) -> int:
    from ..scoring import score_inbox
    from ..store import require_schema

    s = settings(  # with the umask applied: archive/, quarantine/, runs/ and the compiled cache follow it
        args,
        score_batch_size=args.score_batch_size,
        settle_seconds=args.settle_seconds,
        inference=args.inference,
    )
    require_schema(s.database_url)
    r = score_inbox(
        s, inbox=args.inbox, run_id=args.run_id, progress=progress, force_unvalidated=args.force_unvalidated
    )

    def human() -> None:
        print(
            f"scoring run {one_line(r['run_id'])} with {r['model_version']} ({r['inference']}, {r['precision'] or '-'}; "
            f"{r['rescored_fp32']} re-scored in fp32 near the threshold): {r['scored']} scored, "
            f"{r['duplicates']} duplicates, {r['rejected']} rejected, {r['ignored']} ignored, "
            f"{r['skipped']} still being written ({r['images_per_second']} images/s, {r['seconds']}s)"
        )
        more = {  # shown when it happened (a file scored, then gone or changed before its move, is in two)
            "recovered": "earlier moves finished",
            "missing": "left the inbox before they were moved (any prediction made is kept)",
            "taken_by_other_runs": "scored and moved by another run",
            "changed": "changed after they were read (left for the next run)",
            "move_failed": "could not be moved",
        }
        if extra := [f"{r[k]} {what}" for k, what in more.items() if r.get(k)]:
            print(f"  also: {', '.join(extra)}")
        for rej in r["rejections"]:
            print(f"  rejected {rej['path']}: {rej['reason']}")
        for f in r["move_failures"]:
            print(f"  NOT MOVED {f['path']}: {f['error']}")
        print(f"archive: {r['archive_dir']}\nquarantine: {r['quarantine_dir']}")

    emit(args, r, human)
    if r.get("finished_before"):
        print(
            f"bcc: note: scoring run {one_line(r['run_id'])} had finished (at {r['finished_at']}); nothing was "
            "done now and these are its counts. Leave out --run-id to score what the inbox holds now.",
            file=sys.stderr,
        )
    if r["unreachable"]:
        paths = "; ".join(f"{u['path']} ({u['reason']})" for u in r["unreachable"][:10])
        print(
            f"bcc: error: {len(r['unreachable'])} path(s) in the inbox cannot be reached and are never scored "
            f"as things are: {paths}",
            file=sys.stderr,
        )
        return 1
    if r["persistent_move_failures"]:
        paths = ", ".join(f["path"] for f in r["persistent_move_failures"][:10])
        print(
            f"bcc: error: {len(r['persistent_move_failures'])} file(s) could not be moved in more than one run "
            f"and are still in the inbox: {paths}",
            file=sys.stderr,
        )
        return 1
    if r["move_failed"]:
        print(
            f"bcc: warning: {r['move_failed']} file(s) could not be moved and are still in the inbox "
            "(listed under move_failures); the next run tries again",
            file=sys.stderr,
        )
    return 0


def cmd_predictions(args: argparse.Namespace) -> int:
    from ..predictions import csv_chunks, json_chunks, parse_since, query_predictions

    s = settings(args)
    fmt = "json" if args.json else args.format
    limit = args.limit if args.limit is not None else (100 if fmt == "table" else None)
    rows = query_predictions(
        s,
        since=parse_since(args.since) if args.since else None,
        label=args.label,
        model_version=args.model_version,
        limit=limit,
        latest=args.latest,
    )
    out = sys.stdout
    if fmt in ("json", "csv"):
        out.writelines((json_chunks if fmt == "json" else csv_chunks)(rows))
    else:
        n = 0
        for n, row in enumerate(rows, 1):
            if n == 1:
                print(
                    f"{'scored_at (UTC)':19s}  {'label':9s} {'p_malig':>7s}  {'model_version':26s} "
                    f"{'sha256':12s}  {'back-end':19s} source_path"
                )
            how = f"{row['backend'] or '-'}/{row['precision'] or '-'}"
            print(
                f"{row['scored_at'][:19]:19s}  {row['label']:9s} {row['prob_malignant']:7.4f}  "
                f"{row['model_version']:26s} {row['sha256'][:12]:12s}  {how:19s} {row['source_path']}"
            )
        if n == 0:
            print("no predictions match")
        elif limit is not None and n == limit:
            print(f"(first {limit}; --limit N for more, --format csv|json for all)", file=sys.stderr)
    return 0


def register(sub: Any, add: Any) -> None:
    sp = add("score", cmd_score, "score every image in the inbox with the champion (batch scoring)")
    sp.add_argument("--inbox", help="folder to score (default: $BCC_HOME/inbox)")
    sp.add_argument(
        "--batch-size",
        dest="score_batch_size",
        type=int,
        help=f"inference batch size (default: BCC_SCORE_BATCH_SIZE or {DEFAULTS['score_batch_size']})",
    )
    sp.add_argument(
        "--settle-seconds",
        type=float,
        help="leave files modified more recently than this for the next run (BCC_SETTLE_SECONDS)",
    )
    sp.add_argument("--run-id", help="run id (default: a new one); the id of an interrupted run finishes it")
    sp.add_argument(
        "--inference",
        choices=INFERENCE_CHOICES,
        help=f"inference back-end (default: BCC_INFERENCE or {DEFAULTS['inference']}; see the README's "
        "Benchmarks)",
    )
    sp.add_argument(
        "--force-unvalidated",
        action="store_true",
        help="score with --inference even where it is not validated for the champion (recorded)",
    )

    sp = add("predictions", cmd_predictions, "list stored predictions, newest first")
    sp.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="table (default, first 100 rows), csv or json (all rows unless --limit)",
    )
    sp.add_argument(
        "--since",
        help="only predictions scored at or after: ISO date/time (UTC unless a zone "
        "is given) or an age such as 12h, 7d",
    )
    sp.add_argument("--label", choices=("benign", "malignant"))
    sp.add_argument("--model-version", help="only predictions of this model version")
    sp.add_argument("--limit", type=int, help="at most N rows")
    sp.add_argument(
        "--latest",
        action="store_true",
        help="only the newest prediction per image (the latest_predictions view)",
    )
