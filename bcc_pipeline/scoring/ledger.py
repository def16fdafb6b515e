"""Every SQL statement on the inbox ledger of batch scoring: a batch's claim and commit, the look-ups a shard
makes, and where each file went.

The ledger (``inbox_files``) has one row per inbox file a run took on. A batch is committed in ONE
transaction (:func:`commit_batch`): the ledger rows (``INSERT .. ON CONFLICT DO NOTHING`` claims each
(run, path) once, so a shard started twice cannot score a file twice), the ``images`` rows, the
predictions (``UNIQUE(image_sha256, model_version)``, insert-or-nothing: a content already predicted by
this model is a *duplicate*) and the ``rejections``. Only after the commit do the files move; then
:func:`record_moves` writes where each went (``moved_to``) or why it could not (``move_error``).
Database errors become :class:`StoreError`. The ``scoring_runs`` rows (opening, liveness, tallies,
closing) are :mod:`.run_records`, whose names are re-exported here; the transaction is :mod:`.db`'s.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, delete, func, or_, select, update
from sqlalchemy.engine import Engine

from ..files import display_path
from ..moving import identity_text
from ..store import (
    ImageRecord,
    InboxFile,
    Prediction,
    Rejection,
    insert_rows,
    utcnow,
)
from ..store import place_recorded as _place_recorded
from .db import require_schema, transaction
from .loader import Item
from .run_records import (  # re-exported: the run rows were part of this module
    HEARTBEAT_STALE_SECONDS,
    champion_version,
    close_run,
    fail_run,
    heartbeat,
    mark_abandoned,
    model_version,
    open_run,
    run_tallies,
)

__all__ = [
    "CHANGED",
    "HEARTBEAT_STALE_SECONDS",
    "VANISHED",
    "champion_version",
    "changed",
    "close_run",
    "commit_batch",
    "fail_run",
    "heartbeat",
    "known_rows",
    "mark_abandoned",
    "mark_moved",
    "mark_vanished",
    "moved_by_another_run",
    "newest_row",
    "model_version",
    "open_run",
    "place_recorded",
    "places_elsewhere",
    "predicted",
    "record_moves",
    "recorded_place",
    "record_swept",
    "require_schema",
    "run_tallies",
    "transaction",
    "unmoved_rows",
    "vanished",
    "withdraw",
]

LEDGER = InboxFile.__table__
VANISHED = "the file left the inbox before it was moved"
"""``move_error`` of a file that left the inbox on its own: reported as missing, not as a failed move."""
_VANISHED_PREFIX = "the file left"  # every wording of VANISHED (older rows) starts so


CHANGED = "the file changed after it was read; it stays in the inbox for the next run"
"""``move_error`` of a file whose path held other content by the time it was to move (it was not moved;
the next run scores what is there)."""


def vanished(move_error: str) -> bool:
    """True for the ``move_error`` of a file that left the inbox on its own (any wording of it)."""
    return move_error.startswith(_VANISHED_PREFIX)


def changed(move_error: str) -> bool:
    """True for the ``move_error`` of a file that changed between reading and moving."""
    return move_error.startswith("the file changed")


# -- a shard's batches --------------------------------------------------------------------------
def known_rows(engine: Engine, run_id: str, keys: Sequence[str]) -> dict[str, list[Any]]:
    """The ledger rows that matter for these path keys, newest first: this run's rows, and other runs'
    rows not yet moved."""
    t = LEDGER
    with transaction(engine) as conn:
        rows = conn.execute(
            select(t)
            .where(t.c.path_key.in_(list(keys)))
            .where((t.c.run_id == run_id) | t.c.moved_to.is_(None))
            .order_by(t.c.id.desc())
        ).all()
    by_key: dict[str, list[Any]] = collections.defaultdict(list)
    for r in rows:
        by_key[r.path_key].append(r)
    return by_key


def predicted(engine: Engine, version: str, shas: Sequence[str]) -> set[str]:
    """Which of these contents already have a prediction from ``version``."""
    if not shas:
        return set()
    t = Prediction.__table__
    with transaction(engine) as conn:
        return set(
            conn.execute(
                select(t.c.image_sha256).where(t.c.model_version == version, t.c.image_sha256.in_(list(shas)))
            ).scalars()
        )


def commit_batch(
    engine: Engine,
    run_id: str,
    shard: int,
    mv: dict[str, Any],
    fresh: Sequence[Item],
    probs: dict[str, float],
    dest: dict[str, str],
    provenance: dict[str, tuple[str, str | None]] | None = None,
) -> tuple[list[Item], set[str]]:
    """Claim, record and predict one batch in ONE transaction.

    ``fresh``: the batch's files with no ledger row yet (loaded ``ok`` or ``rejected``); ``probs`` the
    model's probability per new content; ``provenance[sha]`` the (back-end, precision) that computed it;
    ``dest[key]`` where each file is to go. Returns the items this
    call claimed (another attempt of the same shard may have claimed the rest) and the path keys whose
    content got a new prediction (the other ``ok`` ones are duplicates).
    """
    now = utcnow()
    ledger = []
    for it in sorted(fresh, key=lambda i: i.key):  # one lock order in every process
        status = "rejected" if it.kind == "rejected" else "duplicate"
        ledger.append(
            {
                "run_id": run_id,
                "shard": shard,
                "path": it.path,
                "path_key": it.key,
                "sha256": it.sha,
                "status": status,
                "reason": it.reason,
                "dest": dest[it.key],
                "src_identity": identity_text(it.ident),
                "moved_to": None,
                "move_error": None,
                "created_at": now,
                "updated_at": now,
            }
        )
    lt = LEDGER
    with transaction(engine) as conn:
        claimed = set(
            insert_rows(conn, InboxFile, ledger, key=("run_id", "path_key"), returning=lt.c.path_key)
        )
        mine = [it for it in fresh if it.key in claimed]
        ok = [it for it in mine if it.kind == "ok"]
        img_rows, seen = [], set()
        for it in sorted(ok, key=lambda i: i.sha):
            if it.sha in seen:
                continue
            seen.add(it.sha)
            img_rows.append(
                {
                    "sha256": it.sha,
                    "label": None,
                    "group_id": None,
                    "width": it.info.width,
                    "height": it.info.height,
                    "format": it.info.format,
                    "source_path": it.path,
                    "stored_path": None,
                    "excluded_reason": None,
                    "first_seen_at": now,
                }
            )
        insert_rows(conn, ImageRecord, img_rows, key=("sha256",))
        owner: dict[str, Item] = {}
        for it in ok:
            if it.sha in probs and it.sha not in owner:
                owner[it.sha] = it
        thr, how = mv["threshold"], provenance or {}
        pred_rows = [
            {
                "image_sha256": sha,
                "model_version": mv["version"],
                "prob_malignant": probs[sha],
                "label": "malignant" if probs[sha] >= thr else "benign",
                "threshold": thr,
                "source_path": it.path,
                "run_id": run_id,
                "scored_at": now,
                "backend": how.get(sha, (None, None))[0],
                "precision": how.get(sha, (None, None))[1],
            }
            for sha, it in sorted(owner.items())
        ]
        new = set(
            insert_rows(
                conn,
                Prediction,
                pred_rows,
                key=("image_sha256", "model_version"),
                returning=Prediction.__table__.c.image_sha256,
            )
        )
        scored_keys = [owner[sha].key for sha in sorted(new)]
        if scored_keys:
            conn.execute(
                update(lt)
                .where(lt.c.run_id == run_id, lt.c.path_key.in_(scored_keys))
                .values(status="scored")
            )
        rej_rows = [
            {
                "run_id": run_id,
                "stage": "scoring",
                "path": it.path,
                "sha256": it.sha,
                "reason": it.reason,
                "moved_to": None,
                "rejected_at": now,
            }
            for it in sorted(mine, key=lambda i: i.path)
            if it.kind == "rejected"
        ]
        insert_rows(conn, Rejection, rej_rows, key=("run_id", "stage", "path"))
    return mine, set(scored_keys)


# -- moves --------------------------------------------------------------------------------------
def record_moves(engine: Engine, outcomes: Sequence[dict[str, Any]]) -> None:
    """Write where each file went. ``outcomes``: {run_id, key, path, rejected, moved_to, error, failed}; a
    rejected file that moved also gets ``moved_to`` on its ``rejections`` row; a failed move (``failed``)
    adds one to the row's ``move_attempts``."""
    if not outcomes:
        return
    lt = LEDGER
    now = utcnow()
    updates = [
        {
            "b_run": o["run_id"],
            "b_key": o["key"],
            "b_moved": o["moved_to"],
            "b_err": o["error"],
            "b_now": now,
            "b_fail": 1 if o.get("failed") else 0,
        }
        for o in outcomes
    ]
    rej_updates = [
        {"b_run": o["run_id"], "b_path": o["path"], "b_moved": o["moved_to"]}
        for o in outcomes
        if o["rejected"] and o["moved_to"]
    ]
    with transaction(engine) as conn:
        conn.execute(
            update(lt)
            .where(lt.c.run_id == bindparam("b_run"), lt.c.path_key == bindparam("b_key"))
            .values(
                moved_to=bindparam("b_moved"),
                move_error=bindparam("b_err"),
                updated_at=bindparam("b_now"),
                move_attempts=lt.c.move_attempts + bindparam("b_fail"),
            ),
            updates,
        )
        if rej_updates:
            conn.execute(_rejection_moved(), rej_updates)


def place_recorded(engine: Engine, run_id: str, shown: str) -> bool:
    """Whether a file of ``run_id`` is recorded as moved to ``shown`` (:func:`bcc_pipeline.store.place_recorded`)."""
    with transaction(engine) as conn:
        return _place_recorded(conn, run_id, shown)


def mark_moved(engine: Engine, row_id: int, moved_to: str, move_error: str | None = None) -> None:
    """A ledger row whose file an earlier attempt moved without recording it (``move_error``: a note,
    such as why it went to quarantine)."""
    with transaction(engine) as conn:
        conn.execute(
            update(LEDGER)
            .where(LEDGER.c.id == row_id)
            .values(moved_to=display_path(moved_to), move_error=move_error, updated_at=utcnow())
        )
        _rejections_follow(conn, [(row_id, moved_to)])


def _rejections_follow(conn: Any, found: Sequence[tuple[int, str]]) -> None:
    """The ``rejections`` rows of rejected ledger rows (id, where the file is) get the same ``moved_to``,
    as :func:`record_moves` gives them: a move recorded later is recorded in both tables."""
    rt = Rejection.__table__
    where = dict(found)
    rows = conn.execute(
        select(LEDGER.c.id, LEDGER.c.run_id, LEDGER.c.path).where(
            LEDGER.c.id.in_(list(where)), LEDGER.c.status == "rejected"
        )
    ).all()
    if rows:
        conn.execute(
            _rejection_moved().where(rt.c.moved_to.is_(None)),
            [{"b_run": r.run_id, "b_path": r.path, "b_moved": display_path(where[r.id])} for r in rows],
        )


def _rejection_moved() -> Any:
    """``moved_to`` of a scoring rejection, by (``b_run``, ``b_path``) = ``b_moved``."""
    rt = Rejection.__table__
    return (
        update(rt)
        .where(rt.c.run_id == bindparam("b_run"), rt.c.stage == "scoring", rt.c.path == bindparam("b_path"))
        .values(moved_to=bindparam("b_moved"))
    )


def recorded_place(engine: Engine, run_id: str, key: str) -> str | None:
    """Where the ledger row (``run_id``, ``key``) says its file went (``moved_to``), or None."""
    with transaction(engine) as conn:
        return conn.execute(
            select(LEDGER.c.moved_to).where(LEDGER.c.run_id == run_id, LEDGER.c.path_key == key)
        ).scalar()


def newest_row(engine: Engine) -> int:
    """The id of the newest ledger row (0 when there is none): rows with a larger id were written later."""
    with transaction(engine) as conn:
        return int(conn.execute(select(func.max(LEDGER.c.id))).scalar() or 0)


def moved_by_another_run(engine: Engine, run_id: str, key: str, after: int | None) -> str | None:
    """The run id of another run that scored and moved the file at the path ``key`` in a ledger row
    written after the row id ``after`` (when this run was planned), or None."""
    if after is None:
        return None
    t = LEDGER
    with transaction(engine) as conn:
        return conn.execute(
            select(t.c.run_id)
            .where(t.c.path_key == key, t.c.run_id != run_id, t.c.id > after, t.c.moved_to.is_not(None))
            .order_by(t.c.id.desc())
            .limit(1)
        ).scalar()


def places_elsewhere(
    engine: Engine, run_id: str, key: str, ident: str | None, after: int | None
) -> list[str]:
    """Where other runs' rows for the path ``key`` that read the very file ``ident`` (its identity as
    text), written after the row id ``after`` (this run looked the file up then), put it, or mean to
    (``moved_to``, else ``dest``): a run interleaved with this one took it. An older row of the same
    identity (a file archived before and put back) is not one. Row ids, not clocks: hosts' clocks differ."""
    if ident is None or after is None:
        return []
    t = LEDGER
    with transaction(engine) as conn:
        rows = conn.execute(
            select(t.c.moved_to, t.c.dest).where(
                t.c.path_key == key, t.c.run_id != run_id, t.c.src_identity == ident, t.c.id > after
            )
        ).all()
    return [r.moved_to or r.dest for r in rows if r.moved_to or r.dest]


def withdraw(engine: Engine, run_id: str, key: str, path: str) -> None:
    """Take back a run's claim of a file that another run, interleaved with it, took and moved first: its
    ledger row and its scoring rejection go (the file has the other run's); a prediction stays (one per
    content, whichever run wrote it)."""
    rt = Rejection.__table__
    with transaction(engine) as conn:
        conn.execute(delete(LEDGER).where(LEDGER.c.run_id == run_id, LEDGER.c.path_key == key))
        conn.execute(delete(rt).where(rt.c.run_id == run_id, rt.c.stage == "scoring", rt.c.path == path))


def mark_vanished(engine: Engine, row_id: int) -> None:
    """A ledger row whose file left the inbox before it was moved."""
    with transaction(engine) as conn:
        conn.execute(
            update(LEDGER).where(LEDGER.c.id == row_id).values(move_error=VANISHED, updated_at=utcnow())
        )


def unmoved_rows(engine: Engine, only_run: str | None = None, limit: int = 10000) -> list[Any]:
    """Ledger rows with no ``moved_to`` whose file has not left the inbox (id, run_id, path, path_key,
    status, reason, sha256, src_identity, move_attempts)."""
    t = LEDGER
    q = select(
        t.c.id,
        t.c.run_id,
        t.c.path,
        t.c.path_key,
        t.c.status,
        t.c.reason,
        t.c.sha256,
        t.c.src_identity,
        t.c.move_attempts,
    ).where(t.c.moved_to.is_(None))
    # settled: the file left the inbox (its row is found again by its path, should it come back)
    q = q.where(or_(t.c.move_error.is_(None), ~t.c.move_error.startswith(_VANISHED_PREFIX)))
    if only_run is not None:
        q = q.where(t.c.run_id == only_run)
    with transaction(engine) as conn:  # in the order the files were taken on (and so moved)
        return list(conn.execute(q.order_by(t.c.id).limit(limit)).all())


def record_swept(engine: Engine, found: Sequence[tuple[int, str, str | None]]) -> None:
    """``moved_to`` for rows (id, where the file is, a note for ``move_error``) whose move an interrupted
    run finished."""
    if not found:
        return
    now = utcnow()
    t = LEDGER
    with transaction(engine) as conn:
        conn.execute(
            update(t)
            .where(t.c.id == bindparam("b_id"), t.c.moved_to.is_(None))
            .values(
                moved_to=bindparam("b_moved"), move_error=bindparam("b_err"), updated_at=bindparam("b_now")
            ),
            [
                {"b_id": i, "b_moved": display_path(moved), "b_err": note, "b_now": now}
                for i, moved, note in found
            ],
        )
        _rejections_follow(conn, [(i, moved) for i, moved, _ in found])
