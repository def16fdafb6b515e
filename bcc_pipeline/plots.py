"""The evaluation plots: training curves, confusion matrix, ROC curve and reliability diagram.

Plots use :class:`matplotlib.figure.Figure` directly (never ``pyplot``), so they need no display, touch
no global state and are safe to call from several threads. Every figure is rendered in memory and
written with :func:`bcc_pipeline.files.atomic_write`, so a reader never sees a half-written PNG; plots
get the project's file mode (:func:`bcc_pipeline.files.created_mode`, from ``BCC_UMASK``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from .evaluation import ArrayLike, PathLike, _check_unit, _confusion, _ece, _validate
from .files import atomic_write

__all__ = ["plot_all", "plot_confusion_matrix", "plot_reliability", "plot_roc", "plot_training_curves"]

_FIGSIZE = (6.0, 4.5)
_DPI = 100


def _png_path(path: PathLike) -> Path:
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {str(target)!r}")
    return target


def _save_png(fig: Any, path: Path) -> Path:
    """Render ``fig`` as PNG in memory, then write it all or nothing."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    atomic_write(path, buffer.getvalue())  # with the mode the umask gives (BCC_UMASK)
    return path


def _new_figure(**kwargs: Any) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained", **kwargs)


def _save_unit_square(
    fig: Any, ax: Any, path: Path, *, xlabel: str, ylabel: str, title: str, legend: str
) -> Path:
    """Finish a plot of two quantities in [0, 1] (axes with a small margin, labels, title, grid, the
    legend at ``legend``) and save it as :func:`_save_png` does."""
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc=legend, fontsize="small")
    return _save_png(fig, path)


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
    return _save_unit_square(
        fig,
        ax,
        target,
        xlabel="False positive rate (1 - specificity)",
        ylabel="True positive rate (sensitivity)",
        title=f"ROC curve (n = {y.shape[0]}, malignant = {n_pos})",
        legend="lower right",
    )


def plot_reliability(
    y_true: ArrayLike,
    prob_malignant: ArrayLike,
    path: PathLike,
    *,
    uncalibrated: ArrayLike | None = None,
    n_bins: int = 10,
    title: str = "Reliability diagram",
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
    return _save_unit_square(
        fig,
        ax,
        target,
        xlabel="Mean predicted probability of malignant",
        ylabel="Observed malignant rate",
        title=f"{title} (n = {y.shape[0]}, {n_bins} bins)",
        legend="upper left",
    )


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
    written["reliability"] = str(
        plot_reliability(y, p, folder / "reliability.png", uncalibrated=uncalibrated)
    )
    return written
