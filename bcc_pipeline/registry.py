"""Model versions, the champion/challenger quality gate, the promotion log and rollback.

Statuses: ``candidate`` (registered, not yet decided) → ``champion`` (the one scoring uses; the
database allows at most one) or ``rejected``; a champion that is replaced becomes ``retired``.
Every decision — automatic, manual or rollback — appends a row to ``promotions`` with who, when,
why and the metrics behind it; rows are never edited.

The gate: a candidate must clear absolute floors (accuracy, sensitivity) and, when a champion
exists, be no worse than the champion by more than a tolerance on accuracy, sensitivity and ROC
AUC — measured on the *same* images, the candidate's validation set, which the caller scores with
the champion. The first model faces the floors only.
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
    "GATE_COMPARED",
    "GateDecision",
    "decision_for",
    "default_actor",
    "evaluate_gate",
    "get_champion",
    "get_version",
    "list_versions",
    "metrics_of",
    "new_version_id",
    "promote",
    "record_gate_decision",
    "rollback",
    "save_metrics",
]

GATE_COMPARED = ("accuracy", "sensitivity", "roc_auc")


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
    """The gate's recorded decision on ``version`` (its ``promoted`` or ``rejected`` row), or None
    while it is undecided. Manual promotions and rollbacks are not gate decisions."""
    return session.scalars(
        select(Promotion).where(Promotion.candidate_version == version,
                                Promotion.decision.in_(("promoted", "rejected")))
        .order_by(Promotion.id)
    ).first()


def list_versions(session: Session) -> list[ModelVersion]:
    # Newest first: what people look for after a retrain.
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc())))


def save_metrics(session: Session, version: str, split: str, metrics: dict[str, float]) -> None:
    rows = [{"model_version": version, "split": split, "name": k,
             "value": None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)}
            for k, v in metrics.items()]
    insert_rows(session, Metric, rows, key=("model_version", "split", "name"), update=("value",))


def metrics_of(session: Session, version: str, split: str = "validation") -> dict[str, float | None]:
    rows = session.execute(
        select(Metric.name, Metric.value).where(Metric.model_version == version, Metric.split == split)
    ).all()
    return {name: value for name, value in rows}


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]
    candidate: dict[str, float]
    champion: dict[str, float] | None = None
    champion_version: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    #: The images the champion was compared on: ``images`` (how many), ``champion_trained_on`` (how
    #: many of the candidate's validation images the champion had trained on), ``fallback`` (None, or
    #: why images the champion trained on are nevertheless in the comparison). Empty without a champion.
    comparison: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return "; ".join(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_gate(candidate: dict[str, float], champion: dict[str, float] | None, *, min_accuracy: float,
                  min_sensitivity: float, tolerance: float, champion_version: str | None = None,
                  comparison: dict[str, Any] | None = None) -> GateDecision:
    """Decide on ``candidate`` metrics against floors and (optionally) the champion's metrics on the
    same images, described by ``comparison`` (kept in the decision; its ``fallback``, when set, is
    one of the reasons). Pure function: no database, no side effects."""
    reasons: list[str] = []
    failed = False

    def val(m: dict[str, float], k: str) -> float:
        v = m.get(k)
        return math.nan if v is None else float(v)

    for name, floor in (("accuracy", min_accuracy), ("sensitivity", min_sensitivity)):
        v = val(candidate, name)
        if math.isnan(v) or v < floor:
            failed = True
            reasons.append(f"{name} {v:.4f} is below the floor {floor:.4f}")
        else:
            reasons.append(f"{name} {v:.4f} clears the floor {floor:.4f}")
    if champion is None:
        reasons.append("no champion yet: floors only")
    else:
        for name in GATE_COMPARED:
            c, ch = val(candidate, name), val(champion, name)
            if math.isnan(ch):
                continue
            if math.isnan(c) or c < ch - tolerance:
                failed = True
                reasons.append(f"{name} {c:.4f} is worse than champion {champion_version}'s {ch:.4f} "
                               f"by more than {tolerance:.4f}")
            else:
                reasons.append(f"{name} {c:.4f} vs champion {ch:.4f} (tolerance {tolerance:.4f})")
        if comparison and comparison.get("fallback"):
            reasons.append(str(comparison["fallback"]))
    return GateDecision(passed=not failed, reasons=reasons, candidate=dict(candidate),
                        champion=None if champion is None else dict(champion),
                        champion_version=champion_version,
                        thresholds={"min_accuracy": min_accuracy, "min_sensitivity": min_sensitivity,
                                    "tolerance": tolerance},
                        comparison=dict(comparison or {}))


def _log(session: Session, *, candidate: str, from_v: str | None, to_v: str | None, decision: str,
         reason: str, actor: str, evidence: dict[str, Any]) -> Promotion:
    row = Promotion(candidate_version=candidate, from_version=from_v, to_version=to_v, decision=decision,
                    reason=reason, actor=actor[:128], evidence=evidence, decided_at=utcnow())  # column width
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


def record_gate_decision(session: Session, version: str, decision: GateDecision, *, actor: str) -> Promotion:
    """Apply a gate decision to a candidate: promote it or mark it rejected, and log the decision.

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
    if decision.passed:
        previous = _make_champion(session, mv)
        return _log(session, candidate=version, from_v=previous, to_v=version, decision="promoted",
                    reason="passed the quality gate: " + decision.summary, actor=actor, evidence=evidence)
    mv.status = "rejected"
    champ = get_champion(session)
    return _log(session, candidate=version, from_v=champ.version if champ else None,
                to_v=champ.version if champ else None, decision="rejected",
                reason="failed the quality gate: " + decision.summary, actor=actor, evidence=evidence)


def promote(session: Session, version: str, *, actor: str, reason: str) -> Promotion:
    """Manual promotion of any registered version (a human decision; overrides the gate)."""
    if not reason or not reason.strip():
        raise RegistryError("a manual promotion needs a --reason")
    mv = get_version(session, version)
    if mv.status == "champion":
        raise RegistryError(f"{version} is already the champion")
    previous = _make_champion(session, mv)
    return _log(session, candidate=version, from_v=previous, to_v=version, decision="manual",
                reason=reason.strip(), actor=actor,
                evidence={"validation": metrics_of(session, version), "previous_status_retired": previous})


def rollback(session: Session, *, actor: str, reason: str) -> Promotion:
    """Give the champion role back to the version it replaced; the current champion is retired."""
    if not reason or not reason.strip():
        raise RegistryError("a rollback needs a --reason")
    current = get_champion(session)
    if current is None:
        raise NoChampionError("there is no champion to roll back")
    # The row in which the current champion took over (by gate or by hand) names its predecessor.
    took_over = session.scalars(
        select(Promotion).where(Promotion.to_version == current.version,
                                Promotion.decision.in_(("promoted", "manual")))
        .order_by(Promotion.id.desc())
    ).first()
    if took_over is None or took_over.from_version is None:
        raise RegistryError(f"{current.version} replaced no earlier champion; nothing to roll back to "
                            "(use `bcc promote VERSION --reason ...` to choose one)")
    target = get_version(session, took_over.from_version)
    _make_champion(session, target)
    return _log(session, candidate=target.version, from_v=current.version, to_v=target.version,
                decision="rollback", reason=reason.strip(), actor=actor,
                evidence={"replaced": current.version, "restored": target.version})
