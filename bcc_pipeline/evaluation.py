"""Evaluation of the malignant-vs-benign classifier: operating threshold, metrics and plots.

Everything here works on two parallel 1-D sequences:

* ``y_true`` - the true labels, ``0`` = benign, ``1`` = malignant (ints, bools or floats equal
  to 0/1);
* ``prob_malignant`` - the model's probability of class 1 (column 1 of the softmax output),
  each value in ``[0, 1]``.

A sample is *predicted* malignant when ``prob_malignant >= threshold``.

:func:`choose_threshold` picks the operating threshold on the calibration split,
:func:`compute_metrics` returns a flat ``dict[str, float]`` (keys :data:`METRIC_NAMES`, in that
order) suitable for storing next to a model version, and the ``plot_*`` functions write PNG
reports. Plots use :class:`matplotlib.figure.Figure` directly (never ``pyplot``), so they need no
display, touch no global state and are safe to call from several threads. Every figure is rendered
in memory and written with :func:`bcc_pipeline.files.atomic_write`, so a reader never sees a
half-written PNG.

The standard metrics come from :mod:`sklearn.metrics`; what is written here is what is ours: the
input checks, the operating-threshold rule, the calibration error with its documented bins, the
undefined-metric conventions (``nan`` where scikit-learn would raise or warn) and the plots.

Bad input (empty, length mismatch, labels outside ``{0, 1}``, probabilities outside ``[0, 1]`` or
not finite, bad parameters) raises :class:`ValueError` with a one-line message.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss, confusion_matrix, log_loss, roc_auc_score, roc_curve

from .files import atomic_write

__all__ = [
    "DEFAULT_THRESHOLD",
    "LOG_LOSS_EPS",
    "METRIC_NAMES",
    "choose_threshold",
    "compute_metrics",
    "plot_all",
    "plot_confusion_matrix",
    "plot_reliability",
    "plot_roc",
    "plot_training_curves",
    "threshold_choice",
]

#: The keys of :func:`compute_metrics`'s result, in the order they are returned.
METRIC_NAMES: tuple[str, ...] = (
    *("accuracy", "precision", "recall", "sensitivity", "specificity", "f1"),  # at the threshold
    *("roc_auc", "log_loss", "ece", "brier"),  # threshold-free
    *("threshold", "n", "tp", "fp", "tn", "fn"),  # the inputs and the counts
)

#: Probabilities are clipped to ``[LOG_LOSS_EPS, 1 - LOG_LOSS_EPS]`` before taking logs.
LOG_LOSS_EPS = 1e-7

#: Threshold returned by :func:`choose_threshold` when the data hold no malignant sample.
DEFAULT_THRESHOLD = 0.5

_FIGSIZE = (6.0, 4.5)
_DPI = 100

ArrayLike = Sequence[float] | np.ndarray
PathLike = str | os.PathLike[str]


def _as_1d(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values)
    except Exception as exc:  # ragged nested sequences and the like
        raise ValueError(f"{name} cannot be read as an array: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _validate(y_true: Any, prob_malignant: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(labels as int64, probabilities as float64)`` or raise ``ValueError``."""
    y = _as_1d(y_true, "y_true")
    p = _as_1d(prob_malignant, "prob_malignant")
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true and prob_malignant differ in length ({y.shape[0]} != {p.shape[0]})")
    if y.dtype.kind not in "biuf":
        raise ValueError(f"y_true must be numeric labels in {{0, 1}}, got dtype {y.dtype}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        examples = sorted({repr(v) for v in y[bad][:5].tolist()})
        raise ValueError(
            f"y_true must contain only 0 (benign) and 1 (malignant), found {', '.join(examples)}"
        )
    if p.dtype.kind not in "biuf":
        raise ValueError(f"prob_malignant must be numeric, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if not np.isfinite(p).all():
        raise ValueError("prob_malignant contains NaN or infinite values")
    if (p < 0.0).any() or (p > 1.0).any():
        raise ValueError(f"prob_malignant must lie in [0, 1], got values in [{p.min():.6g}, {p.max():.6g}]")
    return y.astype(np.int64), p


def _check_unit(value: Any, name: str, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    if low_open:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {v!r}")
    elif not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    return v


def _confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """``(tp, fp, tn, fn)`` with prediction = ``p >= threshold``."""
    tn, fp, fn, tp = confusion_matrix(y, p >= threshold, labels=[False, True]).ravel().tolist()
    return tp, fp, tn, fn


def threshold_choice(
    y_true: ArrayLike, prob_malignant: ArrayLike, *, target_sensitivity: float = 0.95
) -> dict[str, Any]:
    """The operating threshold and why: the highest threshold whose sensitivity on this data is at
    least the target, placed midway between two adjacent observed probabilities, never on one.

    Sensitivity can only fall as the threshold rises, so the highest qualifying threshold is also the
    one with the best specificity among those meeting the target. Let ``hi`` be the
    ``ceil(target * n_malignant)``-th largest malignant probability (the highest observed value that
    reaches the target) and ``lo`` the next lower distinct probability observed in the data (0.0
    when none is lower): the threshold is ``(lo + hi) / 2``. Every case at or above ``hi`` is called
    malignant and every case at or below ``lo`` benign, exactly as at ``hi``, but no observed
    probability lies on the threshold, so a numerical difference of one ulp flips no label. (The one
    exception: when ``hi`` is 0.0 the threshold is 0.0, where every case is malignant anyway.)

    Returns ``{"threshold", "between": [lo, hi], "target", "sensitivity", "n_malignant", "n"}``
    (``sensitivity``: reached on this data). Without malignant samples sensitivity is undefined:
    :data:`DEFAULT_THRESHOLD` (0.5) with ``between`` None.
    Raises ``ValueError`` for invalid input or ``target_sensitivity`` outside ``(0, 1]``.
    """
    target = _check_unit(target_sensitivity, "target_sensitivity", low_open=True)
    y, p = _validate(y_true, prob_malignant)
    n_pos = int(np.count_nonzero(y == 1))
    info: dict[str, Any] = {"target": target, "n_malignant": n_pos, "n": int(y.shape[0])}
    if n_pos == 0:
        return {**info, "threshold": DEFAULT_THRESHOLD, "between": None, "sensitivity": math.nan}
    candidates = np.unique(p)  # ascending
    pos_sorted = np.sort(p[y == 1])
    # positives with prob >= candidate
    tp = n_pos - np.searchsorted(pos_sorted, candidates, side="left")
    sensitivity = tp / n_pos
    ok = np.flatnonzero(sensitivity >= target)  # same float arithmetic as tp / (tp + fn) elsewhere
    # The smallest observed probability always gives sensitivity 1.0, so ``ok`` is never empty.
    j = int(ok.max())
    hi = float(candidates[j])
    lo = float(candidates[j - 1]) if j > 0 else 0.0
    return {**info, "threshold": (lo + hi) / 2.0, "between": [lo, hi], "sensitivity": float(sensitivity[j])}


def choose_threshold(
    y_true: ArrayLike, prob_malignant: ArrayLike, *, target_sensitivity: float = 0.95
) -> float:
    """The threshold of :func:`threshold_choice`: midway between two adjacent observed probabilities."""
    return float(threshold_choice(y_true, prob_malignant, target_sensitivity=target_sensitivity)["threshold"])


def _ece(y: np.ndarray, p: np.ndarray, n_bins: int) -> float:
    # Written here rather than on sklearn.calibration.calibration_curve: that returns the mean of each
    # non-empty bin but not its size, which the ECE weights by, and it puts a probability lying on a
    # bin edge into the lower bin, whereas the bins documented here are [k / n_bins, (k + 1) / n_bins).
    # 1.0 goes to the last bin.
    idx = np.minimum(np.floor(p * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
    used = counts > 0
    gaps = np.abs(sum_p[used] - sum_y[used]) / counts[used]
    return float(np.sum(counts[used] * gaps) / y.shape[0])


def compute_metrics(
    y_true: ArrayLike, prob_malignant: ArrayLike, *, threshold: float = 0.5, n_bins: int = 10
) -> dict[str, float]:
    """Classification and calibration metrics at ``threshold``; every value is a plain float.

    Keys (in :data:`METRIC_NAMES` order):

    * ``accuracy`` - (tp + tn) / n.
    * ``precision`` - tp / (tp + fp); ``0.0`` when nothing is predicted malignant.
    * ``recall`` and ``sensitivity`` (equal) - tp / (tp + fn); ``nan`` when there is no
      malignant sample (undefined, rather than a misleading 0).
    * ``specificity`` - tn / (tn + fp); ``nan`` when there is no benign sample.
    * ``f1`` - 2 tp / (2 tp + fp + fn); ``0.0`` when that denominator is 0.
    * ``roc_auc`` - area under the ROC curve; ``nan`` when only one class is present.
    * ``log_loss`` - mean binary cross-entropy with probabilities clipped to
      ``[1e-7, 1 - 1e-7]``.
    * ``ece`` - expected calibration error: ``n_bins`` equal-width bins over ``[0, 1]``
      (bin ``k`` = ``[k/n_bins, (k+1)/n_bins)``, 1.0 in the last bin), sum over non-empty bins
      of ``(bin size / n) * |mean prob_malignant - malignant rate|``.
    * ``brier`` - mean of ``(prob_malignant - y_true) ** 2``.
    * ``threshold``, ``n``, ``tp``, ``fp``, ``tn``, ``fn`` - the inputs/counts, as floats.

    Raises ``ValueError`` for invalid input, ``threshold`` outside ``[0, 1]`` or ``n_bins < 1``.
    """
    thr = _check_unit(threshold, "threshold")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    y, p = _validate(y_true, prob_malignant)
    n = y.shape[0]
    tp, fp, tn, fn = _confusion(y, p, thr)
    n_pos, n_neg = tp + fn, tn + fp
    nan = float("nan")

    # The ratios stay ours: scikit-learn warns and returns 0 where a rate is undefined, and this
    # module reports those as nan (a recall of 0 on data without malignant samples would mislead).
    recall = tp / n_pos if n_pos else nan
    # roc_auc_score raises on one class: the area is undefined there, so nan
    roc_auc = float(roc_auc_score(y, p)) if n_pos and n_neg else nan
    # labels=[0, 1]: defined on one class too; our clipping, so the value does not depend on the
    # floating-point epsilon scikit-learn clips with
    loss = float(log_loss(y, np.clip(p, LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS), labels=[0, 1]))
    counts = {"threshold": thr, "n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn}

    values: dict[str, float] = {
        "accuracy": (tp + tn) / n,
        "precision": tp / (tp + fp) if (tp + fp) else 0.0,
        "recall": recall,
        "sensitivity": recall,
        "specificity": tn / n_neg if n_neg else nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0,
        "roc_auc": roc_auc,
        "log_loss": loss,
        "ece": _ece(y, p, int(n_bins)),
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        **counts,
    }
    return {name: float(values[name]) for name in METRIC_NAMES}


def _png_path(path: PathLike) -> Path:
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {str(target)!r}")
    return target


def _save_png(fig: Any, path: Path) -> Path:
    """Render ``fig`` as PNG in memory, then write it all or nothing (readable by all, as plots are)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    atomic_write(path, buffer.getvalue())
    os.chmod(path, 0o644)
    return path


def _new_figure(**kwargs: Any) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained", **kwargs)


def _series(history: Mapping[str, Sequence[float]], *keys: str) -> tuple[str, np.ndarray] | None:
    for key in keys:
        if key in history:
            values = np.asarray(history[key], dtype=np.float64).ravel()
            if values.size:
                return key, values
    return None


def plot_training_curves(history: Mapping[str, Sequence[float]], path: PathLike) -> Path:
    """Plot loss (top) and accuracy (bottom) per epoch, training and validation, to a PNG.

    ``history`` is a Keras ``History.history`` dict. Recognised keys: ``loss``, ``val_loss``,
    ``accuracy``/``acc``, ``val_accuracy``/``val_acc``; others (``lr``, ``learning_rate``, ...)
    are ignored and any of the recognised ones may be missing. The epoch with the lowest
    ``val_loss`` is marked. Raises ``ValueError`` when the history is empty or holds none of the
    recognised series, or when ``path`` does not end in ``.png``. Returns ``Path(path)``.
    """
    target = _png_path(path)
    if not isinstance(history, Mapping):
        raise ValueError(
            f"history must be a mapping of metric name to per-epoch values, got {type(history).__name__}"
        )
    try:
        loss = _series(history, "loss")
        val_loss = _series(history, "val_loss")
        acc = _series(history, "accuracy", "acc")
        val_acc = _series(history, "val_accuracy", "val_acc")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"history values must be sequences of numbers: {exc}") from exc
    if not any((loss, val_loss, acc, val_acc)):
        raise ValueError(
            "history is empty: expected per-epoch lists under loss/val_loss/accuracy/val_accuracy"
        )

    from matplotlib.ticker import MaxNLocator

    fig = _new_figure()
    ax_loss, ax_acc = fig.subplots(2, 1, sharex=True)
    fig.suptitle("Training curves")
    panels = ((ax_loss, "Loss", (loss, val_loss)), (ax_acc, "Accuracy", (acc, val_acc)))
    for ax, label, (train, val) in panels:
        drawn = False
        for series, name, style in ((train, "training", "-o"), (val, "validation", "--s")):
            if series is None:
                continue
            values = series[1]
            epochs = np.arange(1, values.size + 1)
            ax.plot(epochs, values, style, markersize=3, linewidth=1.5, label=name)
            drawn = True
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(loc="best", fontsize="small")
        else:
            empty = f"no {label.lower()} recorded"
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="gray")
    if val_loss is not None and np.isfinite(val_loss[1]).any():
        best = int(np.nanargmin(val_loss[1])) + 1
        for ax in (ax_loss, ax_acc):
            ax.axvline(best, color="gray", linestyle=":", linewidth=1)
        ax_loss.set_title(f"best val_loss at epoch {best}", fontsize="small")
    ax_acc.set_xlabel("Epoch")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save_png(fig, target)


def plot_confusion_matrix(
    y_true: ArrayLike,
    prob_malignant: ArrayLike,
    threshold: float,
    path: PathLike,
    *,
    labels: Sequence[str] = ("benign", "malignant"),
) -> Path:
    """Plot the 2x2 confusion matrix at ``threshold`` (prediction = prob >= threshold) to a PNG.

    Rows are the true class, columns the predicted class; each cell shows its count and the
    share of its row. ``labels`` names class 0 and class 1. Returns ``Path(path)``.
    """
    target = _png_path(path)
    thr = _check_unit(threshold, "threshold")
    if isinstance(labels, str) or len(labels) != 2:
        raise ValueError(f"labels must be two class names (class 0, class 1), got {labels!r}")
    names = [str(label) for label in labels]
    y, p = _validate(y_true, prob_malignant)
    cm = confusion_matrix(y, p >= thr, labels=[False, True])  # rows: true class, columns: predicted
    row_totals = cm.sum(axis=1, keepdims=True)

    fig = _new_figure()
    ax = fig.subplots()
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
    from matplotlib.ticker import MaxNLocator

    fig.colorbar(image, ax=ax, label="samples", ticks=MaxNLocator(integer=True))
    for i in range(2):
        for j in range(2):
            count = int(cm[i, j])
            share = f"\n{count / row_totals[i, 0]:.1%}" if row_totals[i, 0] else ""
            color = "white" if count > 0.5 * cm.max() else "black"
            ax.text(j, i, f"{count}{share}", ha="center", va="center", fontsize=13, color=color)
    ax.set_xticks([0, 1], labels=names)
    ax.set_yticks([0, 1], labels=names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"Confusion matrix (threshold = {thr:.3g}, n = {y.shape[0]})")
    return _save_png(fig, target)


def plot_roc(
    y_true: ArrayLike, prob_malignant: ArrayLike, path: PathLike, *, threshold: float | None = None
) -> Path:
    """Plot the ROC curve (AUC in the legend) to a PNG, marking the operating point if given.

    The operating point is (1 - specificity, sensitivity) at ``threshold``. Raises
    ``ValueError`` when only one class is present (no ROC curve exists). Returns ``Path(path)``.
    """
    target = _png_path(path)
    thr = None if threshold is None else _check_unit(threshold, "threshold")
    y, p = _validate(y_true, prob_malignant)
    n_pos = int(np.count_nonzero(y == 1))
    if n_pos == 0 or n_pos == y.shape[0]:
        raise ValueError("cannot plot a ROC curve: y_true must contain both classes")

    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)  # every distinct probability as a threshold
    auc = float(roc_auc_score(y, p))

    fig = _new_figure()
    ax = fig.subplots()
    ax.plot(fpr, tpr, linewidth=2, label=f"ROC (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="chance")
    if thr is not None:
        tp, fp, tn, fn = _confusion(y, p, thr)
        sens, fpr_t = tp / (tp + fn), fp / (fp + tn)
        point = f"threshold {thr:.3g}: sens {sens:.2f}, spec {1 - fpr_t:.2f}"
        ax.plot([fpr_t], [sens], "o", markersize=8, color="crimson", label=point)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(f"ROC curve (n = {y.shape[0]}, malignant = {n_pos})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save_png(fig, target)


def plot_reliability(
    y_true: ArrayLike, prob_malignant: ArrayLike, path: PathLike, *,
    uncalibrated: ArrayLike | None = None, n_bins: int = 10, title: str = "Reliability diagram"
) -> Path:
    """Reliability diagram (:func:`sklearn.calibration.calibration_curve`, uniform bins): observed
    malignant rate against mean predicted probability, calibrated and (if given) uncalibrated, with
    the ECE of each in the legend. Returns ``Path(path)``."""
    from sklearn.calibration import calibration_curve

    target = _png_path(path)
    y, p = _validate(y_true, prob_malignant)
    fig = _new_figure()
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfectly calibrated")
    series = [("calibrated", p, "-o")]
    if uncalibrated is not None:
        series.insert(0, ("uncalibrated", _validate(y, uncalibrated)[1], ":s"))
    for name, probs, style in series:
        rate, mean = calibration_curve(y, probs, n_bins=n_bins, strategy="uniform")
        ax.plot(mean, rate, style, markersize=4, label=f"{name} (ECE {_ece(y, probs, n_bins):.3f})")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("Mean predicted probability of malignant")
    ax.set_ylabel("Observed malignant rate")
    ax.set_title(f"{title} (n = {y.shape[0]}, {n_bins} bins)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return _save_png(fig, target)


def plot_all(
    *,
    history: Mapping[str, Sequence[float]] | None,
    y_true: ArrayLike,
    prob_malignant: ArrayLike,
    threshold: float,
    out_dir: PathLike,
    uncalibrated: ArrayLike | None = None,
) -> dict[str, str]:
    """Write ``training_curves.png``, ``confusion_matrix.png``, ``roc.png`` and ``reliability.png``
    into ``out_dir``; ``uncalibrated`` adds the probabilities before calibration to the reliability diagram.

    ``out_dir`` is created if needed. Returns ``{"training_curves": path, "confusion_matrix":
    path, "roc": path, "reliability": path}`` with string paths. ``history=None`` skips the training curves (and
    its key). Errors from the individual plot functions propagate.
    """
    # validate everything first so that bad input leaves no partial set of plots behind
    _check_unit(threshold, "threshold")
    y, p = _validate(y_true, prob_malignant)
    if np.unique(y).size < 2:
        raise ValueError("cannot plot a ROC curve: y_true must contain both classes")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if history is not None:
        written["training_curves"] = str(plot_training_curves(history, folder / "training_curves.png"))
    written["confusion_matrix"] = str(plot_confusion_matrix(y, p, threshold, folder / "confusion_matrix.png"))
    written["roc"] = str(plot_roc(y, p, folder / "roc.png", threshold=threshold))
    written["reliability"] = str(plot_reliability(y, p, folder / "reliability.png", uncalibrated=uncalibrated))
    return written
