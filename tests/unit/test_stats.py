"""bcc_pipeline.stats and the registry's statistical gate, on synthetic probability arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from bcc_pipeline import registry, stats
from bcc_pipeline.evaluation import compute_metrics

FLOORS = {"min_accuracy": 0.8, "min_sensitivity": 0.9, "margin": 0.05}


# -- intervals --------------------------------------------------------------------------------------
def test_exact_interval_of_25_of_25_is_the_known_value():
    iv = stats.proportion_interval(25, 25)
    assert iv.value == 1.0 and iv.upper == 1.0 and (iv.k, iv.n, iv.method) == (25, 25, "exact")
    assert iv.lower == pytest.approx(0.025 ** (1 / 25), abs=1e-9)  # (alpha/2)^(1/n)
    assert iv.lower == pytest.approx(0.8628, abs=1e-4)
    assert stats.proportion_interval(0, 10).lower == 0.0
    assert stats.proportion_interval(0, 10).upper == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-9)


@pytest.mark.parametrize(("k", "n"), [(24, 25), (3, 7), (120, 131), (1, 2)])
@pytest.mark.parametrize("method", ["exact", "wilson"])
def test_intervals_match_scipy_and_the_closed_forms(k, n, method):
    iv = stats.proportion_interval(k, n, method=method)
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method=method)
    assert (iv.lower, iv.upper) == pytest.approx((ref.low, ref.high))
    if method == "wilson":  # Wilson's closed form, independently of scipy
        z, ph = sps.norm.ppf(0.975), k / n
        centre = (ph + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n))
        assert (iv.lower, iv.upper) == pytest.approx((centre - half, centre + half))
    else:  # Clopper-Pearson from the beta quantiles
        assert iv.lower == pytest.approx(sps.beta.ppf(0.025, k, n - k + 1))
        assert iv.upper == pytest.approx(sps.beta.ppf(0.975, k + 1, n - k))


def test_empty_proportion_is_nan():
    iv = stats.proportion_interval(0, 0)
    assert math.isnan(iv.value) and math.isnan(iv.lower) and iv.n == 0


def _scores(n: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    p = np.clip(rng.normal(0.5 + separation * (y - 0.5), 0.2), 0, 1)
    return y, p


def test_bootstrap_auc_interval_contains_the_point_and_is_reproducible():
    y, p = _scores(200, 0.4, 1)
    a = stats.auc_interval(y, p, seed=7)
    assert a.value == pytest.approx(roc_auc_score(y, p))
    assert a.lower < a.value < a.upper and a.n == 200 and a.k is None
    assert "seed 7" in a.method and "BCa" in a.method
    assert stats.auc_interval(y, p, seed=7) == a  # the seed fixes the resamples
    assert stats.auc_interval(y, p, seed=8) != a


def test_metric_intervals_count_k_of_n():
    y = [1] * 25 + [0] * 20
    p = [0.9] * 24 + [0.1] + [0.2] * 18 + [0.8] * 2
    ivs = stats.metric_intervals(y, p, 0.5, seed=1)
    assert (ivs["sensitivity"].k, ivs["sensitivity"].n) == (24, 25)
    assert (ivs["specificity"].k, ivs["specificity"].n) == (18, 20)
    assert (ivs["accuracy"].k, ivs["accuracy"].n) == (42, 45)
    assert (
        stats.format_interval("sensitivity", ivs["sensitivity"])
        == "sensitivity 0.96 [0.80, 1.00], 24/25 (holdout)"
    )


# -- temperature scaling ----------------------------------------------------------------------------
def test_temperature_scaling_lowers_ece_on_an_overconfident_model():
    rng = np.random.default_rng(0)
    n = 2000
    y = rng.integers(0, 2, n)
    true_logit = rng.normal(1.2 * (2 * y - 1), 1.5)  # a model that is right, but not that right
    overconfident = 1 / (1 + np.exp(-4.0 * true_logit))  # logits blown up 4x
    cal, hold = slice(0, 1000), slice(1000, None)
    t = stats.fit_temperature(y[cal], overconfident[cal])
    assert 2.5 < t < 6  # recovers roughly the blow-up
    before = compute_metrics(y[hold], overconfident[hold])
    after = compute_metrics(y[hold], stats.calibrate(overconfident[hold], t))
    assert after["ece"] < 0.5 * before["ece"]
    assert after["brier"] < before["brier"] and after["log_loss"] < before["log_loss"]
    assert after["roc_auc"] == pytest.approx(before["roc_auc"])  # the ranking is kept


def test_calibrate_is_identity_without_temperature_and_checks_it():
    p = np.array([0.0, 0.2, 0.7, 1.0])
    assert np.array_equal(stats.calibrate(p, None), p)
    assert stats.calibrate(p, 1.0) == pytest.approx(np.clip(p, 1e-7, 1 - 1e-7))
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            stats.calibrate(p, bad)


# -- the gate ---------------------------------------------------------------------------------------
def _gate(y, p_cand, p_champ, *, thr=0.5, margin=0.05, seed=3, **floors):
    cand = {k: v.as_dict() for k, v in stats.metric_intervals(y, p_cand, thr, seed=seed).items()}
    champ = {k: v.as_dict() for k, v in stats.metric_intervals(y, p_champ, thr, seed=seed).items()}
    diffs = stats.paired_differences(y, p_cand, thr, p_champ, thr, seed=seed)
    return registry.evaluate_gate(
        cand,
        champ,
        **{**FLOORS, "margin": margin, **floors},
        differences=diffs,
        champion_version="v-champ",
        comparison={"bootstrap_seed": seed},
    )


def test_gate_promotes_a_clearly_better_candidate():
    y, p_champ = _scores(400, 0.45, 2)  # the champion: good
    _, p_cand = _scores(400, 0.7, 3)  # the candidate: clearly better
    d = _gate(y, p_cand, p_champ)
    assert d.decision == "promoted" and d.passed, d.reasons
    assert d.differences["sensitivity"]["lower"] > -0.05 and d.differences["roc_auc"]["lower"] > -0.05
    assert d.rule == registry.GATE_RULE and d.as_dict()["comparison"]["bootstrap_seed"] == 3


def test_gate_rejects_a_clearly_worse_candidate():
    y, p_champ = _scores(400, 0.7, 2)
    rng = np.random.default_rng(9)
    p_cand = np.where(rng.random(400) < 0.7, p_champ, 1 - p_champ)  # 30% of the calls flipped
    d = _gate(y, p_cand, p_champ, margin=0.05)
    assert d.decision == "rejected" and not d.passed, d.reasons
    assert any("inferior" in r or "below the floor" in r for r in d.reasons)


def test_gate_says_insufficient_evidence_on_a_tiny_holdout_and_how_many_more_images():
    # two models of the same, middling quality on 16 images: the differences cannot be pinned down
    y, p_champ = _scores(16, 0.4, 4)
    _, p_cand = _scores(16, 0.4, 5)
    d = _gate(y, p_cand, p_champ, margin=0.05, min_accuracy=0.0, min_sensitivity=0.0)
    assert d.decision == "insufficient_evidence", d.reasons
    assert d.more_images_needed is not None and d.more_images_needed > 0
    assert f"about {d.more_images_needed} more holdout images would be needed" in d.summary
    assert "the champion stays" in d.summary


def test_first_model_faces_the_floors_only():
    y = [1] * 20 + [0] * 20
    p = [0.9] * 19 + [0.1] + [0.1] * 18 + [0.9] * 2  # sensitivity 0.95, accuracy 0.925
    cand = {k: v.as_dict() for k, v in stats.metric_intervals(y, p, 0.5, seed=1).items()}
    assert registry.evaluate_gate(cand, None, **FLOORS).decision == "promoted"
    low = registry.evaluate_gate(cand, None, **{**FLOORS, "min_sensitivity": 0.96})
    assert low.decision == "rejected" and "below the floor" in low.summary


def test_extra_images_needed_follows_one_over_root_n():
    iv = stats.Interval(value=0.0, lower=-0.1, upper=0.1, n=100)
    # half-width 0.1 must shrink to 0.05 (the gap to -margin): 4x the images, i.e. 300 more
    assert stats.extra_images_needed(iv, 0.05) == 300
    assert stats.extra_images_needed(stats.Interval(0.0, -0.01, 0.01, 100), 0.05) == 0
    assert stats.extra_images_needed(stats.Interval(-0.05, -0.1, 0.0, 100), 0.05) is None
