"""The dataset store: one content-addressed copy of each labelled image, ``dataset/<sha[:2]>/<sha><ext>``,
written by intake and by holdout changes, read by training through ``images.stored_path``."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .copying import require_room
from .files import atomic_write, sha256_file
from .mounts import mounted_between, table_generation
from .moving import root_id

__all__ = ["holds", "store_copy"]


def store_copy(
    data: bytes, sha: str, ext: str, dataset_dir: Path, *, root_pin: tuple[int, int] | None = None
) -> Path:
    """Write the content-addressed copy atomically. An existing copy is kept only when it is a regular
    file holding exactly these bytes (by its hash): a damaged or replaced one of the same size is
    rewritten, never trusted in place of the landing file that is about to be removed. ``root_pin``:
    ``dataset/`` as it was when the run began (:func:`bcc_pipeline.moving.root_id`): once something is
    mounted over it, or it is swapped for a link, nothing is written (``OSError``, the file stays)."""
    dest = dataset_dir / sha[:2] / f"{sha}{ext}"
    generation = table_generation()
    if (point := mounted_between(dataset_dir, dest.parent)) is not None:
        # the copy would land wherever that mount leads, and be gone once it is unmounted
        raise OSError(errno.EXDEV, "something is mounted inside the dataset store", point)
    if root_pin is not None and root_id(dataset_dir) != root_pin:
        raise OSError(
            errno.EXDEV, "the dataset store has changed since the run began (a mount?)", str(dataset_dir)
        )
    try:
        if stat.S_ISREG(os.lstat(dest).st_mode) and sha256_file(dest) == sha:
            return dest
    except OSError:
        pass
    require_room(dataset_dir, len(data))  # never fills the disk the database and the models may share
    atomic_write(dest, data)
    if table_generation() != generation:  # a mount made or removed while it was written: is it here?
        point = mounted_between(dataset_dir, dest.parent)
        try:
            moved = root_pin is not None and root_id(dataset_dir) != root_pin
            here = point is None and not moved and sha256_file(dest) == sha
        except OSError:
            here = False
        if not here:  # written into a mount (another folder), or hidden under one: never trusted
            raise OSError(
                errno.EXDEV, "the dataset store changed (a mount) while the copy was written", str(dest)
            )
    return dest


def holds(stored_path: str | None, sha: str) -> bool:
    """Whether the stored copy at ``stored_path`` (an ``images`` row's) is a regular file holding exactly
    the content ``sha``."""
    if not stored_path:
        return False
    try:
        return stat.S_ISREG(os.lstat(stored_path).st_mode) and sha256_file(stored_path) == sha
    except OSError:
        return False
