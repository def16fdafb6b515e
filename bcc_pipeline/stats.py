"""Calibration and uncertainty: temperature scaling, intervals for proportions, bootstrap intervals
for ROC AUC and for paired differences between two models on the same images.

Conventions (shared with :mod:`bcc_pipeline.evaluation`): ``y`` holds 0 (benign) / 1 (malignant),
``p`` the probability of malignant; a case is called malignant when ``p >= threshold``.

* **Temperature scaling.** With the two softmax outputs, ``z = log(p_malignant / p_benign)``
  (``p`` clipped to ``[LOG_LOSS_EPS, 1 - LOG_LOSS_EPS]`` first); the calibrated probability is
  ``sigmoid(z / T)``. One scalar ``T > 0`` is fitted on the calibration split by minimising the log
  loss (:func:`fit_temperature`). It preserves the ranking, so the ROC AUC is unchanged.
  :func:`calibrate` is the one function that applies it, in evaluation and in scoring.
* **Proportions** (sensitivity, specificity, accuracy, precision) carry an exact Clopper–Pearson
  interval from :meth:`scipy.stats.binomtest(...).proportion_ci`, with their ``k`` and ``n``.
* **ROC AUC** and **paired differences** carry a BCa interval from :func:`scipy.stats.bootstrap`
  (cases resampled jointly, ``paired=True``) with a fixed, recorded seed, so the same inputs always
  give the same interval. A resample holding a single class has no AUC: when at most
  :data:`MAX_UNDEFINED_RESAMPLES` of them are such, they are dropped and the percentile interval of the
  others is reported (the method says so); beyond that the bounds are ``nan`` and the caller must
  treat the evidence as insufficient.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import optimize, special
from scipy import stats as sps

from .evaluation import LOG_LOSS_EPS

__all__ = [
    "BOOTSTRAP_METHOD",
    "BOOTSTRAP_RESAMPLES",
    "CONFIDENCE",
    "MAX_UNDEFINED_RESAMPLES",
    "TEMPERATURE_BOUNDS",
    "Interval",
    "auc_interval",
    "calibrate",
    "extra_images_needed",
    "fit_temperature",
    "format_interval",
    "format_number",
    "logit",
    "metric_intervals",
    "paired_differences",
    "proportion_interval",
]

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_METHOD = "BCa"
#: The search range of the temperature; the bounds themselves mean "the fit ran into the edge".
TEMPERATURE_BOUNDS = (0.05, 20.0)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided 95 % interval; ``k``/``n`` for proportions (``k`` is None
    for AUC and differences), ``method`` says how the bounds were computed."""

    value: float
    lower: float
    upper: float
    n: int
    k: int | None = None
    method: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def logit(p: Any) -> np.ndarray:
    """``log(p / (1 - p))`` of the clipped probabilities: the softmax logit difference."""
    q = np.clip(np.asarray(p, dtype=np.float64), LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    return special.logit(q)


def calibrate(p: Any, temperature: float | None) -> np.ndarray:
    """Calibrated probability of malignant: ``sigmoid(logit(p) / T)``. ``None`` (a version without
    a fitted temperature) returns ``p`` unchanged, as float64."""
    arr = np.asarray(p, dtype=np.float64)
    if temperature is None:
        return arr
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return special.expit(logit(arr) / t)


def fit_temperature(y: Any, p: Any) -> float:
    """The ``T`` in :data:`TEMPERATURE_BOUNDS` minimising the mean log loss of ``sigmoid(z / T)``."""
    yy = np.asarray(y, dtype=np.float64)
    z = logit(p)
    if yy.shape != z.shape or yy.size == 0:
        raise ValueError("temperature scaling needs equally long, non-empty labels and probabilities")

    def loss(t: float) -> float:
        q = np.clip(special.expit(z / t), LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
        return float(-np.mean(yy * np.log(q) + (1.0 - yy) * np.log1p(-q)))

    res = optimize.minimize_scalar(loss, bounds=TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(res.x)


def proportion_interval(k: int, n: int, *, method: str = "exact") -> Interval:
    """``k`` of ``n`` with its exact (Clopper–Pearson) or ``wilson`` interval; ``nan`` when n = 0."""
    k, n = int(k), int(n)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, 0, method)
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=CONFIDENCE, method=method)
    return Interval(k / n, float(ci.low), float(ci.high), n, k, method)


def _auc(y: np.ndarray, p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mann–Whitney ROC AUC along ``axis`` (ties count one half); ``nan`` where a class is missing."""
    y = np.asarray(y, dtype=np.float64)
    ranks = sps.rankdata(p, axis=axis)
    n1 = y.sum(axis=axis)
    n0 = y.shape[axis] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(axis=axis) - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), auc, np.nan)


def _rate(y: np.ndarray, called: np.ndarray, positive: bool, axis: int = -1) -> np.ndarray:
    """Sensitivity (``positive``) or specificity of 0/1 calls along ``axis``; ``nan`` without cases."""
    cls = y if positive else 1.0 - y
    hit = called if positive else 1.0 - called
    n = cls.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (cls * hit).sum(axis=axis) / n, np.nan)


#: When at most this share of the resamples is undefined (one class only), they are dropped and the
#: percentile interval of the others is used; above it the interval is unknown (``nan``).
MAX_UNDEFINED_RESAMPLES = 0.05


def _bootstrap(
    data: tuple[np.ndarray, ...], statistic: Any, *, seed: int, n_resamples: int
) -> tuple[float, float, str]:
    """Bounds of a paired, vectorised statistic and a note on how they were obtained: BCa; a constant
    bootstrap distribution gives ``(value, value)``; resamples without a defined value (a single
    class) are dropped when few (percentile interval of the rest), else the bounds are ``nan``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning / nan resamples: handled below
        res = sps.bootstrap(
            data,
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=n_resamples,
            confidence_level=CONFIDENCE,
            method=BOOTSTRAP_METHOD,
            rng=np.random.default_rng(seed),
        )
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    finite = dist[np.isfinite(dist)]
    if finite.size and np.ptp(finite) == 0 and finite.size == dist.size:
        return float(finite[0]), float(finite[0]), ""
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isfinite(lo) and math.isfinite(hi):
        return lo, hi, ""
    dropped = dist.size - finite.size
    if finite.size and dropped <= MAX_UNDEFINED_RESAMPLES * dist.size:
        tail = (1.0 - CONFIDENCE) / 2.0 * 100.0
        lo, hi = np.percentile(finite, [tail, 100.0 - tail])
        return float(lo), float(hi), f"; {dropped} single-class resamples dropped, percentile interval"
    return math.nan, math.nan, f"; {dropped} of {dist.size} resamples undefined, no interval"


def auc_interval(y: Any, p: Any, *, seed: int, n_resamples: int = BOOTSTRAP_RESAMPLES) -> Interval:
    """ROC AUC with its paired BCa bootstrap interval (``seed`` fixes the resamples)."""
    yy, pp = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    value = float(_auc(yy, pp))
    method = f"bootstrap {BOOTSTRAP_METHOD}, {n_resamples} resamples, seed {seed}"
    if math.isnan(value):
        return Interval(value, math.nan, math.nan, int(yy.size), None, method)
    lo, hi, note = _bootstrap((yy, pp), _auc, seed=seed, n_resamples=n_resamples)
    return Interval(value, lo, hi, int(yy.size), None, method + note)


def metric_intervals(
    y: Any, p: Any, threshold: float, *, seed: int, n_resamples: int = BOOTSTRAP_RESAMPLES
) -> dict[str, Interval]:
    """Intervals of sensitivity, recall, specificity, accuracy, precision (exact) and ROC AUC (bootstrap)."""
    yy = np.asarray(y, dtype=np.int64)
    called = np.asarray(p, dtype=np.float64) >= threshold
    tp = int(np.sum(called & (yy == 1)))
    fp = int(np.sum(called & (yy == 0)))
    n_pos, n_neg = int(np.sum(yy == 1)), int(np.sum(yy == 0))
    tn = n_neg - fp
    sens = proportion_interval(tp, n_pos)
    return {
        "sensitivity": sens,
        "recall": sens,
        "specificity": proportion_interval(tn, n_neg),
        "accuracy": proportion_interval(tp + tn, yy.size),
        "precision": proportion_interval(tp, tp + fp),
        "roc_auc": auc_interval(yy, p, seed=seed, n_resamples=n_resamples),
    }


def paired_differences(
    y: Any,
    p_candidate: Any,
    threshold_candidate: float,
    p_champion: Any,
    threshold_champion: float,
    *,
    seed: int,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Interval]:
    """candidate − champion for sensitivity, specificity and ROC AUC on the same cases, each model at
    its own threshold: the same bootstrap resamples of the cases for both models (paired), BCa."""
    yy = np.asarray(y, dtype=np.float64)
    pc, ph = np.asarray(p_candidate, dtype=np.float64), np.asarray(p_champion, dtype=np.float64)
    cc = (pc >= threshold_candidate).astype(np.float64)
    ch = (ph >= threshold_champion).astype(np.float64)
    method = f"paired bootstrap {BOOTSTRAP_METHOD}, {n_resamples} resamples, seed {seed}"

    def sens(y_, a, b, axis=-1):
        return _rate(y_, a, True, axis) - _rate(y_, b, True, axis)

    def spec(y_, a, b, axis=-1):
        return _rate(y_, a, False, axis) - _rate(y_, b, False, axis)

    def auc(y_, a, b, axis=-1):
        return _auc(y_, a, axis) - _auc(y_, b, axis)

    out: dict[str, Interval] = {}
    for name, fn, a, b in (
        ("sensitivity", sens, cc, ch),
        ("specificity", spec, cc, ch),
        ("roc_auc", auc, pc, ph),
    ):
        value = float(fn(yy, a, b))
        lo, hi, note = (
            (math.nan, math.nan, "")
            if math.isnan(value)
            else _bootstrap((yy, a, b), fn, seed=seed, n_resamples=n_resamples)
        )
        out[name] = Interval(value, lo, hi, int(yy.size), None, method + note)
    return out


def extra_images_needed(diff: Interval, margin: float) -> int | None:
    """How many more holdout images would make ``diff``'s interval clear ``-margin`` (either way),
    assuming the estimate stays and the half-width shrinks with 1/√n. ``None`` when no number would
    (the estimate sits on ``-margin``) or the interval is unknown."""
    if not all(math.isfinite(v) for v in (diff.value, diff.lower, diff.upper)) or diff.n <= 0:
        return None
    half = (diff.upper - diff.lower) / 2.0
    gap = abs(diff.value + margin)
    if gap == 0:
        return None
    if half <= gap:
        return 0
    return max(1, math.ceil(diff.n * (half / gap) ** 2) - diff.n)


def format_number(v: Any, digits: int = 3) -> str:
    """A number for people with ``digits`` decimals; ``n/a`` for a missing one or NaN."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def format_interval(
    name: str, iv: Interval | dict[str, Any] | None, role: str = "holdout", digits: int = 2
) -> str:
    """``sensitivity 0.96 [0.80, 0.99], 24/25 (holdout)``; AUC and differences show ``n=…``."""
    if iv is None:
        return f"{name} n/a ({role})"
    d = iv.as_dict() if isinstance(iv, Interval) else dict(iv)

    def num(v: Any) -> str:
        return format_number(v, digits)

    count = f"{d['k']}/{d['n']}" if d.get("k") is not None else f"n={d.get('n')}"
    return f"{name} {num(d.get('value'))} [{num(d.get('lower'))}, {num(d.get('upper'))}], {count} ({role})"
