"""Labelled data: intake from ``landing/``, the group-aware split and its manifest, and tf.data input.

Intake reads ``landing/<label>/[<group>/]...`` (label ``benign`` or ``malignant``; the first folder
under the label, when there is one, is the patient/slide group). Every accepted file is copied into
the content-addressed store ``dataset/<sha[:2]>/<sha><ext>`` and recorded in ``images``; only then
is the landing file removed. Content seen under both labels is excluded from training and reported.
Unreadable files go to ``quarantine/<run>/landing/...`` with a reason file; nothing is dropped silently.

The data roles (train, validation, calibration, holdout) and their manifests are in
:mod:`bcc_pipeline.manifests`; the frozen holdout, near-duplicates and the development split beside it
in :mod:`bcc_pipeline.holdout`. Their public names are re-exported here.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import images
from .config import DEFAULTS, Settings
from .errors import DatasetError, ImageError
from .files import REASON_SUFFIX, SYSTEM_NAMES, atomic_write, quarantine_file, safe_dirname
from .holdout import current_holdout, extend_holdout, freeze_holdout, split_roles
from .manifests import Manifest, load_manifest, make_split, manifest_arrays, write_manifest
from .model import CLASS_NAMES
from .neardup import perceptual_hash
from .store import ImageRecord, Rejection, session_scope, upsert, utcnow

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

__all__ = [
    "CACHE_BUDGET_BYTES",
    "LABELS",
    "PROGRESS_EVERY",
    "IntakeReport",
    "Manifest",
    "augmentation",
    "current_holdout",
    "extend_holdout",
    "freeze_holdout",
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
    upsert(session, Rejection, [{
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
        rgb = images.decode(data, path=rel, max_pixels=settings.max_pixels, min_side=settings.min_side)
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
            phash=perceptual_hash(rgb),
        ))
    else:  # known from scoring (unlabelled); now it has a label
        existing.label, existing.group_id, existing.stored_path = label, group, str(stored)
        existing.first_seen_at, existing.phash = utcnow(), perceptual_hash(rgb)
    session.flush()
    session.commit()
    path.unlink()
    report.accepted += 1


# -- split and manifest: the roles live in manifests, the holdout in holdout -------------------
def prepare_split(settings: Settings) -> Manifest:
    """Split every usable labelled image outside the holdout into train/validation/calibration and
    write the development manifest (freezing a holdout first when there is none yet, see
    :func:`bcc_pipeline.holdout.split_roles`)."""
    return split_roles(settings).development


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
