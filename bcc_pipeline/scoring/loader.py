"""Reading, validating, decoding and preprocessing inbox files, with bounded memory. No database here.

A bounded thread pool (:class:`Loader`) reads each file once (``O_NOFOLLOW``), hashes it, validates the
header (pixel limit, minimum side: a 40000×40000 PNG is refused before any decoder sees it), decodes and
preprocesses it (:mod:`bcc_pipeline.images`, the one preprocessing contract) one batch ahead of the model.
Memory is bounded by the batch size, the prefetch depth and a decoding budget shared by the loading
threads (:data:`DECODE_BUDGET_BYTES`, :class:`MemoryBudget`; a bigger image is decoded alone), never by
the inbox. Each file comes back as an :class:`Item`: ``ok`` (with its pixels), ``rejected`` (with the
reason), ``skipped`` (still being written) or ``missing`` (gone).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import images, mounts
from ..errors import ImageError
from ..files import display_path, one_line, read_once, settled
from ..moving import Identity, LinkedFolderError, change_time, identity, require_real_folders
from .inbox import path_key

__all__ = [
    "DECODE_BUDGET_BYTES",
    "DECODE_BYTES_PER_PIXEL",
    "LOADER_NICE",
    "LOAD_WORKERS",
    "PREFETCH_BATCHES",
    "Item",
    "Loader",
    "MemoryBudget",
    "clean_reason",
    "load_file",
]

LOAD_WORKERS = max(1, min(4, os.cpu_count() or 2))
"""Threads that read, check, decode and preprocess (OpenCV and hashlib release the GIL)."""
PREFETCH_BATCHES = 2
"""Batches in flight: the one the model scores and the one being decoded."""
LOADER_NICE = 10
"""Loading threads run this much nicer than the process (Linux): with the inference back-end busy on every
core, they take their few percent of CPU without stalling its threads (measured in benchmarks/)."""
DECODE_BUDGET_BYTES = 512 << 20
"""Memory the loading threads may hold at once for file bytes and decoding (estimated). An image bigger
than the whole budget is still loaded, alone."""
DECODE_BYTES_PER_PIXEL = 40
"""Estimated peak decoding cost per pixel (the worst measured case, 16-bit RGBA PNG, is about 38)."""
MAX_REASON = 2000
"""Characters of a reason or error message kept in the database."""


def clean_reason(text: str, limit: int = MAX_REASON) -> str:
    """``text`` as one line of storable UTF-8 (:func:`bcc_pipeline.files.one_line`: newlines, NUL and other
    control characters escaped), at most ``limit`` characters. Reasons go to logs and the database."""
    text = one_line(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class MemoryBudget:
    """Bounds what the loading threads hold at once: a thread waits until its reservation fits, or until
    nothing else is reserved (so one oversized image still goes through, alone). First come, first
    served, so a big image is not starved by a stream of small ones."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._cv = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def acquire(self, amount: int) -> int:
        amount = max(1, int(amount))
        with self._cv:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving or (self.used and self.used + amount > self.capacity):
                self._cv.wait()
            self._serving += 1
            self.used += amount
            self._cv.notify_all()
        return amount

    def release(self, amount: int) -> None:
        with self._cv:
            self.used -= amount
            self._cv.notify_all()


@dataclass
class Item:
    """One inbox file on its way through a shard."""

    rel: str  # exact relative path (what the filesystem calls it)
    path: str  # the same as text for the database
    key: str  # sha256 of the path bytes
    kind: str = "ok"  # ok | rejected | skipped | missing | done
    sha: str | None = None
    reason: str | None = None
    is_link: bool = False
    ident: Identity | None = None  # what the file was when read (from the descriptor that was hashed)
    ctime: int | None = None  # its change time then (moving.change_time)
    ledger_mark: int | None = None  # the newest ledger row id when this shard looked the file up
    # the mount table's generation the file was read in (mounts.MountWatch); None when not watched, or
    # when the table changed while it was read (what was read may not be what the folder holds)
    mount_generation: int | None = None
    x: Any = None  # preprocessed float32 (S, S, 3)
    info: images.ImageInfo | None = None
    rows: list[Any] = field(default_factory=list)  # ledger rows already there for this path

    @classmethod
    def of(cls, rel: str) -> Item:
        return cls(rel=rel, path=display_path(rel), key=path_key(rel))


def _reject(item: Item, reason: str) -> Item:
    item.kind, item.reason, item.x = "rejected", clean_reason(reason), None
    return item


def load_file(
    item: Item,
    abs_path: str,
    *,
    watch: mounts.MountWatch | None = None,
    **options: Any,
) -> Item:
    """Read the file once (never through a link), hash, validate, decode and preprocess it into ``item``
    (:func:`_load_file`, ``options``). With ``watch``: ``item.mount_generation`` is the mount table's
    generation the whole load ran in, or None when the table changed meanwhile."""
    before = watch.generation() if watch is not None else None
    item = _load_file(item, abs_path, **options)
    if watch is not None:
        item.mount_generation = before if watch.generation() == before else None
    return item


def _load_file(
    item: Item,
    abs_path: str,
    *,
    size: int,
    max_pixels: int,
    min_side: int,
    settle: float,
    max_bytes: int,
    budget: MemoryBudget,
    root: str | None = None,
) -> Item:
    """See :func:`load_file`. ``root``: the inbox, as it resolved when the run was planned; a folder between
    it and the file, or the inbox itself or a folder above it, that has become a link since is never read
    through (the file is skipped: left where it is)."""
    try:
        if root is not None:
            require_real_folders(root, abs_path, resolved_root=True)
        st = os.lstat(abs_path)
    except FileNotFoundError:
        item.kind = "missing"
        return item
    except LinkedFolderError:
        item.kind = "skipped"  # not ours to follow; the next plan lists what the inbox holds then
        return item
    except OSError as exc:
        return _reject(item, f"cannot inspect the file: {exc.strerror or exc}")
    item.ident = identity(st)
    if stat.S_ISLNK(st.st_mode):
        item.is_link = True
        try:
            target = display_path(os.readlink(abs_path))  # the link's text; the target is never touched
        except OSError:
            target = "?"
        return _reject(item, f"symbolic link (to {target}): links are never followed")
    if not stat.S_ISREG(st.st_mode):
        item.kind = "skipped"  # it was a regular file when the run was planned
        return item
    if not settled(item.path, st.st_mtime, time.time(), settle):
        item.kind = "skipped"
        return item
    if st.st_size > max_bytes:
        return _reject(
            item,
            f"file of {st.st_size} bytes is larger than any image within the pixel "
            f"limit can be ({max_bytes} bytes)",
        )
    return _read_and_decode(
        item,
        abs_path,
        size=size,
        max_pixels=max_pixels,
        min_side=min_side,
        max_bytes=max_bytes,
        budget=budget,
        held=[budget.acquire(st.st_size)],
    )


def _read_and_decode(
    item: Item,
    abs_path: str,
    *,
    size: int,
    max_pixels: int,
    min_side: int,
    max_bytes: int,
    budget: MemoryBudget,
    held: list[int],
) -> Item:
    """The part of :func:`load_file` that holds memory; ``held[0]`` is the budget reservation, released here."""
    try:
        try:
            data, after = read_once(abs_path, max_bytes)
        except FileNotFoundError:
            item.kind = "missing"
            return item
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # replaced by a link since the lstat
                item.is_link = True
                return _reject(item, "symbolic link: links are never followed")
            return _reject(item, f"cannot read the file: {exc.strerror or exc}")
        if data is None:  # not a regular file any more, or changed while we read it: still being written
            item.kind = "skipped"
            return item
        item.ident = identity(after)  # the very file these bytes came from
        item.ctime = change_time(after)
        if len(data) > max_bytes:
            return _reject(
                item, f"file is larger than any image within the pixel limit can be ({max_bytes} bytes)"
            )
        item.sha = images.sha256_bytes(data)
        try:
            info = images.validate(data, path=item.path, max_pixels=max_pixels, min_side=min_side)
            # decoding needs far more memory than the file: re-reserve (release first: no hold-and-wait)
            budget.release(held[0])
            held[0] = 0
            held[0] = budget.acquire(len(data) + info.pixels * DECODE_BYTES_PER_PIXEL)
            rgb = images.decode(data, path=item.path, max_pixels=max_pixels, min_side=min_side)
            del data
            item.x = images.preprocess(rgb, size)
            del rgb
            item.info = info
        except ImageError as exc:
            return _reject(item, exc.reason)
        except MemoryError:
            return _reject(item, "not enough memory to decode this image")
        except Exception as exc:  # noqa: BLE001 - one hostile file must never stop the run
            return _reject(item, f"cannot decode the image: {type(exc).__name__}: {exc}")
        return item
    finally:
        if held[0]:
            budget.release(held[0])
            held[0] = 0


def _lower_thread_priority() -> None:
    """Loading threads yield the CPU to inference, which sets the pace: on Linux the nice value is per
    thread, so this lowers only the calling (loading) thread by :data:`LOADER_NICE`."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + LOADER_NICE))
    except (AttributeError, OSError):  # not Linux / not permitted: run at normal priority
        pass


class Loader:
    """Loads the files of an inbox batch by batch, :data:`PREFETCH_BATCHES` ahead, in :data:`LOAD_WORKERS`
    threads. Use as a context manager (the threads stop when it exits)::

        with Loader(inbox, image_size=224, max_pixels=..., min_side=..., settle=0) as loader:
            for items in loader.batches(rels, 32):
                ...

    ``prepare(items)``, called for each batch before its files are read, may mark an item ``done``
    (nothing left to do for it): it is then returned without being read.
    """

    def __init__(
        self,
        inbox: str,
        *,
        image_size: int,
        max_pixels: int,
        min_side: int,
        settle: float,
        prepare: Callable[[list[Item]], None] | None = None,
        watch: mounts.MountWatch | None = None,
    ):
        self.inbox = inbox
        self.options = {
            "size": image_size,
            "max_pixels": max_pixels,
            "min_side": min_side,
            "settle": settle,
            "max_bytes": images.max_file_bytes(max_pixels),
            "budget": MemoryBudget(DECODE_BUDGET_BYTES),
            "root": inbox,
            "watch": watch,
        }
        self.prepare = prepare
        self._pool: cf.ThreadPoolExecutor | None = None

    def __enter__(self) -> Loader:
        self._pool = cf.ThreadPoolExecutor(
            max_workers=LOAD_WORKERS, thread_name_prefix="bcc-load", initializer=_lower_thread_priority
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _submit(self, rels: Sequence[str]) -> list[tuple[Item, cf.Future | None]]:
        assert self._pool is not None, "use the Loader as a context manager"
        items = [Item.of(rel) for rel in rels]
        if self.prepare is not None:
            self.prepare(items)
        return [
            (
                it,
                None
                if it.kind == "done"
                else self._pool.submit(load_file, it, os.path.join(self.inbox, it.rel), **self.options),
            )
            for it in items
        ]

    def batches(self, rels: Sequence[str], batch_size: int) -> Iterator[list[Item]]:
        """The items of ``rels``, loaded, in batches of ``batch_size``, in order."""
        chunks = [list(rels[i : i + batch_size]) for i in range(0, len(rels), batch_size)]
        pending: collections.deque = collections.deque()
        nxt = 0
        for _ in range(len(chunks)):
            while nxt < len(chunks) and len(pending) < PREFETCH_BATCHES:
                pending.append(self._submit(chunks[nxt]))
                nxt += 1
            batch = pending.popleft()
            items = [fut.result() if fut is not None else it for it, fut in batch]
            del batch
            yield items
