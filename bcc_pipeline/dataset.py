"""Labelled data: intake from ``landing/``, the group-aware split and its manifest, and tf.data input.

Intake reads ``landing/<label>/[<group>/]...`` (label ``benign`` or ``malignant``; the first folder
under the label, when there is one, is the patient/slide group). Every accepted file is copied into
the content-addressed store ``dataset/<sha[:2]>/<sha><ext>`` and recorded in ``images``; only then
is the landing file removed. Content seen under both labels is excluded from training and reported.
Unreadable files go to ``quarantine/<run>/landing/...`` with a reason file; nothing is dropped silently.

The split is seeded, group-aware and stratified: a group (or, without groups, a single image) never
sits on both sides, and each label gets its share of the validation set. It is written as a manifest
(JSON) whose hash identifies the data every model version was trained on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import stat
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from . import images
from .config import DEFAULTS, Settings
from .errors import DatasetError, ImageError
from .files import REASON_SUFFIX, SYSTEM_NAMES, atomic_write, quarantine_file, safe_dirname
from .model import CLASS_NAMES
from .store import ImageRecord, Rejection, insert_rows, session_scope, utcnow

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

__all__ = [
    "CACHE_BUDGET_BYTES",
    "LABELS",
    "PROGRESS_EVERY",
    "IntakeReport",
    "Manifest",
    "augmentation",
    "intake",
    "load_manifest",
    "make_dataset",
    "make_split",
    "manifest_arrays",
    "prepare_split",
    "write_manifest",
]

log = logging.getLogger(__name__)

LABELS = CLASS_NAMES  # the model's class order: label index i is output column i
PROGRESS_EVERY = 50  # intake reports progress each time this many more files are stored


@dataclass
class IntakeReport:
    run_id: str
    accepted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    rejected: int = 0
    ignored: int = 0
    skipped: int = 0
    rejections: list[dict[str, str]] = field(default_factory=list)
    ignored_paths: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)  # could not be handled; still in landing

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_ignored_name(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES or name.endswith(REASON_SUFFIX)


def _store_copy(data: bytes, sha: str, ext: str, dataset_dir: Path) -> Path:
    """Write the content-addressed copy atomically; an existing complete copy is kept."""
    dest = dataset_dir / sha[:2] / f"{sha}{ext}"
    if dest.is_file() and dest.stat().st_size == len(data):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(dest, data)


def _walk(root: Path):
    """Yield regular files and symlinks below ``root`` without following links, sorted."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield Path(dirpath) / name
        # symlinks to directories show up in dirnames; report them as files (they are rejected)
        for d in list(dirnames):
            if (Path(dirpath) / d).is_symlink():
                dirnames.remove(d)
                yield Path(dirpath) / d


def intake(settings: Settings, *, run_id: str | None = None,
           progress: Callable[[str], None] | None = None) -> IntakeReport:
    """Take every labelled image in ``landing/`` into the dataset store and the ``images`` table.

    Safe to rerun at any point: a file is removed from landing only after its copy is stored and
    its row committed, and a retry of a half-done run finds the content already known.
    """
    run_id = run_id or f"intake-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    report = IntakeReport(run_id=run_id)
    landing = settings.landing_dir
    quarantine_root = settings.quarantine_dir / safe_dirname(run_id) / "landing"
    now_ts = dt.datetime.now().timestamp()
    if not landing.is_dir():
        log.info("no landing folder at %s; nothing to take in", landing)
        return report

    for entry in sorted(landing.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name not in LABELS or not entry.is_dir() or entry.is_symlink():
            report.ignored += 1
            report.ignored_paths.append(str(entry.relative_to(landing)))
            log.warning("ignoring %s: landing/ holds only the folders %s", entry, ", ".join(LABELS))

    last_progress = 0
    with session_scope(settings.database_url) as session:
        for label in LABELS:
            label_dir = landing / label
            if not label_dir.is_dir() or label_dir.is_symlink():
                continue
            for path in _walk(label_dir):
                rel = path.relative_to(landing)
                try:
                    _intake_one(settings, session, path, rel, label, report, quarantine_root, now_ts)
                    session.commit()  # one file at a time: a crash loses no more than the current file
                except OSError as exc:  # e.g. a quarantine move refused: report it, keep the file, go on
                    session.rollback()
                    report.failed.append({"path": str(rel), "error": f"{type(exc).__name__}: {exc}"})
                    log.error("could not take in %s (left in landing): %s", rel, exc)
                done = report.accepted + report.duplicates
                if progress and report.accepted and done % PROGRESS_EVERY == 0 and done != last_progress:
                    last_progress = done  # once per count: rejected and ignored files do not repeat it
                    progress(f"intake: {report.accepted} accepted, {report.duplicates} duplicates so far")
    log.info("intake %s: %d accepted, %d duplicates, %d conflicts, %d rejected, %d ignored, %d skipped",
             run_id, report.accepted, report.duplicates, report.conflicts, report.rejected,
             report.ignored, report.skipped)
    return report


def _reject(session, path: Path, rel: Path, reason: str, sha: str | None,
            report: IntakeReport, quarantine_root: Path) -> None:
    moved = quarantine_file(path, quarantine_root, rel, reason)
    insert_rows(session, Rejection, [{
        "run_id": report.run_id, "stage": "intake", "path": str(rel), "sha256": sha,
        "reason": reason, "moved_to": str(moved), "rejected_at": utcnow(),
    }], key=("run_id", "path"))
    report.rejected += 1
    report.rejections.append({"path": str(rel), "reason": reason})
    log.warning("rejected %s: %s", rel, reason)


def _intake_one(settings: Settings, session, path: Path, rel: Path, label: str, report: IntakeReport,
                quarantine_root: Path, now_ts: float) -> None:
    if path.is_symlink():
        _reject(session, path, rel, "symbolic link: links are never followed", None, report,
                quarantine_root)
        return
    if _is_ignored_name(path.name) or path.suffix.lower() not in images.IMAGE_EXTENSIONS:
        report.ignored += 1
        report.ignored_paths.append(str(rel))
        return
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end: never open it
            report.ignored += 1
            report.ignored_paths.append(str(rel))
            return
        if now_ts - st.st_mtime < settings.settle_seconds:
            report.skipped += 1  # still being written; next run takes it
            return
        if st.st_size > images.max_file_bytes(settings.max_pixels):
            _reject(session, path, rel, f"file of {st.st_size} bytes is larger than any image within "
                    f"the pixel limit ({settings.max_pixels}) can be", None, report, quarantine_root)
            return
        data = path.read_bytes()
    except OSError as exc:
        _reject(session, path, rel, f"unreadable file: {exc.strerror or exc}", None, report,
                quarantine_root)
        return
    sha = images.sha256_bytes(data)
    try:
        info = images.validate(data, path=rel, max_pixels=settings.max_pixels, min_side=settings.min_side)
        images.decode(data, path=rel, max_pixels=settings.max_pixels, min_side=settings.min_side)
    except ImageError as exc:
        _reject(session, path, rel, exc.reason, sha, report, quarantine_root)
        return

    parts = rel.parts  # (label, [group, ...], name)
    group = parts[1] if len(parts) > 2 else None
    existing = session.get(ImageRecord, sha)
    if existing is not None and existing.label not in (None, label):
        reason = (f"the same image content was already taken in as {existing.label} "
                  f"({existing.source_path}); excluded from training under both labels")
        if existing.excluded_reason is None:
            existing.excluded_reason = f"content seen as both {existing.label} and {label} ({rel})"
        report.conflicts += 1
        _reject(session, path, rel, reason, sha, report, quarantine_root)
        return
    if existing is not None and existing.label == label:
        report.duplicates += 1
        session.flush()
        path.unlink()  # its content is already stored under dataset/
        return

    stored = _store_copy(data, sha, path.suffix.lower(), settings.dataset_dir)
    if existing is None:
        session.add(ImageRecord(
            sha256=sha, label=label, group_id=group, width=info.width, height=info.height,
            format=info.format, source_path=str(rel), stored_path=str(stored), first_seen_at=utcnow(),
        ))
    else:  # known from scoring (unlabelled); now it has a label
        existing.label, existing.group_id, existing.stored_path = label, group, str(stored)
        existing.first_seen_at = utcnow()
    session.flush()
    session.commit()
    path.unlink()
    report.accepted += 1


# -- split and manifest -----------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    path: Path
    hash: str
    entries: list[dict[str, Any]]
    created_at: str
    data_cutoff: str | None

    def split(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["split"] == name]

    @property
    def n_train(self) -> int:
        return len(self.split("train"))

    @property
    def n_val(self) -> int:
        return len(self.split("validation"))


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def make_split(records: Sequence[dict[str, Any]], *, seed: int = DEFAULTS["seed"],
               val_fraction: float = DEFAULTS["val_fraction"]) -> list[dict[str, Any]]:
    """Assign each record (``sha256``, ``label``, ``group_id``) to ``train`` or ``validation``.

    Groups are ranked by a seeded hash (stable when new groups arrive, unlike a shuffle) and taken
    into validation greedily while that brings every label closer to its target count
    ``round(val_fraction * n_label)``. A group never straddles the split.
    """
    if not records:
        raise DatasetError("no labelled images to split; put images in landing/benign and landing/malignant and run intake")
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r.get("group_id") or f"sha:{r['sha256']}"].append(r)
    totals: dict[str, int] = defaultdict(int)
    for r in records:
        totals[r["label"]] += 1
    for label in LABELS:
        if totals[label] < 2:
            raise DatasetError(
                f"need at least 2 {label} images for a train/validation split, have {totals[label]}")
    target = {lab: max(1, round(val_fraction * n)) for lab, n in totals.items()}
    val_count: dict[str, int] = defaultdict(int)
    val_groups: set[str] = set()
    for g in sorted(groups, key=lambda g: _rank(seed, g)):
        counts: dict[str, int] = defaultdict(int)
        for r in groups[g]:
            counts[r["label"]] += 1
        before = sum(abs(target[lab] - val_count[lab]) for lab in target)
        after = sum(abs(target[lab] - val_count[lab] - counts.get(lab, 0)) for lab in target)
        if after < before:
            val_groups.add(g)
            for lab, c in counts.items():
                val_count[lab] += c
    out = []
    for g, members in groups.items():
        for r in members:
            out.append({"sha256": r["sha256"], "label": r["label"], "group_id": g,
                        "path": r.get("path"), "split": "validation" if g in val_groups else "train"})
    for label in LABELS:
        sides = {e["split"] for e in out if e["label"] == label}
        if sides != {"train", "validation"}:
            raise DatasetError(f"the split left no {label} images on one side; add more {label} groups")
    out.sort(key=lambda e: e["sha256"])
    return out


def _manifest_hash(entries: Sequence[dict[str, Any]]) -> str:
    canonical = [{k: e[k] for k in ("sha256", "label", "group_id", "split")} for e in entries]
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(entries: Sequence[dict[str, Any]], out_dir: Path, *, seed: int, val_fraction: float,
                   data_cutoff: dt.datetime | None = None) -> Manifest:
    """Write ``out_dir/<hash>.json``; the same data and split always give the same file."""
    digest = _manifest_hash(entries)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{digest}.json"
    created = dt.datetime.now(dt.UTC).isoformat()
    cutoff = data_cutoff.isoformat() if data_cutoff else None
    doc = {"hash": digest, "seed": seed, "val_fraction": val_fraction, "created_at": created,
           "data_cutoff": cutoff, "counts": _counts(entries), "entries": list(entries)}
    if not path.exists():
        atomic_write(path, json.dumps(doc, indent=1))
    return load_manifest(path)


def _counts(entries: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {"train": {}, "validation": {}}
    for e in entries:
        role = out.setdefault(e["split"], {})
        role[e["label"]] = role.get(e["label"], 0) + 1
    return out


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read manifest {path}: {exc}") from exc
    if _manifest_hash(doc["entries"]) != doc["hash"]:
        raise DatasetError(f"manifest {path} does not match its own hash; it was edited after it was written")
    return Manifest(path=path, hash=doc["hash"], entries=doc["entries"], created_at=doc["created_at"],
                    data_cutoff=doc.get("data_cutoff"))


def prepare_split(settings: Settings) -> Manifest:
    """Split every usable labelled image in the store and write the manifest."""
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(ImageRecord.sha256, ImageRecord.label, ImageRecord.group_id, ImageRecord.stored_path,
                   ImageRecord.first_seen_at)
            .where(ImageRecord.label.is_not(None), ImageRecord.excluded_reason.is_(None),
                   ImageRecord.stored_path.is_not(None))
        ).all()
    records = [{"sha256": r.sha256, "label": r.label, "group_id": r.group_id, "path": r.stored_path}
               for r in rows]
    cutoff = max((r.first_seen_at for r in rows), default=None)
    entries = make_split(records, seed=settings.seed, val_fraction=settings.val_fraction)
    return write_manifest(entries, settings.dataset_dir / "manifests", seed=settings.seed,
                          val_fraction=settings.val_fraction, data_cutoff=cutoff)


# -- tf.data ----------------------------------------------------------------------------------
def augmentation(seed: int):
    """The seed's augmentation as Keras preprocessing layers: flips, rotation, zoom."""
    import keras

    return keras.Sequential([
        keras.layers.RandomFlip("horizontal_and_vertical", seed=seed, name="flip"),
        keras.layers.RandomRotation(0.25, fill_mode="reflect", seed=seed + 1, name="rotation"),
        keras.layers.RandomZoom(0.2, fill_mode="reflect", seed=seed + 2, name="zoom"),
    ], name="augmentation")


# Keep decoded training images in memory when they fit in this budget; beyond it they are
# decoded again every epoch (slower, but memory stays flat whatever the data set holds).
CACHE_BUDGET_BYTES = 2 * 1024**3


def make_dataset(paths: Sequence[str], labels: Sequence[int] | None, *, image_size: int, batch_size: int,
                 training: bool = False, seed: int = DEFAULTS["seed"], max_pixels: int = DEFAULTS["max_pixels"],
                 min_side: int = DEFAULTS["min_side"], cache: bool | None = None) -> tf.data.Dataset:
    """A tf.data pipeline over image files: decode + ``images.preprocess`` in parallel, batch, prefetch.

    ``labels`` (0 benign, 1 malignant) become one-hot targets; with ``labels=None`` the dataset yields
    images only (for prediction). ``training=True`` shuffles every epoch and applies the augmentation.
    """
    import numpy as np
    import tensorflow as tf

    if len(paths) == 0:
        raise DatasetError("no images to build a dataset from")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(paths)} paths but {len(labels)} labels")

    def _load(p: bytes) -> np.ndarray:
        arr, _sha = images.load_for_model(p.decode("utf-8"), image_size, max_pixels=max_pixels,
                                          min_side=min_side)
        return arr

    def _map(p):
        x = tf.numpy_function(_load, [p], tf.float32, stateful=False)
        x.set_shape((image_size, image_size, 3))
        return x

    ds = tf.data.Dataset.from_tensor_slices(list(map(str, paths)))
    ds = ds.map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if labels is not None:
        y = tf.one_hot(np.asarray(labels, dtype="int32"), 2, dtype=tf.float32)
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(y)))
    if cache is None:
        cache = len(paths) * image_size * image_size * 3 * 4 <= CACHE_BUDGET_BYTES
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(len(paths), 2048), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training:
        aug = augmentation(seed)
        if labels is not None:
            ds = ds.map(lambda x, t: (aug(x, training=True), t), num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.map(lambda x: aug(x, training=True), num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    # each pipeline op on one thread: the pipeline needs a few percent of the CPU, and ops that fan out over
    # every core stall the training step's own threads (measured in benchmarks/: training_pipeline_overhead)
    options.threading.max_intra_op_parallelism = 1
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def manifest_arrays(manifest: Manifest, split: str) -> tuple[list[str], list[int]]:
    """Stored paths and 0/1 labels of one side of the split."""
    entries = manifest.split(split)
    missing = [e["path"] for e in entries if not e.get("path") or not Path(e["path"]).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} stored images of the manifest are missing, e.g. {missing[0]}")
    return [e["path"] for e in entries], [LABELS.index(e["label"]) for e in entries]
