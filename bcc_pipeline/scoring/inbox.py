"""The inbox: which folder may be scored, what in it is scored, and where each file goes afterwards.

Discovery (:func:`discover`) walks the inbox without following links. Hidden and system files, non-image
extensions, folders (even one named ``x.png``) and special files are *ignored* and left where they are;
files modified within ``settle_seconds`` are *skipped* (still being written; the next run takes them);
symbolic links are listed apart, to be rejected (moved to quarantine as links, the target never touched).

The folders the pipeline manages (:attr:`Settings.managed_dirs`, the one list) are never scored: an inbox
may not lie inside one, and an inbox that contains one (``--inbox $BCC_HOME``) skips it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

from .. import images
from ..config import Settings
from ..errors import ConfigError
from ..files import REASON_SUFFIX, SYSTEM_NAMES, display_path, safe_dirname

__all__ = ["destination", "discover", "inbox_root", "path_key"]

log = logging.getLogger(__name__)
InboxArg = str | os.PathLike[str] | None


def path_key(rel: str) -> str:
    """The ledger's key of an inbox path: the sha256 of its exact bytes (names may be long or not UTF-8)."""
    return hashlib.sha256(os.fsencode(rel)).hexdigest()


def destination(settings: Settings, run_id: str, status: str, rel: str) -> Path:
    """Where a file a run took on goes: ``quarantine/<run>/<rel>`` when rejected, else ``archive/<run>/<rel>``."""
    root = settings.quarantine_dir if status == "rejected" else settings.archive_dir
    return root / safe_dirname(run_id) / rel


def inbox_root(settings: Settings, inbox: InboxArg = None) -> Path:
    """The inbox folder (``inbox`` or ``settings.inbox_dir``); a :class:`ConfigError` when it lies inside a
    folder the pipeline manages: scoring it would move training data, models or earlier results into
    ``archive/``. (The home itself is fine only as a parent: :func:`discover` skips the managed folders.)"""
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(inbox)))) if inbox else settings.inbox_dir
    real = os.path.realpath(root)
    for managed in settings.managed_dirs:
        m = os.path.realpath(managed)
        if real == m or real.startswith(m + os.sep):
            raise ConfigError(f"the inbox {root} lies inside {managed}, which the pipeline manages; "
                              "choose another folder")
    return root


def discover(settings: Settings, inbox: InboxArg = None) -> dict[str, Any]:
    """Walk the inbox (recursively, never following links) and sort what is there.

    Returns ``{"inbox", "pending", "links", "ignored", "skipped"}``: ``pending`` are image files ready to
    score and ``links`` symbolic links to reject (paths relative to the inbox, sorted); ``ignored`` is a
    list of ``{"path", "reason"}`` left where they are; ``skipped`` files were modified within
    ``settle_seconds`` (still being written). Nothing is opened or read.
    """
    root = inbox_root(settings, inbox)
    out: dict[str, Any] = {"inbox": str(root), "pending": [], "links": [], "ignored": [], "skipped": []}
    if not root.is_dir():
        log.info("no inbox folder at %s; nothing to score", root)
        return out
    managed = {os.path.realpath(p) for p in settings.managed_dirs}
    now = time.time()
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        dir_abs, prefix = stack.pop()
        try:
            with os.scandir(dir_abs) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            out["ignored"].append({"path": display_path(prefix or "."),
                                   "reason": f"cannot list this folder: {exc.strerror or exc}"})
            continue
        subdirs = []
        for entry in entries:
            rel = os.path.join(prefix, entry.name) if prefix else entry.name
            name = entry.name
            ext = os.path.splitext(name)[1].lower()
            if name.startswith(".") or name.lower() in SYSTEM_NAMES:
                out["ignored"].append({"path": display_path(rel), "reason": "hidden or system file"})
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                out["ignored"].append({"path": display_path(rel),
                                       "reason": f"cannot inspect: {exc.strerror or exc}"})
                continue
            mode = st.st_mode
            if stat.S_ISLNK(mode):
                out["links"].append(rel)
            elif stat.S_ISDIR(mode):
                if os.path.realpath(entry.path) in managed:
                    continue
                if ext in images.IMAGE_EXTENSIONS:
                    out["ignored"].append({"path": display_path(rel),
                                           "reason": "a folder, not an image file (what it holds is scored)"})
                subdirs.append((entry.path, rel))
            elif not stat.S_ISREG(mode):
                out["ignored"].append({"path": display_path(rel),
                                       "reason": "not a regular file (pipe, socket or device)"})
            elif ext not in images.IMAGE_EXTENSIONS or name.endswith(REASON_SUFFIX):
                out["ignored"].append({"path": display_path(rel), "reason": "not an image file extension"})
            elif now - st.st_mtime < settings.settle_seconds:
                out["skipped"].append(display_path(rel))
            else:
                out["pending"].append(rel)
        stack.extend(reversed(subdirs))
    out["pending"].sort()
    out["links"].sort()
    return out
