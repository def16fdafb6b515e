"""Labelled data: intake from ``landing/``, the group-aware split and its manifest, and tf.data input.

Intake itself lives in :mod:`bcc_pipeline.intake` (re-exported here: ``dataset.intake``).

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
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from . import images
from .config import DEFAULTS, Settings
from .errors import DatasetError
from .files import atomic_write
from .intake import PROGRESS_EVERY, IntakeReport, intake  # re-exported: dataset.intake is the old home
from .model import CLASS_NAMES
from .store import ImageRecord, session_scope

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
