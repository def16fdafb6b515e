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

from .. import images
from ..config import Settings
from ..destinations import require_destination
from ..display import display_path, one_line
from ..errors import DatasetError, ImageError
from ..manifests import (
    Manifest,
    assign,
    require_both_sides,
    require_counts,
    select_groups,
    write_manifest,
)
from ..neardup import near_duplicates, perceptual_hash, turned_hashes
from ..store import HoldoutEvent, ImageRecord, session_scope, utcnow
from .records import (
    LABELS,
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
    mark_both_labels,
    patient_key,
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


def _read_folder(settings: Settings, folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every image under ``folder/<label>/[<group>/]``: decoded, hashed. Returns (images, refused): what
    could not be used ({path, reason}), with ``ignored`` set on what is left alone on purpose (hidden and
    system files, files that are no image by their extension), as intake ignores them."""
    from ..intake import IntakeReport, patient_group
    from ..intake_folders import is_ignored_name, walk

    found, refused = [], []

    def ignored(rel: Path | str, why: str) -> None:  # listed, but not a reason to exit 1 (as intake)
        refused.append({"path": display_path(rel), "reason": why, "ignored": True})

    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            ignored(entry.name, "hidden, left alone")
        elif entry.name not in LABELS:
            refused.append(
                {"path": display_path(entry.name), "reason": f"not a label folder ({', '.join(LABELS)})"}
            )
    for label in LABELS:
        if (folder / label).is_symlink():
            refused.append({"path": label, "reason": "a symbolic link; links are never followed"})
            continue
        if not (folder / label).is_dir():
            continue
        walked = IntakeReport(run_id="holdout")
        for path in walk(folder / label, folder, walked):
            rel = path.relative_to(folder)
            if is_ignored_name(path.name):  # hidden and system files (.DS_Store, Thumbs.db)
                ignored(rel, "hidden or system file, left alone")
                continue
            if path.is_symlink():  # a linked patient folder too: its images would go unseen
                refused.append(
                    {"path": display_path(rel), "reason": "a symbolic link; links are never followed"}
                )
                continue
            if path.suffix.lower() not in images.IMAGE_EXTENSIONS:
                ignored(rel, "not an image file extension")
                continue
            if not path.is_file():
                refused.append({"path": display_path(rel), "reason": "not a regular file"})
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
                refused.append(
                    {"path": display_path(rel), "reason": one_line(getattr(exc, "reason", None) or str(exc))}
                )
                continue
            found.append(
                {
                    "sha256": images.sha256_bytes(data),
                    "label": label,
                    # as intake names it: one patient has one group id, whichever way it came in
                    "group_id": patient_group(rel.parts[1]) if len(rel.parts) > 2 else None,
                    "source": display_path(path),
                    "data": data,
                    "suffix": path.suffix.lower(),
                    "phash": perceptual_hash(rgb),
                    "turns": turned_hashes(rgb),
                    "info": info,
                }
            )
        refused += [{"path": f["path"], "reason": f["error"]} for f in walked.failed]  # unlistable folders
        refused += [
            {"path": p, "reason": "a hidden folder, left alone", "ignored": True}
            for p in walked.ignored_paths
        ]
    return found, refused


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
        dev_groups = {patient_key(r["group_id"]) for r in dev if r["group_id"]}  # however it is spelled
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
            elif r["group_id"] and patient_key(r["group_id"]) in dev_groups:
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
            excluded=(old.excluded if old else []) + excluded,
            seq=seq,
        )
    return dataclasses.replace(changed, refused=refused)  # the caller says what was not added


def _name_twins_in_development(
    excluded: list[dict[str, Any]], grouped_out: list[dict[str, Any]], dev: list[dict[str, Any]]
) -> None:
    """An image kept out because its patient has development images, that is also a near-copy of a
    development image under the other label, names that image (``near_sha256``): the split then keeps the
    development image out of training (:func:`.roles._disputed_labels`), as for any near-copy kept out."""
    by_sha = {x["sha256"]: x for x in excluded if x["kind"] == "group_in_development"}
    label = {r["sha256"]: r["label"] for r in dev}
    for hit in near_duplicates(grouped_out, dev):
        x = by_sha[hit["sha256"]]
        if label[hit["near_sha256"]] != x["label"]:
            x.update(near_sha256=hit["near_sha256"], distance=hit["distance"])
            x["reason"] += (
                f"; and a near-copy of development image {hit['near_sha256'][:12]} labelled "
                f"{label[hit['near_sha256']]} ({hit['distance']} of 64 bits apart)"
            )


def _as_label_conflict(x: dict[str, Any], hold: list[dict[str, Any]]) -> dict[str, Any]:
    """A near-copy of a holdout image kept out: under the other label it is a label conflict (the holdout
    image is contested), and the reason says so."""
    theirs = next(e["label"] for e in hold if e["sha256"] == x["near_sha256"])
    if theirs == x["label"]:
        return x
    return {
        **x,
        "kind": "label_conflict",
        "reason": f"{x['reason']}, which is labelled {theirs}: which label is right cannot be told; that "
        "holdout image's label is contested (`bcc holdout show`)",
    }


def _label_conflicts(settings: Settings, found: list[dict[str, Any]]) -> dict[str, str]:
    """The images of ``found`` whose content is under both labels, in the folder itself or in the store
    under the other label, each with the reason it is kept out. As intake does, a stored image is excluded
    under both labels (a holdout image becomes contested, a development image leaves training); committed
    here, before the change is decided."""
    seen_as: dict[str, dict[str, str]] = {}  # sha256 -> label -> where the folder has it
    for r in found:
        seen_as.setdefault(r["sha256"], {}).setdefault(r["label"], r["source"])
    out: dict[str, str] = {}
    with session_scope(settings.database_url) as s:
        for sha, where in seen_as.items():
            known = s.get(ImageRecord, sha)
            if len(where) > 1:
                out[sha] = (
                    "the same image content is in the folder as "
                    + " and as ".join(f"{label} ({src})" for label, src in sorted(where.items()))
                    + "; excluded under both labels"
                )
            elif known is not None and known.label not in (None, *where):
                out[sha] = (
                    f"the same image content is in the store as {known.label} ({known.source_path}); "
                    "excluded under both labels"
                )
            else:
                continue
            if known is not None and known.label is not None:
                other = next(label for label in sorted(where) if label != known.label)
                mark_both_labels(known, other, where[other])
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
