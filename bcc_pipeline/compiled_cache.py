"""The cache of converted models (OpenVINO, ONNX) beside a model artifact, for :mod:`bcc_pipeline.inference`.

A conversion is kept in ``<artifact dir>/compiled/<format>-<artifact sha>/``: written into a temporary
folder (``.bcc-tmp-<format>-<sha>.XXXX``; one that a killed process left behind is removed by
:func:`bcc_pipeline.leftovers.sweep_stale_temporaries`), renamed into place and its files' checksums recorded
(``ledger``: the database's ``compiled_models``; without one, the folder's own ``source.json``). Before
each load the files are read once, hashed and compared with that record, and only the bytes checked are
handed to the runtime. A file that differs, or a cache with no record, is converted again; a models
folder that cannot be written means converting into a temporary folder every time.

Nothing is read, written or deleted through a symbolic link between the home's ``models/`` folder and the
files (:func:`bcc_pipeline.moving.require_real_folders`, files opened with ``O_NOFOLLOW``): a link at
``compiled/`` or at the cache folder is removed (the link itself, never what it leads to) and the cache is
rebuilt in a real folder; a ``models/<version>/`` that is a link (not this home's to change) gets no cache:
its model is converted into a temporary folder, with a warning naming the link.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from . import model as model_lib
from . import mounts
from .errors import ArtifactError
from .files import created_mode, sha256_file, temp_prefix
from .moving import LinkedFolderError, make_real_folders, require_real_folders

__all__ = ["CacheLedger", "check_input", "converted_model", "publish"]

log = logging.getLogger(__name__)


def check_input(shape: tuple, image_size: int, version: str) -> None:
    if tuple(shape) != (image_size, image_size, 3):
        raise ArtifactError(
            f"model {version} takes input {tuple(shape)}, but its registry row says image_size {image_size}"
        )


# -- converted formats, cached beside the artifact --------------------------------------------
class CacheLedger(Protocol):
    """Where the checksums of published conversions are recorded (the database:
    :class:`bcc_pipeline.backend_store.CompiledModels`)."""

    def expected(self, artifact_sha256: str, fmt: str) -> dict[str, str] | None: ...

    def record(self, artifact_sha256: str, fmt: str, files: dict[str, str]) -> None: ...


def _cache_dir(artifact_path: Path, fmt: str, sha: str) -> Path:
    return artifact_path.parent / "compiled" / f"{fmt}-{sha[:16]}"


def _root_of(folder: Path) -> Path:
    """The home's ``models/`` folder above cache folder ``models/<version>/compiled/<format>-<sha>``."""
    return folder.parents[2]


def _read(path: Path) -> bytes:
    """``path``'s bytes, read only where no folder from the models folder down to it, nor the file itself,
    is a symbolic link (:class:`LinkedFolderError`, ``ELOOP``)."""
    require_real_folders(_root_of(path.parent), path)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # a FIFO or a device: never read (no end)
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return f.read()


def _real_folder(folder: Path) -> bool:
    """Whether ``folder`` is a real folder reached through real folders only (no link on its way)."""
    try:
        require_real_folders(_root_of(folder), folder)
        return stat.S_ISDIR(os.lstat(folder).st_mode)
    except OSError:
        return False


def _unlink_links(folder: Path, version: str) -> bool:
    """Remove a symbolic link standing at ``compiled/`` or at the cache ``folder`` (the link itself, never
    its target). False, with a warning naming it, when ``models/<version>/`` is a link: not this home's
    folder to change, so its converted model is neither used nor cached there."""
    try:
        require_real_folders(_root_of(folder), folder.parent)
    except LinkedFolderError as exc:
        try:
            what = f"a symbolic link (to {os.readlink(exc.filename)})"
        except OSError:
            what = "not a folder"
        log.warning(
            "%s is %s: the converted model of %s is neither used nor cached through it; converting it "
            "in a temporary folder",
            exc.filename,
            what,
            version,
        )
        return False
    except FileNotFoundError:
        return True  # no version folder: loading the artifact fails with its own message
    if (point := mounts.mounted_between(_root_of(folder), folder)) is not None:  # a bind mount: not ours
        log.warning(
            "%s is a mount point: the converted model of %s is neither used nor cached there; converting it "
            "in a temporary folder",
            point,
            version,
        )
        return False
    for link in (folder.parent, folder):
        try:
            mode = os.lstat(link).st_mode
            if link == folder.parent and not stat.S_ISLNK(mode) and not stat.S_ISDIR(mode):
                # compiled/ replaced by a file (a FIFO, a device): in this home's version folder, ours to
                # remove; left, every run converted the model in memory again
                os.unlink(link)
                log.warning("%s is not a folder: removed it; converting %s again", link, version)
                continue
            if not stat.S_ISLNK(mode):
                continue
            target = os.readlink(link)
            os.unlink(link)  # the link only: what it leads to is never touched
        except (FileNotFoundError, NotADirectoryError):  # nothing there, or compiled/ is a file
            return True
        except OSError as exc:  # a link that cannot be removed (a read-only models folder): not used
            log.warning("%s cannot be checked or removed (%s); converting %s in memory", link, exc, version)
            return False
        log.warning(
            "%s is a symbolic link (to %s), never followed: removed it; converting %s again",
            link,
            target,
            version,
        )
    return True


def _source_json(folder: Path, sha: str) -> dict[str, str] | None:
    """The checksums ``folder/source.json`` claims (only trusted where no ledger is given)."""
    try:
        meta = json.loads(_read(folder / "source.json").decode("utf-8"))
        return dict(meta["files"]) if meta.get("artifact_sha256") == sha else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _expected(folder: Path, sha: str, fmt: str, ledger: CacheLedger | None) -> dict[str, str] | None:
    return ledger.expected(sha, fmt) if ledger is not None else _source_json(folder, sha)


def _read_verified(
    folder: Path, names: tuple[str, ...], expected: dict[str, str] | None, *, quiet: bool = False
) -> dict[str, bytes] | None:
    """The bytes of ``names`` in ``folder`` when each matches its ``expected`` sha256, else None (logged
    unless ``quiet``). The bytes checked are the bytes loaded: nothing is read again after the check, and
    nothing is read through a link (:func:`_read`)."""
    if not expected:
        return None
    blobs = {}
    for name in names:
        try:
            data = _read(folder / name)
        except OSError as exc:
            if not quiet:
                log.warning("converted model file %s cannot be read (%s)", folder / name, exc)
            return None
        if hashlib.sha256(data).hexdigest() != expected.get(name):
            if not quiet:
                log.warning(
                    "converted model file %s is damaged: its sha256 differs from the one recorded "
                    "when it was published",
                    folder / name,
                )
            return None
        blobs[name] = data
    return blobs


def _cached(folder: Path, sha: str, names: tuple[str, ...]) -> bool:
    """True when ``folder`` holds ``names`` converted from artifact ``sha``, all checksums (source.json) matching."""
    meta = _source_json(folder, sha)
    try:
        return meta is not None and all(
            hashlib.sha256(_read(folder / n)).hexdigest() == meta[n] for n in names
        )
    except (OSError, KeyError):
        return False


def publish(
    folder: Path,
    sha: str,
    names: tuple[str, ...],
    write: Callable[[Path], None],
    trusted: Callable[[], bool] | None = None,
    on_published: Callable[[dict[str, str]], None] | None = None,
) -> Path | None:
    """Write a conversion into a temporary folder beside ``folder`` and rename it into place.

    ``trusted()`` says whether the folder now in place is a good cache (default: its source.json);
    ``on_published(files)`` records the checksums once this call's conversion is in place. Returns the
    folder to load from, or ``None`` when the models folder is not writable or a folder on the way from
    ``models/`` is a symbolic link (nothing is created, replaced or removed through one).
    """
    trusted = trusted or (lambda: _cached(folder, sha, names))
    try:
        make_real_folders(_root_of(folder), folder.parent)  # never through a link (LinkedFolderError)
        # compiled/ itself, held open: what is renamed or removed below is renamed or removed in it, even
        # if its path is swapped for a link into another home meanwhile (a path would follow that link)
        dfd = os.open(
            folder.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        )
    except OSError as exc:
        log.warning(
            "cannot cache the converted model under %s (%s); converting in memory", folder.parent, exc
        )
        return None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder.name), dir=folder.parent))
        # mkdtemp's 0700 becomes the project's mode (BCC_UMASK); the setgid bit it took from a group-shared
        # compiled/ stays, or the files written in it would take the creator's own group, not the shared one
        shared = os.stat(tmp).st_mode & stat.S_ISGID
        os.chmod(tmp, created_mode(directory=True) | shared)
        os.stat(tmp.name, dir_fd=dfd, follow_symlinks=False)  # made where compiled/ was opened
    except OSError as exc:
        os.close(dfd)
        log.warning(
            "cannot cache the converted model under %s (%s); converting in memory", folder.parent, exc
        )
        return None
    try:
        write(tmp)
        files = {n: sha256_file(tmp / n) for n in names}
        (tmp / "source.json").write_text(
            json.dumps({"artifact_sha256": sha, "files": files}, indent=1) + "\n", encoding="utf-8"
        )
        try:
            require_real_folders(_root_of(folder), folder)  # right before replacing what stands there
        except LinkedFolderError as exc:
            log.warning(
                "cannot cache the converted model under %s (%s); converting in memory", exc.filename, exc
            )
            return None
        if _real_folder(folder) and trusted():  # another process (a parallel shard) published it meanwhile
            return folder
        try:  # a stale or damaged cache, a file or a link: moved aside (in compiled/ itself), replaced
            st = os.stat(folder.name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            stale = f"{temp_prefix(folder.name)}stale-{uuid.uuid4().hex[:8]}"
            os.rename(folder.name, stale, src_dir_fd=dfd, dst_dir_fd=dfd)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(stale, dir_fd=dfd, ignore_errors=True)
            else:  # a file or a link stood there: removed, never followed
                os.unlink(stale, dir_fd=dfd)
        try:
            os.rename(tmp.name, folder.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError:  # another process published first: use theirs if it is good
            if not trusted():
                raise
            return folder
        if on_published is not None:
            on_published(files)
        return folder
    finally:
        shutil.rmtree(tmp.name, dir_fd=dfd, ignore_errors=True)
        os.close(dfd)


@contextmanager
def converted_model(
    artifact_path: Path,
    sha: str,
    fmt: str,
    names: tuple[str, ...],
    image_size: int,
    version: str,
    write: Callable[[Any, Path], None],
    ledger: CacheLedger | None,
) -> Iterator[tuple[dict[str, bytes], bool]]:
    """Yield ``(file name -> verified bytes of the converted model, converted now?)`` for artifact ``sha``.

    A cache whose files match the checksums recorded at publication (``ledger``; without one, the cache's
    own source.json) is used after the artifact's checksum is verified. Otherwise the Keras model is
    loaded (checksum verified), ``write(net, folder)`` converts it into the cache and the checksums are
    recorded; when the cache cannot be written, into a temporary folder removed afterwards.
    """
    folder = _cache_dir(Path(os.path.abspath(artifact_path)), fmt, sha)
    usable = _unlink_links(folder, version)
    expected = _expected(folder, sha, fmt, ledger) if usable else None
    blobs = _read_verified(folder, names, expected) if usable else None
    if blobs is not None:
        model_lib.verify_artifact(artifact_path, sha)
        yield blobs, False
        return
    if usable and os.path.lexists(folder):
        log.warning(
            "the converted %s model at %s is %s; converting %s again",
            fmt,
            folder,
            "damaged" if expected else "not recorded as published",
            version,
        )
    net = model_lib.load_artifact(artifact_path, sha)
    check_input(tuple(net.input_shape[1:]), image_size, version)
    where = (
        None
        if not usable
        else publish(
            folder,
            sha,
            names,
            lambda d: write(net, d),
            trusted=lambda: (
                _read_verified(folder, names, _expected(folder, sha, fmt, ledger), quiet=True) is not None
            ),
            on_published=(lambda files: ledger.record(sha, fmt, files)) if ledger is not None else None,
        )
    )
    if where is not None:
        net = None  # free the Keras model before the caller compiles the converted one
        blobs = _read_verified(where, names, _expected(where, sha, fmt, ledger))
        if blobs is None:
            raise ArtifactError(
                f"the converted {fmt} model at {where} changed while model {version} was loading"
            )
        yield blobs, True
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"bcc-{fmt}-"))
    try:
        write(net, tmp)
        net = None
        yield {n: (tmp / n).read_bytes() for n in names}, True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
