"""What a folder given to ``bcc holdout extend`` holds: its images read, decoded and hashed (and what it
holds that cannot be used), which of them are one content under both labels, and the reasons a near-copy
under the other label is kept out with (:func:`.changes.extend_holdout` decides the change)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import images
from ..config import Settings
from ..display import display_path, one_line
from ..errors import ImageError
from ..neardup import image_hashes, near_duplicates
from ..store import ImageRecord, session_scope
from .records import LABELS, mark_both_labels

__all__: list[str] = []


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
            phash, turns = image_hashes(rgb)
            found.append(
                {
                    "sha256": images.sha256_bytes(data),
                    "label": label,
                    # as intake names it: one patient has one group id, whichever way it came in
                    "group_id": patient_group(rel.parts[1]) if len(rel.parts) > 2 else None,
                    "source": display_path(path),
                    "data": data,
                    "suffix": path.suffix.lower(),
                    "phash": phash,
                    "turns": turns,
                    "info": info,
                }
            )
        refused += [{"path": f["path"], "reason": f["error"]} for f in walked.failed]  # unlistable folders
        refused += [
            {"path": p, "reason": "a hidden folder, left alone", "ignored": True}
            for p in walked.ignored_paths
        ]
    return found, refused


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
