"""Evaluation of the malignant-vs-benign classifier: operating threshold and metrics (plots: :mod:`.plots`).

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

import math
import os
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss, confusion_matrix, log_loss, roc_auc_score

__all__ = [
    "DEFAULT_THRESHOLD",
    "LOG_LOSS_EPS",
    "METRIC_NAMES",
    "choose_threshold",
    "compute_metrics",
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
