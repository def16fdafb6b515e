"""The model commands of ``bcc``: train, demo, models, model-card, promote, rollback, status, model-info,
validate-backends. The work is in the library; these parse, call and print."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

from ..config import BACKENDS, Settings, load_settings
from ..errors import StoreError
from ..files import apply_umask, one_line
from ..store import safe_url
from .common import add_decision_args, emit, progress, settings

__all__ = ["prepare_demo_home", "print_train_summary", "register"]


def print_train_summary(r: dict[str, Any], s: Settings) -> None:
    from ..model_card import format_between, holdout_lines

    ev, gate = r["evaluation"], r["gate"]
    v, op = ev["holdout"], ev["operating_point"]
    print(f"model version   {r['version']}  ({gate['decision']}; champion now {gate['champion']})")
    print(f"gate            {gate['rule']}")
    print(f"                {gate['reason']}")
    print(
        f"threshold       {ev['threshold']:.4f}  (target sensitivity {op['target']} on {op['n']} calibration "
        f"images, midway between {format_between(op['between'])})"
    )
    print(f"calibration     temperature {ev['temperature']:.3f}")
    print("holdout         " + "\n                ".join(holdout_lines(ev["intervals"], ev["calibration"])))
    print(
        f"confusion       TP {v['tp']:.0f}  FP {v['fp']:.0f}  TN {v['tn']:.0f}  FN {v['fn']:.0f}  "
        f"(holdout n={v['n']:.0f}; {r['split']['n_train']} train images)"
    )
    for warning in r["split"].get("warnings", []):
        print(f"warning         {warning}")
    print("plots           " + "\n                ".join(ev["plots"].values()))
    print(f"model card      {s.models_dir / r['version'] / 'model_card.md'}")
    print(f"took            {r['seconds']:.0f}s")


def cmd_train(args: argparse.Namespace) -> int:
    from ..pipelines import retrain

    s = settings(args)
    from ..store import require_schema

    require_schema(s.database_url)
    r = retrain(s, actor=args.actor, progress=progress, skip_intake=args.skip_intake)
    emit(args, r, lambda: print_train_summary(r, s))
    return 0


def _version_rows(s: Settings) -> list[dict[str, Any]]:
    from ..overview import model_versions
    from ..validation import validated_summary

    return [
        {
            **{k: v for k, v in row.items() if k not in ("metrics", "plots")},
            "backends_validated_here": validated_summary(s, row["version"]),
        }
        for row in model_versions(s)
    ]


def cmd_models(args: argparse.Namespace) -> int:
    s = settings(args)
    rows = _version_rows(s)

    def human() -> None:
        if not rows:
            print("no model versions yet; run `bcc train`")
            return
        print(
            "holdout metrics with 95% intervals (exact for proportions, bootstrap for AUC); T = temperature"
        )
        print(
            f"{'version':26s} {'status':10s} {'px':>4s} {'sensitivity':>24s} {'specificity':>24s} "
            f"{'ROC AUC':>18s} {'thr':>6s} {'T':>6s}  {'holdout':12s}  validated back-ends (this CPU class)"
        )
        for r in rows:
            iv = r["intervals"]

            def f(k: str, iv: dict = iv) -> str:
                d = iv.get(k)
                if not d or d.get("value") is None:
                    return "n/a"
                lo, hi = (("n/a" if d.get(b) is None else f"{d[b]:.2f}") for b in ("lower", "upper"))
                count = f" {d['k']}/{d['n']}" if d.get("k") is not None else ""
                return f"{d['value']:.2f} [{lo}, {hi}]{count}"

            temp = "n/a" if r["temperature"] is None else f"{r['temperature']:6.3f}"
            hold = (r["manifest_hashes"] or {}).get("holdout") or "n/a"
            print(
                f"{r['version']:26s} {r['status']:10s} {r['image_size']:4d} {f('sensitivity'):>24s} "
                f"{f('specificity'):>24s} {f('roc_auc'):>18s} {r['threshold']:6.3f} {temp:>6s}  {hold[:12]:12s}  "
                f"{r['backends_validated_here']}"
            )

    emit(args, rows, human)
    return 0


def cmd_model_card(args: argparse.Namespace) -> int:
    from ..model_card import render
    from ..store import require_schema

    s = settings(args)
    require_schema(s.database_url)
    card = render(s, args.version)
    emit(args, {"version": args.version, "markdown": card}, lambda: sys.stdout.write(card))
    return 0


def _decide(
    args: argparse.Namespace, decide: Callable[..., Any], *what: str
) -> tuple[Settings, dict[str, Any]]:
    """Run a registry decision (``promote``, ``rollback``) with the command's actor and reason; the settings
    and the promotions row it wrote, as the promote/rollback commands report it."""
    from ..registry import default_actor
    from ..store import require_schema, session_scope

    s = settings(args)
    require_schema(s.database_url)
    with session_scope(s.database_url) as session:
        row = decide(session, *what, actor=args.actor or default_actor(), reason=args.reason)
        return s, {
            "decision": row.decision,
            "from_version": row.from_version,
            "to_version": row.to_version,
            "actor": row.actor,
            "reason": row.reason,
            "decided_at": row.decided_at.isoformat(),
        }


def cmd_promote(args: argparse.Namespace) -> int:
    from ..registry import promote
    from ..validation import validate_published

    s, out = _decide(args, promote, args.version)
    out["backends"] = validate_published(s, args.version, progress=progress)
    emit(
        args,
        out,
        f"{out['to_version']} is now the champion (was {out['from_version'] or 'none'}); validated "
        f"back-ends here: {', '.join(out['backends']['validated']) or 'none (fp32 Keras scores)'}",
    )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from ..registry import rollback

    _s, out = _decide(args, rollback)
    emit(args, out, f"rolled back: {out['to_version']} is the champion again ({out['from_version']} retired)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Champion with its metrics and plots, the last scoring run, the newest predictions."""
    from ..errors import BCCError
    from ..holdout import contested as holdout_contested
    from ..model_card import holdout_lines
    from ..overview import champion_summary, scoring_runs
    from ..predictions import query_predictions
    from ..scoring import mark_abandoned, quiet_runs
    from ..store import get_engine

    s = settings(args)
    hanging: list[str] = []
    with contextlib.suppress(StoreError):  # a `running` run whose process is gone says so (schema permitting)
        mark_abandoned(get_engine(s.database_url), runs_dir=s.runs_dir)
        hanging = quiet_runs(get_engine(s.database_url), s.runs_dir)  # alive, but silent for an hour
    champion = champion_summary(s)
    runs = scoring_runs(s, limit=1)
    run = runs[0] if runs else None
    rows = list(query_predictions(s, limit=args.rows, latest=True))
    try:  # holdout images whose label is in doubt: its metrics still count them under the holdout label
        contested = [c["sha256"] for c in holdout_contested(s)]
    except BCCError:  # no readable holdout: nothing to say about it here
        contested = []
    from ..destinations import destination_lost

    # a folder every run refuses (a copied home, another disk at archive/): said here too, not only by runs
    refused = [
        why
        for folder in (s.archive_dir, s.quarantine_dir, s.dataset_dir)
        if (why := destination_lost(s, folder, look_only=True)) is not None
    ]
    payload = {
        "champion": champion,
        "last_scoring_run": run,
        "latest_predictions": rows,
        "contested_holdout": contested,
        "refused_folders": refused,
        "silent_runs": hanging,
    }

    def human() -> None:
        if champion is None:
            print("champion        none yet (run bcc_retrain or `bcc train`)")
        else:
            temp = (
                "uncalibrated"
                if champion["temperature"] is None
                else f"temperature {champion['temperature']:.3f}"
            )
            print(
                f"champion        {champion['version']}  ({champion['profile']} profile, "
                f"{champion['image_size']}px, threshold {champion['threshold']:.4f}, {temp}, "
                f"{champion['n_train']} train / {champion['n_val']} validation images)"
            )
            lines = holdout_lines(champion["intervals"]) or ["no holdout metrics recorded"]
            print("holdout         " + "\n                ".join(lines))
            print("plots           " + ("\n                ".join(champion["plots"]) or "none"))
        if contested:
            print(
                f"holdout         WARNING: {len(contested)} image(s) of the frozen holdout have a contested "
                "label (`bcc holdout show`; `bcc holdout withdraw --contested --reason ...`)"
            )
        for why in refused:
            print(f"folders         WARNING: {one_line(why)}")
        for why in hanging:
            print(f"scoring         WARNING: {why}")
        if run is None:
            print("last scoring    none yet (drop images into the inbox, run bcc_score or `bcc score`)")
        else:
            c = run["counts"] or {}
            # no precision: nothing was scored (an empty run), or it is not known (an older record)
            precision = c.get("precision") or ("-" if not c.get("scored") else "?")
            how = f", {c['inference']} inference ({precision})" if c.get("inference") else ""
            rare = (
                "missing",
                "taken_by_other_runs",
                "changed",
                "move_failed",
                "recovered",
            )  # when they happened
            print(
                f"last scoring    {one_line(run['run_id'])} ({run['status']}) with {run['model_version']}{how}: "
                + ", ".join(
                    [f"{c.get(k, 0)} {k}" for k in ("scored", "duplicates", "rejected", "ignored", "skipped")]
                    + [f"{c[k]} {k}" for k in rare if c.get(k)]
                )
                + (" so far (from its ledger: the run was not finalized)" if c.get("so_far") else "")
            )
            if run.get("error"):
                print(f"                {one_line(run['error'])}")
        print(f"\nlatest predictions (newest first, {len(rows)} shown; `bcc predictions` for more):")
        print(f"  {'label':9s} {'p(malig)':>8s}  {'model':24s} {'scored_at':19s}  source_path")
        for r in rows:
            print(
                f"  {r['label']:9s} {r['prob_malignant']:8.4f}  {r['model_version']:24s} "
                f"{str(r['scored_at'])[:19]:19s}  {r['source_path']}"
            )

    emit(args, payload, human)
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from ..model import build_classifier, count_params

    s = settings(args)
    net = build_classifier(image_size=s.image_size, base_weights=s.base_weights)
    info = {
        "architecture": "DenseNet201 -> GlobalAveragePooling2D -> Dropout(0.5) -> BatchNormalization "
        "-> Dense(2, softmax)",
        "profile": s.profile,
        "base_weights": s.base_weights,
        "input_shape": [s.image_size, s.image_size, 3],
        **count_params(net),
        "layers": [layer.name for layer in net.layers],
    }
    from ..validation import champion_validations

    info["backend_validations"], table = champion_validations(s)
    emit(
        args,
        info,
        lambda: (
            [print(f"{k:22s} {v}") for k, v in info.items() if k != "backend_validations"] + [print(table)]
        ),
    )
    return 0


def prepare_demo_home(s: Settings) -> None:
    """Set up the demo's home: migrate its database and mark the folder as a BCC home (``.bcc-home``, so
    no deployment ever scores it as an inbox), and generate the demo images into ``landing/`` when there
    is nothing to train on yet."""
    from ..demo_data import generate, patients_for
    from ..store import upgrade

    upgrade(s.database_url, home=s.home)
    # what intake would take in (hidden names, the .bcc-managed marker among them, are never images)
    has_landing = s.landing_dir.is_dir() and any(
        p.is_file() and not p.name.startswith(".") for p in s.landing_dir.rglob("*")
    )
    stored = s.dataset_dir.is_dir() and any(not p.name.startswith(".") for p in s.dataset_dir.iterdir())
    if not has_landing and not stored:
        progress(
            "generating synthetic demo images into landing/ (112 benign, 127 malignant, in patient folders)"
        )
        generate(s.landing_dir, benign=112, malignant=127, size=224, seed=s.seed, groups=patients_for(127))


def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded end-to-end demo: migrate, generate demo images if needed, retrain, print the result."""
    from ..pipelines import retrain

    # settle_seconds=0: the demo writes its own images (atomically), nobody else is writing
    s = load_settings(profile=args.profile or "demo", overrides={"epochs": args.epochs, "settle_seconds": 0})
    apply_umask(s.umask)  # the permission policy (BCC_UMASK) for everything the demo creates
    t0 = time.monotonic()
    progress(f"BCC_HOME={s.home}  database={safe_url(s.database_url)}  profile={s.profile}")
    prepare_demo_home(s)
    r = retrain(s, actor="bcc demo", progress=progress)
    r["wall_seconds"] = round(time.monotonic() - t0, 1)
    emit(args, r, lambda: print_train_summary(r, s))
    return 0


def cmd_validate_backends(args: argparse.Namespace) -> int:
    from ..validation import format_validations, validate_backends

    s = settings(args)  # with the umask applied: the converted-model caches follow it
    r = validate_backends(
        s, args.version, args.backend, reference_only=args.reference_only, progress=progress
    )
    emit(
        args,
        r,
        lambda: print(
            format_validations(r["results"])
            + "".join(f"\n  {b:14s} skipped: {why}" for b, why in r["skipped"].items())
        ),
    )
    return 0


def register(sub: Any, add: Any) -> None:
    sp = add(
        "train", cmd_train, "intake, split, train, evaluate, gate and register a candidate", training=True
    )
    sp.add_argument("--skip-intake", action="store_true", help="train on what is already in the store")
    sp.add_argument("--actor", help="who asked (recorded in the promotion log)")

    add("models", cmd_models, "list model versions with their holdout metrics, intervals and calibration")

    sp = add("model-card", cmd_model_card, "print the model card of a version (markdown)")
    sp.add_argument("version")

    sp = add("promote", cmd_promote, "make a model version the champion by hand")
    sp.add_argument("version")
    add_decision_args(sp, "promotion")

    sp = add("rollback", cmd_rollback, "give the champion role back to the previous champion")
    add_decision_args(sp, "promotion")

    sp = add(
        "status", cmd_status, "champion, its metrics and plots, the last scoring run, newest predictions"
    )
    sp.add_argument("--rows", type=int, default=10, help="how many of the newest predictions to show (10)")

    sp = add(
        "model-info",
        cmd_model_info,
        "build the model and print its architecture and parameter counts",
        profile=True,
    )
    sp.add_argument("--image-size", type=int, help="override the input size in pixels")
    sp.add_argument("--base-weights", help="imagenet | none | PATH")

    sp = add(
        "validate-backends",
        cmd_validate_backends,
        "compare inference back-ends with fp32 Keras on a model version's images and record the results",
    )
    sp.add_argument("version")
    sp.add_argument("--backend", action="append", choices=BACKENDS, help="only this back-end (repeatable)")
    sp.add_argument("--reference-only", action="store_true", help="only the fixed reference tiles (seconds)")

    sp = add(
        "demo",
        cmd_demo,
        "embedded end-to-end demo: demo data → intake → train → evaluate → gate",
        profile=True,
    )
    sp.add_argument("--epochs", type=int, help="override the number of epochs")
