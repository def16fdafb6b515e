"""The development split made beside the frozen holdout (freezing one first when there is none).

Development is every usable labelled image outside the holdout and its exclusions, less the images of a
patient in the holdout and the near-duplicates of a holdout image (kept out, with the reason in
:class:`RoleSplit`); it is divided into calibration, train and validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..config import Settings
from ..errors import DatasetError
from ..manifests import (
    Manifest,
    assign,
    group_key,
    load_manifest,
    make_split,
    require_both_sides,
    require_counts,
    select_groups,
    write_manifest,
)
from ..store import ModelVersion, session_scope
from .changes import freeze_holdout
from .records import (
    _contest_near_copies,
    _excluded,
    _near_copies_within,
    _near_exclusions,
    _usable,
    _with_phash,
    current_holdout,
)

__all__ = ["AUTO_FREEZE_REASON", "RoleSplit", "split_roles"]

AUTO_FREEZE_REASON = "first split: no holdout yet"
UNGROUPED_WARNING = (
    "without patient groups, a split by image can leak: tiles of one patient can sit in "
    "training and in the holdout, and every reported metric is then optimistic"
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
    ungrouped = sum(_ungrouped(r) for r in records)
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


def _ungrouped(r: dict[str, Any]) -> bool:
    """An image that landed in no patient folder (its group is ``sha:<its sha256>``); a folder that is
    named ``sha:...`` is a patient's."""
    return not r.get("group_id") or r["group_id"] == f"sha:{r['sha256']}"


def split_roles(settings: Settings) -> RoleSplit:
    """The development split beside the frozen holdout (frozen now when there is none and
    ``holdout_fraction`` > 0). Development is every usable labelled image outside the holdout and its
    exclusions; ``calibration_fraction`` of it (by group, stratified) becomes calibration, and the
    seed's train/validation split applies to the rest."""
    from ..destinations import require_destination
    from ..leftovers import sweep_stale_temporaries
    from ..registry import default_actor

    require_destination(settings, settings.dataset_dir)  # its disk not mounted: no manifest written there
    sweep_stale_temporaries(settings)  # what a killed earlier split or change left half-written
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
    # by patient, however its folder was spelled (`patient_07` in the holdout, `Patient_07 ` landing later)
    hold_groups = {group_key(e) for e in hold_entries if not _ungrouped(e)}  # a folder named `sha:p9` too
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
            if group_key(r) in hold_groups
        ]
        in_hold_groups = _with_phash(s, [r for r in dev if group_key(r) in hold_groups])
        dev = _with_phash(s, [r for r in dev if group_key(r) not in hold_groups])
        hold_hashed = _with_phash(s, [{**e} for e in hold_entries])
        dev_excluded += _near_exclusions(dev, hold_hashed, "holdout")
        # a near-copy under the other label contests the holdout image also when its patient's folder is
        # in the holdout (kept out for that already, it would never be compared)
        same_patient = _near_exclusions(in_hold_groups, hold_hashed, "holdout")
        if n := _contest_near_copies(s, dev_excluded + same_patient, hold_entries):
            warnings.append(
                f"{n} holdout image(s) have a near-copy labelled the other way: their label is contested "
                "(`bcc holdout show`)"
            )
        gone = {x["sha256"] for x in dev_excluded}
        disputed = _disputed_labels([r for r in dev if r["sha256"] not in gone], holdout)
        # and against every image a holdout change kept out (round 27: kept out by `holdout extend` for its
        # patient in development, its copy under the other label landing afterwards trained)
        kept_by_changes = list({x["sha256"]: x for x in (holdout.excluded if holdout else [])}.values())
        stored = _with_phash(
            s, [{**x, "path": x.get("source")} for x in kept_by_changes if not x.get("phash")]
        )
        disputed += _twins_of_kept_out(
            [r for r in dev if r["sha256"] not in gone | {x["sha256"] for x in disputed}],
            in_hold_groups + [x for x in kept_by_changes if x.get("phash")] + stored,
        )
        if disputed:
            dev_excluded += disputed
            warnings.append(
                f"{len(disputed)} development image(s) have a near-copy labelled the other way (re-encoded or "
                "resized: other bytes): kept out of development under both labels (see the manifest's "
                "excluded)"
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


def _disputed_labels(dev: list[dict[str, Any]], holdout: Manifest | None) -> list[dict[str, Any]]:
    """Development images whose picture is also there under the other label, with other bytes (an exact
    copy is caught by intake): a near-copy in development labelled the other way (both kept out), or one
    that a holdout change kept out and found to be this image's near-copy (``bcc holdout extend`` of a
    re-encoded copy, in a new patient folder or in this image's own).
    Training on either label would teach what nobody can defend; which one is right cannot be told here."""
    out = _near_copies_within(dev, "another development", same_label=False)
    done = {x["sha256"] for x in out}
    by_sha = {r["sha256"]: r for r in dev}
    for x in (
        holdout.excluded if holdout else []
    ):  # kept out as a near-copy, or for its patient and a near-copy
        mine = by_sha.get(x.get("near_sha256") or "")
        if mine is None or mine["label"] == x["label"] or mine["sha256"] in done:
            continue
        done.add(mine["sha256"])
        out.append(
            _excluded(
                mine,
                f"near-copy {x['sha256'][:12]} ({x['source']}) was labelled {x['label']} and kept out of the "
                f"holdout ({x['distance']} of 64 bits apart): which label is right cannot be told",
                "label_conflict",
                near_sha256=x["sha256"],
                distance=x["distance"],
            )
        )
    return out


def _twins_of_kept_out(dev: list[dict[str, Any]], kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Development images with a near-copy labelled the other way among the images kept out of every role
    (for their patient in the holdout, or by a holdout change: for their patient in development, as a
    near-copy): the same picture under both labels, which one is right cannot be told. Round 26: kept out
    for its patient, a benign slide was never compared, and its malignant copy (turned, re-encoded) in
    another patient's folder stayed in calibration; round 27: so did one landing after `holdout extend`
    kept its benign twin out."""
    if not dev or not kept:
        return []
    mine, theirs = {r["sha256"] for r in dev}, {r["sha256"] for r in kept}
    return [
        x
        for x in _near_copies_within(dev + kept, "a kept-out", same_label=False)
        if x["sha256"] in mine and x.get("near_sha256") in theirs
    ]


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
        records = [r for r in records if group_key(r) not in chosen]
    return sorted(
        cal + make_split(records, seed=settings.seed, val_fraction=settings.val_fraction),
        key=lambda e: e["sha256"],
    )
