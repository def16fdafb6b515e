"""Data roles and the manifests that record them.

Every labelled image has at most one role:

``train``
    fitting;
``validation``
    epoch choice and the learning-rate schedule (the seed's 80/20 split of the development data that is
    not calibration);
``calibration``
    the operating threshold and the probability calibration;
``holdout``
    frozen, only for reporting and for comparing models; kept in its own manifest
    (:mod:`bcc_pipeline.holdout`), never in the development manifest.

A manifest is a JSON file named by the sha256 of its canonical entries (sha256, label, group, role), so
the same data in the same roles always gives the same file and hash, and an edited file is detected on
load. :meth:`Manifest.role_hash` identifies the images of one role alone.

Splits are seeded, group-aware and stratified: a group (a patient/slide; without one, a single image)
never sits in two roles, and each label gets its share. Groups are ranked by a seeded hash, not
shuffled, so a group keeps its role when new groups arrive.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DEFAULTS
from .display import INVISIBLE, path_from_display
from .errors import DatasetError
from .files import atomic_write
from .model import CLASS_NAMES

__all__ = [
    "ROLES",
    "Manifest",
    "assign",
    "counts",
    "group_key",
    "load_manifest",
    "make_split",
    "manifest_arrays",
    "patient_cut",
    "patient_key",
    "patient_name",
    "require_both_sides",
    "require_counts",
    "role_hash",
    "select_groups",
    "write_manifest",
]

LABELS = CLASS_NAMES
#: The data roles, in the order they are reported.
ROLES = ("train", "validation", "calibration", "holdout")
_CANONICAL = ("sha256", "label", "group_id", "split")


def _canonical_hash(entries: Sequence[dict[str, Any]]) -> str:
    canonical = [{k: e[k] for k in _CANONICAL} for e in entries]
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def role_hash(entries: Sequence[dict[str, Any]], role: str) -> str:
    """sha256 of the canonical entries of one role (sorted by sha256); an empty role has a hash too."""
    return _canonical_hash(sorted((e for e in entries if e["split"] == role), key=lambda e: e["sha256"]))


@dataclass(frozen=True)
class Manifest:
    """A written manifest. ``excluded`` lists images kept out of every role, each with its reason
    (near-duplicates, groups that would straddle roles); ``doc`` is the whole JSON document."""

    path: Path
    hash: str
    entries: list[dict[str, Any]]
    created_at: str
    data_cutoff: str | None
    excluded: list[dict[str, Any]] = field(default_factory=list)
    doc: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: what the change that wrote it was given and could not use ({path, reason}: a folder that is no
    #: label, a file that is no image); not part of the manifest (`bcc holdout extend` lists them)
    refused: list[dict[str, str]] = field(default_factory=list, repr=False, compare=False)

    def split(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["split"] == name]

    def n(self, role: str) -> int:
        return len(self.split(role))

    def role_hash(self, role: str) -> str:
        return role_hash(self.entries, role)

    @property
    def n_train(self) -> int:
        return self.n("train")

    @property
    def n_val(self) -> int:
        return self.n("validation")


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def patient_key(group_id: str | None) -> str | None:
    """The patient a group id names, for telling whether two folders are one patient: ``Patient_07``,
    ``patient_07 ``, ``patient-07`` and ``patient_０7`` (full-width digit) are ``patient07``
    (:func:`patient_name` of the folder's own name, not its escaped display form, cut as
    :func:`patient_cut` cuts it). Two spellings of one patient must never sit in two roles; two patients
    that only punctuation, case or accents tell apart are kept together, the safe side. Empty (a name of
    punctuation or blanks alone): the caller keeps such a group as it is spelled."""
    if not group_id:
        return None
    try:  # group ids are stored as displayed (escaped): the folder's own name is what is compared
        name = path_from_display(group_id)
    except ValueError:  # not a display form (an old id cut mid-escape): compared as it is stored
        name = group_id
    return patient_cut(patient_name(name))


def patient_name(name: str) -> str:
    """A folder's own name as one patient's: its letters and digits only, compatibility-decomposed
    (full-width forms, ligatures, fractions), case folded (the dotless ``ı`` as ``i``, for Turkish case
    pairs: ``Işık``/``IŞIK``), without accents, marks, punctuation, spaces of any kind, or characters
    nobody can see (:data:`bcc_pipeline.display.INVISIBLE`: variation selectors, Hangul fillers, the blank
    braille pattern). Applied to its own result it changes nothing."""
    s = unicodedata.normalize("NFKD", name).casefold().replace("\u0131", "i")
    s = unicodedata.normalize("NFKD", s)
    s = "".join(c for c in s if c.isalnum() and not INVISIBLE.match(c))
    return unicodedata.normalize("NFKC", s)


_PATIENT_MAX = 255  # images.group_id is VARCHAR(255)


def patient_cut(name: str) -> str:
    """:func:`patient_name`'s result within the group id column: a longer one is cut with 8 hex digits of
    its hash (letters and digits too, so that cutting it again changes nothing)."""
    if len(name) <= _PATIENT_MAX:
        return name
    return name[: _PATIENT_MAX - 8] + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _own_group(r: dict[str, Any]) -> str:
    return r.get("group_id") or f"sha:{r['sha256']}"


def group_key(r: dict[str, Any]) -> str:
    """The group a record is kept with in every split: its patient however the folder is spelled
    (:func:`patient_key`; a name of blanks alone is its own), an ungrouped image alone (``sha:<sha256>``)."""
    own = _own_group(r)
    return patient_key(own) or own


def _groups(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[group_key(r)].append(r)
    return groups


def select_groups(
    records: Sequence[dict[str, Any]], fraction: float, *, seed: int, salt: str = ""
) -> set[str]:
    """The groups that take ``fraction`` of every label, stratified.

    Groups are visited in the order of a seeded hash of ``salt`` and the group name, and taken while
    that brings every label closer to its target ``max(1, round(fraction * n_label))``. Ungrouped
    records are groups of one (``sha:<sha256>``); a patient spelled two ways is one group
    (:func:`group_key`). Returns group keys: test a record with ``group_key(r) in chosen``."""
    groups = _groups(records)
    totals: dict[str, int] = defaultdict(int)
    for r in records:
        totals[r["label"]] += 1
    target = {lab: max(1, round(fraction * n)) for lab, n in totals.items()}
    taken: dict[str, int] = defaultdict(int)
    chosen: set[str] = set()
    # ranked by the patient, not a spelling: a new spelling of a patient moves no other group (round 26)
    for g in sorted(groups, key=lambda g: _rank(seed, f"{salt}{g}")):
        counts: dict[str, int] = defaultdict(int)
        for r in groups[g]:
            counts[r["label"]] += 1
        before = sum(abs(target[lab] - taken[lab]) for lab in target)
        after = sum(abs(target[lab] - taken[lab] - counts.get(lab, 0)) for lab in target)
        if after < before:
            chosen.add(g)
            for lab, c in counts.items():
                taken[lab] += c
    return chosen


def assign(
    records: Sequence[dict[str, Any]], chosen: set[str], inside: str, outside: str
) -> list[dict[str, Any]]:
    """Entries for ``records``: role ``inside`` for the chosen groups, ``outside`` for the rest."""
    out = []
    for g, members in _groups(records).items():
        for r in members:
            out.append(
                {
                    "sha256": r["sha256"],
                    "label": r["label"],
                    "group_id": _own_group(r),
                    "path": r.get("path"),
                    "split": inside if g in chosen else outside,
                }
            )
    return out


def require_both_sides(entries: Sequence[dict[str, Any]], roles: tuple[str, str], what: str) -> None:
    for label in LABELS:
        sides = {e["split"] for e in entries if e["label"] == label}
        if not set(roles) <= sides:
            raise DatasetError(
                f"the {what} split left no {label} images on one side; add more {label} groups"
            )


def require_counts(records: Sequence[dict[str, Any]], what: str) -> None:
    if not records:
        raise DatasetError(
            "no labelled images to split; put images in landing/benign and landing/malignant and run intake"
        )
    for label in LABELS:
        n = sum(r["label"] == label for r in records)
        if n < 2:
            raise DatasetError(f"need at least 2 {label} images for a {what} split, have {n}")


def make_split(
    records: Sequence[dict[str, Any]],
    *,
    seed: int = DEFAULTS["seed"],
    val_fraction: float = DEFAULTS["val_fraction"],
) -> list[dict[str, Any]]:
    """Assign each record (``sha256``, ``label``, ``group_id``) to ``train`` or ``validation``.

    Groups are ranked by a seeded hash (stable when new groups arrive, unlike a shuffle) and taken
    into validation greedily while that brings every label closer to its target count
    ``round(val_fraction * n_label)``. A group never straddles the split.
    """
    require_counts(records, "train/validation")
    out = assign(records, select_groups(records, val_fraction, seed=seed), "validation", "train")
    require_both_sides(out, ("train", "validation"), "train/validation")
    out.sort(key=lambda e: e["sha256"])
    return out


def counts(
    entries: Sequence[dict[str, Any]], roles: Sequence[str] = ("train", "validation")
) -> dict[str, dict[str, int]]:
    """Images per role and label; ``roles`` are always present, any other role that occurs too."""
    out: dict[str, dict[str, int]] = {r: {} for r in roles}
    for e in entries:
        role = out.setdefault(e["split"], {})
        role[e["label"]] = role.get(e["label"], 0) + 1
    order = {lab: i for i, lab in enumerate(LABELS)}
    return {
        r: dict(sorted(c.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
        for r, c in out.items()
    }


def write_manifest(
    entries: Sequence[dict[str, Any]],
    out_dir: Path,
    *,
    seed: int,
    val_fraction: float,
    data_cutoff: dt.datetime | None = None,
    extra: dict[str, Any] | None = None,
    excluded: Sequence[dict[str, Any]] = (),
    roles: Sequence[str] = ("train", "validation"),
) -> Manifest:
    """Write ``out_dir/<hash>.json``; the same data and split always give the same file.

    ``extra`` is recorded in the document (the kind of manifest, settings); ``excluded`` lists images
    kept out of every role with the reason; ``roles`` are counted and hashed even when empty."""
    digest = _canonical_hash(entries)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{digest}.json"
    present = sorted({e["split"] for e in entries} | set(roles), key=_role_order)
    doc = {
        "hash": digest,
        "seed": seed,
        "val_fraction": val_fraction,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "data_cutoff": data_cutoff.isoformat() if data_cutoff else None,
        "counts": counts(entries, roles),
        "role_hashes": {r: role_hash(entries, r) for r in present},
        **(extra or {}),
        "excluded": list(excluded),
        "entries": list(entries),
    }
    if not path.exists():
        atomic_write(path, json.dumps(doc, indent=1))
    else:  # the same entries as an earlier manifest (a withdraw back to an earlier set): its file is kept,
        # and what this one keeps out is added to its list, never lost with the file not written
        old = json.loads(path.read_text(encoding="utf-8"))
        known = {json.dumps(x, sort_keys=True, default=str) for x in old.get("excluded", [])}
        more = [x for x in excluded if json.dumps(x, sort_keys=True, default=str) not in known]
        if more:
            atomic_write(path, json.dumps({**old, "excluded": old.get("excluded", []) + more}, indent=1))
    return load_manifest(path)


def _role_order(role: str) -> tuple[int, str]:
    return (ROLES.index(role) if role in ROLES else len(ROLES), role)


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read manifest {path}: {exc}") from exc
    if _canonical_hash(doc["entries"]) != doc["hash"]:
        raise DatasetError(f"manifest {path} does not match its own hash; it was edited after it was written")
    return Manifest(
        path=path,
        hash=doc["hash"],
        entries=doc["entries"],
        created_at=doc["created_at"],
        data_cutoff=doc.get("data_cutoff"),
        excluded=doc.get("excluded", []),
        doc=doc,
    )


def manifest_arrays(manifest: Manifest, split: str) -> tuple[list[str], list[int]]:
    """Stored paths and 0/1 labels of one role (``train``, ``validation``, ``calibration``, ``holdout``)."""
    entries = manifest.split(split)
    missing = [e["path"] for e in entries if not e.get("path") or not Path(e["path"]).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} stored images of the manifest are missing, e.g. {missing[0]}")
    return [e["path"] for e in entries], [LABELS.index(e["label"]) for e in entries]
