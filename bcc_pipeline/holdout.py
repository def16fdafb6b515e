"""The frozen holdout, and the development split made beside it.

The holdout is the only place where reported metrics and model comparisons are measured, so every
candidate and the champion see the same images, and no choice (epoch, threshold, calibration) has
touched them. It is a manifest of its own, ``dataset/holdout/<hash>.json`` (entries with role
``holdout``), and it changes only through two explicit commands, each logged in ``holdout_events``
(who, when, why, hash before and after, counts):

* :func:`freeze_holdout` chooses it once from the labelled store: group-aware (a patient never sits
  in two roles) and stratified. The first split freezes one itself when there is none yet
  (``holdout_fraction``), logged like any other freeze.
* :func:`extend_holdout` adds labelled images from a folder laid out like ``landing/<label>/[<group>/]``.
  Those images go into the store as holdout images and never enter development; the folder is read,
  never changed.

New labelled data that arrives through ``landing/`` goes to development, never into the holdout.

Kept out of the holdout, with the reason recorded in its manifest (``excluded``): near-duplicates of a
development image (:mod:`bcc_pipeline.neardup`), exact copies of an image already in the store, and
images of a patient group that already has development images. Kept out of development, with the
reason in :func:`split_roles`' result: near-duplicates of a holdout image and images of a patient in
the holdout. Excluded images are used by no role.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import images
from .config import Settings
from .errors import DatasetError, ImageError
from .manifests import (
    Manifest,
    assign,
    load_manifest,
    make_split,
    require_both_sides,
    require_counts,
    select_groups,
    write_manifest,
)
from .model import CLASS_NAMES
from .neardup import NEAR_DUPLICATE_BITS, ensure_phashes, near_duplicates, perceptual_hash
from .store import HoldoutEvent, ImageRecord, ModelVersion, session_scope, utcnow

__all__ = [
    "AUTO_FREEZE_REASON",
    "RoleSplit",
    "current_holdout",
    "describe_holdout",
    "extend_holdout",
    "freeze_holdout",
    "split_roles",
]

LABELS = CLASS_NAMES
AUTO_FREEZE_REASON = "first split: no holdout yet"
UNGROUPED_WARNING = (
    "without patient groups, a split by image can leak: tiles of one patient can sit in "
    "training and in the holdout, and every reported metric is then optimistic"
)


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
            "first_seen_at": r.first_seen_at,
        }
        for r in rows
    ]


def _with_phash(session: Session, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    hashes = ensure_phashes(session, [r["sha256"] for r in records])
    return [{**r, "phash": hashes.get(r["sha256"])} for r in records]


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


def _label_counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    return {lab: sum(e["label"] == lab for e in entries) for lab in LABELS}


def _commit_change(
    session: Session,
    settings: Settings,
    *,
    action: str,
    actor: str,
    reason: str,
    old: Manifest | None,
    entries: list[dict[str, Any]],
    excluded: list[dict[str, Any]],
    seq: int,
) -> Manifest:
    """Write the holdout manifest and log the change (committed with the caller's session)."""
    entries = sorted(
        ({k: e[k] for k in ("sha256", "label", "group_id", "path", "split")} for e in entries),
        key=lambda e: e["sha256"],
    )
    manifest = write_manifest(
        entries,
        _holdout_dir(settings),
        seed=settings.seed,
        val_fraction=0.0,
        extra={"kind": "holdout"},
        excluded=excluded,
        roles=("holdout",),
    )
    session.add(
        HoldoutEvent(
            seq=seq,
            action=action,
            actor=actor,
            reason=reason,
            old_hash=old.hash if old else None,
            new_hash=manifest.hash,
            manifest_path=str(manifest.path),
            n_before=len(old.entries) if old else 0,
            n_after=len(entries),
            n_excluded=sum(x.get("change") == seq for x in excluded),
            counts=_label_counts(entries),
            created_at=utcnow(),
        )
    )
    session.flush()  # the unique seq refuses a concurrent change here
    return manifest


def _check_reason(reason: str) -> str:
    if not reason or not reason.strip():
        raise DatasetError("a holdout change needs a reason (it is recorded in the holdout log)")
    return reason.strip()


def freeze_holdout(settings: Settings, *, fraction: float, actor: str, reason: str) -> Manifest:
    """Choose the holdout once from the labelled store: ``fraction`` of each label, whole patient
    groups only, seeded. Near-duplicates of the remaining (development) images are kept out of it.
    Refused when a holdout exists: replacing it would make earlier comparisons meaningless."""
    reason = _check_reason(reason)
    if not 0 < fraction <= 0.5:
        raise DatasetError(f"the holdout fraction must be above 0 and at most 0.5, got {fraction}")
    with session_scope(settings.database_url) as s:
        last = _latest(s)
        if last is not None:
            raise DatasetError(
                f"a holdout is already frozen ({last.new_hash[:12]}, {last.n_after} images); it "
                "is changed only by `bcc holdout extend`"
            )
        records = _usable(s)
        require_counts(records, "holdout")
        records = _with_phash(s, records)
        chosen = select_groups(records, fraction, seed=settings.seed, salt="holdout:")
        by_sha = {r["sha256"]: r for r in records}
        hold = [e for e in assign(records, chosen, "holdout", "development") if e["split"] == "holdout"]
        dev = [r for r in records if _group_of(r) not in chosen]
        excluded = []
        for hit in near_duplicates([by_sha[e["sha256"]] for e in hold], dev):
            excluded.append(
                _excluded(
                    by_sha[hit["sha256"]],
                    _near_reason(hit, "development"),
                    "near_duplicate",
                    near_sha256=hit["near_sha256"],
                    distance=hit["distance"],
                    change=1,
                )
            )
        out = {x["sha256"] for x in excluded}
        hold = [e for e in hold if e["sha256"] not in out]
        require_both_sides(
            hold + [{**r, "split": "development"} for r in dev], ("holdout", "development"), "holdout"
        )
        return _commit_change(
            s,
            settings,
            action="freeze",
            actor=actor,
            reason=reason,
            old=None,
            entries=hold,
            excluded=excluded,
            seq=1,
        )


def _read_folder(settings: Settings, folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every image under ``folder/<label>/[<group>/]``: decoded, hashed. Returns (images, refused)."""
    from .intake import IntakeReport, _is_ignored_name, _walk

    found, refused = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name not in LABELS and not entry.name.startswith("."):
            refused.append({"path": entry.name, "reason": f"not a label folder ({', '.join(LABELS)})"})
    for label in LABELS:
        if not (folder / label).is_dir() or (folder / label).is_symlink():
            continue
        walked = IntakeReport(run_id="holdout")
        for path in _walk(folder / label, folder, walked):
            rel = path.relative_to(folder)
            if _is_ignored_name(path.name) or path.suffix.lower() not in images.IMAGE_EXTENSIONS:
                continue
            if path.is_symlink() or not path.is_file():
                refused.append({"path": str(rel), "reason": "not a regular file (links are never followed)"})
                continue
            try:
                if path.stat().st_size > images.max_file_bytes(settings.max_pixels):
                    raise ImageError(f"larger than any image within the pixel limit ({settings.max_pixels})")
                data = path.read_bytes()
                info = images.validate(
                    data, path=rel, max_pixels=settings.max_pixels, min_side=settings.min_side
                )
                rgb = images.decode(
                    data, path=rel, max_pixels=settings.max_pixels, min_side=settings.min_side
                )
            except (OSError, ImageError) as exc:
                refused.append({"path": str(rel), "reason": getattr(exc, "reason", None) or str(exc)})
                continue
            found.append(
                {
                    "sha256": images.sha256_bytes(data),
                    "label": label,
                    "group_id": rel.parts[1] if len(rel.parts) > 2 else None,
                    "source": str(path),
                    "data": data,
                    "suffix": path.suffix.lower(),
                    "phash": perceptual_hash(rgb),
                    "info": info,
                }
            )
        refused += [{"path": f["path"], "reason": f["error"]} for f in walked.failed]  # unlistable folders
    return found, refused


def extend_holdout(settings: Settings, folder: str | Path, *, actor: str, reason: str) -> Manifest:
    """Add the labelled images of ``folder`` (laid out like ``landing/<label>/[<group>/]``) to the
    holdout (creating it when there is none). The images are copied into the store as holdout images
    and never enter development; the folder is left as it is. Kept out, with the reason recorded:
    exact copies of images already in the store, images of a patient group that has development
    images, near-duplicates of development images. Raises :class:`DatasetError` when nothing could be
    added (the message says why), so an explicit command never does nothing silently."""
    from .intake import _store_copy

    reason = _check_reason(reason)
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    found, refused = _read_folder(settings, folder)
    with session_scope(settings.database_url) as s:
        last = _latest(s)
        old = _load(last)
        seq = (last.seq if last else 0) + 1
        in_holdout = {e["sha256"] for e in old.entries} if old else set()
        kept_out = {x["sha256"] for x in (old.excluded if old else [])}
        reserved = in_holdout | kept_out
        dev = _with_phash(s, [r for r in _usable(s) if r["sha256"] not in reserved])
        dev_groups = {r["group_id"] for r in dev if r["group_id"]}
        excluded, candidates, already, seen = [], [], 0, set()
        for r in found:
            if r["sha256"] in reserved or r["sha256"] in seen:  # in the holdout, or kept out before
                already += 1
                continue
            seen.add(r["sha256"])
            known = s.get(ImageRecord, r["sha256"])
            if known is not None and known.label is not None:
                excluded.append(
                    _excluded(
                        r,
                        f"exact copy (sha256) of an image already in the store as {known.label}",
                        "exact_duplicate",
                        change=seq,
                    )
                )
            elif r["group_id"] and r["group_id"] in dev_groups:
                excluded.append(
                    _excluded(
                        r,
                        f"patient group {r['group_id']} has development images; a patient "
                        "never sits in two roles",
                        "group_in_development",
                        change=seq,
                    )
                )
            else:
                candidates.append(r)
        for hit in near_duplicates(candidates, dev):
            r = next(c for c in candidates if c["sha256"] == hit["sha256"])
            excluded.append(
                _excluded(
                    r,
                    _near_reason(hit, "development"),
                    "near_duplicate",
                    near_sha256=hit["near_sha256"],
                    distance=hit["distance"],
                    change=seq,
                )
            )
        out = {x["sha256"] for x in excluded}
        added = [r for r in candidates if r["sha256"] not in out]
        if not added:
            why = "; ".join(f"{x['source']}: {x['reason']}" for x in excluded[:5]) or "no new image"
            raise DatasetError(
                f"no image from {folder} was added to the holdout ({already} already in it "
                f"or kept out before, "
                f"{len(excluded)} kept out, {len(refused)} refused): {why}"
            )
        new_entries = []
        for r in added:
            stored = str(_store_copy(r["data"], r["sha256"], r["suffix"], settings.dataset_dir))
            row = s.get(ImageRecord, r["sha256"])
            if row is None:
                info = r["info"]
                s.add(
                    ImageRecord(
                        sha256=r["sha256"],
                        label=r["label"],
                        group_id=r["group_id"],
                        width=info.width,
                        height=info.height,
                        format=info.format,
                        source_path=r["source"],
                        stored_path=stored,
                        first_seen_at=utcnow(),
                        phash=r["phash"],
                    )
                )
            else:  # known from scoring (unlabelled); now it has a label
                row.label, row.group_id, row.stored_path, row.phash = (
                    r["label"],
                    r["group_id"],
                    stored,
                    r["phash"],
                )
            new_entries.append({**r, "group_id": _group_of(r), "path": stored, "split": "holdout"})
        entries = (old.entries if old else []) + new_entries
        return _commit_change(
            s,
            settings,
            action="extend",
            actor=actor,
            reason=reason,
            old=old,
            entries=entries,
            excluded=(old.excluded if old else []) + excluded,
            seq=seq,
        )


@dataclass
class RoleSplit:
    """What :func:`split_roles` made: the development manifest (train/validation/calibration), the
    holdout beside it, and what a reader must know about both."""

    development: Manifest
    holdout: Manifest | None
    grouped: bool
    warnings: list[str] = field(default_factory=list)
    near_duplicates: list[dict[str, Any]] = field(default_factory=list)
    holdout_frozen_now: bool = False


def _group_warnings(records: list[dict[str, Any]]) -> tuple[bool, list[str]]:
    ungrouped = sum(not r.get("group_id") or str(r["group_id"]).startswith("sha:") for r in records)
    if records and ungrouped == len(records):
        return False, [
            f"no patient groups: none of the {len(records)} labelled images sits in a patient/slide "
            f"folder (landing/<label>/<group>/); {UNGROUPED_WARNING}"
        ]
    if ungrouped:
        return True, [
            f"{ungrouped} of {len(records)} labelled images have no patient group and are split one "
            f"by one; {UNGROUPED_WARNING}"
        ]
    return True, []


def split_roles(settings: Settings) -> RoleSplit:
    """The development split beside the frozen holdout (frozen now when there is none and
    ``holdout_fraction`` > 0). Development is every usable labelled image outside the holdout and its
    exclusions; ``calibration_fraction`` of it (by group, stratified) becomes calibration, and the
    seed's train/validation split applies to the rest."""
    from .registry import default_actor

    holdout, frozen_now, warnings = current_holdout(settings), False, []
    if holdout is None and settings.holdout_fraction > 0:
        holdout = freeze_holdout(
            settings, fraction=settings.holdout_fraction, actor=default_actor(), reason=AUTO_FREEZE_REASON
        )
        frozen_now = True
        warnings.append(
            f"froze a new holdout of {len(holdout.entries)} images ({holdout.hash[:12]}): "
            f"{AUTO_FREEZE_REASON}"
        )
    elif holdout is None:
        warnings.append(
            "no holdout (holdout_fraction is 0): metrics can only be measured on images that "
            "choices were made on"
        )
    hold_entries = holdout.entries if holdout else []
    reserved = {e["sha256"] for e in hold_entries} | {
        x["sha256"] for x in (holdout.excluded if holdout else [])
    }
    hold_groups = {e["group_id"] for e in hold_entries if not e["group_id"].startswith("sha:")}
    with session_scope(settings.database_url) as s:
        warnings += _champion_overlap(s, settings, {e["sha256"] for e in hold_entries})
        records = _usable(s)
        cutoff = max((r["first_seen_at"] for r in records), default=None)
        dev = [r for r in records if r["sha256"] not in reserved]
        dev_excluded = [
            _excluded(
                r,
                f"patient group {r['group_id']} is in the holdout; a patient never sits in "
                "two roles (`bcc holdout extend` can add this image to it)",
                "group_in_holdout",
            )
            for r in dev
            if r["group_id"] in hold_groups
        ]
        dev = _with_phash(s, [r for r in dev if r["group_id"] not in hold_groups])
        hold_hashed = _with_phash(s, [{**e} for e in hold_entries])
        by_sha = {r["sha256"]: r for r in dev}
        for hit in near_duplicates(dev, hold_hashed):
            dev_excluded.append(
                _excluded(
                    by_sha[hit["sha256"]],
                    _near_reason(hit, "holdout"),
                    "near_duplicate",
                    near_sha256=hit["near_sha256"],
                    distance=hit["distance"],
                )
            )
    out = {x["sha256"] for x in dev_excluded}
    dev = [r for r in dev if r["sha256"] not in out]
    grouped, group_warnings = _group_warnings(dev + hold_entries)
    warnings += group_warnings
    if any(x["kind"] == "group_in_holdout" for x in dev_excluded):
        n = sum(x["kind"] == "group_in_holdout" for x in dev_excluded)
        warnings.append(f"{n} labelled images belong to patients in the holdout; kept out of development")
    near = [
        {**x, "kept_out_of": "holdout"}
        for x in (holdout.excluded if holdout else [])
        if x["kind"] == "near_duplicate"
    ] + [{**x, "kept_out_of": "development"} for x in dev_excluded if x["kind"] == "near_duplicate"]
    if near:
        warnings.append(f"{len(near)} near-duplicate images across roles kept out (see near_duplicates)")
    entries = _development_entries(dev, settings)
    manifest = write_manifest(
        entries,
        settings.dataset_dir / "manifests",
        seed=settings.seed,
        val_fraction=settings.val_fraction,
        data_cutoff=cutoff,
        extra={"kind": "development", "calibration_fraction": settings.calibration_fraction},
        excluded=dev_excluded,
    )
    return RoleSplit(
        development=manifest,
        holdout=holdout,
        grouped=grouped,
        warnings=warnings,
        near_duplicates=near,
        holdout_frozen_now=frozen_now,
    )


def _champion_overlap(session: Session, settings: Settings, holdout: set[str]) -> list[str]:
    """A warning when the champion was developed on holdout images (a manifest from before the holdout,
    e.g. after an upgrade from an older release): the comparison on the holdout then favours it."""
    champ = session.scalars(select(ModelVersion).where(ModelVersion.status == "champion")).first()
    if champ is None or not holdout:
        return []
    try:
        seen = {
            e["sha256"]
            for e in load_manifest(settings.dataset_dir / "manifests" / f"{champ.manifest_hash}.json").entries
        }
    except DatasetError:
        return []
    n = len(seen & holdout)
    return (
        [
            f"the champion {champ.version} was developed on {n} of the {len(holdout)} holdout images (its data "
            "predates the holdout): comparisons on the holdout favour it"
        ]
        if n
        else []
    )


def _development_entries(records: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    records = [{k: r[k] for k in ("sha256", "label", "group_id", "path")} for r in records]
    cal: list[dict[str, Any]] = []
    if settings.calibration_fraction > 0:
        require_counts(records, "calibration")
        chosen = select_groups(
            records, settings.calibration_fraction, seed=settings.seed, salt="calibration:"
        )
        both = assign(records, chosen, "calibration", "development")
        require_both_sides(both, ("calibration", "development"), "calibration")
        cal = [e for e in both if e["split"] == "calibration"]
        records = [r for r in records if _group_of(r) not in chosen]
    return sorted(
        cal + make_split(records, seed=settings.seed, val_fraction=settings.val_fraction),
        key=lambda e: e["sha256"],
    )


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
    if holdout is None:
        return {
            "hash": None,
            "path": None,
            "n": 0,
            "counts": {},
            "groups": {},
            "excluded": [],
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
        "history": history,
    }
