"""Fit the classifier with the seed recipe, log progress, keep the best checkpoint.

Recipe: Adam(learning_rate), binary cross-entropy on the two softmax columns, the configured batch
size and epochs, ``ReduceLROnPlateau`` on validation loss, and the weights of the epoch with the
lowest validation loss restored at the end (``ModelCheckpoint(save_best_only=True)``).

From-scratch runs and BatchNorm
-------------------------------
Measured here: DenseNet201 at 96 px with random init, 191 training tiles and 5 epochs reached 100%
training accuracy yet exactly 50% validation accuracy every epoch. DenseNet201 has 200 BatchNorm
layers whose moving statistics (momentum 0.99) move by about 1% per step; in ~60 steps they stay
near their initial values (mean 0, variance 1) while the real activations of a freshly trained
network are far from that, so inference mode, which uses the moving statistics, is broken.
ImageNet-initialised runs start from moving statistics that already fit, and do not need this.

The fix, :func:`recalibrate_batchnorm`, re-estimates the moving statistics from the training
images: one forward pass in training mode (batch statistics), with no weight update, dropout off,
and the moving averages replaced by the plain mean of the batch statistics over the pass. With
``bn_recalibration=auto`` it runs after every epoch of a from-scratch run, *before* validation, so
the validation loss that drives ``ReduceLROnPlateau`` and the best-checkpoint choice is measured on
a model in a usable inference state. Each checkpoint is saved after that epoch's recalibration, so
restoring the best epoch at the end restores its recalibrated statistics too; no further pass runs.
"""

from __future__ import annotations

import json
import logging
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import tensorflow as tf

__all__ = ["TrainResult", "compile_model", "fit", "predict_malignant", "recalibrate_batchnorm"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    history: dict[str, list[float]]
    best_epoch: int  # 1-based
    best_val_loss: float
    seconds: float
    recalibrated: bool


def compile_model(model: keras.Model, learning_rate: float) -> None:
    """Adam (fused: same update, far fewer graph ops), binary cross-entropy, accuracy."""
    import keras

    from .fused_adam import FusedAdam

    model.compile(
        optimizer=FusedAdam(learning_rate=learning_rate),
        loss="binary_crossentropy",
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def _layers(model: keras.Model, cls: type) -> list[Any]:
    return [
        layer for layer in model._flatten_layers(include_self=False, recursive=True) if isinstance(layer, cls)
    ]


_RECALIBRATION_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def recalibrate_batchnorm(model: keras.Model, dataset: tf.data.Dataset, *, passes: int = 1) -> int:
    """Re-estimate every BatchNorm layer's moving mean/variance on ``dataset`` (images only or
    (image, label) pairs, not augmented). No weights are trained. Returns the number of steps run.

    The momentum of every BatchNorm layer is replaced for the duration by one shared variable set to
    ``(k - 1) / k`` before step ``k``, which turns Keras' exponential moving average into the plain
    running mean of the batch statistics ("precise BatchNorm"): after one pass the moving statistics
    are the average over the whole training set, with nothing left of the stale values.
    """
    import keras
    import tensorflow as tf

    bns = _layers(model, keras.layers.BatchNormalization)
    drops = _layers(model, keras.layers.Dropout)
    saved_m = [bn.momentum for bn in bns]
    saved_r = [d.rate for d in drops]
    cached = _RECALIBRATION_STEPS.get(model)
    if cached is None:
        momentum = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="recalibration_momentum")

        # Traced once per model (tracing DenseNet201 takes ~30 s here) and reused every epoch.
        @tf.function(reduce_retracing=True)
        def step(x):
            model(x, training=True)

        cached = _RECALIBRATION_STEPS[model] = (momentum, step)
    momentum, step = cached
    for bn in bns:
        bn.momentum = momentum  # read inside call(); a variable keeps one trace for every step
    for d in drops:
        d.rate = 0.0  # dropout would change the statistics the head's BatchNorm sees
    try:
        steps = 0
        for _ in range(passes):
            for batch in dataset:
                x = batch[0] if isinstance(batch, tuple) else batch
                steps += 1
                momentum.assign((steps - 1) / steps)
                step(x)
        if steps == 0:
            raise ValueError("recalibration dataset is empty")
    finally:
        for bn, m in zip(bns, saved_m, strict=True):
            bn.momentum = m
        for d, r in zip(drops, saved_r, strict=True):
            d.rate = r
    return steps


def _callbacks(
    val_ds,
    recal_ds,
    checkpoint: Path,
    progress: Callable[[str], None],
    epochs: int,
    steps_per_epoch: int | None,
):
    import keras

    class EpochValidation(keras.callbacks.Callback):
        """Recalibrate BatchNorm (from-scratch runs), then validate, and put val_* into the logs
        that ReduceLROnPlateau and ModelCheckpoint read after it."""

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            if recal_ds is not None:
                recalibrate_batchnorm(self.model, recal_ds)
            result = self.model.evaluate(val_ds, verbose=0, return_dict=True)
            for k, v in result.items():
                logs[f"val_{k}"] = float(v)

    class Progress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.t0 = time.monotonic()

        def on_epoch_begin(self, epoch, logs=None):
            self.te, self.epoch = time.monotonic(), epoch

        def on_train_batch_end(self, batch, logs=None):
            if steps_per_epoch and steps_per_epoch >= 10 and (batch + 1) % max(1, steps_per_epoch // 4) == 0:
                progress(
                    f"epoch {self.epoch + 1}/{epochs}: batch {batch + 1}/{steps_per_epoch} "
                    f"loss {float(logs.get('loss', math.nan)):.4f}"
                )

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            lr = logs.get("learning_rate", logs.get("lr"))
            progress(
                f"epoch {epoch + 1}/{epochs}: loss {logs.get('loss', math.nan):.4f} "
                f"acc {logs.get('accuracy', math.nan):.4f} val_loss {logs.get('val_loss', math.nan):.4f} "
                f"val_acc {logs.get('val_accuracy', math.nan):.4f}"
                + (f" lr {float(lr):.2e}" if lr is not None else "")
                + f" ({time.monotonic() - self.te:.0f}s, total {time.monotonic() - self.t0:.0f}s)"
            )

    return [
        EpochValidation(),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1, min_lr=1e-7, verbose=0),
        keras.callbacks.ModelCheckpoint(
            str(checkpoint),
            monitor="val_loss",
            mode="min",
            save_best_only=True,
            save_weights_only=True,
            verbose=0,
        ),
        Progress(),
    ]


def fit(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    *,
    epochs: int,
    learning_rate: float,
    workdir: str | Path,
    recalibration_ds: tf.data.Dataset | None = None,
    steps_per_epoch: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Compile and train ``model``; on return it holds the best epoch's weights.

    ``recalibration_ds`` (un-augmented training images) switches on BatchNorm recalibration after
    every epoch, before validation; the restored best checkpoint carries that epoch's recalibrated
    statistics. ``workdir`` receives ``best.weights.h5`` and ``history.json`` (written atomically).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    progress = progress or log.info
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / "best.weights.h5"
    compile_model(model, learning_rate)
    t0 = time.monotonic()
    hist = model.fit(
        train_ds,
        epochs=epochs,
        verbose=0,
        shuffle=False,  # tf.data shuffles
        callbacks=_callbacks(val_ds, recalibration_ds, checkpoint, progress, epochs, steps_per_epoch),
    )
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    if not checkpoint.is_file():
        raise RuntimeError("training produced no checkpoint (validation loss was never finite)")
    model.load_weights(str(checkpoint))  # the best epoch, BatchNorm statistics included
    val_losses = history.get("val_loss", [])
    best = (
        int(min(range(len(val_losses)), key=lambda i: val_losses[i])) if val_losses else len(val_losses) - 1
    )
    atomic_write(workdir / "history.json", json.dumps(history, indent=1) + "\n")
    result = TrainResult(
        history=history,
        best_epoch=best + 1,
        best_val_loss=float(val_losses[best]) if val_losses else math.nan,
        seconds=time.monotonic() - t0,
        recalibrated=recalibration_ds is not None,
    )
    progress(
        f"training done in {result.seconds:.0f}s; best epoch {result.best_epoch} "
        f"(val_loss {result.best_val_loss:.4f}) restored"
    )
    return result


def predict_malignant(model: keras.Model, dataset: tf.data.Dataset) -> Any:
    """P(malignant) for every image of ``dataset`` (compiled, batched ``predict``)."""
    import numpy as np

    probs = model.predict(dataset, verbose=0)
    return np.asarray(probs[:, 1], dtype="float64")
