"""Labelled data: intake from ``landing/``, the group-aware split and its manifest, and tf.data input.

Intake itself lives in :mod:`bcc_pipeline.intake` (re-exported here: ``dataset.intake``).

The data roles (train, validation, calibration, holdout) and their manifests are in
:mod:`bcc_pipeline.manifests`; the frozen holdout, near-duplicates and the development split beside it
in :mod:`bcc_pipeline.holdout`. Their public names are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import images
from .config import DEFAULTS, Settings
from .errors import DatasetError
from .holdout import current_holdout, extend_holdout, freeze_holdout, split_roles
from .intake import PROGRESS_EVERY, IntakeReport, intake  # re-exported: dataset.intake is the old home
from .manifests import Manifest, load_manifest, make_split, manifest_arrays, write_manifest
from .model import CLASS_NAMES

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

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal_and_vertical", seed=seed, name="flip"),
            keras.layers.RandomRotation(0.25, fill_mode="reflect", seed=seed + 1, name="rotation"),
            keras.layers.RandomZoom(0.2, fill_mode="reflect", seed=seed + 2, name="zoom"),
        ],
        name="augmentation",
    )


# Keep decoded training images in memory when they fit in this budget; beyond it they are
# decoded again every epoch (slower, but memory stays flat whatever the data set holds).
CACHE_BUDGET_BYTES = 2 * 1024**3


def make_dataset(
    paths: Sequence[str],
    labels: Sequence[int] | None,
    *,
    image_size: int,
    batch_size: int,
    training: bool = False,
    seed: int = DEFAULTS["seed"],
    max_pixels: int = DEFAULTS["max_pixels"],
    min_side: int = DEFAULTS["min_side"],
    cache: bool | None = None,
) -> tf.data.Dataset:
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
        arr, _sha = images.load_for_model(
            p.decode("utf-8"), image_size, max_pixels=max_pixels, min_side=min_side
        )
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
