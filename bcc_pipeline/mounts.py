"""Where else a folder is visible on this machine: the paths a bind mount hides.

A bind mount shows a folder under a second path, and nothing at the second path says where the folder
really lives: ``mount --bind /srv/bcc-b/landing /srv/inbox/scans`` makes deployment B's labelled images
look like a plain inbox folder. The kernel knows, and says so in ``/proc/self/mountinfo``: each mount
names its filesystem (major:minor) and the folder of that filesystem it shows (its *root*). Another mount
of the same filesystem whose root lies above that folder shows it too, under a path that can be checked
for a BCC home above it (:func:`other_paths`). A mount can also be made while a run reads a folder it judged
a moment before: :class:`MountWatch` says when the table changed, so the folders are judged again. Two
kinds of mount show files under a device and inode of their own, so no comparison of folders finds them:
an overlay filesystem (its layers are in the mount's options: :func:`overlay_layers`) and a bind mount of
a single file (a mount point below the folder: :func:`mount_points_below`).

Hand-written because neither the standard library nor a kept package reads mountinfo's roots
(``os.path.ismount`` only compares devices, which a bind mount inside one filesystem leaves equal).
Where ``/proc`` is not there (not Linux) or a filesystem is mounted nowhere else here (a container that
sees only the bind), there is nothing to find, and only a ``.bcc-managed`` marker tells.
"""

from __future__ import annotations

import errno
import os
import re
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "SYSTEM_FILESYSTEMS",
    "CannotTell",
    "Mount",
    "MountWatch",
    "mount_points_below",
    "mounted_between",
    "table_generation",
    "mount_table",
    "OVERLAY_UNCHECKED",
    "other_paths",
    "overlay_layers",
    "overlay_point",
    "system_filesystem",
]

MOUNTINFO = "/proc/self/mountinfo"
T = TypeVar("T")
_ESCAPE = re.compile(rb"\\([0-7]{3})")


class CannotTell(PermissionError):
    """A path of the folder's filesystem that may show the same folder, which this user may not look at
    (a foreign home kept private) or which another mount covers: whether the folder is another
    deployment's cannot be told. ``why``: what stopped the look."""

    def __init__(self, errno_: int, why: str, path: str):
        super().__init__(errno_, why, path)
        self.why = why


@dataclass(frozen=True)
class Mount:
    device: bytes  # major:minor of the filesystem
    root: bytes  # the folder of that filesystem shown here
    point: bytes  # where it is shown
    fstype: bytes = b""  # its type (ext4, tmpfs, proc, ...)
    options: bytes = b""  # the filesystem's own options (an overlay's lowerdir= and upperdir=)


#: Filesystems the kernel makes up (processes, devices, kernel settings): what is in them is nobody's
#: image, and a link or file there may be the system's own. A folder showing one is never scored.
SYSTEM_FILESYSTEMS = frozenset(
    b"autofs binfmt_misc bpf cgroup cgroup2 configfs debugfs devpts devtmpfs efivarfs fusectl hugetlbfs "
    b"mqueue nsfs proc pstore rpc_pipefs securityfs selinuxfs sysfs tracefs".split()
)


class MountWatch:
    """Whether this process's mount table changed: a folder judged before a bind mount was made over it
    (or over a folder above it) shows other files now, and a file read while the table changed may have
    been read through a mount that is gone again by the time anyone looks.

    The kernel marks an open ``/proc/self/mountinfo`` when a mount or unmount changes the namespace's table
    (``poll`` reports ``POLLPRI``: proc(5)), and clears the mark when it reports it. :meth:`generation`
    counts the marks seen (one ``poll`` call with no wait, nothing read), so a mount made and removed again
    between two looks still moves the count on. A file is trusted as read only when the count was the same
    before and after its read, and the folders were judged (:meth:`stable`) in that very generation.
    Where the table cannot be opened (no ``/proc``) the count never moves: there is no table to judge by
    either. Use it as a context manager (it holds a file descriptor)."""

    def __init__(self, path: str = MOUNTINFO):
        self._poll: select.poll | None = None
        self._lock = threading.Lock()  # the loading threads and the shard's thread ask at once
        self._generation = 0
        try:
            self._fh = open(path, "rb")  # noqa: SIM115 -- held open: the kernel marks this open file
        except OSError:
            self._fh = None
            return
        self._poll = select.poll()
        self._poll.register(self._fh, select.POLLPRI | select.POLLERR)

    def generation(self) -> int:
        """How many changes of the table have been seen so far (several changes between two calls count
        once). The same number before and after a piece of work (reading a file) means the table did not
        change during it: what the work saw is what a judgement made in that generation saw."""
        with self._lock:
            if self._poll is not None and any(
                ev & (select.POLLPRI | select.POLLERR) for _, ev in self._poll.poll(0)
            ):
                self._generation += 1
            return self._generation

    def stable(self, judge: Callable[[], T], attempts: int = 5) -> tuple[T, int | None]:
        """``judge()`` run while the table did not change, and the generation it holds for: what it
        returns is true of every moment of that generation. None for the generation when the table kept
        changing ``attempts`` times in a row (then nothing read meanwhile can be trusted)."""
        for _ in range(attempts):
            before = self.generation()
            verdict = judge()
            if self.generation() == before:
                return verdict, before
        return verdict, None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh, self._poll = None, None

    def __enter__(self) -> MountWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unescape(field: bytes) -> bytes:
    # mountinfo writes space, tab, newline and backslash as three-digit octal escapes
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def mount_table(path: str = MOUNTINFO) -> list[Mount]:
    """The mounts of this process's namespace in mount order (a later mount on a point covers an earlier
    one); empty where the table cannot be read."""
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    table = []
    for line in lines:
        fields = line.split(b" ")
        if len(fields) >= 5:
            # the optional fields end at "-"; the filesystem type follows it
            dash = fields.index(b"-", 6) if b"-" in fields[6:-1] else None
            fstype = fields[dash + 1] if dash is not None else b""
            options = fields[dash + 3] if dash is not None and len(fields) > dash + 3 else b""
            table.append(Mount(fields[2], _unescape(fields[3]), _unescape(fields[4]), fstype, options))
    return table


def _under(path: bytes, folder: bytes) -> bytes | None:
    """``path`` relative to ``folder`` (b"" when equal), or None when it is not inside it."""
    if path == folder:
        return b""
    prefix = folder.rstrip(b"/") + b"/"
    return path[len(prefix) :] if path.startswith(prefix) else None


def _join(folder: bytes, rel: bytes) -> bytes:
    return (folder.rstrip(b"/") + b"/" + rel) if rel else folder


def _shown_by(target: bytes, table: list[Mount]) -> Mount | None:
    """The mount that shows the path ``target``: the last one (the top of a stack) on the longest point
    above it."""
    shown = None
    for m in table:
        if _under(target, m.point) is not None and (shown is None or len(m.point) >= len(shown.point)):
            shown = m
    return shown


def system_filesystem(folder: str, table: list[Mount] | None = None) -> str | None:
    """The type of the filesystem ``folder`` (a resolved path) is on when it is one the kernel makes up
    (:data:`SYSTEM_FILESYSTEMS`: ``/proc`` bind-mounted into an inbox), else None."""
    shown = _shown_by(os.fsencode(folder), mount_table() if table is None else table)
    return os.fsdecode(shown.fstype) if shown is not None and shown.fstype in SYSTEM_FILESYSTEMS else None


def mount_points_below(folder: str, table: list[Mount] | None = None) -> frozenset[str]:
    """The mount points strictly inside the folder ``folder`` (a resolved path): where another folder, or a
    single file (``mount --bind /elsewhere/x.png inbox/x.png``), is shown inside it."""
    table = mount_table() if table is None else table
    target = os.fsencode(folder)
    return frozenset(os.fsdecode(m.point) for m in table if _under(m.point, target))


_tables_lock = threading.Lock()
_tables: dict[str, object] = {}


def _process_watch() -> MountWatch:
    """This process's own :class:`MountWatch` (a forked child makes its own). Call with the lock held."""
    watch = _tables.get("watch")
    if not isinstance(watch, MountWatch) or _tables.get("pid") != os.getpid():
        watch = MountWatch()
        _tables.update(watch=watch, pid=os.getpid(), generation=None)
    return watch


def table_generation() -> int:
    """The mount table's generation as this process sees it (:meth:`MountWatch.generation`): the same
    number before and after a write means no mount was made or removed meanwhile."""
    with _tables_lock:
        return _process_watch().generation()


def _current_table() -> list[Mount]:
    """The mount table, read again only when it changed since it was last read (one process-wide
    :class:`MountWatch`: a ``poll`` per call, the file read only after a change)."""
    with _tables_lock:
        watch = _process_watch()
        generation = watch.generation()
        if _tables.get("generation") != generation:
            table, generation = watch.stable(mount_table)
            _tables.update(table=table, generation=generation)
        return _tables["table"]  # type: ignore[return-value]


def mounted_between(root: str | os.PathLike[str], folder: str | os.PathLike[str]) -> str | None:
    """A mount point below the folder ``root`` at or above ``folder`` (a folder inside it), or None: a
    filesystem, or another folder, mounted over a folder the pipeline writes into (``archive/<run>/...``,
    ``quarantine/``, ``dataset/``). What is written there goes wherever that mount leads (another
    deployment's ``landing/malignant``) and is gone from here once it is unmounted."""
    real_root = os.path.realpath(root)
    rel = os.path.relpath(os.path.abspath(folder), os.path.abspath(root))
    if rel == os.curdir or rel.startswith(os.pardir):
        return None
    target = os.fsencode(os.path.join(real_root, rel))
    base = os.fsencode(real_root)
    for m in _current_table():
        if _under(m.point, base) and _under(target, m.point) is not None:
            return os.fsdecode(m.point)
    return None


_UNESCAPED = {b",": re.compile(rb"(?<!\\),"), b":": re.compile(rb"(?<!\\):")}


def overlay_point(folder: str, table: list[Mount] | None = None) -> str | None:
    """Where the overlay filesystem that shows the folder ``folder`` (a resolved path) is mounted, or None
    when the folder is on another kind of filesystem."""
    table = mount_table() if table is None else table
    shown = _shown_by(os.fsencode(folder), table)
    return os.fsdecode(shown.point) if shown is not None and shown.fstype == b"overlay" else None


#: Why a folder on an overlay mounted anywhere but ``/`` (a container's own root) is refused when no layer
#: of it shows a home: the layers are named by the paths they had when it was mounted, and a layer folder
#: renamed since (into another home, or under the other label) is not where its path says.
OVERLAY_UNCHECKED = (
    "its layers are named by paths that may no longer be the folders it shows (a layer renamed after the "
    "overlay was mounted), so whose images it shows cannot be told"
)


def overlay_layers(folder: str, table: list[Mount] | None = None) -> list[str]:
    """Where the files of the folder ``folder`` (a resolved path) come from when it is on an overlay
    filesystem: the same place in each of the overlay's layers (``lowerdir`` folders, ``upperdir``), from
    the mount's options. An overlay whose lower folder is another deployment's ``landing/`` shows that
    deployment's images here, under files of another device and inode, so only these paths tell. A layer
    path that is itself a bind mount brings its other paths (:func:`other_paths`; :class:`CannotTell`
    when one cannot be looked at). Empty for a folder on any other filesystem."""
    table = mount_table() if table is None else table
    target = os.fsencode(folder)
    shown = _shown_by(target, table)
    if shown is None or shown.fstype != b"overlay":
        return []
    layers: list[bytes] = []
    for option in _UNESCAPED[b","].split(shown.options):
        key, _, value = option.partition(b"=")
        if key in (b"lowerdir", b"lowerdir+", b"datadir+"):
            layers.extend(v for v in _UNESCAPED[b":"].split(value) if v)
        elif key == b"upperdir":
            layers.append(value)
    rel = _join(shown.root.lstrip(b"/"), _under(target, shown.point) or b"").lstrip(b"/")
    found: list[str] = []
    for layer in layers:
        path = _join(_unescape(layer).replace(b"\\:", b":").replace(b"\\,", b","), rel)
        found.append(os.path.normpath(os.fsdecode(path)))
        # a layer given by a path that is itself a bind mount (an alias of another home's folder): its
        # other paths too (CannotTell when one cannot be looked at)
        if os.path.isdir(found[-1]):
            found.extend(p for p in other_paths(os.path.realpath(found[-1]), table) if p not in found)
    return found


def other_paths(folder: str, table: list[Mount] | None = None) -> list[str]:
    """Other paths of the folder ``folder`` (a resolved path) on this machine, through the mounts of its
    filesystem: for a folder inside a bind mount of ``/srv/b/landing``, ``/srv/b/landing/...`` where the
    filesystem's root (or a folder above ``/srv/b/landing``) is mounted too. Each path returned was checked
    to be the same folder (device and inode), so a path covered by a later mount is never returned.
    :class:`CannotTell` when a path that may be the folder cannot be looked at (permission denied)."""
    table = mount_table() if table is None else table
    target = os.fsencode(folder)
    shown = _shown_by(target, table)
    if shown is None:
        return []
    source = _join(shown.root, _under(target, shown.point) or b"")  # the folder within its filesystem
    found: list[str] = []
    for m in table:
        if m.device != shown.device or m is shown or (rel := _under(source, m.root)) is None:
            continue
        other = os.fsdecode(_join(m.point, rel))
        if other == folder or other in found:
            continue
        cover = _shown_by(os.fsencode(other), table)
        if cover is not m and cover is not shown:
            # Another mount covers the path where the folder lives (a tmpfs mounted over it, or over the
            # home it lies in, after the bind mount was made): that path shows something else now, so
            # whose folder this is cannot be checked. Fail closed. (A path covered by the folder's own
            # mount, as systemd's PrivateTmp binds /tmp/systemd-private-*/tmp over /tmp, leads back here.)
            raise CannotTell(errno.EACCES, "another mount covers the path the kernel shows it under", other)
        try:
            if os.path.samefile(other, folder):
                found.append(other)
        except PermissionError as exc:  # fail closed: a private home is still a home
            raise CannotTell(exc.errno, os.strerror(exc.errno), other) from exc
        except OSError:  # gone, or not a folder: another folder
            continue
    return found
