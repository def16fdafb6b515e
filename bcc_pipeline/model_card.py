"""The model card of a version (``models/<version>/model_card.md``) and the gate's evidence in markdown.

Both are rendered from what is recorded (the database rows and ``metadata.json``), never from
numbers recomputed here, so a card always shows what the gate and the scorer used. :func:`render`
returns the card; :func:`write` refreshes the file (after evaluation, after the gate, after an
approval); ``bcc model-card VERSION`` prints :func:`render`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Settings
from .files import atomic_write
from .stats import format_interval, format_number

__all__ = ["CARD_NAME", "card_path", "gate_markdown", "holdout_lines", "render", "write"]

CARD_NAME = "model_card.md"
#: The metrics with intervals a card and the logs show, in this order (name as printed, key).
SHOWN = (
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("accuracy", "accuracy"),
    ("precision", "precision"),
    ("ROC AUC", "roc_auc"),
)


def card_path(settings: Settings, version: str) -> Path:
    return settings.models_dir / version / CARD_NAME


def holdout_lines(intervals: dict[str, Any], calibration: dict[str, Any] | None = None) -> list[str]:
    """``sensitivity 0.96 [0.80, 0.99], 24/25 (holdout)``, one line per metric, then calibration."""
    lines = [format_interval(name, intervals.get(key)) for name, key in SHOWN if intervals.get(key)]
    if calibration:
        lines.append(
            f"calibration: temperature {calibration['temperature']:.3f} (fitted on "
            f"{calibration.get('n_calibration', '?')} calibration images); on {calibration.get('holdout_n')} "
            f"holdout images ECE {calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f}, "
            f"Brier {calibration['brier_before']:.3f} -> {calibration['brier_after']:.3f} (before -> after)"
            + (
                "; the temperature reached the edge of its search range: the calibration split says "
                "little about this model"
                if calibration.get("at_search_bound")
                else ""
            )
        )
    return lines


def format_between(between: list[float] | None) -> str:
    """The two adjacent observed probabilities a threshold sits midway between, for people to read:
    ``"0.3330 and 0.3568"``, with as many decimals (from 4) as it takes to tell the two apart."""
    if not between:
        return "n/a (no malignant calibration image)"
    lo, hi = between
    digits = 4
    while digits < 17 and f"{lo:.{digits}f}" == f"{hi:.{digits}f}":
        digits += 1
    return f"{lo:.{digits}f} and {hi:.{digits}f}"


def _meta(settings: Settings, version: str) -> dict[str, Any]:
    try:
        return json.loads((settings.models_dir / version / "metadata.json").read_text())
    except (OSError, ValueError):
        return {}


def _records(settings: Settings, version: str) -> dict[str, Any]:
    from . import registry
    from .store import session_scope

    with session_scope(settings.database_url) as s:
        mv = registry.get_version(s, version)
        row = registry.decision_for(s, version)
        return {
            "status": mv.status,
            "threshold": mv.threshold,
            "temperature": mv.temperature,
            "operating_point": mv.operating_point or {},
            "lineage": mv.lineage or {},
            "profile": mv.profile,
            "image_size": mv.image_size,
            "hyperparameters": mv.hyperparameters,
            "plots_dir": mv.plots_dir,
            "intervals": registry.intervals_of(s, version, "holdout"),
            "holdout": registry.metrics_of(s, version, "holdout"),
            "decision": None
            if row is None
            else {
                "decision": row.decision,
                "reason": row.reason,
                "actor": row.actor,
                "evidence": row.evidence or {},
                "decided_at": row.decided_at.isoformat(),
            },
        }


def _num(v: Any, digits: int = 4) -> str:
    return format_number(v, digits)


def _evidence_md(decision: dict[str, Any] | None) -> list[str]:
    if decision is None:
        return ["Not decided yet."]
    ev = decision["evidence"]
    out = [
        f"**{decision['decision']}** by `{decision['actor']}` at {decision['decided_at'][:19]} UTC.",
        "",
        f"Rule: {ev.get('rule', 'n/a')}; margin {ev.get('thresholds', {}).get('margin', 'n/a')}, floors "
        f"accuracy {ev.get('thresholds', {}).get('min_accuracy', 'n/a')}, sensitivity "
        f"{ev.get('thresholds', {}).get('min_sensitivity', 'n/a')}.",
        "",
    ]
    out += [f"- {r}" for r in ev.get("reasons", [])]
    diffs = ev.get("differences") or {}
    if diffs:
        out += [
            "",
            f"Candidate − champion `{ev.get('champion_version')}` on the same holdout images "
            f"(paired bootstrap, seed {ev.get('comparison', {}).get('bootstrap_seed')}):",
            "",
            "| metric | difference | 95% interval | n |",
            "|---|---|---|---|",
        ]
        for name, d in diffs.items():
            out.append(
                f"| {name} | {_num(d.get('value'), 3)} | [{_num(d.get('lower'), 3)}, {_num(d.get('upper'), 3)}]"
                f" | {d.get('n')} |"
            )
    if ev.get("approval"):
        a = ev["approval"]
        out += [
            "",
            f"Human approval: {'approved' if a['approved'] else 'rejected'} by `{a['actor']}`"
            f"{': ' + a['comment'] if a.get('comment') else ''}",
        ]
    return out


def gate_markdown(settings: Settings, version: str) -> str:
    """The gate's evidence for a person deciding on ``version``: holdout metrics with intervals, the
    comparison with the champion, and where the plots and the model card are."""
    r = _records(settings, version)
    meta = _meta(settings, version)
    lines = [
        f"### Candidate `{version}` ({r['profile']}, {r['image_size']} px)",
        "",
        f"Threshold {_num(r['threshold'])}, temperature {_num(r['temperature'], 3)}.",
        "",
        "**Holdout metrics (95% intervals):**",
        "",
    ]
    lines += [f"- {line}" for line in holdout_lines(r["intervals"], meta.get("calibration"))]
    lines += ["", "**Gate:**", ""] + _evidence_md(r["decision"])
    plots = sorted(str(p) for p in Path(r["plots_dir"]).glob("*.png")) if r["plots_dir"] else []
    lines += ["", "**Files:**", "", f"- model card: `{card_path(settings, version)}`"]
    lines += [f"- plot: `{p}`" for p in plots]
    return "\n".join(lines) + "\n"


def render(settings: Settings, version: str) -> str:
    """The model card of ``version`` as markdown."""
    r = _records(settings, version)
    meta = _meta(settings, version)
    op, lin, cal = r["operating_point"], r["lineage"], meta.get("calibration") or {}
    counts: dict[str, dict[str, int]] = {}
    groups: dict[str, int] = {}
    for role, path in (("development", meta.get("manifest_path")), ("holdout", meta.get("holdout_path"))):
        try:
            entries = json.loads(Path(path).read_text())["entries"] if path else []
        except (OSError, ValueError, KeyError):
            entries = []
        for e in entries:
            counts.setdefault(e["split"], {}).setdefault(e["label"], 0)
            counts[e["split"]][e["label"]] += 1
        groups[role] = len({e.get("group_id") for e in entries if e.get("group_id")})
    hp = r["hyperparameters"] or {}
    lines = [
        f"# Model card: {version}",
        "",
        f"Status: **{r['status']}**.",
        "",
        "## Intended use",
        "",
        "Decision support for classifying H&E breast-tissue image tiles as benign or malignant, "
        "with a pathologist reviewing every result. Not a diagnosis. Only for images like the "
        "training data (magnification, staining, scanner).",
        "",
        "**Caveat:** a version trained on the synthetic demo tiles (`bcc demo-data`, profile "
        f"`{r['profile']}`{' — this one' if r['profile'] == 'demo' else ''}) shows the pipeline only; "
        "its numbers say nothing about real tissue.",
        "",
        "## Data",
        "",
        "| role | benign | malignant |",
        "|---|---|---|",
    ]
    for role in ("train", "validation", "calibration", "holdout"):
        c = counts.get(role, {})
        lines.append(f"| {role} | {c.get('benign', 0)} | {c.get('malignant', 0)} |")
    lines += [
        "",
        f"Patient/slide groups: {groups.get('development', 0)} in development, "
        f"{groups.get('holdout', 0)} in the holdout"
        + (
            " (none: a split by image can leak near-identical tiles across roles)."
            if not groups.get("development")
            else "."
        ),
        "",
    ]
    lines += [
        "## Recipe",
        "",
        f"{meta.get('architecture', 'n/a')}; {r['image_size']} px; preprocessing "
        f"`{meta.get('preprocessing', 'n/a')}`; best epoch {meta.get('best_epoch', 'n/a')} (chosen on "
        "validation).",
        "",
        "```json",
        json.dumps(hp, indent=1, sort_keys=True, default=str),
        "```",
        "",
    ]
    lines += [
        "## Holdout metrics",
        "",
        "On the frozen holdout, which no choice (epoch, threshold, temperature) saw:",
        "",
    ]
    lines += [f"- {line}" for line in holdout_lines(r["intervals"], cal or None)]
    lines += [
        "",
        "## Threshold",
        "",
        f"Threshold **{_num(r['threshold'])}** on calibrated probabilities: the highest that reaches the "
        f"target sensitivity {op.get('target', 'n/a')} on the {op.get('n', '?')} calibration images "
        f"({op.get('n_malignant', '?')} malignant; reached {_num(op.get('sensitivity'), 3)}), placed midway "
        f"between the adjacent observed probabilities {format_between(op.get('between'))} so that no image lies on it. "
        f"On the holdout it reaches {format_interval('sensitivity', op.get('holdout_sensitivity'))}.",
        "",
        "## Gate decision",
        "",
    ] + _evidence_md(r["decision"])
    lines += [
        "",
        "## Lineage",
        "",
        "```json",
        json.dumps(lin, indent=1, sort_keys=True, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def write(settings: Settings, version: str) -> Path:
    """Write (or refresh) ``models/<version>/model_card.md``; returns its path."""
    path = card_path(settings, version)
    atomic_write(path, render(settings, version).encode())
    return path
