"""The frozen holdout as recorded, and the labelled images it is drawn from.

Reads the holdout log (``holdout_events``) and the manifest of its newest change, describes the holdout
for people, lists the usable labelled images of the store, and builds the exclusion records (with their
reasons) that :mod:`.changes` and :mod:`.roles` both write.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..config import Settings
from ..errors import DatasetError
from ..manifests import Manifest, load_manifest, patient_key
from ..model import CLASS_NAMES
from ..neardup import NEAR_DUPLICATE_BITS, ensure_phashes, near_duplicates, near_pairs
from ..store import HoldoutEvent, ImageRecord, session_scope

__all__ = ["contested", "current_holdout", "describe_holdout", "mark_both_labels", "patient_key"]

LABELS = CLASS_NAMES


def _holdout_dir(settings: Settings) -> Path:
    return settings.dataset_dir / "holdout"


def _latest(session: Session) -> HoldoutEvent | None:
    return session.scalars(select(HoldoutEvent).order_by(HoldoutEvent.seq.desc()).limit(1)).first()


def _load(event: HoldoutEvent | None) -> Manifest | None:
    if event is None:
        return None
    m = load_manifest(event.manifest_path)
    if m.hash != event.new_hash:
        raise DatasetError(
            f"holdout manifest {event.manifest_path} has hash {m.hash}, the log says {event.new_hash}"
        )
    return m


def current_holdout(settings: Settings) -> Manifest | None:
    """The frozen holdout (the manifest of the newest logged change), or ``None`` before the first."""
    with session_scope(settings.database_url) as s:
        return _load(_latest(s))


def _usable(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(
        select(
            ImageRecord.sha256,
            ImageRecord.label,
            ImageRecord.group_id,
            ImageRecord.stored_path,
            ImageRecord.source_path,
            ImageRecord.first_seen_at,
        ).where(
            ImageRecord.label.is_not(None),
            ImageRecord.excluded_reason.is_(None),
            ImageRecord.stored_path.is_not(None),
        )
    ).all()
    return [
        {
            "sha256": r.sha256,
            "label": r.label,
            "group_id": r.group_id,
            "path": r.stored_path,
            "source": r.source_path,  # where it landed: what reasons name it by
            "first_seen_at": r.first_seen_at,
        }
        for r in rows
    ]


def _with_phash(session: Session, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    hashes = ensure_phashes(session, [r["sha256"] for r in records])
    out = []
    for r in records:
        phash, turns = hashes.get(r["sha256"], (None, None))
        out.append({**r, "phash": phash, "turns": turns})
    return out


def _contested(session: Session, holdout: Manifest | None) -> list[dict[str, Any]]:
    """The holdout's images whose label is contested since they were frozen: their ``images`` row was
    excluded (intake saw the same content under the other label). Metrics on this holdout still count
    them under their holdout label until a logged change withdraws them (:func:`.changes.withdraw_from_holdout`)."""
    if holdout is None or not holdout.entries:
        return []
    by_sha = {e["sha256"]: e for e in holdout.entries}
    rows = session.execute(
        select(ImageRecord.sha256, ImageRecord.excluded_reason).where(
            ImageRecord.sha256.in_(list(by_sha)), ImageRecord.excluded_reason.is_not(None)
        )
    ).all()
    return [
        {"sha256": r.sha256, "label": by_sha[r.sha256]["label"], "reason": r.excluded_reason}
        for r in sorted(rows, key=lambda r: r.sha256)
    ]


def mark_both_labels(row: ImageRecord, label: str, where: str) -> None:
    """The stored image ``row`` seen again under the other ``label`` (at ``where``): excluded under both
    labels (out of training; a holdout image is contested), the first reason kept."""
    if row.excluded_reason is None:
        row.excluded_reason = f"content seen as both {row.label} and {label} ({where})"


def contested(settings: Settings) -> list[dict[str, Any]]:
    """The current holdout's images whose label is contested (:func:`_contested`)."""
    with session_scope(settings.database_url) as s:
        return _contested(s, _load(_latest(s)))


def _group_of(r: dict[str, Any]) -> str:
    return r.get("group_id") or f"sha:{r['sha256']}"


def _excluded(r: dict[str, Any], reason: str, kind: str, **more: Any) -> dict[str, Any]:
    return {
        "sha256": r["sha256"],
        "label": r["label"],
        "group_id": _group_of(r),
        "source": r.get("source") or r.get("path"),
        "kind": kind,
        "reason": reason,
        **more,
    }


def _near_reason(hit: dict[str, Any], other_role: str) -> str:
    return (
        f"near-duplicate of {other_role} image {hit['near_sha256'][:12]} (perceptual hash {hit['distance']} "
        f"of 64 bits apart, rule: at most {NEAR_DUPLICATE_BITS})"
    )


def _near_exclusions(
    candidates: list[dict[str, Any]], others: list[dict[str, Any]], other_role: str, **more: Any
) -> list[dict[str, Any]]:
    """The candidates that are near-duplicates of an image of ``other_role`` (``others``), as exclusion
    records naming that image and the distance; ``more`` is added to each (the holdout change)."""
    by_sha = {r["sha256"]: r for r in candidates}
    return [
        _excluded(
            by_sha[hit["sha256"]],
            _near_reason(hit, other_role),
            "near_duplicate",
            near_sha256=hit["near_sha256"],
            distance=hit["distance"],
            **more,
        )
        for hit in near_duplicates(candidates, others)
    ]


def _near_copies_within(
    records: list[dict[str, Any]], role: str, *, same_label: bool, **more: Any
) -> list[dict[str, Any]]:
    """Near-copies among ``records`` themselves (one folder, one role), as exclusion records. A pair
    labelled both ways is kept out whole (``label_conflict``): the pictures cannot tell which label is
    right, and either copy would teach or score the other label. With ``same_label``, the later of a
    same-label pair is kept out too (``near_duplicate``: one picture counted twice). ``role`` names the
    other image in the reason ("another development image ...")."""
    by_sha = {r["sha256"]: r for r in records}
    hits = near_pairs(records)
    out: dict[str, dict[str, Any]] = {}
    for hit in sorted(hits, key=lambda h: by_sha[h["sha256"]]["label"] == by_sha[h["near_sha256"]]["label"]):
        r, first = by_sha[hit["sha256"]], by_sha[hit["near_sha256"]]
        if r["label"] != first["label"]:
            for a, b in ((r, first), (first, r)):
                out.setdefault(
                    a["sha256"],
                    _excluded(
                        a,
                        f"near-copy of {role} image {b['sha256'][:12]} labelled {b['label']} "
                        f"({b.get('source') or b.get('path')}; {hit['distance']} of 64 bits apart, rule: at "
                        f"most {NEAR_DUPLICATE_BITS}): which label is right cannot be told, both kept out",
                        "label_conflict",
                        near_sha256=b["sha256"],
                        distance=hit["distance"],
                        **more,
                    ),
                )
        elif same_label:
            out.setdefault(
                r["sha256"],
                _excluded(
                    r,
                    _near_reason(hit, role),
                    "near_duplicate",
                    near_sha256=hit["near_sha256"],
                    distance=hit["distance"],
                    **more,
                ),
            )
    return list(out.values())


def _contest_near_copies(session: Session, kept_out: list[dict[str, Any]], hold: list[dict[str, Any]]) -> int:
    """A development image kept out as a near-copy of a holdout image, under the other label, puts that
    holdout image's label in doubt, as an exact copy does at intake: its ``images`` row is excluded, so
    that it is reported as contested (the holdout itself changes only by a logged withdraw). Returns how
    many were newly marked."""
    label = {e["sha256"]: e["label"] for e in hold}
    marked = 0
    for x in kept_out:
        theirs = label.get(x.get("near_sha256", ""))
        if x["kind"] != "near_duplicate" or theirs in (None, x["label"]):
            continue
        row = session.get(ImageRecord, x["near_sha256"])
        if row is not None and row.excluded_reason is None:
            row.excluded_reason = (
                f"a near-copy ({x['distance']} of 64 bits apart) was labelled {x['label']} ({x['source']})"
            )
            marked += 1
    return marked


def _label_counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    return {lab: sum(e["label"] == lab for e in entries) for lab in LABELS}


def _utc(when: dt.datetime) -> str:
    """A stored time as UTC text (SQLite hands back naive datetimes; they were stored as UTC)."""
    aware = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return aware.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_holdout(settings: Settings) -> dict[str, Any]:
    """The holdout for people: hash, counts per label and per group, exclusions and the change log."""
    with session_scope(settings.database_url) as s:
        last = _latest(s)
        holdout = _load(last)
        history = [
            {
                "seq": e.seq,
                "action": e.action,
                "actor": e.actor,
                "reason": e.reason,
                "at": _utc(e.created_at),
                "old_hash": e.old_hash,
                "new_hash": e.new_hash,
                "n_before": e.n_before,
                "n_after": e.n_after,
                "n_excluded": e.n_excluded,
                "counts": e.counts,
            }
            for e in s.scalars(select(HoldoutEvent).order_by(HoldoutEvent.seq))
        ]
        disputed = _contested(s, holdout)
    if holdout is None:
        return {
            "hash": None,
            "path": None,
            "n": 0,
            "counts": {},
            "groups": {},
            "excluded": [],
            "contested": [],
            "history": history,
        }
    per_group: dict[str, Counter] = defaultdict(Counter)
    for e in holdout.entries:
        per_group[e["group_id"]][e["label"]] += 1
    return {
        "hash": holdout.hash,
        "path": str(holdout.path),
        "n": len(holdout.entries),
        "counts": _label_counts(holdout.entries),
        "n_groups": {lab: sum(c[lab] > 0 for c in per_group.values()) for lab in LABELS},
        "groups": {g: dict(c) for g, c in sorted(per_group.items())},
        "excluded": holdout.excluded,
        "contested": disputed,
        "history": history,
    }
