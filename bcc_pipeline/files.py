"""File primitives the pipeline shares: the display form of paths (from :mod:`bcc_pipeline.display`),
names within the 255-byte limit, atomic writes, umask, reason files, the home marker, renames that never
replace a file (``rename_no_replace``), reading a file once through one descriptor (:func:`read_once`) and
when a file counts as written (:func:`settled`). The move itself (``move_no_clobber`` and its rules) is in
:mod:`bcc_pipeline.moving`.

Every temporary file or folder the pipeline makes beside what it publishes (:func:`atomic_write`, the
converted-model cache) has a name that starts with :data:`TEMP_PREFIX` (``.bcc-tmp-``); what a killed
process leaves of them is removed by :mod:`bcc_pipeline.leftovers`.

Names are kept within the 255-byte limit of a file name: a clash suffix or a ``.reason.txt`` added to a
very long name shortens its stem (with a short hash of the full name, so shortened names stay distinct).
Paths are kept within :data:`PATH_MAX` (:func:`fit_path`): a relative path that fits under one folder
(the inbox, ``landing/``) but not under a deeper one (``archive/<run>/``) gets a hashed folder.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .display import display_path, one_line, path_from_display
from .temp_names import TEMP_PREFIX, temp_owner

__all__ = [
    "LINK_UNSUPPORTED",
    "NAME_MAX",
    "PATH_MAX",
    "PATH_ROOM",
    "REASON_SUFFIX",
    "SYSTEM_NAMES",
    "TEMP_PREFIX",
    "apply_umask",
    "atomic_write",
    "candidate_names",
    "created_mode",
    "current_umask",
    "display_path",
    "fit_name",
    "fit_path",
    "managing_home",
    "mark_home",
    "one_line",
    "path_from_display",
    "quarantine_rel",
    "publish_no_clobber",
    "read_once",
    "reason_path",
    "rename_no_replace",
    "renameat2",
    "safe_dirname",
    "settled",
    "sha256_file",
    "temp_prefix",
    "write_reason",
]

log = logging.getLogger(__name__)
NAME_MAX = 255
PATH_MAX = 4096
"""The longest path (bytes, with its final NUL) the kernel takes in one call (Linux)."""
PATH_ROOM = 64
"""Bytes a destination keeps free below :data:`PATH_MAX` for a clash suffix and ``.reason.txt``."""
REASON_SUFFIX = ".reason.txt"
LINK_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
# renameat2 errors that mean "this filesystem or kernel cannot do RENAME_NOREPLACE", not "this rename failed"
_NOREPLACE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc >= 2.28 / not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


renameat2 = _load_renameat2()
"""The C library's ``renameat2``, or ``None`` where there is none (then :func:`rename_no_replace` copies
with ``O_EXCL``). Tests set it to ``None`` to exercise that fallback."""


SYSTEM_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"})
"""Names (lower case) of files operating systems leave behind; intake and scoring ignore them like
hidden files and leave them where they are."""


def fit_name(stem: str, tail: str = "") -> str:
    """``stem + tail`` when it fits in :data:`NAME_MAX` bytes; otherwise the stem is shortened and
    ``#<8 hex of the full stem>`` is added before ``tail``."""
    raw, tail_b = os.fsencode(stem), os.fsencode(tail)
    if len(raw) + len(tail_b) <= NAME_MAX:
        return stem + tail
    digest = "#" + hashlib.sha256(raw).hexdigest()[:8]
    keep = max(1, NAME_MAX - len(tail_b) - len(digest))
    cut = raw[:keep]
    # do not end inside a multi-byte UTF-8 character
    while cut and (cut[-1] & 0xC0) == 0x80:
        cut = cut[:-1]
    if cut and cut[-1] >= 0xC0:
        cut = cut[:-1]
    return os.fsdecode(cut or raw[:1]) + digest + tail


def fit_path(root: Path, rel: str | os.PathLike[str]) -> Path:
    """``root/rel``, or ``root/#<hash of rel's folder>/<name>`` when that would not fit in :data:`PATH_MAX`
    (less :data:`PATH_ROOM`): a path that fits under the folder it came from can be too long under a
    deeper one, and would then fail to move (ENAMETOOLONG) on every run."""
    dest = root / rel
    if len(os.fsencode(dest)) < PATH_MAX - PATH_ROOM:
        return dest
    folder, name = os.path.split(os.fspath(rel))
    return root / f"#{hashlib.sha256(os.fsencode(folder)).hexdigest()[:16]}" / name


def quarantine_rel(rel: str | os.PathLike[str]) -> str:
    """``rel`` as laid out under ``quarantine/<run>/``: a folder whose name ends in ``.reason.txt`` gets
    ``.d`` appended, so that it can never take the name of a quarantined file's reason file (a file
    ``x.png`` beside a folder ``x.png.reason.txt/`` would otherwise block one or the other, run after
    run). Folders merge harmlessly; files never replace one another. A folder name that has no room left
    for ``.d`` (255 bytes) is shortened with a hash of it (:func:`fit_name`), as a long file name is."""
    parts = os.fspath(rel).split(os.sep)
    folders = [fit_name(p, ".d") if p.endswith(REASON_SUFFIX) else p for p in parts[:-1]]
    return os.sep.join([*folders, parts[-1]])


def settled(shown: str, mtime: float, now: float, settle: float) -> bool:
    """Whether a file last modified at ``mtime`` is done being written (``shown``: its displayed path, for
    the warning). A modification time more than ``settle`` seconds in the future (clock skew between
    hosts) counts as settled, with a warning: such a file would otherwise wait forever."""
    age = now - mtime
    if age >= settle:
        return True
    if age < -settle:
        if -age >= 1.0:  # a file written this instant can be stamped a little ahead of time.time()
            log.warning("%s was modified %.0f s in the future (clock skew?); taking it anyway", shown, -age)
        return True
    return False


def read_once(path: str | os.PathLike[str], max_bytes: int) -> tuple[bytes | None, os.stat_result]:
    """Read a file once, through one descriptor opened with ``O_NOFOLLOW | O_NONBLOCK``: a symbolic link
    is never followed (``OSError`` ``ELOOP``) and a FIFO or device never blocks. Returns ``(data, st)``,
    ``st`` the descriptor's ``fstat`` after reading: the very file these bytes came from (its
    :func:`bcc_pipeline.moving.identity` is what a later move or removal checks). ``data`` is ``None``
    when the path is not a regular file (nothing is read), the file changed while it was read (still being
    written) or was not read to its end (reading stops within 1 MiB past ``max_bytes``; a caller compares
    ``len(data)`` with ``max_bytes``). ``FileNotFoundError`` and other ``OSError`` propagate."""
    flags = (
        os.O_RDONLY
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    fd = os.open(path, flags)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return None, before
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    del chunks
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or len(
        data
    ) != after.st_size:
        return None, after
    return data, after


def candidate_names(dest: Path) -> Iterator[Path]:
    """``dest``, then ``dest~1``, ``dest~2``, ... (each fitted to the name limit): the names a no-clobber
    move tries in turn."""
    name = dest.name
    suffix = Path(name).suffix if len(Path(name).suffix) <= 16 else ""
    stem = name[: len(name) - len(suffix)] if suffix else name
    yield dest.with_name(fit_name(stem, suffix))
    n = 1
    while True:
        yield dest.with_name(fit_name(stem, f"~{n}{suffix}"))
        n += 1


def reason_path(path: Path) -> Path:
    """Where the reason file of a quarantined ``path`` goes: ``<name>.reason.txt`` beside it."""
    return path.with_name(fit_name(path.name, REASON_SUFFIX))


def apply_umask(umask: int) -> int:
    """Make ``umask`` (``Settings.umask``, ``BCC_UMASK``) this process's umask; returns the previous one.

    The permission policy: everything BCC creates (the SQLite database and its WAL files, model artifacts,
    the dataset store, the converted-model cache, quarantine and archive folders) gets the mode a plain
    ``open``/``mkdir`` gets under this umask, so with the default ``027`` files are ``0640`` and folders
    ``0750``: readable by the group (scoring and training may run as different users of one group), not by
    others (the database holds patient folder names). The entry points apply it once: the CLI and the DAG
    tasks (through their settings)."""
    return os.umask(umask)


def current_umask() -> int:
    """The process's umask, read without changing it (Linux ``/proc``; elsewhere set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def created_mode(directory: bool = False) -> int:
    """The mode a new file (or folder) gets under the current umask; for files made by ``mkstemp`` or
    ``mkdtemp`` (always ``0600``/``0700``), which are given it before they are published."""
    return (0o777 if directory else 0o666) & ~current_umask()


def temp_prefix(name: str) -> str:
    """The start of a temporary name made for ``name`` (``mkstemp``/``mkdtemp``'s ``prefix``):
    :data:`TEMP_PREFIX`, its maker (:func:`temp_owner`), a dot, at most 40 characters of ``name`` and a
    dot."""
    return f"{TEMP_PREFIX}{temp_owner()}.{name[:40]}."


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | str | Callable[[Path], object],
    *,
    exclusive: bool = False,
    fsync: bool = True,
) -> Path:
    """Write ``data`` to ``path`` all or nothing: a temporary file in the same folder (fsynced),
    then ``os.replace``. A crash leaves the old file or the new one, never half of one (a SIGKILL leaves
    the temporary ``.bcc-tmp-<name>.XXXX.tmp`` too, for :func:`sweep_stale_temporaries`).

    ``data``: bytes, text (UTF-8), or a function that writes the file at the path it is given, for
    libraries that only write to a path (Keras' ``Model.save``, matplotlib's ``savefig``); that
    temporary path ends in ``path``'s suffix.
    ``exclusive``: never replace an existing file; the temporary file is hard-linked (or, without hard
    links, renamed with :func:`rename_no_replace`) into place, and ``FileExistsError`` is raised when
    ``path`` is already there (whoever wrote first wins).
    The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp{path.suffix}" if callable(data) else ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=suffix, dir=path.parent)
    try:
        if callable(data):
            os.close(fd)
            data(Path(tmp))
            os.chmod(tmp, created_mode())  # mkstemp's 0600 (or the writer's own) becomes the umask's mode
            if fsync:
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
        else:
            raw = data.encode("utf-8", errors="backslashreplace") if isinstance(data, str) else data
            os.fchmod(fd, created_mode())  # mkstemp's 0600 becomes the mode the umask gives
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
                if fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
        if exclusive:
            publish_no_clobber(Path(tmp), path)  # fails instead of replacing
        else:
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def mark_home(home: str | os.PathLike[str]) -> Path:
    """Write ``home``'s marker (``<home>/.bcc-home``, :data:`bcc_pipeline.settings.HOME_MARKER`) when it is
    missing; returns its path. A folder with the marker is a BCC home: no deployment ever scores it, or a
    folder of it, as an inbox. A managed folder of the home that is a link to a folder elsewhere
    (``landing/`` on a shared mount) gets a marker of its own there (:data:`MANAGED_MARKER`), since no
    home marker lies above that folder. Called by whatever sets a home up: ``bcc db upgrade``, ``bcc
    demo``, intake, training and scoring."""
    from .settings import HOME_MARKER, MANAGED_FOLDERS, MANAGED_MARKER

    home = Path(home)
    marker = home / HOME_MARKER
    _mark(marker, "This folder is a BCC home; it is never scored as an inbox.\n")
    from .homes import foreign_above

    for name in MANAGED_FOLDERS:
        folder = home / name
        # never into another deployment's folder (a link into its home): that home's runs would refuse it
        if folder.is_symlink() and folder.is_dir() and foreign_above(home, os.path.realpath(folder)) is None:
            _mark(
                folder / MANAGED_MARKER,
                f"This folder is {name}/ of the BCC home {display_path(home)}; it is never scored as an inbox."
                f"\nhome={display_path(os.path.abspath(home))}\nfolder={name}\n",
            )
    return marker


def managing_home(folder: str | os.PathLike[str]) -> str | None:
    """The BCC home whose managed folder (a link's target) ``folder`` is, by its ``.bcc-managed`` marker
    (:func:`mark_home`), or None: no marker, or a stale one. A marker is stale only where it can be seen to
    be: its home is on this machine and that home's folder leads, here, to another folder (the link was
    re-pointed, or this folder is a copy). A home that is not here (another machine's), or whose link
    leads nowhere here (a mount path of another host), is taken at its word."""
    from .settings import HOME_MARKER, MANAGED_MARKER

    marker = os.path.join(os.fspath(folder), MANAGED_MARKER)
    if not os.path.lexists(marker):
        return None
    fields: dict[str, str] = {}
    try:
        data, _ = read_once(marker, 64 * 1024)
        for line in (data or b"").decode("utf-8", "replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and key in ("home", "folder"):
                fields[key] = value
        home = path_from_display(fields["home"])
        target = os.path.join(home, fields["folder"])
    except (OSError, KeyError, ValueError):
        return "(a BCC home its marker does not name)"  # cannot tell whose: refused, as a current one
    if not os.path.lexists(os.path.join(home, HOME_MARKER)):
        return fields["home"]  # not this machine's home (or not visible here): taken at its word
    try:  # the same folder, however reached (a link, a bind mount): the same device and inode
        same = os.path.samefile(target, folder)
    except OSError:  # the home's link leads nowhere here (another host's mount path): cannot tell
        return fields["home"]
    return fields["home"] if same else None


def _mark(marker: Path, text: str) -> None:
    if not os.path.lexists(marker):
        try:
            atomic_write(marker, text, exclusive=True)
        except FileExistsError:  # another process marked it meanwhile
            pass


@functools.lru_cache(maxsize=256)  # a pure function, called for every file a run moves (with its run id)
def safe_dirname(name: str) -> str:
    """A single, harmless folder name for a run id (or any text): ASCII letters, digits and ``-_.+``;
    anything else becomes ``_``, and so does a leading ``.``: a run's folder is never hidden, and never
    carries the ``.bcc-tmp-`` prefix that the stale-temporary sweep removes. A name that had to be
    changed (or is empty) gets a short hash of the original, so different ids stay different folders."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.+") else "_" for c in name)[:120]
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe != name or safe == "":
        safe = f"{safe}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return safe


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks. ``OSError`` propagates."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_reason(path: Path, reason: str) -> Path:
    """Write (atomically, replacing an older one) the reason file beside ``path``.

    A quarantined *link* that happens to carry that name is never replaced: the reason then goes to
    ``<name>.reason~N.txt``. A reason file whose name is not ``<name>.reason.txt`` (that one, or a name too
    long for it, shortened with a hash) starts by naming the file it is for.
    """
    target = reason_path(path)
    if os.path.islink(target):
        target = next(c for c in candidate_names(target) if not os.path.islink(c))
    if target.name != path.name + REASON_SUFFIX:  # a shortened (hashed) or numbered name: say whose it is
        reason = f"reason for {display_path(path.name)}: {reason}"
    return atomic_write(target, reason.rstrip() + "\n", fsync=False)


def _copy_no_replace(src: Path, dst: Path) -> None:
    """Copy ``src`` (a link as a link) to a new ``dst``: ``FileExistsError`` when ``dst`` exists. The copy
    is flushed to disk before this returns; a failed copy is removed again."""
    src_st = os.lstat(src)
    if stat.S_ISLNK(src_st.st_mode):
        os.symlink(os.readlink(src), dst)  # fails when dst exists; readlink never touches the target
        return
    nofollow, cloexec = getattr(os, "O_NOFOLLOW", 0), getattr(os, "O_CLOEXEC", 0)
    in_fd = os.open(src, os.O_RDONLY | nofollow | cloexec)
    with os.fdopen(in_fd, "rb") as inp:
        out_fd = os.open(
            dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow | cloexec, stat.S_IMODE(src_st.st_mode)
        )
        try:
            with os.fdopen(out_fd, "wb") as out:
                while chunk := inp.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.utime(dst, ns=(src_st.st_atime_ns, src_st.st_mtime_ns))
        except BaseException:
            os.unlink(dst)
            raise


def rename_no_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` (a file, or a symlink itself) to ``dst`` unless ``dst`` exists: then
    ``FileExistsError``, and both stay as they are.

    One ``renameat2(..., RENAME_NOREPLACE)`` call where the C library and the filesystem support it (the
    check and the rename are one atomic step in the kernel). Elsewhere the bytes are copied into a new
    ``dst`` created with ``O_EXCL`` and flushed, and then ``src`` is removed.
    """
    src, dst = Path(src), Path(dst)
    fn = renameat2
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _NOREPLACE_UNSUPPORTED:
            raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))
    _copy_no_replace(src, dst)
    os.unlink(src)


def publish_no_clobber(tmp: Path, dest: Path) -> None:
    """Give the complete file (or symbolic link) ``tmp`` the name ``dest`` without replacing anything
    (``FileExistsError`` when taken): a hard link (``tmp`` is then the caller's to remove), or without
    hard links a :func:`rename_no_replace`."""
    try:
        os.link(tmp, dest, follow_symlinks=False)  # a symbolic link ``tmp`` is linked itself, not its target
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno not in LINK_UNSUPPORTED:
            raise
        rename_no_replace(tmp, dest)
