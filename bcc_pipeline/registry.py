"""Model versions, the champion/challenger quality gate, the promotion log and rollback.

Statuses: ``candidate`` (registered, not yet decided) → ``champion`` (the one scoring uses; the
database allows at most one) or ``rejected``; a champion that is replaced becomes ``retired``.
Every decision — automatic, human, manual or rollback — appends a row to ``promotions`` with who,
when, why and the evidence behind it; rows are never edited.

The gate (:func:`evaluate_gate`, rule :data:`GATE_RULE`) decides on the frozen **holdout**, which no
choice (epoch, threshold, temperature) has touched:

1. **Floors**: the candidate's holdout accuracy and sensitivity (point estimates, each printed
   with its exact 95 % interval) must reach ``gate_min_accuracy`` / ``gate_min_sensitivity``.
   A floor missed is ``rejected``.
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

With ``require_approval`` the gate does not promote by itself: a passing candidate is recorded
``awaiting_approval`` and :func:`record_approval` (a person, through Airflow's approval task or
the library) finishes the decision, with the approver and the comment in ``promotions``.
"""

from __future__ import annotations

import datetime as dt
import getpass
import math
import secrets
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .errors import NoChampionError, RegistryError
from .store import Metric, ModelVersion, Promotion, insert_rows, utcnow

__all__ = [
    "AWAITING",
    "GATE_COMPARED",
    "GATE_DECISIONS",
    "GATE_RULE",
    "GateDecision",
    "decision_for",
    "intervals_of",
    "default_actor",
    "evaluate_gate",
    "get_champion",
    "get_version",
    "list_versions",
    "metrics_of",
    "new_version_id",
    "promote",
    "record_approval",
    "record_gate_decision",
    "rollback",
    "save_metrics",
]

#: The differences (candidate − champion) that decide non-inferiority; specificity's is recorded too.
GATE_COMPARED = ("sensitivity", "roc_auc")
GATE_RULE = "non-inferiority: paired bootstrap (BCa) of candidate - champion on the frozen holdout"
AWAITING = "awaiting_approval"
#: The decisions the gate (and the approval that finishes it) records.
GATE_DECISIONS = ("promoted", "rejected", "insufficient_evidence", AWAITING)


def new_version_id(now: dt.datetime | None = None) -> str:
    """``v20261125-223015-3fa2c1``: sortable by time, unique enough for concurrent runs."""
    now = now or dt.datetime.now(dt.UTC)
    return f"v{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def get_version(session: Session, version: str) -> ModelVersion:
    mv = session.get(ModelVersion, version)
    if mv is None:
        raise RegistryError(f"unknown model version {version!r}; `bcc models` lists them")
    return mv


def get_champion(session: Session) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).where(ModelVersion.status == "champion")).first()


def decision_for(session: Session, version: str) -> Promotion | None:
    """The latest gate decision on ``version`` (``promoted``, ``rejected``, ``insufficient_evidence``,
    or ``awaiting_approval`` until a person answers), or None while it is undecided. Manual
    promotions and rollbacks are not gate decisions."""
    return session.scalars(
        select(Promotion)
        .where(Promotion.candidate_version == version, Promotion.decision.in_(GATE_DECISIONS))
        .order_by(Promotion.id.desc())
    ).first()


def list_versions(session: Session) -> list[ModelVersion]:
    # Newest first: what people look for after a retrain.
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc())))


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def save_metrics(
    session: Session,
    version: str,
    split: str,
    metrics: dict[str, float],
    intervals: dict[str, Any] | None = None,
) -> None:
    """Store ``metrics`` of ``version`` on ``split``; ``intervals`` (name → a
    :class:`bcc_pipeline.stats.Interval` or its dict) adds the 95 % bounds, n, k and method."""
    intervals = intervals or {}
    rows = []
    for k, v in metrics.items():
        iv = intervals.get(k)
        d = iv if isinstance(iv, dict) or iv is None else iv.as_dict()
        d = d or {}
        rows.append(
            {
                "model_version": version,
                "split": split,
                "name": k,
                "value": _num(v),
                "lower": _num(d.get("lower")),
                "upper": _num(d.get("upper")),
                "n": d.get("n"),
                "k": d.get("k"),
                "method": d.get("method"),
            }
        )
    insert_rows(
        session,
        Metric,
        rows,
        key=("model_version", "split", "name"),
        update=("value", "lower", "upper", "n", "k", "method"),
    )


def metrics_of(session: Session, version: str, split: str = "validation") -> dict[str, float | None]:
    rows = session.execute(
        select(Metric.name, Metric.value).where(Metric.model_version == version, Metric.split == split)
    ).all()
    return {name: value for name, value in rows}


def intervals_of(session: Session, version: str, split: str = "holdout") -> dict[str, dict[str, Any]]:
    """The metrics of ``version`` on ``split`` that carry an interval: name → value, lower, upper, n, k, method."""
    rows = session.execute(
        select(
            Metric.name, Metric.value, Metric.lower, Metric.upper, Metric.n, Metric.k, Metric.method
        ).where(Metric.model_version == version, Metric.split == split, Metric.method.is_not(None))
    ).all()
    return {
        r.name: {"value": r.value, "lower": r.lower, "upper": r.upper, "n": r.n, "k": r.k, "method": r.method}
        for r in rows
    }


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
    elif floors_ok:
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


def _log(
    session: Session,
    *,
    candidate: str,
    from_v: str | None,
    to_v: str | None,
    decision: str,
    reason: str,
    actor: str,
    evidence: dict[str, Any],
) -> Promotion:
    row = Promotion(
        candidate_version=candidate,
        from_version=from_v,
        to_version=to_v,
        decision=decision,
        reason=reason,
        actor=actor[:128],
        evidence=evidence,
        decided_at=utcnow(),
    )  # column width
    session.add(row)
    session.flush()
    return row


def _make_champion(session: Session, mv: ModelVersion) -> str | None:
    current = get_champion(session)
    previous = None
    if current is not None and current.version != mv.version:
        current.status = "retired"
        previous = current.version
        session.flush()  # the partial unique index allows one champion at a time
    mv.status = "champion"
    session.flush()
    return previous


def record_gate_decision(
    session: Session, version: str, decision: GateDecision, *, actor: str, require_approval: bool = False
) -> Promotion:
    """Apply a gate decision to a candidate and log it: promote it, mark it rejected (also for
    ``insufficient_evidence``: the champion stays), or, with ``require_approval`` and a passing
    decision, log ``awaiting_approval`` and leave it a candidate until :func:`record_approval`.

    Idempotent: when the candidate was already decided, the existing log row is returned and nothing
    changes, so a retried task cannot promote twice or flip a decision.
    """
    mv = get_version(session, version)
    done = decision_for(session, version)
    if done is not None:
        return done
    if mv.status != "candidate":
        raise RegistryError(f"{version} is {mv.status}, not a candidate; the gate decides candidates only")
    evidence = decision.as_dict()
    champ = get_champion(session)
    current = champ.version if champ else None
    if decision.passed and require_approval:
        return _log(
            session,
            candidate=version,
            from_v=current,
            to_v=current,
            decision=AWAITING,
            reason="passed the quality gate, awaiting a person's approval: " + decision.summary,
            actor=actor,
            evidence=evidence,
        )
    if decision.passed:
        previous = _make_champion(session, mv)
        return _log(
            session,
            candidate=version,
            from_v=previous,
            to_v=version,
            decision="promoted",
            reason="passed the quality gate: " + decision.summary,
            actor=actor,
            evidence=evidence,
        )
    mv.status = "rejected"
    what = "failed the quality gate" if decision.decision == "rejected" else "not enough evidence"
    return _log(
        session,
        candidate=version,
        from_v=current,
        to_v=current,
        decision=decision.decision,
        reason=f"{what}: " + decision.summary,
        actor=actor,
        evidence=evidence,
    )


def record_approval(
    session: Session, version: str, approved: bool, *, actor: str, comment: str | None = None
) -> Promotion:
    """Finish a decision that awaits approval: ``approved`` promotes the candidate (the champion it
    replaces is retired), otherwise it is rejected and the champion stays. The approver (``actor``)
    and ``comment`` are logged with the gate's evidence. Idempotent: answering the same way again
    returns the recorded row; answering the other way raises :class:`RegistryError`."""
    mv = get_version(session, version)
    last = decision_for(session, version)
    if last is None:
        raise RegistryError(f"{version} has no gate decision; run the gate first")
    wanted = "promoted" if approved else "rejected"
    if last.decision != AWAITING:
        if last.decision == wanted and (last.evidence or {}).get("approval"):
            return last
        raise RegistryError(f"{version} does not await approval: it was {last.decision} ({last.reason})")
    approval = {
        "approved": bool(approved),
        "actor": actor,
        "comment": comment or "",
        "answered_at": utcnow().isoformat(),
    }
    evidence = {**(last.evidence or {}), "approval": approval}
    said = f"{actor}: {comment.strip()}" if comment and comment.strip() else actor
    if approved:
        previous = _make_champion(session, mv)
        return _log(
            session,
            candidate=version,
            from_v=previous,
            to_v=version,
            decision="promoted",
            reason=f"approved by {said}; " + last.reason,
            actor=actor,
            evidence=evidence,
        )
    mv.status = "rejected"
    champ = get_champion(session)
    current = champ.version if champ else None
    return _log(
        session,
        candidate=version,
        from_v=current,
        to_v=current,
        decision="rejected",
        reason=f"rejected by {said}; " + last.reason,
        actor=actor,
        evidence=evidence,
    )


def promote(session: Session, version: str, *, actor: str, reason: str) -> Promotion:
    """Manual promotion of any registered version (a human decision; overrides the gate)."""
    if not reason or not reason.strip():
        raise RegistryError("a manual promotion needs a --reason")
    mv = get_version(session, version)
    if mv.status == "champion":
        raise RegistryError(f"{version} is already the champion")
    previous = _make_champion(session, mv)
    return _log(
        session,
        candidate=version,
        from_v=previous,
        to_v=version,
        decision="manual",
        reason=reason.strip(),
        actor=actor,
        evidence={"validation": metrics_of(session, version), "previous_status_retired": previous},
    )


def rollback(session: Session, *, actor: str, reason: str) -> Promotion:
    """Give the champion role back to the version it replaced; the current champion is retired."""
    if not reason or not reason.strip():
        raise RegistryError("a rollback needs a --reason")
    current = get_champion(session)
    if current is None:
        raise NoChampionError("there is no champion to roll back")
    # The row in which the current champion took over (by gate or by hand) names its predecessor.
    took_over = session.scalars(
        select(Promotion)
        .where(Promotion.to_version == current.version, Promotion.decision.in_(("promoted", "manual")))
        .order_by(Promotion.id.desc())
    ).first()
    if took_over is None or took_over.from_version is None:
        raise RegistryError(
            f"{current.version} replaced no earlier champion; nothing to roll back to "
            "(use `bcc promote VERSION --reason ...` to choose one)"
        )
    target = get_version(session, took_over.from_version)
    _make_champion(session, target)
    return _log(
        session,
        candidate=target.version,
        from_v=current.version,
        to_v=target.version,
        decision="rollback",
        reason=reason.strip(),
        actor=actor,
        evidence={"replaced": current.version, "restored": target.version},
    )
