"""The names of the pipeline's temporaries: :data:`TEMP_PREFIX`, then who made them (process id and a key of
this machine's process table), so that what a killed process left is known as such at once
(:func:`temp_owner_gone`, used by :mod:`bcc_pipeline.leftovers`). :func:`bcc_pipeline.files.temp_prefix`
builds the names."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
from pathlib import Path

__all__ = ["TEMP_PREFIX", "temp_owner", "temp_owner_gone"]

TEMP_PREFIX = ".bcc-tmp-"
"""How the name of every temporary file or folder the pipeline makes starts (hidden, so discovery and
intake ignore it); what :func:`bcc_pipeline.leftovers.sweep_temporaries` may remove."""


def _machine_key() -> str:
    """8 hex digits that name this machine's process table: its host name, boot and pid namespace (with the
    start time of that namespace's first process). Two
    processes with the same key see each other's process ids (and can tell whether one is alive)."""
    return _machine_key_of(os.getpid())  # a forked child looks again (it may have a namespace of its own)


@functools.cache
def _machine_key_of(pid: int) -> str:
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
        # a namespace's inode number is reused by later namespaces: its first process's start time is not
        parts.append(Path("/proc/1/stat").read_text().rsplit(")", 1)[-1].split()[19])
    except (OSError, IndexError):
        parts.append("?")
    return hashlib.sha256("\0".join(parts).encode("utf-8", "backslashreplace")).hexdigest()[:8]


def temp_owner() -> str:
    """``p<pid>-<machine>``: the process a temporary is made by (:func:`temp_prefix`), so that what a killed
    process left is known as such at once (its process is gone: :func:`temp_owner_gone`)."""
    return f"p{os.getpid()}-{_machine_key()}"


_TEMP_OWNER = re.compile(re.escape(TEMP_PREFIX) + r"p([0-9]+)-([0-9a-f]{8})\.")


def temp_owner_gone(name: str) -> bool:
    """Whether the temporary ``name`` was made by a process of this machine's process table that is no
    longer alive (SIGKILLed in the middle of a write). False when that cannot be told: a name made on
    another host or in another pid namespace (a container sharing the folder), before names carried their
    maker, or by a process id alive now (perhaps reused). The maker's tag comes right after the prefix,
    before any of the file's own name, so no name can imitate or hide it."""
    found = _TEMP_OWNER.match(name)
    if found is None:
        return False
    pid, key = int(found.group(1)), found.group(2)
    if key != _machine_key() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False
