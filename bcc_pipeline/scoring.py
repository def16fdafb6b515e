"""Batch scoring: every image in the inbox ends up with exactly one prediction from a known model version,
or in quarantine with a reason. Streaming, batched, idempotent, crash-safe, sharded.

The steps, each a plain function returning a small JSON-able dict (an Airflow XCom)::

    plan_shards(settings, run_id, K)     discover the inbox, pin the champion, write runs/<run>/plan.json
    score_shard(settings, run_id, k)     score shard k (K of them may run at once, in any processes)
    finalize_run(settings, run_id)       counts from the ledger into scoring_runs, the run's summary
    score_inbox(settings)                all three with K = 1 (what ``bcc score`` runs)

Discovery (:func:`discover`) walks the inbox without following links. Hidden and system files, non-image
extensions, folders (even one named ``x.png``) and special files are *ignored* and left where they are;
files modified within ``settle_seconds`` are *skipped* (still being written; the next run takes them);
symbolic links are rejected (moved to quarantine as links; the target is never read, moved or changed).

Scoring a shard streams its files in batches. A bounded thread pool reads each file once (``O_NOFOLLOW``),
hashes it, validates the header (pixel limit, minimum side: a 40000×40000 PNG is refused before any
decoder sees it), decodes and preprocesses it (:mod:`bcc_pipeline.images`, the one preprocessing contract)
one batch ahead of the model, which sees whole batches through one compiled inference back-end
(:mod:`bcc_pipeline.inference`, chosen by ``BCC_INFERENCE`` and pinned in the run's plan). Memory is
bounded by the batch size, the prefetch depth and a decoding budget shared by the loading threads
(:data:`DECODE_BUDGET_BYTES`; a bigger image is decoded alone), never by the inbox.

Per batch, in ONE transaction: the ledger rows (``inbox_files``; ``INSERT .. ON CONFLICT DO NOTHING``
claims each (run, path) once, so a shard started twice cannot score a file twice), the ``images`` rows,
the predictions (``UNIQUE(image_sha256, model_version)``, insert-or-nothing: a content already predicted
by this model is a *duplicate*) and the ``rejections``. Only after the commit do the files move
(``archive/<run>/<rel>``, ``quarantine/<run>/<rel>`` + ``<name>.reason.txt``; see :mod:`.files`), and then
the ledger gets ``moved_to``. A run killed anywhere is finished by the next one: a rerun of the same run id
moves what its ledger says is done and scores the rest; a new run finds the content already predicted (a
duplicate, archived) or an interrupted run's unmoved ledger row for that file (the file is moved where that
run meant it to go: *recovered*).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from . import images
from .config import Settings
from .errors import ArtifactError, ConfigError, ImageError, NoChampionError, StoreError
from .files import (
    SYSTEM_NAMES,
    atomic_write,
    display_path,
    move_no_clobber,
    reason_path,
    safe_dirname,
    write_reason,
)
from .inference import BACKENDS, load_predictor
from .store import (
    ImageRecord,
    InboxFile,
    ModelVersion,
    Prediction,
    Rejection,
    ScoringRun,
    get_engine,
    insert_rows,
    require_schema,
    utcnow,
)

__all__ = [
    "discover",
    "finalize_run",
    "new_run_id",
    "plan_shards",
    "run_dir",
    "score_inbox",
    "score_shard",
]

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

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
_PLAN_VERSION = 1
_MAX_REASON = 2000


# -- small helpers ----------------------------------------------------------------------------
def new_run_id(now: dt.datetime | None = None) -> str:
    """``score-20261126T020000-3fa2c1``: sortable by time, unique enough for concurrent runs."""
    now = now or dt.datetime.now(dt.UTC)
    return f"score-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def run_dir(settings: Settings, run_id: str) -> Path:
    """``$BCC_HOME/runs/<run>/``: the plan and the shard summaries of a scoring run."""
    return settings.runs_dir / safe_dirname(run_id)


def _path_key(rel: str) -> str:
    return hashlib.sha256(os.fsencode(rel)).hexdigest()


def _clean(text: str) -> str:
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 1] + "…"


def _write_json(path: Path, doc: Any, *, exclusive: bool = False) -> bool:
    """Write JSON atomically; with ``exclusive`` an existing file is kept (and False returned)."""
    try:
        atomic_write(path, json.dumps(doc, indent=1), exclusive=exclusive)
    except FileExistsError:
        return False
    return True


def _tx(engine: Engine):
    """``engine.begin()`` whose database errors become :class:`StoreError`."""
    from contextlib import contextmanager

    @contextmanager
    def scope():
        try:
            with engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"database error while scoring: {str(exc).splitlines()[0]}") from exc

    return scope()


def _insert(conn: Connection, model: type, rows: Sequence[dict[str, Any]], key: Sequence[str],
            returning: Any = None) -> list[Any]:
    """INSERT ... ON CONFLICT (key) DO NOTHING [RETURNING col]; returns the returned values."""
    return insert_rows(conn, model, rows, key=key, returning=returning)


def _require_schema(url: str) -> None:
    """The BCC schema, at least at the revision that brought batch scoring."""
    require_schema(url, tables=("inbox_files",))


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    if t is None:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


# -- discovery --------------------------------------------------------------------------------
def _inbox_root(settings: Settings, inbox: str | os.PathLike[str] | None) -> Path:
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(inbox)))) if inbox else settings.inbox_dir
    real = os.path.realpath(root)
    # Folders the pipeline owns: scoring one of them would move training data, models or earlier
    # results into archive/. (The home itself is fine only as a parent: discover() skips these.)
    for managed in settings.managed_dirs:
        m = os.path.realpath(managed)
        if real == m or real.startswith(m + os.sep):
            raise ConfigError(f"the inbox {root} lies inside {managed}, which the pipeline manages; "
                              "choose another folder")
    return root


def discover(settings: Settings, inbox: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Walk the inbox (recursively, never following links) and sort what is there.

    Returns ``{"inbox", "pending", "links", "ignored", "skipped"}``: ``pending`` are image files ready to
    score and ``links`` symbolic links to reject (paths relative to the inbox, sorted); ``ignored`` is a
    list of ``{"path", "reason"}`` left where they are; ``skipped`` files were modified within
    ``settle_seconds`` (still being written). Nothing is opened or read.
    """
    root = _inbox_root(settings, inbox)
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
            elif ext not in images.IMAGE_EXTENSIONS or name.endswith(".reason.txt"):
                out["ignored"].append({"path": display_path(rel), "reason": "not an image file extension"})
            elif now - st.st_mtime < settings.settle_seconds:
                out["skipped"].append(display_path(rel))
            else:
                out["pending"].append(rel)
        stack.extend(reversed(subdirs))
    out["pending"].sort()
    out["links"].sort()
    return out


# -- planning ---------------------------------------------------------------------------------
def _load_plan(settings: Settings, run_id: str) -> dict[str, Any]:
    path = run_dir(settings, run_id) / "plan.json"
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"scoring run {run_id!r} has no plan ({path}); plan it first") from exc
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the plan of scoring run {run_id!r} ({path}): {exc}") from exc
    if plan.get("run_id") != run_id:
        raise StoreError(f"{path} belongs to run {plan.get('run_id')!r}, not {run_id!r}")
    return plan


def _plan_result(plan: dict[str, Any], path: Path) -> dict[str, Any]:
    return {"run_id": plan["run_id"], "shards": plan["n_shards"], "n_files": plan["n_files"],
            "plan_path": str(path), "model_version": plan["model_version"], "inbox": plan["inbox"],
            "inference": plan.get("inference", "keras"),
            "ignored": len(plan["ignored"]), "skipped": len(plan["skipped"])}


def plan_shards(settings: Settings, run_id: str, shards: int,
                inbox: str | os.PathLike[str] | None = None, inference: str | None = None) -> dict[str, Any]:
    """Discover the inbox, pin the current champion and split the files into ``shards`` disjoint lists.

    Writes ``runs/<run>/plan.json`` atomically and the ``scoring_runs`` row. When the plan of ``run_id``
    already exists it is returned unchanged (a retried planning task changes nothing). Raises
    :class:`NoChampionError` when there is no champion. Returns ``{run_id, shards, n_files, plan_path,
    model_version, inbox, inference, ignored, skipped}``. ``inference`` (default ``settings.inference``)
    is the back-end every shard of the run will use (:mod:`bcc_pipeline.inference`).
    """
    inference = inference or settings.inference
    if inference not in BACKENDS:
        raise ConfigError(f"unknown inference back-end {inference!r}; choose one of {', '.join(BACKENDS)}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"the number of shards must be a positive integer, got {shards!r}")
    if not run_id or not str(run_id).strip():
        raise ConfigError("a scoring run needs a non-empty run id")
    _require_schema(settings.database_url)
    path = run_dir(settings, run_id) / "plan.json"
    if not path.exists():
        engine = get_engine(settings.database_url)
        with _tx(engine) as conn:
            champ = conn.execute(select(ModelVersion.version).where(ModelVersion.status == "champion")).first()
        if champ is None:
            raise NoChampionError(
                "there is no champion model to score with; train one (`bcc train`) or choose one "
                "(`bcc promote VERSION --reason ...`)")
        found = discover(settings, inbox)
        files = sorted(found["pending"] + found["links"])
        plan = {
            "plan_version": _PLAN_VERSION, "run_id": run_id, "inbox": found["inbox"],
            "model_version": champ.version, "inference": inference, "n_shards": shards, "n_files": len(files),
            "created_at": utcnow().isoformat(), "settle_seconds": settings.settle_seconds,
            "shards": [files[k::shards] for k in range(shards)],
            "ignored": found["ignored"], "skipped": found["skipped"],
        }
        if _write_json(path, plan, exclusive=True):
            log.info("planned scoring run %s: %d files in %d shard(s), model %s, %d ignored, %d skipped",
                     run_id, len(files), shards, champ.version, len(found["ignored"]), len(found["skipped"]))
    plan = _load_plan(settings, run_id)  # whoever wrote it first wins; everyone uses that one
    if plan["n_shards"] != shards:
        raise ConfigError(f"scoring run {run_id!r} is already planned with {plan['n_shards']} shard(s), "
                          f"not {shards}")
    if inbox is not None and os.path.abspath(os.fspath(inbox)) != plan["inbox"]:
        log.warning("scoring run %s was planned for the inbox %s; using that one", run_id, plan["inbox"])
    engine = get_engine(settings.database_url)
    with _tx(engine) as conn:
        _insert(conn, ScoringRun, [{
            "run_id": run_id, "model_version": plan["model_version"], "started_at": utcnow(),
            "finished_at": None, "status": "running", "counts": {"planned": plan["n_files"]},
        }], key=("run_id",))
    _sweep_interrupted(settings, engine, exclude_run=None)
    return _plan_result(plan, path)


# -- destinations and moves -------------------------------------------------------------------
def _dest(settings: Settings, run_id: str, status: str, rel: str) -> Path:
    root = settings.quarantine_dir if status == "rejected" else settings.archive_dir
    return root / safe_dirname(run_id) / rel


def _exact_rel(path: str, path_key: str) -> str | None:
    """The real relative path of a ledger row when its text is exact (not an escaped invalid name)."""
    return path if _path_key(path) == path_key else None


def _sweep_interrupted(settings: Settings, engine: Engine, exclude_run: str | None,
                       only_run: str | None = None) -> int:
    """Ledger rows whose file reached its destination but whose ``moved_to`` was never written (the
    process died between the move and the update) get ``moved_to``. Returns how many."""
    t = InboxFile.__table__
    q = select(t.c.id, t.c.run_id, t.c.path, t.c.path_key, t.c.status, t.c.reason).where(
        t.c.moved_to.is_(None))
    if only_run is not None:
        q = q.where(t.c.run_id == only_run)
    with _tx(engine) as conn:
        rows = conn.execute(q.limit(10000)).all()
    inboxes: dict[str, str | None] = {}
    fixed = []
    for r in rows:
        if r.run_id == exclude_run:
            continue
        rel = _exact_rel(r.path, r.path_key)
        if rel is None:
            continue
        if r.run_id not in inboxes:
            try:
                inboxes[r.run_id] = _load_plan(settings, r.run_id)["inbox"]
            except (ConfigError, StoreError):
                inboxes[r.run_id] = None
        inbox = inboxes[r.run_id]
        if inbox is None or os.path.lexists(os.path.join(inbox, rel)):
            continue
        dest = _dest(settings, r.run_id, r.status, rel)
        if os.path.lexists(dest):
            if r.status == "rejected" and not os.path.lexists(reason_path(dest)):
                _try_write_reason(dest, r.reason or "rejected")
            fixed.append({"b_id": r.id, "b_moved": str(dest), "b_err": None, "b_now": utcnow()})
    if fixed:
        with _tx(engine) as conn:
            conn.execute(update(t).where(t.c.id == bindparam("b_id"), t.c.moved_to.is_(None)).values(
                moved_to=bindparam("b_moved"), move_error=bindparam("b_err"), updated_at=bindparam("b_now")),
                fixed)
        log.info("recorded %d file move(s) that interrupted runs had finished", len(fixed))
    return len(fixed)


def _try_write_reason(path: Path, reason: str) -> None:
    try:
        write_reason(path, reason)
    except OSError as exc:
        log.warning("could not write the reason file beside %s: %s", path, exc)


# -- loading (worker threads) -----------------------------------------------------------------
class _MemoryBudget:
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
class _Item:
    rel: str                      # exact relative path (what the filesystem calls it)
    path: str                     # the same as text for the database
    key: str                      # sha256 of the path bytes
    kind: str = "ok"              # ok | rejected | skipped | missing | done
    sha: str | None = None
    reason: str | None = None
    is_link: bool = False
    x: Any = None                 # preprocessed float32 (S, S, 3)
    info: images.ImageInfo | None = None
    rows: list[Any] = field(default_factory=list)  # ledger rows already there for this path


def _reject(item: _Item, reason: str) -> _Item:
    item.kind, item.reason, item.x = "rejected", _clean(reason), None
    return item


def _load(item: _Item, abs_path: str, *, size: int, max_pixels: int, min_side: int, settle: float,
          max_bytes: int, budget: _MemoryBudget) -> _Item:
    """Read the file once (never through a link), hash, validate, decode and preprocess it."""
    try:
        st = os.lstat(abs_path)
    except FileNotFoundError:
        item.kind = "missing"
        return item
    except OSError as exc:
        return _reject(item, f"cannot inspect the file: {exc.strerror or exc}")
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
    if time.time() - st.st_mtime < settle:
        item.kind = "skipped"
        return item
    if st.st_size > max_bytes:
        return _reject(item, f"file of {st.st_size} bytes is larger than any image within the pixel "
                             f"limit can be ({max_bytes} bytes)")
    return _read_and_decode(item, abs_path, size=size, max_pixels=max_pixels, min_side=min_side,
                            max_bytes=max_bytes, budget=budget, held=[budget.acquire(st.st_size)])


def _read_and_decode(item: _Item, abs_path: str, *, size: int, max_pixels: int, min_side: int, max_bytes: int,
                     budget: _MemoryBudget, held: list[int]) -> _Item:
    """The part of :func:`_load` that holds memory; ``held[0]`` is the budget reservation, released here."""
    try:
        flags = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_CLOEXEC", 0))
        try:
            fd = os.open(abs_path, flags)
        except FileNotFoundError:
            item.kind = "missing"
            return item
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # replaced by a link since the lstat
                item.is_link = True
                return _reject(item, "symbolic link: links are never followed")
            return _reject(item, f"cannot read the file: {exc.strerror or exc}")
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                item.kind = "skipped"
                return item
            chunks, total = [], 0
            while total <= max_bytes:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            after = os.fstat(fd)
        except OSError as exc:
            return _reject(item, f"cannot read the file: {exc.strerror or exc}")
        finally:
            os.close(fd)
        data = b"".join(chunks)
        del chunks
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or len(data) != after.st_size:
            item.kind = "skipped"  # changed while we read it: still being written
            return item
        if len(data) > max_bytes:
            return _reject(item, f"file is larger than any image within the pixel limit can be ({max_bytes} bytes)")
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


# -- the model --------------------------------------------------------------------------------
class _Model:
    """The pinned model version, loaded on first use (checksum verified) for the run's inference back-end."""

    def __init__(self, mv: dict[str, Any], backend: str):
        self.mv = mv
        self.backend = backend
        self.precision: str | None = None
        self._fn = None
        self.load_seconds = 0.0

    def predict(self, x: Any) -> Any:
        import numpy as np

        if self._fn is None:
            self._fn = load_predictor(self.mv["artifact_path"], self.mv["artifact_sha256"],
                                      image_size=int(self.mv["image_size"]), backend=self.backend,
                                      version=self.mv["version"])
            self.load_seconds, self.precision = self._fn.load_seconds, self._fn.precision
            log.info("scoring with model %s (%dpx, threshold %.4f), %s inference (%s)", self.mv["version"],
                     int(self.mv["image_size"]), self.mv["threshold"], self.backend, self.precision)
        out = self._fn(x)
        if out.ndim == 2 and out.shape[1] == 2:
            p = out[:, 1]
        elif out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
            p = out.reshape(-1)
        else:
            raise ArtifactError(f"model {self.mv['version']} returned shape {out.shape}; expected (N, 2) or (N, 1)")
        if p.shape[0] != x.shape[0] or not np.all(np.isfinite(p)):
            raise ArtifactError(f"model {self.mv['version']} returned non-finite or missing probabilities")
        return np.clip(p.astype("float64"), 0.0, 1.0)


# -- scoring one shard ------------------------------------------------------------------------
class _ShardScorer:
    def __init__(self, settings: Settings, plan: dict[str, Any], shard: int, batch_size: int,
                 progress: Progress | None):
        self.s, self.plan, self.shard, self.batch_size = settings, plan, shard, batch_size
        self.run_id: str = plan["run_id"]
        self.inbox: str = plan["inbox"]
        self.progress = progress or log.info
        self.engine = get_engine(settings.database_url)
        with _tx(self.engine) as conn:
            row = conn.execute(select(ModelVersion).where(ModelVersion.version == plan["model_version"])).first()
        if row is None:
            raise StoreError(f"model version {plan['model_version']} of scoring run {self.run_id} is not "
                             "in the registry")
        self.mv = {"version": row.version, "image_size": int(row.image_size), "threshold": float(row.threshold),
                   "artifact_path": row.artifact_path, "artifact_sha256": row.artifact_sha256}
        self.model = _Model(self.mv, plan.get("inference", "keras"))
        self.counts = collections.Counter()
        self.first_batch_done: float | None = None  # wall time after the first batch (start-up excluded)
        self.move_failures: list[dict[str, str]] = []
        self.skipped_paths: list[str] = []
        self.max_bytes = images.max_file_bytes(settings.max_pixels)
        self.budget = _MemoryBudget(DECODE_BUDGET_BYTES)

    # ledger look-ups ------------------------------------------------------------------------
    def _known(self, items: list[_Item]) -> None:
        """Attach the ledger rows that matter: this run's rows, and other runs' rows not yet moved."""
        t = InboxFile.__table__
        keys = [it.key for it in items]
        with _tx(self.engine) as conn:
            rows = conn.execute(select(t).where(t.c.path_key.in_(keys)).where(
                (t.c.run_id == self.run_id) | t.c.moved_to.is_(None)).order_by(t.c.id.desc())).all()
        by_key: dict[str, list[Any]] = collections.defaultdict(list)
        for r in rows:
            by_key[r.path_key].append(r)
        for it in items:
            it.rows = by_key.get(it.key, [])
            if any(r.run_id == self.run_id and r.moved_to is not None for r in it.rows):
                it.kind = "done"

    def _submit(self, pool: cf.ThreadPoolExecutor, rels: list[str]) -> list[tuple[_Item, cf.Future | None]]:
        items = [_Item(rel=rel, path=display_path(rel), key=_path_key(rel)) for rel in rels]
        self._known(items)
        out = []
        for it in items:
            if it.kind == "done":
                out.append((it, None))
                continue
            fut = pool.submit(_load, it, os.path.join(self.inbox, it.rel), size=self.mv["image_size"],
                              max_pixels=self.s.max_pixels, min_side=self.s.min_side,
                              settle=self.s.settle_seconds, max_bytes=self.max_bytes, budget=self.budget)
            out.append((it, fut))
        return out

    # main loop ------------------------------------------------------------------------------
    def run(self, rels: Sequence[str]) -> dict[str, Any]:
        t0 = time.time()
        batches = [list(rels[i : i + self.batch_size]) for i in range(0, len(rels), self.batch_size)]
        pending: collections.deque = collections.deque()
        done_files = 0
        pool = cf.ThreadPoolExecutor(max_workers=LOAD_WORKERS, thread_name_prefix="bcc-load",
                                     initializer=_lower_thread_priority)
        try:
            nxt = 0
            for _ in range(len(batches)):
                while nxt < len(batches) and len(pending) < PREFETCH_BATCHES:
                    pending.append(self._submit(pool, batches[nxt]))
                    nxt += 1
                batch = pending.popleft()
                items = [fut.result() if fut is not None else it for it, fut in batch]
                del batch
                self._process(items)
                if self.first_batch_done is None:
                    self.first_batch_done = time.time()
                done_files += len(items)
                del items
                if done_files % (self.batch_size * 10) < self.batch_size or done_files == len(rels):
                    self.progress(f"scoring {self.run_id} shard {self.shard}: {done_files}/{len(rels)} files "
                                  f"({self.counts['scored']} scored, {self.counts['duplicates']} duplicates, "
                                  f"{self.counts['rejected']} rejected)")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        t1 = time.time()
        return {"run_id": self.run_id, "shard": self.shard, "model_version": self.mv["version"],
                "n_files": len(rels), "loop_started": t0, "loop_finished": t1, "seconds": round(t1 - t0, 3),
                "scored": self.counts["scored"], "duplicates": self.counts["duplicates"],
                "rejected": self.counts["rejected"], "skipped": self.counts["skipped"],
                "missing": self.counts["missing"], "recovered": self.counts["recovered"],
                "already_done": self.counts["already_done"], "not_claimed": self.counts["not_claimed"],
                "move_failed": self.counts["move_failed"], "move_failures": self.move_failures,
                "skipped_paths": self.skipped_paths, "model_load_seconds": round(self.model.load_seconds, 3),
                "inference": self.model.backend, "precision": self.model.precision,
                "first_batch_done": self.first_batch_done}

    def _process(self, items: list[_Item]) -> None:
        import numpy as np

        fresh: list[_Item] = []
        for it in items:
            if it.kind == "done":
                self.counts["already_done"] += 1
            elif it.rows and self._resolve_known(it):
                pass
            elif it.kind == "missing":
                self.counts["missing"] += 1
                log.warning("%s left the inbox before it was scored", it.path)
            elif it.kind == "skipped":
                self.counts["skipped"] += 1
                self.skipped_paths.append(it.path)
            else:
                fresh.append(it)
        if not fresh:
            return
        ok = [it for it in fresh if it.kind == "ok"]
        shas = sorted({it.sha for it in ok})
        t = Prediction.__table__
        with _tx(self.engine) as conn:
            known = set(conn.execute(select(t.c.image_sha256).where(
                t.c.model_version == self.mv["version"], t.c.image_sha256.in_(shas))).scalars()) if shas else set()
        first: dict[str, _Item] = {}
        for it in ok:
            if it.sha not in known and it.sha not in first:
                first[it.sha] = it
        probs: dict[str, float] = {}
        if first:
            x = np.stack([it.x for it in first.values()])
            p = self.model.predict(x)
            probs = dict(zip(first, (float(v) for v in p), strict=True))
            del x
        for it in ok:
            it.x = None  # the pixels are no longer needed
        self._commit_and_move(fresh, probs)

    def _commit_and_move(self, fresh: list[_Item], probs: dict[str, float]) -> None:
        now = utcnow()
        ledger = []
        for it in sorted(fresh, key=lambda i: i.key):  # one lock order in every process
            status = "rejected" if it.kind == "rejected" else "duplicate"
            ledger.append({"run_id": self.run_id, "shard": self.shard, "path": it.path, "path_key": it.key,
                           "sha256": it.sha, "status": status, "reason": it.reason,
                           "dest": display_path(_dest(self.s, self.run_id, status, it.rel)),
                           "moved_to": None, "move_error": None, "created_at": now, "updated_at": now})
        lt = InboxFile.__table__
        with _tx(self.engine) as conn:
            claimed = set(_insert(conn, InboxFile, ledger, ("run_id", "path_key"), returning=lt.c.path_key))
            mine = [it for it in fresh if it.key in claimed]
            ok = [it for it in mine if it.kind == "ok"]
            img_rows, seen = [], set()
            for it in sorted(ok, key=lambda i: i.sha):
                if it.sha in seen:
                    continue
                seen.add(it.sha)
                img_rows.append({"sha256": it.sha, "label": None, "group_id": None, "width": it.info.width,
                                 "height": it.info.height, "format": it.info.format, "source_path": it.path,
                                 "stored_path": None, "excluded_reason": None, "first_seen_at": now})
            _insert(conn, ImageRecord, img_rows, ("sha256",))
            owner: dict[str, _Item] = {}
            for it in ok:
                if it.sha in probs and it.sha not in owner:
                    owner[it.sha] = it
            thr = self.mv["threshold"]
            pred_rows = [{"image_sha256": sha, "model_version": self.mv["version"], "prob_malignant": probs[sha],
                          "label": "malignant" if probs[sha] >= thr else "benign", "threshold": thr,
                          "source_path": it.path, "run_id": self.run_id, "scored_at": now}
                         for sha, it in sorted(owner.items())]
            new = set(_insert(conn, Prediction, pred_rows, ("image_sha256", "model_version"),
                              returning=Prediction.__table__.c.image_sha256))
            scored_keys = [owner[sha].key for sha in sorted(new)]
            if scored_keys:
                conn.execute(update(lt).where(lt.c.run_id == self.run_id, lt.c.path_key.in_(scored_keys))
                             .values(status="scored"))
            rej_rows = [{"run_id": self.run_id, "stage": "scoring", "path": it.path, "sha256": it.sha,
                         "reason": it.reason, "moved_to": None, "rejected_at": now}
                        for it in sorted(mine, key=lambda i: i.path) if it.kind == "rejected"]
            _insert(conn, Rejection, rej_rows, ("run_id", "path"))
        self.counts["not_claimed"] += len(fresh) - len(mine)
        new_keys = set(scored_keys)
        for it in mine:
            if it.kind == "rejected":
                self.counts["rejected"] += 1
                log.warning("rejected %s: %s", it.path, it.reason)
            elif it.key in new_keys:
                self.counts["scored"] += 1
            else:
                self.counts["duplicates"] += 1
        # Only now, with the rows committed, do the files move.
        moves = [(it, "rejected" if it.kind == "rejected" else "scored", self.run_id, it.reason) for it in mine]
        self._move_all(moves)

    # moving -----------------------------------------------------------------------------------
    def _move_all(self, moves: Iterable[tuple[_Item, str, str, str | None]]) -> None:
        """Move each item to its run's archive/quarantine folder and record where it went."""
        lt, rt = InboxFile.__table__, Rejection.__table__
        updates, rej_updates = [], []
        for it, status, run_id, reason in moves:
            src = os.path.join(self.inbox, it.rel)
            dest = _dest(self.s, run_id, status, it.rel)
            moved, error = None, None
            try:
                if status == "rejected":
                    dest.parent.mkdir(parents=True, exist_ok=True)
                moved_path = move_no_clobber(src, dest)
                if status == "rejected":
                    _try_write_reason(moved_path, reason or "rejected")
                moved = display_path(moved_path)
            except FileNotFoundError:
                if os.path.lexists(dest):  # someone else (a recovering run) finished this very move
                    moved = display_path(dest)
                else:
                    error = "the file left the inbox before it could be moved"
                    self.counts["missing"] += 1
            except OSError as exc:
                error = _clean(f"cannot move to {display_path(dest)}: {exc.strerror or exc}")
            if error and moved is None and not error.startswith("the file left"):
                self.counts["move_failed"] += 1
                self.move_failures.append({"path": it.path, "error": error, "run_id": run_id})
                log.error("could not move %s (it stays in the inbox): %s", it.path, error)
            updates.append({"b_run": run_id, "b_key": it.key, "b_moved": moved, "b_err": error,
                            "b_now": utcnow()})
            if status == "rejected" and moved:
                rej_updates.append({"b_run": run_id, "b_path": it.path, "b_moved": moved})
        if not updates:
            return
        with _tx(self.engine) as conn:
            conn.execute(update(lt).where(lt.c.run_id == bindparam("b_run"), lt.c.path_key == bindparam("b_key"))
                         .values(moved_to=bindparam("b_moved"), move_error=bindparam("b_err"),
                                 updated_at=bindparam("b_now")),
                         updates)
            if rej_updates:
                conn.execute(update(rt).where(rt.c.run_id == bindparam("b_run"), rt.c.path == bindparam("b_path"))
                             .values(moved_to=bindparam("b_moved")), rej_updates)

    def _resolve_known(self, it: _Item) -> bool:
        """A file with ledger rows already: finish what an interrupted attempt started. True when
        handled (nothing more to do for this file in this run)."""
        own = [r for r in it.rows if r.run_id == self.run_id]
        others = [r for r in it.rows if r.run_id != self.run_id and r.moved_to is None]
        lt = InboxFile.__table__

        def matches(r: Any) -> bool:
            if it.kind == "missing" or it.kind == "skipped":
                return False
            if r.sha256 is not None:
                return r.sha256 == it.sha
            return r.status == "rejected" and (it.is_link or it.kind == "rejected")

        def mark_moved(r: Any, dest: Path) -> None:
            if r.status == "rejected" and not os.path.lexists(reason_path(dest)):
                _try_write_reason(dest, r.reason or "rejected")
            with _tx(self.engine) as conn:
                conn.execute(update(lt).where(lt.c.id == r.id).values(
                    moved_to=display_path(dest), move_error=None, updated_at=utcnow()))

        for r in own:  # this run took the file on, and did not record the move
            if matches(r):
                self._move_all([(it, r.status, r.run_id, r.reason)])
                self.counts["already_done"] += 1
                return True
            dest = _dest(self.s, r.run_id, r.status, it.rel)
            if os.path.lexists(dest):
                mark_moved(r, dest)
            if it.kind == "missing":
                if not os.path.lexists(dest):
                    with _tx(self.engine) as conn:
                        conn.execute(update(lt).where(lt.c.id == r.id).values(
                            move_error="the file left the inbox before it was moved", updated_at=utcnow()))
                    self.counts["missing"] += 1
                else:
                    self.counts["already_done"] += 1
            else:
                self.counts["skipped"] += 1  # new content at a path this run already handled: next run
                self.skipped_paths.append(it.path)
            return True
        for r in others:  # an interrupted earlier run took the file on and never moved it
            if matches(r):
                self._move_all([(it, r.status, r.run_id, r.reason)])
                self.counts["recovered"] += 1
                log.info("recovered %s for interrupted run %s", it.path, r.run_id)
                return True
            dest = _dest(self.s, r.run_id, r.status, it.rel)
            if os.path.lexists(dest):
                mark_moved(r, dest)
        return False


def score_shard(settings: Settings, run_id: str, shard: int, *, batch_size: int | None = None,
                progress: Progress | None = None) -> dict[str, Any]:
    """Score shard ``shard`` of the planned run ``run_id`` with the run's pinned model version.

    Safe to retry and to run twice at once: the ledger claims each file once. Returns the shard's
    counts (``scored``, ``duplicates``, ``rejected``, ``skipped``, ``missing``, ``recovered``,
    ``move_failed``, ...) and writes them to ``runs/<run>/shard-<k>.json`` for :func:`finalize_run`.
    """
    _require_schema(settings.database_url)
    plan = _load_plan(settings, run_id)
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < plan["n_shards"]:
        raise ConfigError(f"scoring run {run_id!r} has shards 0..{plan['n_shards'] - 1}, not {shard!r}")
    size = batch_size or settings.score_batch_size
    if size < 1:
        raise ConfigError(f"the scoring batch size must be positive, got {size}")
    scorer = _ShardScorer(settings, plan, shard, size, progress)
    result = scorer.run(plan["shards"][shard])
    _write_json(run_dir(settings, run_id) / f"shard-{shard}.json", result)
    return result


# -- finishing a run --------------------------------------------------------------------------
def finalize_run(settings: Settings, run_id: str) -> dict[str, Any]:
    """Count the run from its ledger, close its ``scoring_runs`` row and return the summary.

    Safe to call again (the counts are recomputed). Status: ``finished``; ``move_failed`` when some files
    could not be moved (they are listed and still in the inbox); ``incomplete`` when a shard has not
    finished (run it, then finalize again).
    """
    _require_schema(settings.database_url)
    plan = _load_plan(settings, run_id)
    engine = get_engine(settings.database_url)
    _sweep_interrupted(settings, engine, exclude_run=None, only_run=run_id)
    t = InboxFile.__table__
    with _tx(engine) as conn:  # aggregates and short lists only: memory does not grow with the run
        by_status = collections.Counter(dict(conn.execute(
            select(t.c.status, func.count()).where(t.c.run_id == run_id).group_by(t.c.status)).all()))
        rejections = [{"path": r.path, "reason": r.reason} for r in conn.execute(
            select(t.c.path, t.c.reason).where(t.c.run_id == run_id, t.c.status == "rejected").order_by(t.c.path))]
        unmoved = conn.execute(select(t.c.path, t.c.move_error).where(
            t.c.run_id == run_id, t.c.moved_to.is_(None), t.c.move_error.is_not(None)).order_by(t.c.path)).all()
        run = conn.execute(select(ScoringRun.__table__).where(ScoringRun.__table__.c.run_id == run_id)).first()
    shard_docs = []
    for k in range(plan["n_shards"]):
        p = run_dir(settings, run_id) / f"shard-{k}.json"
        try:
            shard_docs.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
    failures = [{"path": r.path, "error": r.move_error} for r in unmoved
                if not r.move_error.startswith("the file left")]
    for d in shard_docs:  # files of interrupted earlier runs this run tried to move, in vain
        extra = [f for f in d.get("move_failures", []) if f.get("run_id", run_id) != run_id]
        failures += extra
    started = _aware(run.started_at) if run is not None else None
    finished = utcnow()
    loop_start = min((d["loop_started"] for d in shard_docs), default=None)
    loop_end = max((d["loop_finished"] for d in shard_docs), default=None)
    processed = by_status["scored"] + by_status["duplicate"] + by_status["rejected"]
    # scoring time: the shards' span, less the time it took to load the model (TensorFlow start-up)
    load = max((d.get("model_load_seconds", 0.0) for d in shard_docs), default=0.0)
    busy = (loop_end - loop_start - load) if loop_start is not None else 0.0
    if len(shard_docs) < plan["n_shards"]:
        status = "incomplete"
    elif failures:
        status = "move_failed"
    else:
        status = "finished"
    summary: dict[str, Any] = {
        "run_id": run_id, "model_version": plan["model_version"], "status": status,
        "inference": plan.get("inference", "keras"),
        "precision": next((d["precision"] for d in shard_docs if d.get("precision")), None),
        "scored": by_status["scored"], "duplicates": by_status["duplicate"], "rejected": by_status["rejected"],
        "ignored": len(plan["ignored"]),
        "skipped": len(plan["skipped"]) + sum(d.get("skipped", 0) for d in shard_docs),
        "move_failed": len(failures),
        "recovered": sum(d.get("recovered", 0) for d in shard_docs),
        "missing": sum(d.get("missing", 0) for d in shard_docs),
        "planned": plan["n_files"], "shards": plan["n_shards"], "shards_finished": len(shard_docs),
        "seconds": round((finished - started).total_seconds(), 3) if started else None,
        "images_per_second": round(processed / busy, 2) if busy > 0 else 0.0,
        "model_load_seconds": round(load, 3),
        "started_at": started.isoformat() if started else None, "finished_at": finished.isoformat(),
        "inbox": plan["inbox"],
        "archive_dir": str(settings.archive_dir / safe_dirname(run_id)),
        "quarantine_dir": str(settings.quarantine_dir / safe_dirname(run_id)),
        "rejections": rejections,
        "move_failures": failures,
        "ignored_paths": plan["ignored"],
        "skipped_paths": plan["skipped"] + [p for d in shard_docs for p in d.get("skipped_paths", [])],
    }
    counts = {k: summary[k] for k in ("scored", "duplicates", "rejected", "ignored", "skipped", "move_failed",
                                      "recovered", "missing", "planned", "seconds", "images_per_second",
                                      "inference", "precision")}
    rt = ScoringRun.__table__
    with _tx(engine) as conn:
        conn.execute(update(rt).where(rt.c.run_id == run_id).values(
            status=status, counts=counts, finished_at=None if status == "incomplete" else finished))
    return summary


def score_inbox(settings: Settings, *, inbox: str | os.PathLike[str] | None = None, run_id: str | None = None,
                batch_size: int | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Plan with one shard, score it, finalize: the whole nightly job in one process (``bcc score``).

    Passing the ``run_id`` of an interrupted run finishes that run (its plan is reused).
    """
    run_id = run_id or new_run_id()
    try:
        shards = int(_load_plan(settings, run_id)["n_shards"])  # finishing an earlier (maybe sharded) run
    except ConfigError:  # no plan yet: a new run
        shards = 1
    plan_shards(settings, run_id, shards, inbox=inbox)
    for shard in range(shards):
        score_shard(settings, run_id, shard, batch_size=batch_size, progress=progress)
    return finalize_run(settings, run_id)
