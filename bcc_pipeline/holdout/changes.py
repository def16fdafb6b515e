"""Freezing and extending the holdout: the only two ways it changes, each logged in ``holdout_events``.

:func:`freeze_holdout` chooses it once from the labelled store; :func:`extend_holdout` adds the labelled
images of a folder. Both keep near-duplicates of development images out, with the reason recorded in
the holdout manifest (``excluded``), and write the new manifest with its log entry in one transaction.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from ..config import Settings
from ..destinations import require_destination
from ..display import display_path
from ..errors import DatasetError
from ..leftovers import sweep_stale_temporaries
from ..manifests import (
    Manifest,
    assign,
    group_key,
    require_both_sides,
    require_counts,
    select_groups,
    write_manifest,
)
from ..store import HoldoutEvent, ImageRecord, session_scope, utcnow
from .extend_folder import _as_label_conflict, _label_conflicts, _name_twins_in_development, _read_folder
from .records import (
    _contest_near_copies,
    _excluded,
    _group_of,
    _holdout_dir,
    _label_counts,
    _latest,
    _load,
    _near_copies_within,
    _near_exclusions,
    _usable,
    _with_phash,
)

__all__ = ["extend_holdout", "freeze_holdout", "withdraw_from_holdout"]


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
    require_destination(settings, settings.dataset_dir)  # its disk not mounted: no manifest written there
    sweep_stale_temporaries(settings)  # what a killed earlier change left half-written (.bcc-tmp-*)
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
        dev = [r for r in records if group_key(r) not in chosen]
        excluded = _near_exclusions([by_sha[e["sha256"]] for e in hold], dev, "development", change=1)
        out = {x["sha256"] for x in excluded}
        # nor one picture twice in it, or under both labels
        excluded += _near_copies_within(
            [by_sha[e["sha256"]] for e in hold if e["sha256"] not in out],
            "another holdout",
            same_label=True,
            change=1,
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


def extend_holdout(settings: Settings, folder: str | Path, *, actor: str, reason: str) -> Manifest:
    """Add the labelled images of ``folder`` (laid out like ``landing/<label>/[<group>/]``) to the
    holdout (creating it when there is none). The images are copied into the store as holdout images
    and never enter development; the folder is left as it is. Kept out, with the reason recorded:
    exact copies of images already in the store, images of a patient group that has development
    images, near-duplicates of development or holdout images, and content seen under both labels (exact or
    near copies, in the folder or in the store). What the folder holds that could not be used (a folder
    that is no label, a file that is no readable image) is returned in the manifest's ``refused``. Raises
    :class:`DatasetError` when nothing could be added (the message says why), so an explicit command
    never does nothing silently."""
    from ..content_store import store_copy

    reason = _check_reason(reason)
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    require_destination(settings, settings.dataset_dir)  # its disk not mounted: nothing stored there
    sweep_stale_temporaries(settings)  # what a killed earlier change left half-written (.bcc-tmp-*)
    found, refused = _read_folder(settings, folder)
    conflicts = _label_conflicts(settings, found)  # committed even when nothing is added
    with session_scope(settings.database_url) as s:
        last = _latest(s)
        old = _load(last)
        seq = (last.seq if last else 0) + 1
        in_holdout = {e["sha256"] for e in old.entries} if old else set()
        kept_out = {x["sha256"] for x in (old.excluded if old else [])}
        reserved = in_holdout | kept_out
        dev = _with_phash(s, [r for r in _usable(s) if r["sha256"] not in reserved])
        dev_groups = {group_key(r) for r in dev if r["group_id"]}  # however it is spelled
        excluded, candidates, already, seen = [], [], 0, set()
        grouped_out: list[dict[str, Any]] = []  # kept out for their patient: still compared for a twin
        contested_before = [
            conflicts[r["sha256"]] for r in found if r["sha256"] in conflicts and r["sha256"] in in_holdout
        ]
        for r in found:
            if r["sha256"] in conflicts and r["sha256"] not in reserved:
                # (one in the holdout is contested now: its row is excluded, `holdout show` lists it)
                if r["sha256"] not in seen:  # one record for the copies under both labels
                    seen.add(r["sha256"])
                    excluded.append(_excluded(r, conflicts[r["sha256"]], "label_conflict", change=seq))
                continue
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
            elif r["group_id"] and group_key(r) in dev_groups:
                grouped_out.append(r)
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
        excluded += _near_exclusions(candidates, dev, "development", change=seq)
        _name_twins_in_development(excluded, grouped_out, dev)
        out = {x["sha256"] for x in excluded}
        firsts, taken = [], set(reserved)  # each content of the folder once, as first found
        for r in found:
            if r["sha256"] not in taken:
                taken.add(r["sha256"])
                firsts.append(r)
        # nor a near-duplicate of an image already in the holdout (the same picture counted twice). One under
        # the other label contests that holdout image, as an exact copy does, whatever else keeps it out
        # (its patient in development, say)
        hold = _with_phash(s, [dict(e) for e in (old.entries if old else [])])
        near_hold = _near_exclusions(firsts, hold, "holdout", change=seq)
        contested_now = _contest_near_copies(s, near_hold, hold)
        excluded += [_as_label_conflict(x, hold) for x in near_hold if x["sha256"] not in out]
        out = {x["sha256"] for x in excluded}
        # nor one picture twice in the folder, or under both labels (re-encoded: other bytes), whatever
        # else keeps one of them out (a twin whose patient is in development is that patient's picture too)
        within = _near_copies_within(firsts, "another new holdout", same_label=True, change=seq)
        excluded += [x for x in within if x["sha256"] not in out]
        out = {x["sha256"] for x in excluded}
        added = [r for r in candidates if r["sha256"] not in out]
        if not added:
            refused_now = [x for x in refused if not x.get("ignored")]
            why = "; ".join(
                [f"holdout image contested: {c}" for c in dict.fromkeys(contested_before)]
                + [f"{x['source']}: {x['reason']}" for x in excluded[:5]]
                + [f"{x['path']}: {x['reason']}" for x in refused_now[: max(0, 5 - len(excluded))]]
            )
            why = why or "no new image"
            if contested_now:
                s.commit()  # the holdout images whose label is in doubt now stay marked: nothing else is written
            raise DatasetError(
                f"no image from {folder} was added to the holdout ({already} already in it "
                f"or kept out before, "
                f"{len(excluded)} kept out, {len(refused_now)} refused): {why}"
            )
        new_entries = []
        for r in added:
            try:
                stored = str(store_copy(r["data"], r["sha256"], r["suffix"], settings.dataset_dir))
            except (
                OSError
            ) as exc:  # full (the spare room it keeps), read-only: nothing of the change is written
                where = display_path(exc.filename) if exc.filename else display_path(settings.dataset_dir)
                raise DatasetError(
                    f"cannot write {r['source']} into the dataset store ({where}): "
                    f"{exc.strerror or exc}; the holdout is unchanged"
                ) from exc
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
                        phash_turns=r["turns"],
                    )
                )
            else:  # known from scoring (unlabelled); now it has a label
                row.label, row.group_id, row.stored_path, row.phash, row.phash_turns = (
                    r["label"],
                    r["group_id"],
                    stored,
                    r["phash"],
                    r["turns"],
                )
            new_entries.append({**r, "group_id": _group_of(r), "path": stored, "split": "holdout"})
        entries = (old.entries if old else []) + new_entries
        changed = _commit_change(
            s,
            settings,
            action="extend",
            actor=actor,
            reason=reason,
            old=old,
            entries=entries,
            excluded=(old.excluded if old else []) + _with_hashes(excluded, found),
            seq=seq,
        )
    return dataclasses.replace(changed, refused=refused)  # the caller says what was not added


def _with_hashes(excluded: list[dict[str, Any]], found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The exclusions of a change with the perceptual hashes of their pictures (``phash``, ``turns``): a
    picture kept out is not stored, and the split compares later development images with it (its copy
    under the other label must never train: :func:`.roles._twins_of_kept_out`)."""
    hashes = {r["sha256"]: (r.get("phash"), r.get("turns")) for r in found}
    out = []
    for x in excluded:
        phash, turns = hashes.get(x["sha256"], (None, None))
        out.append({**x, "phash": phash, "turns": turns} if phash and "phash" not in x else x)
    return out


def withdraw_from_holdout(
    settings: Settings, shas: list[str], *, contested: bool = False, actor: str, reason: str
) -> Manifest:
    """Take images out of the holdout, a logged change like the others (``withdraw``): those whose sha256
    starts with one of ``shas`` (at least 12 characters, each naming exactly one holdout image), and with
    ``contested`` every image whose label is contested (:func:`.records.contested`: intake saw its content
    under the other label). They are kept out from then on, with the reason, and never enter development.
    Until then the holdout's metrics count such an image under its holdout label, which nobody can defend
    once the label is in doubt; the holdout changes only by an explicit command, so intake only reports it."""
    from .records import _contested

    reason = _check_reason(reason)
    if any(len(p) < 12 for p in shas):
        raise DatasetError("name each image by at least 12 characters of its sha256")
    require_destination(settings, settings.dataset_dir)  # its disk not mounted: no manifest written there
    sweep_stale_temporaries(settings)  # what a killed earlier change left half-written (.bcc-tmp-*)
    with session_scope(settings.database_url) as s:
        last = _latest(s)
        old = _load(last)
        if old is None:
            raise DatasetError("there is no holdout to withdraw images from")
        chosen: dict[str, str] = {}
        for prefix in shas:
            hits = [e["sha256"] for e in old.entries if e["sha256"].startswith(prefix.lower())]
            if len(hits) != 1:
                raise DatasetError(f"{prefix} names {len(hits)} holdout images, not one")
            chosen[hits[0]] = reason
        if contested:
            chosen.update(
                {c["sha256"]: f"{reason} (label contested: {c['reason']})" for c in _contested(s, old)}
            )
        if not chosen:
            raise DatasetError("no holdout image to withdraw (none named, none contested)")
        seq = last.seq + 1
        out = [
            _excluded(e, chosen[e["sha256"]], "withdrawn", change=seq)
            for e in old.entries
            if e["sha256"] in chosen
        ]
        return _commit_change(
            s,
            settings,
            action="withdraw",
            actor=actor,
            reason=reason,
            old=old,
            entries=[e for e in old.entries if e["sha256"] not in chosen],
            excluded=old.excluded + out,
            seq=seq,
        )
