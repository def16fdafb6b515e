"""Unit tests for bcc_pipeline.evaluation: metrics against hand-computed values, threshold choice, plots."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from bcc_pipeline import evaluation as ev
from bcc_pipeline.evaluation import (
    METRIC_NAMES,
    choose_threshold,
    compute_metrics,
    plot_all,
    plot_confusion_matrix,
    plot_roc,
    plot_training_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 6 benign, 4 malignant; every probability sits in its own tenth of [0, 1].
Y = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
P = [0.05, 0.15, 0.25, 0.35, 0.55, 0.65, 0.45, 0.75, 0.85, 0.95]

HISTORY = {
    "loss": [0.69, 0.52, 0.41, 0.35, 0.31, 0.29],
    "accuracy": [0.55, 0.71, 0.80, 0.84, 0.87, 0.88],
    "val_loss": [0.66, 0.55, 0.47, 0.44, 0.45, 0.47],
    "val_accuracy": [0.58, 0.70, 0.77, 0.80, 0.79, 0.79],
    "learning_rate": [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4],
}


def _brute_force_threshold(y: np.ndarray, p: np.ndarray, target: float) -> float:
    best = None
    for t in np.unique(p):
        pred = p >= t
        tp = np.sum(pred & (y == 1))
        fn = np.sum(~pred & (y == 1))
        if tp / (tp + fn) >= target and (best is None or t > best):
            best = float(t)
    assert best is not None
    return best


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file()
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= 400 and img.size[1] >= 300
    # nothing left behind by the atomic write
    assert not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------
# compute_metrics
# --------------------------------------------------------------------------------------------


def test_metric_names_order_and_all_floats():
    m = compute_metrics(Y, P)
    assert tuple(m) == METRIC_NAMES
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    assert all(type(v) is float for v in m.values())


def test_metrics_hand_computed_at_half():
    m = compute_metrics(Y, P, threshold=0.5)
    # predicted malignant: 0.55, 0.65 (benign -> fp) and 0.75, 0.85, 0.95 (tp); 0.45 is a fn
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3.0, 2.0, 4.0, 1.0)
    assert m["n"] == 10.0
    assert m["threshold"] == 0.5
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["sensitivity"] == m["recall"]
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    # 22 of the 24 (malignant, benign) pairs are ordered correctly (0.45 < 0.55, 0.65)
    assert m["roc_auc"] == pytest.approx(22 / 24)
    assert m["brier"] == pytest.approx(1.325 / 10)
    # one sample per bin: ece = mean |p - y|
    assert m["ece"] == pytest.approx(3.0 / 10)


def test_metrics_at_other_threshold():
    m = compute_metrics(Y, P, threshold=0.45)  # >= : 0.45 is now a tp
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (4.0, 2.0, 4.0, 0.0)
    assert m["sensitivity"] == 1.0
    assert m["precision"] == pytest.approx(4 / 6)
    # threshold does not change threshold-free metrics
    base = compute_metrics(Y, P)
    for key in ("roc_auc", "log_loss", "ece", "brier"):
        assert m[key] == base[key]


def test_metrics_match_sklearn():
    from sklearn.metrics import (
        accuracy_score,
        brier_score_loss,
        f1_score,
        log_loss,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.35 * y + rng.random(200) * 0.65, 0, 1)
    t = 0.42
    pred = (p >= t).astype(int)
    m = compute_metrics(y, p, threshold=t)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred, zero_division=0))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["log_loss"] == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)))


def test_log_loss_manual_formula_and_clipping():
    expected = -sum(y * math.log(p) + (1 - y) * math.log(1 - p) for y, p in zip(Y, P, strict=True)) / len(Y)
    assert compute_metrics(Y, P)["log_loss"] == pytest.approx(expected, rel=1e-12)
    # confidently wrong at exactly 0 / 1: clipped to 1e-7, so finite and equal to -log(1e-7)
    m = compute_metrics([1, 0], [0.0, 1.0])
    assert m["log_loss"] == pytest.approx(-math.log(1e-7), rel=1e-6)
    # confidently right at exactly 0 / 1: -log(1 - 1e-7), tiny but finite
    assert compute_metrics([0, 1], [0.0, 1.0])["log_loss"] == pytest.approx(1e-7, rel=1e-3)


def test_ece_hand_made_bins():
    # two bins: [0, .5) holds p .05 .15 .25 .35 .45 with y 0 0 0 0 1 (mean p .25, rate .2)
    #           [.5, 1] holds p .55 .65 .75 .85 .95 with y 0 0 1 1 1 (mean p .75, rate .6)
    assert compute_metrics(Y, P, n_bins=2)["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.15)
    # one bin: |mean p - malignant rate| = |0.5 - 0.4|
    assert compute_metrics(Y, P, n_bins=1)["ece"] == pytest.approx(0.1)
    # 1.0 falls into the last bin, perfectly calibrated there; 0.0 in the first
    assert compute_metrics([1, 0], [1.0, 0.0], n_bins=10)["ece"] == pytest.approx(0.0)
    # unequal bin sizes are weighted by size: 3 samples at .2 (1 malignant) + 1 at .9 (benign)
    m = compute_metrics([1, 0, 0, 0], [0.2, 0.2, 0.2, 0.9], n_bins=10)
    assert m["ece"] == pytest.approx(0.75 * abs(0.2 - 1 / 3) + 0.25 * 0.9)


def test_perfect_classifier():
    y = [0, 0, 0, 1, 1, 1]
    p = [0.0, 0.1, 0.2, 0.8, 0.9, 1.0]
    t = choose_threshold(y, p, target_sensitivity=0.95)
    assert t == pytest.approx(0.5)  # midway between 0.2 and 0.8
    m = compute_metrics(y, p, threshold=t)
    for key in ("accuracy", "precision", "recall", "sensitivity", "specificity", "f1", "roc_auc"):
        assert m[key] == 1.0, key
    assert (m["fp"], m["fn"]) == (0.0, 0.0)
    assert m["brier"] == pytest.approx((0.01 + 0.04) * 2 / 6)
    assert m["log_loss"] < 0.2


def test_only_benign_samples():
    m = compute_metrics([0, 0, 0], [0.1, 0.2, 0.7], threshold=0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0.0, 1.0, 2.0, 0.0)
    assert math.isnan(m["recall"]) and math.isnan(m["sensitivity"])
    assert math.isnan(m["roc_auc"])
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == 0.0
    assert m["f1"] == 0.0
    assert math.isfinite(m["log_loss"]) and math.isfinite(m["ece"]) and math.isfinite(m["brier"])
    # no malignant samples: sensitivity is undefined, the documented default is returned
    assert choose_threshold([0, 0, 0], [0.1, 0.2, 0.7]) == 0.5


def test_only_malignant_samples():
    m = compute_metrics([1, 1], [0.3, 0.9], threshold=0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1.0, 0.0, 0.0, 1.0)
    assert math.isnan(m["specificity"])
    assert math.isnan(m["roc_auc"])
    assert m["recall"] == 0.5
    assert m["precision"] == 1.0
    assert choose_threshold([1, 1], [0.3, 0.9], target_sensitivity=0.5) == pytest.approx(0.6)
    assert choose_threshold([1, 1], [0.3, 0.9], target_sensitivity=0.9) == pytest.approx(0.15)  # 0 and 0.3


def test_no_predicted_positives_precision_zero():
    m = compute_metrics([0, 1, 1], [0.1, 0.2, 0.3], threshold=0.9)
    assert m["precision"] == 0.0
    assert m["recall"] == 0.0
    assert m["f1"] == 0.0
    assert m["specificity"] == 1.0


def test_accepts_numpy_bool_and_float_labels():
    y = np.array(Y, dtype=bool)
    p = np.array(P, dtype=np.float32)
    a = compute_metrics(y, p)
    b = compute_metrics(np.array(Y, dtype=float), tuple(P))
    assert a["tp"] == b["tp"] == 3.0
    assert a["roc_auc"] == pytest.approx(b["roc_auc"])


# --------------------------------------------------------------------------------------------
# choose_threshold
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # midway between the qualifying malignant probability and the next lower observed one
        (1.0, 0.40),  # all 4 malignant -> lowest malignant probability 0.45, next lower 0.35
        (0.95, 0.40),  # ceil(3.8) = 4
        (0.75, 0.70),  # exactly 3 of 4 is enough: 0.75, next lower 0.65
        (0.7, 0.70),  # 0.7 * 4 = 2.8 -> 3 (not fooled by 0.7 * 4 rounding)
        (0.5, 0.80),
        (0.25, 0.90),
        (0.01, 0.90),
    ],
)
def test_choose_threshold_hand_made(target, expected):
    t = choose_threshold(Y, P, target_sensitivity=target)
    assert type(t) is float
    assert t == pytest.approx(expected)
    assert t not in P
    assert compute_metrics(Y, P, threshold=t)["sensitivity"] >= target


def test_choose_threshold_ties_and_plateau():
    # three malignant tied at 0.8: any target up to 3/4 is met at 0.8, the highest such threshold
    y = [1, 1, 1, 1, 0, 0]
    p = [0.8, 0.8, 0.8, 0.2, 0.9, 0.1]
    assert choose_threshold(y, p, target_sensitivity=0.5) == pytest.approx(0.5)  # between 0.2 and 0.8
    assert choose_threshold(y, p, target_sensitivity=0.75) == pytest.approx(0.5)
    assert choose_threshold(y, p, target_sensitivity=0.76) == pytest.approx(0.15)  # between 0.1 and 0.2
    # a benign sample above every malignant one does not stop the threshold from rising to 0.8
    assert compute_metrics(y, p, threshold=0.8)["specificity"] == 0.5


def test_choose_threshold_half_is_not_special():
    y = [0, 0, 1, 1]
    p = [0.1, 0.2, 0.3, 0.4]
    assert choose_threshold(y, p, target_sensitivity=0.95) == pytest.approx(0.25)
    assert choose_threshold(y, p, target_sensitivity=0.5) == pytest.approx(0.35)
    y = [0, 0, 1, 1]
    p = [0.6, 0.7, 0.8, 0.9]
    assert choose_threshold(y, p, target_sensitivity=1.0) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_choose_threshold_random_is_highest_meeting_target(seed):
    rng = np.random.default_rng(seed)
    n = 300
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1).round(2)  # rounding forces ties
    observed = np.unique(p)
    for target in (0.5, 0.8, 0.9, 0.95, 0.99, 1.0):
        t = choose_threshold(y, p, target_sensitivity=target)
        best = _brute_force_threshold(y, p, target)
        assert t not in observed or t == best == 0.0  # never on an observed probability above 0
        below = observed[observed < best]
        assert t == pytest.approx(((below.max() if below.size else 0.0) + best) / 2)
        m = compute_metrics(y, p, threshold=t)
        assert m == compute_metrics(y, p, threshold=best) | {"threshold": t}  # the same calls as at best
        assert m["sensitivity"] >= target
        higher = observed[observed > best]
        if higher.size:
            assert compute_metrics(y, p, threshold=float(higher.min()))["sensitivity"] < target


def test_choose_threshold_monotone_in_target():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 100)
    p = rng.random(100)
    ts = [choose_threshold(y, p, target_sensitivity=s) for s in (0.2, 0.5, 0.8, 0.95, 1.0)]
    assert ts == sorted(ts, reverse=True)


# --------------------------------------------------------------------------------------------
# ValueError paths
# --------------------------------------------------------------------------------------------

BAD_INPUTS = [
    pytest.param([], [], "empty", id="empty"),
    pytest.param([0, 1], [0.1], "length", id="length-mismatch"),
    pytest.param([0, 1, 2], [0.1, 0.2, 0.3], "0 \\(benign\\) and 1", id="label-2"),
    pytest.param([0, -1], [0.1, 0.2], "0 \\(benign\\) and 1", id="label-negative"),
    pytest.param([0, 0.5], [0.1, 0.2], "0 \\(benign\\) and 1", id="label-fraction"),
    pytest.param([0, float("nan")], [0.1, 0.2], "0 \\(benign\\) and 1", id="label-nan"),
    pytest.param(["0", "1"], [0.1, 0.2], "numeric labels", id="label-strings"),
    pytest.param([[0, 1]], [[0.1, 0.2]], "one-dimensional", id="2d"),
    pytest.param([0, 1], [[0.9, 0.1], [0.2, 0.8]], "one-dimensional", id="softmax-matrix"),
    pytest.param(0, 0.5, "one-dimensional", id="scalar"),
    pytest.param([0, 1], [0.1, 1.2], "\\[0, 1\\]", id="prob-above-1"),
    pytest.param([0, 1], [-0.01, 0.5], "\\[0, 1\\]", id="prob-negative"),
    pytest.param([0, 1], [0.1, float("nan")], "NaN", id="prob-nan"),
    pytest.param([0, 1], [0.1, float("inf")], "NaN", id="prob-inf"),
    pytest.param([0, 1], ["a", "b"], "numeric", id="prob-strings"),
    pytest.param([0, 1], [[0.1], [0.2, 0.3]], "prob_malignant", id="prob-ragged"),
]


@pytest.mark.parametrize(("y", "p", "match"), BAD_INPUTS)
def test_bad_data_raises_value_error(y, p, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        compute_metrics(y, p)
    with pytest.raises(ValueError, match=match):
        choose_threshold(y, p)
    with pytest.raises(ValueError, match=match):
        plot_confusion_matrix(y, p, 0.5, tmp_path / "cm.png")
    with pytest.raises(ValueError, match=match):
        plot_roc(y, p, tmp_path / "roc.png")
    with pytest.raises(ValueError, match=match):
        plot_all(history=HISTORY, y_true=y, prob_malignant=p, threshold=0.5, out_dir=tmp_path / "all")
    assert not (tmp_path / "cm.png").exists() and not (tmp_path / "roc.png").exists()
    assert not (tmp_path / "all").exists()


@pytest.mark.parametrize("target", [0, 0.0, -0.1, 1.0000001, 2, float("nan"), "0.9", None, True])
def test_bad_target_sensitivity(target):
    with pytest.raises(ValueError, match="target_sensitivity"):
        choose_threshold(Y, P, target_sensitivity=target)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), "0.5", None, False])
def test_bad_threshold(threshold, tmp_path):
    with pytest.raises(ValueError, match="threshold"):
        compute_metrics(Y, P, threshold=threshold)
    with pytest.raises(ValueError, match="threshold"):
        plot_confusion_matrix(Y, P, threshold, tmp_path / "cm.png")
    if threshold is not None:  # None is allowed for plot_roc: no operating point
        with pytest.raises(ValueError, match="threshold"):
            plot_roc(Y, P, tmp_path / "roc.png", threshold=threshold)
    with pytest.raises(ValueError, match="threshold"):
        plot_all(history=HISTORY, y_true=Y, prob_malignant=P, threshold=threshold, out_dir=tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_threshold_bounds_are_valid():
    assert compute_metrics(Y, P, threshold=0.0)["tp"] == 4.0
    assert compute_metrics(Y, P, threshold=1.0)["tp"] == 0.0


@pytest.mark.parametrize("n_bins", [0, -3, 2.5, True, "10", None])
def test_bad_n_bins(n_bins):
    with pytest.raises(ValueError, match="n_bins"):
        compute_metrics(Y, P, n_bins=n_bins)


@pytest.mark.parametrize(
    "history",
    [
        {},
        {"loss": [], "val_loss": []},
        {"lr": [0.001, 0.001]},
        {"learning_rate": [0.001]},
    ],
)
def test_empty_history_raises(history, tmp_path):
    with pytest.raises(ValueError, match="history is empty"):
        plot_training_curves(history, tmp_path / "tc.png")
    assert list(tmp_path.iterdir()) == []


def test_bad_history_types(tmp_path):
    with pytest.raises(ValueError, match="mapping"):
        plot_training_curves([0.5, 0.4], tmp_path / "tc.png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sequences of numbers"):
        plot_training_curves({"loss": ["a", "b"]}, tmp_path / "tc.png")
    assert list(tmp_path.iterdir()) == []


def test_plot_paths_must_be_png(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        plot_training_curves(HISTORY, tmp_path / "tc.pdf")
    with pytest.raises(ValueError, match=r"\.png"):
        plot_confusion_matrix(Y, P, 0.5, tmp_path / "cm")
    with pytest.raises(ValueError, match=r"\.png"):
        plot_roc(Y, P, tmp_path / "roc.jpg")


@pytest.mark.parametrize("labels", [("benign",), ("a", "b", "c"), "ab"])
def test_confusion_matrix_bad_labels(labels, tmp_path):
    with pytest.raises(ValueError, match="labels"):
        plot_confusion_matrix(Y, P, 0.5, tmp_path / "cm.png", labels=labels)


def test_roc_needs_both_classes(tmp_path):
    with pytest.raises(ValueError, match="both classes"):
        plot_roc([0, 0, 0], [0.1, 0.5, 0.9], tmp_path / "roc.png")
    with pytest.raises(ValueError, match="both classes"):
        plot_all(
            history=HISTORY, y_true=[1, 1], prob_malignant=[0.2, 0.9], threshold=0.5, out_dir=tmp_path / "all"
        )
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def test_plot_training_curves(tmp_path):
    out = plot_training_curves(HISTORY, tmp_path / "nested" / "dir" / "training_curves.png")
    assert out == tmp_path / "nested" / "dir" / "training_curves.png"
    _assert_png(out)


def test_plot_training_curves_partial_histories(tmp_path):
    # loss only (no accuracy, no validation), old-Keras acc keys, numpy arrays, str path
    _assert_png(plot_training_curves({"loss": [0.7, 0.5]}, tmp_path / "a.png"))
    _assert_png(plot_training_curves({"acc": [0.5, 0.6], "val_acc": [0.4, 0.5]}, tmp_path / "b.png"))
    _assert_png(
        plot_training_curves({"loss": np.array([0.9]), "val_loss": [float("nan")]}, str(tmp_path / "c.png"))
    )


def test_plot_confusion_matrix(tmp_path):
    out = plot_confusion_matrix(Y, P, 0.5, tmp_path / "cm.png")
    assert out == tmp_path / "cm.png"
    _assert_png(out)
    # one class only still works; custom labels
    _assert_png(plot_confusion_matrix([0, 0], [0.1, 0.9], 0.3, tmp_path / "cm1.png", labels=("B", "M")))


def test_plot_roc(tmp_path):
    _assert_png(plot_roc(Y, P, tmp_path / "roc.png", threshold=0.45))
    _assert_png(plot_roc(Y, P, str(tmp_path / "roc_no_point.png")))


def test_plot_overwrites_existing_file(tmp_path):
    target = tmp_path / "roc.png"
    target.write_bytes(b"old")
    plot_roc(Y, P, target)
    _assert_png(target)


def test_failed_save_leaves_no_temp_file(tmp_path):
    class Boom:
        def savefig(self, *args, **kwargs):
            raise RuntimeError("render failed")

    target = tmp_path / "x.png"
    with pytest.raises(RuntimeError, match="render failed"):
        ev._save_png(Boom(), target)
    assert list(tmp_path.iterdir()) == []


def test_plot_all(tmp_path):
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 120)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.18), 0, 1)
    t = choose_threshold(y, p, target_sensitivity=0.95)
    out_dir = tmp_path / "reports" / "v1"
    written = plot_all(history=HISTORY, y_true=y, prob_malignant=p, threshold=t, out_dir=out_dir)
    assert written == {
        "training_curves": str(out_dir / "training_curves.png"),
        "confusion_matrix": str(out_dir / "confusion_matrix.png"),
        "roc": str(out_dir / "roc.png"),
        "reliability": str(out_dir / "reliability.png"),
    }
    for path in written.values():
        _assert_png(Path(path))
    assert sorted(f.name for f in out_dir.iterdir()) == [
        "confusion_matrix.png",
        "reliability.png",
        "roc.png",
        "training_curves.png",
    ]


def test_plot_all_without_history(tmp_path):
    written = plot_all(history=None, y_true=Y, prob_malignant=P, threshold=0.5, out_dir=tmp_path)
    assert set(written) == {"confusion_matrix", "roc", "reliability"}
    for path in written.values():
        _assert_png(Path(path))


def test_plots_do_not_need_pyplot(tmp_path, monkeypatch):
    # Figure objects only: no pyplot global state, no GUI backend, thread-safe.
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # any import of it now fails
    written = plot_all(history=HISTORY, y_true=Y, prob_malignant=P, threshold=0.5, out_dir=tmp_path)
    assert len(written) == 4
