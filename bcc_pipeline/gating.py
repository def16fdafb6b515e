"""The gate and approval steps of retraining: decide on an evaluated candidate by the registry's rule
(:mod:`bcc_pipeline.gate_rule`) against the champion on the frozen holdout, record the decision, and
finish a decision that awaits a person's approval.

Like the other steps (:mod:`bcc_pipeline.pipelines`, which re-exports these), each takes the settings
plus small values and returns a small JSON-able dict; each is safe to retry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import registry
from .config import Settings
from .measuring import holdout_for, holdout_probs, read_meta, score_paths, training_hashes
from .store import session_scope

__all__ = ["finish_approval", "gate_step"]

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


def gate_step(
    settings: Settings,
    version: str,
    *,
    actor: str | None = None,
    progress: Progress | None = None,
    require_approval: bool | None = None,
) -> dict[str, Any]:
    """Decide on the candidate by the registry's rule on the frozen holdout: floors, then (with a
    champion) the paired bootstrap of candidate − champion on the same holdout images, each model at
    its own threshold and temperature. With ``require_approval`` (default: the setting) a passing
    candidate awaits a person's answer (:func:`bcc_pipeline.registry.record_approval`).
    Idempotent: a decided candidate returns its recorded decision."""
    from . import model, model_card, stats

    progress = progress or log.info
    actor = actor or registry.default_actor()
    approval = settings.require_approval if require_approval is None else bool(require_approval)
    with session_scope(settings.database_url) as s:
        cand = registry.get_version(s, version)
        decided = registry.decision_for(s, version)
        if decided is None:
            flat = registry.metrics_of(s, version, "holdout")
            cand_metrics = {**flat, **registry.intervals_of(s, version, "holdout")}
            champ = registry.get_champion(s)
            champ_info = (
                None
                if champ is None
                else (
                    champ.version,
                    champ.artifact_path,
                    champ.artifact_sha256,
                    champ.image_size,
                    champ.threshold,
                    champ.temperature,
                )
            )
            cand_dir, cand_thr = Path(cand.artifact_path).parent, cand.threshold
    if decided is not None:
        return _gate_result(settings, version)

    meta = read_meta(cand_dir)
    holdout = holdout_for(settings, meta)
    champ_metrics, diffs, comparison = None, None, None
    if champ_info is not None:
        cv, cpath, csha, csize, cthr, ctemp = champ_info
        entries = holdout.split("holdout")
        seen = training_hashes(Path(cpath).parent)
        kept = [e for e in entries if e["sha256"] not in seen]
        comparison = {
            "holdout_hash": holdout.hash,
            "holdout_images": len(entries),
            "images": len(kept),
            "champion_trained_on": len(entries) - len(kept),
            "bootstrap_seed": settings.seed,
            "bootstrap_resamples": stats.BOOTSTRAP_RESAMPLES,
            "champion_threshold": cthr,
            "champion_temperature": ctemp,
        }
        if len(kept) < len(entries):
            comparison["note"] = (
                f"{len(entries) - len(kept)} holdout images the champion was trained on are "
                "left out of the comparison"
            )
        progress(f"scoring champion {cv} on the frozen holdout {holdout.hash[:12]} ({len(kept)} images)")
        net = model.load_artifact(cpath, csha)
        labels = [0 if e["label"] == "benign" else 1 for e in kept]
        champ_probs = stats.calibrate(score_paths(settings, net, [e["path"] for e in kept], csize), ctemp)
        cand_all = holdout_probs(cand_dir)
        cand_probs = [cand_all[e["sha256"]] for e in kept]
        diffs = stats.paired_differences(labels, cand_probs, cand_thr, champ_probs, cthr, seed=settings.seed)
        champ_metrics = {
            k: v.as_dict()
            for k, v in stats.metric_intervals(labels, champ_probs, cthr, seed=settings.seed).items()
        }
    decision = registry.evaluate_gate(
        cand_metrics,
        champ_metrics,
        min_accuracy=settings.gate_min_accuracy,
        min_sensitivity=settings.gate_min_sensitivity,
        margin=settings.gate_margin,
        differences=diffs,
        champion_version=champ_info[0] if champ_info else None,
        comparison=comparison,
    )
    with session_scope(settings.database_url) as s:
        registry.record_gate_decision(s, version, decision, actor=actor, require_approval=approval)
    out = _gate_result(settings, version)
    progress(f"gate ({registry.GATE_RULE}): {version} {out['decision']}: {out['reason']}")
    model_card.write(settings, version)
    _validate_new_champion(settings, version, out, progress)
    return out


def _validate_new_champion(settings: Settings, version: str, out: dict[str, Any], progress: Progress) -> None:
    """Prove each inference back-end on a version that just became champion (never undoes the promotion)."""
    if out.get("champion") == version:
        from .validation import validate_published

        validate_published(settings, version, progress=progress)


def _gate_result(settings: Settings, version: str) -> dict[str, Any]:
    """The recorded gate decision on ``version`` as the gate step returns it (with the approval markdown)."""
    from . import model_card

    with session_scope(settings.database_url) as s:
        row = registry.decision_for(s, version)
        champion = registry.get_champion(s)
        out = {
            "version": version,
            "decision": row.decision,
            "reason": row.reason,
            "champion": champion.version if champion else None,
            "rule": registry.GATE_RULE,
            "differences": (row.evidence or {}).get("differences", {}),
            "more_images_needed": (row.evidence or {}).get("more_images_needed"),
        }
    out["markdown"] = model_card.gate_markdown(settings, version)
    return out


def finish_approval(
    settings: Settings, version: str, approved: bool, *, actor: str, comment: str | None = None
) -> dict[str, Any]:
    """Record a person's answer on a candidate awaiting approval (see ``registry.record_approval``)
    and refresh its model card; returns the decision as :func:`gate_step` does."""
    from . import model_card

    with session_scope(settings.database_url) as s:
        registry.record_approval(s, version, approved, actor=actor, comment=comment)
    model_card.write(settings, version)
    out = _gate_result(settings, version)
    if approved:
        _validate_new_champion(settings, version, out, log.info)
    return out
