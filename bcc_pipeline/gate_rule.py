"""The champion/challenger quality gate: the rule (:data:`GATE_RULE`) and :func:`evaluate_gate`, a pure
function from holdout metrics to a :class:`GateDecision`. :mod:`bcc_pipeline.registry` (which re-exports
these) records the decisions; :mod:`bcc_pipeline.gating` runs the gate step.

The gate (:func:`evaluate_gate`, rule :data:`GATE_RULE`) decides on the frozen **holdout**, which no
choice (epoch, threshold, temperature) has touched:

1. **Floors**: the candidate's holdout accuracy and sensitivity (point estimates, each printed
   with its exact 95 % interval) must reach ``gate_min_accuracy`` / ``gate_min_sensitivity``.
   A floor missed is ``rejected``; the paired differences of step 2 are still shown, for information.
2. **Non-inferiority against the champion**, paired on the same holdout images, each model at its
   own threshold and with its own calibration: for sensitivity and ROC AUC, the 95 % interval of
   (candidate − champion) from a paired bootstrap (the same resampled cases for both models, BCa,
   fixed recorded seed; :func:`bcc_pipeline.stats.paired_differences`). Specificity's difference is
   computed and recorded too, but does not decide.

   * lower bound > −margin on both → non-inferior → ``promoted``;
   * upper bound < −margin on either → inferior → ``rejected``;
   * otherwise (an interval straddles −margin, or cannot be computed) → ``insufficient_evidence``:
     the champion stays, and the reason says roughly how many more holdout images would decide
     (the interval half-width shrinks with 1/√n).

   A paired bootstrap rather than McNemar + DeLong: one method for all three metrics, no normality
   assumption for AUC on small sets, and exactly the pairing the comparison needs (both models see
   every resample); DeLong is not in scipy or scikit-learn.
3. The first model (no champion) faces the floors only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "AWAITING",
    "GATE_COMPARED",
    "GATE_DECISIONS",
    "GATE_RULE",
    "GateDecision",
    "evaluate_gate",
]

#: The differences (candidate − champion) that decide non-inferiority; specificity's is recorded too.
GATE_COMPARED = ("sensitivity", "roc_auc")
GATE_RULE = "non-inferiority: paired bootstrap (BCa) of candidate - champion on the frozen holdout"
AWAITING = "awaiting_approval"
#: The decisions the gate (and the approval that finishes it) records.
GATE_DECISIONS = ("promoted", "rejected", "insufficient_evidence", AWAITING)


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


@dataclass
class GateDecision:
    """The gate's verdict and everything it rests on (stored whole as ``promotions.evidence``)."""

    decision: str  # promoted | rejected | insufficient_evidence
    reasons: list[str]
    candidate: dict[str, Any]  # holdout metrics of the candidate: name -> value (and intervals)
    champion: dict[str, Any] | None = None
    champion_version: str | None = None
    #: candidate − champion: name -> {value, lower, upper, n, method}
    differences: dict[str, Any] = field(default_factory=dict)
    rule: str = GATE_RULE
    thresholds: dict[str, float] = field(default_factory=dict)  # floors and margin
    #: how the champion was compared: holdout hash, images, seed, resamples, what was left out and why
    comparison: dict[str, Any] = field(default_factory=dict)
    more_images_needed: int | None = None

    @property
    def passed(self) -> bool:
        return self.decision == "promoted"

    @property
    def summary(self) -> str:
        return "; ".join(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _value(m: dict[str, Any], k: str) -> float:
    v = m.get(k)
    if isinstance(v, dict):
        v = v.get("value")
    return math.nan if v is None else float(v)


def evaluate_gate(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    *,
    min_accuracy: float,
    min_sensitivity: float,
    margin: float,
    differences: dict[str, Any] | None = None,
    champion_version: str | None = None,
    comparison: dict[str, Any] | None = None,
) -> GateDecision:
    """Decide on the candidate's holdout metrics (name → value, or → interval dict) by the rule of
    this module. ``differences`` (name → :class:`bcc_pipeline.stats.Interval` or its dict, candidate −
    champion, paired on the same holdout) is required when there is a champion. Pure function."""
    from .stats import Interval, extra_images_needed

    reasons: list[str] = []
    floors_ok = True
    for name, floor in (("accuracy", min_accuracy), ("sensitivity", min_sensitivity)):
        v = _value(candidate, name)
        shown = _shown(name, candidate.get(name))
        if math.isnan(v) or v < floor:
            floors_ok = False
            reasons.append(f"{shown} is below the floor {floor:.2f}")
        else:
            reasons.append(f"{shown} reaches the floor {floor:.2f}")
    diffs = {k: (v.as_dict() if isinstance(v, Interval) else dict(v)) for k, v in (differences or {}).items()}
    decision, needed = ("promoted" if floors_ok else "rejected"), None
    if champion is None:
        reasons.append("no champion yet: floors only")
    elif not floors_ok:
        # The floor already decides; the paired comparison is still shown (and kept in the evidence)
        # so that a person sees how the rejected candidate stood against the champion.
        for name in GATE_COMPARED:
            reasons.append(
                f"{name} difference {_fmt(diffs.get(name))} vs champion {champion_version} "
                "(for information: the floor decides)"
            )
    else:
        states = []
        for name in GATE_COMPARED:
            d = diffs.get(name)
            lo, hi = (math.nan, math.nan) if d is None else (_num(d.get("lower")), _num(d.get("upper")))
            lo = math.nan if lo is None else lo
            hi = math.nan if hi is None else hi
            text = f"{name} difference {_fmt(d)} vs champion {champion_version}, margin -{margin:.2f}"
            if math.isfinite(lo) and lo > -margin:
                states.append("ok")
                reasons.append(f"{text}: non-inferior (lower bound above -margin)")
            elif math.isfinite(hi) and hi < -margin:
                states.append("worse")
                reasons.append(f"{text}: inferior (upper bound below -margin)")
            else:
                states.append("open")
                more = (
                    None
                    if d is None
                    else extra_images_needed(
                        Interval(**{k: d.get(k) for k in ("value", "lower", "upper", "n", "k", "method")}),
                        margin,
                    )
                )
                if more is not None:
                    needed = max(needed or 0, more)
                reasons.append(f"{text}: undecided (the interval reaches -margin)")
        if "worse" in states:
            decision = "rejected"
        elif "open" in states:
            decision = "insufficient_evidence"
            n = int(next((d.get("n") for d in diffs.values() if d.get("n")), 0) or 0)
            if needed:
                why = (
                    f"about {needed} more holdout images would be needed to decide (interval half-width "
                    "shrinks with 1/sqrt(n))"
                )
            elif any(
                not all(math.isfinite(_num(d.get(k)) or math.nan) for k in ("lower", "upper"))
                for d in (diffs.get(name) or {} for name in GATE_COMPARED)
            ):
                why = "an interval could not be computed on it (too few cases of a class); a larger holdout is needed"
            else:
                why = "the difference sits on the margin, so no holdout size would decide"
            reasons.append(f"insufficient evidence on {n} holdout images: the champion stays; {why}")
    if comparison and comparison.get("note"):
        reasons.append(str(comparison["note"]))
    return GateDecision(
        decision=decision,
        reasons=reasons,
        candidate=dict(candidate),
        champion=None if champion is None else dict(champion),
        champion_version=champion_version,
        differences=diffs,
        thresholds={"min_accuracy": min_accuracy, "min_sensitivity": min_sensitivity, "margin": margin},
        comparison=dict(comparison or {}),
        more_images_needed=needed,
    )


def _fmt(d: dict[str, Any] | None) -> str:
    if d is None:
        return "n/a"

    def num(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.3f}"

    return f"{num(d.get('value'))} [{num(d.get('lower'))}, {num(d.get('upper'))}]"


def _shown(name: str, v: Any) -> str:
    from .stats import format_interval

    if isinstance(v, dict):
        return format_interval(name, v)
    return f"{name} {'n/a' if v is None else f'{float(v):.4f}'} (holdout)"
