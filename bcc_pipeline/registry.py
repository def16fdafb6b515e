"""Model versions, the champion/challenger quality gate, the promotion log and rollback.

Statuses: ``candidate`` (registered, not yet decided) → ``champion`` (the one scoring uses; the
database allows at most one) or ``rejected``; a champion that is replaced becomes ``retired``.
Every decision — automatic, human, manual or rollback — appends a row to ``promotions`` with who,
when, why and the evidence behind it; rows are never edited.

The gate's rule and decision (:func:`evaluate_gate`, :data:`GATE_RULE`, :class:`GateDecision`) are in
:mod:`bcc_pipeline.gate_rule`, re-exported here.

With ``require_approval`` the gate does not promote by itself: a passing candidate is recorded
``awaiting_approval`` and :func:`record_approval` (a person, through Airflow's approval task or
the library) finishes the decision, with the approver and the comment in ``promotions``.
"""

from __future__ import annotations

import datetime as dt
import getpass
import secrets
import socket
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .errors import NoChampionError, RegistryError
from .gate_rule import (  # re-exported: the gate's rule and decision are declared there
    AWAITING,
    GATE_COMPARED,
    GATE_DECISIONS,
    GATE_RULE,
    GateDecision,
    _num,
    evaluate_gate,
)
from .store import Metric, ModelVersion, Promotion, insert_rows, utcnow

# the gate's rule and decision, re-exported from gate_rule; then this module's own
__all__ = ["AWAITING", "GATE_COMPARED", "GATE_DECISIONS", "GATE_RULE", "GateDecision", "evaluate_gate"]
__all__ += [
    "decision_for",
    "intervals_of",
    "default_actor",
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


def _decide(
    session: Session, mv: ModelVersion, decision: str, reason: str, *, promote: bool = False, **logged: Any
) -> Promotion:
    """Log ``decision`` on candidate ``mv`` (``logged``: the ``actor`` and ``evidence`` of the log row):
    with ``promote`` it becomes the champion first (the one it replaces is retired), otherwise the
    champion stays."""
    if promote:
        from_v, to_v = _make_champion(session, mv), mv.version
    else:
        champ = get_champion(session)
        from_v = to_v = champ.version if champ else None
    return _log(
        session, candidate=mv.version, from_v=from_v, to_v=to_v, decision=decision, reason=reason, **logged
    )


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
    if decision.passed and require_approval:
        why = "passed the quality gate, awaiting a person's approval: " + decision.summary
        return _decide(session, mv, AWAITING, why, actor=actor, evidence=evidence)
    if decision.passed:
        why = "passed the quality gate: " + decision.summary
        return _decide(session, mv, "promoted", why, actor=actor, evidence=evidence, promote=True)
    mv.status = "rejected"
    what = "failed the quality gate" if decision.decision == "rejected" else "not enough evidence"
    return _decide(
        session, mv, decision.decision, f"{what}: " + decision.summary, actor=actor, evidence=evidence
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
        why = f"approved by {said}; " + last.reason
        return _decide(session, mv, "promoted", why, actor=actor, evidence=evidence, promote=True)
    mv.status = "rejected"
    return _decide(
        session, mv, "rejected", f"rejected by {said}; " + last.reason, actor=actor, evidence=evidence
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
