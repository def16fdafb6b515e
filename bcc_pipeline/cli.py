"""``bcc``: the command line. Each command calls the same library functions the Airflow tasks call.

Every reporting command takes ``--json`` (one JSON document on stdout); progress goes to stderr.
Errors exit non-zero with a one-line message (``BCC_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from .cli_data import add_data_commands
from .config import (
    BACKENDS,
    DEFAULTS,
    INFERENCE_CHOICES,
    PROFILES,
    SETTINGS,
    Settings,
    load_settings,
    markdown_table,
)
from .errors import BCCError, StoreError
from .files import apply_umask, one_line
from .store import safe_url

__all__ = ["main"]

log = logging.getLogger("bcc_pipeline.cli")


def _emit(args: argparse.Namespace, payload: Any, human: Callable[[], None] | str) -> None:
    if getattr(args, "json", False):
        json.dump(payload, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    elif callable(human):
        human()
    else:
        print(human)


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "epochs": getattr(args, "epochs", None),
        "image_size": getattr(args, "image_size", None),
        "base_weights": getattr(args, "base_weights", None),
        "batch_size": getattr(args, "batch_size", None),
        "seed": getattr(args, "seed", None),
    }
    settings = load_settings(profile=getattr(args, "profile", None), overrides=overrides)
    apply_umask(settings.umask)  # the permission policy, for everything this command creates
    return settings


def _progress(msg: str) -> None:
    log.info(msg)


# -- commands ---------------------------------------------------------------------------------
def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from .store import upgrade

    s = _settings(args)
    rev = upgrade(s.database_url, home=s.home)
    _emit(args, {"database": safe_url(s.database_url), "revision": rev},
          f"database {safe_url(s.database_url)} is at revision {rev}")
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    from .store import current_revision

    s = _settings(args)
    rev = current_revision(s.database_url)
    _emit(args, {"database": safe_url(s.database_url), "revision": rev},
          f"database {safe_url(s.database_url)} is at revision {rev or '(none: run `bcc db upgrade`)'}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    s = _settings(args)
    data = s.as_dict()
    data["database_url"] = safe_url(s.database_url)

    def human() -> None:
        for k, v in data.items():
            print(f"{k:22s} {v}  ({s.sources.get(k, 'default')}, {SETTINGS[k].env})")

    _emit(args, {"settings": data, "sources": dict(s.sources),
                 "env": {k: spec.env for k, spec in SETTINGS.items()}}, human)
    return 0


def cmd_intake(args: argparse.Namespace) -> int:
    from .pipelines import intake_step

    s = _settings(args)
    r = intake_step(s, progress=_progress)

    def human() -> None:
        print(f"intake {r['run_id']}: {r['accepted']} accepted, {r['duplicates']} duplicates, "
              f"{r['conflicts']} label conflicts, {r['rejected']} rejected, {r['ignored']} ignored, "
              f"{r['skipped']} still being written")
        if r["recovered"]:
            print(f"  finished {r['recovered']} quarantine move(s) of interrupted runs")
        for rej in r["rejections"]:
            print(f"  rejected {rej['path']}: {rej['reason']}")
        for f in r["failed"]:
            print(f"  left in landing {f['path']}: {f['error']}")

    _emit(args, r, human)
    return 0


def _print_train_summary(r: dict[str, Any], s: Settings) -> None:
    from .model_card import holdout_lines

    ev, gate = r["evaluation"], r["gate"]
    v, op = ev["holdout"], ev["operating_point"]
    print(f"model version   {r['version']}  ({gate['decision']}; champion now {gate['champion']})")
    print(f"gate            {gate['rule']}")
    print(f"                {gate['reason']}")
    print(f"threshold       {ev['threshold']:.4f}  (target sensitivity {op['target']} on {op['n']} calibration "
          f"images, midway between {op['between']})")
    print(f"calibration     temperature {ev['temperature']:.3f}")
    print("holdout         " + "\n                ".join(holdout_lines(ev["intervals"], ev["calibration"])))
    print(f"confusion       TP {v['tp']:.0f}  FP {v['fp']:.0f}  TN {v['tn']:.0f}  FN {v['fn']:.0f}  "
          f"(holdout n={v['n']:.0f}; {r['split']['n_train']} train images)")
    for warning in r["split"].get("warnings", []):
        print(f"warning         {warning}")
    print("plots           " + "\n                ".join(ev["plots"].values()))
    print(f"model card      {s.models_dir / r['version'] / 'model_card.md'}")
    print(f"took            {r['seconds']:.0f}s")


def cmd_train(args: argparse.Namespace) -> int:
    from .pipelines import retrain

    s = _settings(args)
    from .store import require_schema

    require_schema(s.database_url)
    r = retrain(s, actor=args.actor, progress=_progress, skip_intake=args.skip_intake)
    _emit(args, r, lambda: _print_train_summary(r, s))
    return 0


def _version_rows(s: Settings) -> list[dict[str, Any]]:
    from .overview import model_versions
    from .validation import validated_summary

    return [{**{k: v for k, v in row.items() if k not in ("metrics", "plots")},
             "backends_validated_here": validated_summary(s, row["version"])} for row in model_versions(s)]


def cmd_models(args: argparse.Namespace) -> int:
    s = _settings(args)
    rows = _version_rows(s)

    def human() -> None:
        if not rows:
            print("no model versions yet; run `bcc train`")
            return
        print("holdout metrics with 95% intervals (exact for proportions, bootstrap for AUC); T = temperature")
        print(f"{'version':26s} {'status':10s} {'px':>4s} {'sensitivity':>24s} {'specificity':>24s} "
              f"{'ROC AUC':>18s} {'thr':>6s} {'T':>6s}  {'holdout':12s}  validated back-ends (this CPU class)")
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
            print(f"{r['version']:26s} {r['status']:10s} {r['image_size']:4d} {f('sensitivity'):>24s} "
                  f"{f('specificity'):>24s} {f('roc_auc'):>18s} {r['threshold']:6.3f} {temp:>6s}  {hold[:12]:12s}  "
                  f"{r['backends_validated_here']}")

    _emit(args, rows, human)
    return 0


def cmd_model_card(args: argparse.Namespace) -> int:
    from .model_card import render
    from .store import require_schema

    s = _settings(args)
    require_schema(s.database_url)
    card = render(s, args.version)
    _emit(args, {"version": args.version, "markdown": card}, lambda: sys.stdout.write(card))
    return 0


def _decision(row: Any) -> dict[str, Any]:
    """A promotions row as the promote/rollback commands report it."""
    return {"decision": row.decision, "from_version": row.from_version, "to_version": row.to_version,
            "actor": row.actor, "reason": row.reason, "decided_at": row.decided_at.isoformat()}


def cmd_promote(args: argparse.Namespace) -> int:
    from .registry import default_actor, promote
    from .store import require_schema, session_scope

    s = _settings(args)
    require_schema(s.database_url)
    with session_scope(s.database_url) as session:
        row = promote(session, args.version, actor=args.actor or default_actor(), reason=args.reason)
        out = _decision(row)
    from .validation import validate_published

    out["backends"] = validate_published(s, args.version, progress=_progress)
    _emit(args, out, f"{out['to_version']} is now the champion (was {out['from_version'] or 'none'}); validated "
                     f"back-ends here: {', '.join(out['backends']['validated']) or 'none (fp32 Keras scores)'}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from .registry import default_actor, rollback
    from .store import require_schema, session_scope

    s = _settings(args)
    require_schema(s.database_url)
    with session_scope(s.database_url) as session:
        row = rollback(session, actor=args.actor or default_actor(), reason=args.reason)
        out = _decision(row)
    _emit(args, out, f"rolled back: {out['to_version']} is the champion again ({out['from_version']} retired)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Champion with its metrics and plots, the last scoring run, the newest predictions."""
    from .model_card import holdout_lines
    from .overview import champion_summary, scoring_runs
    from .predictions import query_predictions
    from .scoring import mark_abandoned
    from .store import get_engine

    s = _settings(args)
    with contextlib.suppress(StoreError):  # a `running` run whose process is gone says so (schema permitting)
        mark_abandoned(get_engine(s.database_url))
    champion = champion_summary(s)
    runs = scoring_runs(s, limit=1)
    run = runs[0] if runs else None
    rows = list(query_predictions(s, limit=args.rows, latest=True))
    payload = {"champion": champion, "last_scoring_run": run, "latest_predictions": rows}

    def human() -> None:
        if champion is None:
            print("champion        none yet (run bcc_retrain or `bcc train`)")
        else:
            temp = "uncalibrated" if champion["temperature"] is None else f"temperature {champion['temperature']:.3f}"
            print(f"champion        {champion['version']}  ({champion['profile']} profile, "
                  f"{champion['image_size']}px, threshold {champion['threshold']:.4f}, {temp}, "
                  f"{champion['n_train']} train / {champion['n_val']} validation images)")
            lines = holdout_lines(champion["intervals"]) or ["no holdout metrics recorded"]
            print("holdout         " + "\n                ".join(lines))
            print("plots           " + ("\n                ".join(champion["plots"]) or "none"))
        if run is None:
            print("last scoring    none yet (drop images into the inbox, run bcc_score or `bcc score`)")
        else:
            c = run["counts"] or {}
            how = f", {c['inference']} inference ({c.get('precision') or '?'})" if c.get("inference") else ""
            print(f"last scoring    {run['run_id']} ({run['status']}) with {run['model_version']}{how}: "
                  + ", ".join(f"{c.get(k, 0)} {k}" for k in ("scored", "duplicates", "rejected", "ignored", "skipped")))
            if run.get("error"):
                print(f"                {one_line(run['error'])}")
        print(f"\nlatest predictions (newest first, {len(rows)} shown; `bcc predictions` for more):")
        print(f"  {'label':9s} {'p(malig)':>8s}  {'model':24s} {'scored_at':19s}  source_path")
        for r in rows:
            print(f"  {r['label']:9s} {r['prob_malignant']:8.4f}  {r['model_version']:24s} "
                  f"{str(r['scored_at'])[:19]:19s}  {r['source_path']}")

    _emit(args, payload, human)
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from .model import build_classifier, count_params

    s = _settings(args)
    net = build_classifier(image_size=s.image_size, base_weights=s.base_weights)
    info = {"architecture": "DenseNet201 -> GlobalAveragePooling2D -> Dropout(0.5) -> BatchNormalization "
                            "-> Dense(2, softmax)",
            "profile": s.profile, "base_weights": s.base_weights,
            "input_shape": [s.image_size, s.image_size, 3], **count_params(net),
            "layers": [layer.name for layer in net.layers]}
    from .validation import champion_validations

    info["backend_validations"], table = champion_validations(s)
    _emit(args, info, lambda: [print(f"{k:22s} {v}") for k, v in info.items() if k != "backend_validations"]
          + [print(table)])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded end-to-end demo: migrate, generate demo images if needed, retrain, print the result."""
    from .demo_data import generate, patients_for
    from .pipelines import retrain
    from .store import upgrade

    # settle_seconds=0: the demo writes its own images (atomically), nobody else is writing
    s = load_settings(profile=args.profile or "demo", overrides={"epochs": args.epochs, "settle_seconds": 0})
    t0 = time.monotonic()
    _progress(f"BCC_HOME={s.home}  database={safe_url(s.database_url)}  profile={s.profile}")
    upgrade(s.database_url)
    has_landing = s.landing_dir.is_dir() and any(p.is_file() for p in s.landing_dir.rglob("*"))
    if not has_landing and not (s.dataset_dir.is_dir() and any(s.dataset_dir.iterdir())):
        _progress("generating synthetic demo images into landing/ (112 benign, 127 malignant, in patient folders)")
        generate(s.landing_dir, benign=112, malignant=127, size=224, seed=s.seed, groups=patients_for(127))
    r = retrain(s, actor="bcc demo", progress=_progress)
    r["wall_seconds"] = round(time.monotonic() - t0, 1)
    _emit(args, r, lambda: _print_train_summary(r, s))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .scoring import score_inbox
    from .store import require_schema

    s = load_settings(overrides={"score_batch_size": args.score_batch_size,
                                 "settle_seconds": args.settle_seconds, "inference": args.inference})
    require_schema(s.database_url)
    r = score_inbox(s, inbox=args.inbox, run_id=args.run_id, progress=_progress,
                    force_unvalidated=args.force_unvalidated)

    def human() -> None:
        print(f"scoring run {r['run_id']} with {r['model_version']} ({r['inference']}, {r['precision']}; "
              f"{r['rescored_fp32']} re-scored in fp32 near the threshold): {r['scored']} scored, "
              f"{r['duplicates']} duplicates, {r['rejected']} rejected, {r['ignored']} ignored, "
              f"{r['skipped']} still being written ({r['images_per_second']} images/s, {r['seconds']}s)")
        for rej in r["rejections"]:
            print(f"  rejected {rej['path']}: {rej['reason']}")
        for f in r["move_failures"]:
            print(f"  NOT MOVED {f['path']}: {f['error']}")
        print(f"archive: {r['archive_dir']}\nquarantine: {r['quarantine_dir']}")

    _emit(args, r, human)
    if r["persistent_move_failures"]:
        paths = ", ".join(f["path"] for f in r["persistent_move_failures"][:10])
        print(f"bcc: error: {len(r['persistent_move_failures'])} file(s) could not be moved in more than one run "
              f"and are still in the inbox: {paths}", file=sys.stderr)
        return 1
    if r["move_failed"]:
        print(f"bcc: warning: {r['move_failed']} file(s) could not be moved and are still in the inbox "
              "(listed under move_failures); the next run tries again", file=sys.stderr)
    return 0


def cmd_validate_backends(args: argparse.Namespace) -> int:
    from .validation import format_validations, validate_backends

    s = load_settings()
    r = validate_backends(s, args.version, args.backend, reference_only=args.reference_only, progress=_progress)
    _emit(args, r, lambda: print(format_validations(r["results"]) + "".join(
        f"\n  {b:14s} skipped: {why}" for b, why in r["skipped"].items())))
    return 0


def cmd_predictions(args: argparse.Namespace) -> int:
    import csv

    from .predictions import PREDICTION_FIELDS, parse_since, query_predictions

    s = load_settings()
    fmt = "json" if args.json else args.format
    limit = args.limit if args.limit is not None else (100 if fmt == "table" else None)
    rows = query_predictions(s, since=parse_since(args.since) if args.since else None, label=args.label,
                             model_version=args.model_version, limit=limit, latest=args.latest)
    out = sys.stdout
    if fmt == "json":
        out.write("[")
        for n, row in enumerate(rows):
            out.write(("," if n else "") + "\n  " + json.dumps(row))
        out.write("\n]\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(PREDICTION_FIELDS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        n = 0
        for n, row in enumerate(rows, 1):
            if n == 1:
                print(f"{'scored_at (UTC)':19s}  {'label':9s} {'p_malig':>7s}  {'model_version':26s} "
                      f"{'sha256':12s}  {'back-end':19s} source_path")
            how = f"{row['backend'] or '-'}/{row['precision'] or '-'}"
            print(f"{row['scored_at'][:19]:19s}  {row['label']:9s} {row['prob_malignant']:7.4f}  "
                  f"{row['model_version']:26s} {row['sha256'][:12]:12s}  {how:19s} {row['source_path']}")
        if n == 0:
            print("no predictions match")
        elif limit is not None and n == limit:
            print(f"(first {limit}; --limit N for more, --format csv|json for all)", file=sys.stderr)
    return 0


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bcc", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, *, json_flag: bool = True,
            profile: bool = False, training: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print one JSON document")
        if profile or training:
            sp.add_argument("--profile", choices=list(PROFILES), help="named settings profile (default: "
                            "BCC_PROFILE or seed)")
        if training:
            sp.add_argument("--epochs", type=int, help="override the number of epochs")
            sp.add_argument("--image-size", type=int, help="override the input size in pixels")
            sp.add_argument("--base-weights", help="imagenet | none | PATH to a weights file")
            sp.add_argument("--batch-size", type=int, help="override the batch size")
            sp.add_argument("--seed", type=int, help="override the random seed")
        return sp

    db = sub.add_parser("db", help="project database schema")
    dbsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = dbsub.add_parser("upgrade", help="apply migrations up to the newest schema")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=cmd_db_upgrade)
    cur = dbsub.add_parser("current", help="show the schema revision")
    cur.add_argument("--json", action="store_true")
    cur.set_defaults(func=cmd_db_current)

    sp = add("config", cmd_config, "show the effective settings and where each came from", profile=True)
    sp.add_argument("--markdown", action="store_true", help="print the README's table of all settings")

    add_data_commands(sub, add)

    add("intake", cmd_intake, "take labelled images from landing/ into the dataset store")

    sp = add("train", cmd_train, "intake, split, train, evaluate, gate and register a candidate", training=True)
    sp.add_argument("--skip-intake", action="store_true", help="train on what is already in the store")
    sp.add_argument("--actor", help="who asked (recorded in the promotion log)")

    add("models", cmd_models, "list model versions with their holdout metrics, intervals and calibration")

    sp = add("model-card", cmd_model_card, "print the model card of a version (markdown)")
    sp.add_argument("version")

    sp = add("promote", cmd_promote, "make a model version the champion by hand")
    sp.add_argument("version")
    sp.add_argument("--reason", required=True, help="why (recorded in the promotion log)")
    sp.add_argument("--actor", help="who (default: user@host)")

    sp = add("rollback", cmd_rollback, "give the champion role back to the previous champion")
    sp.add_argument("--reason", required=True, help="why (recorded in the promotion log)")
    sp.add_argument("--actor", help="who (default: user@host)")

    sp = add("status", cmd_status, "champion, its metrics and plots, the last scoring run, newest predictions")
    sp.add_argument("--rows", type=int, default=10, help="how many of the newest predictions to show (10)")

    sp = add("model-info", cmd_model_info, "build the model and print its architecture and parameter counts",
             profile=True)
    sp.add_argument("--image-size", type=int, help="override the input size in pixels")
    sp.add_argument("--base-weights", help="imagenet | none | PATH")

    sp = add("score", cmd_score, "score every image in the inbox with the champion (batch scoring)")
    sp.add_argument("--inbox", help="folder to score (default: $BCC_HOME/inbox)")
    sp.add_argument("--batch-size", dest="score_batch_size", type=int,
                    help=f"inference batch size (default: BCC_SCORE_BATCH_SIZE or {DEFAULTS['score_batch_size']})")
    sp.add_argument("--settle-seconds", type=float,
                    help="leave files modified more recently than this for the next run (BCC_SETTLE_SECONDS)")
    sp.add_argument("--run-id", help="run id (default: a new one); the id of an interrupted run finishes it")
    sp.add_argument("--inference", choices=INFERENCE_CHOICES,
                    help=f"inference back-end (default: BCC_INFERENCE or {DEFAULTS['inference']}; see the README's "
                    "Benchmarks)")
    sp.add_argument("--force-unvalidated", action="store_true",
                    help="score with --inference even where it is not validated for the champion (recorded)")

    sp = add("validate-backends", cmd_validate_backends,
             "compare inference back-ends with fp32 Keras on a model version's images and record the results")
    sp.add_argument("version")
    sp.add_argument("--backend", action="append", choices=BACKENDS, help="only this back-end (repeatable)")
    sp.add_argument("--reference-only", action="store_true", help="only the fixed reference tiles (seconds)")

    sp = add("predictions", cmd_predictions, "list stored predictions, newest first")
    sp.add_argument("--format", choices=("table", "csv", "json"), default="table",
                    help="table (default, first 100 rows), csv or json (all rows unless --limit)")
    sp.add_argument("--since", help="only predictions scored at or after: ISO date/time (UTC unless a zone "
                    "is given) or an age such as 12h, 7d")
    sp.add_argument("--label", choices=("benign", "malignant"))
    sp.add_argument("--model-version", help="only predictions of this model version")
    sp.add_argument("--limit", type=int, help="at most N rows")
    sp.add_argument("--latest", action="store_true",
                    help="only the newest prediction per image (the latest_predictions view)")

    sp = add("demo", cmd_demo, "embedded end-to-end demo: demo data → intake → train → evaluate → gate",
             profile=True)
    sp.add_argument("--epochs", type=int, help="override the number of epochs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "tensorflow", "h5py", "alembic", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except BCCError as exc:
        if os.environ.get("BCC_DEBUG"):
            traceback.print_exc()
        print(f"bcc: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bcc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for people, the traceback on request
        if os.environ.get("BCC_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"bcc: unexpected error: {type(exc).__name__}: {msg} (set BCC_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
