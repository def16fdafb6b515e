"""Retraining as plain functions, one per step, called one by one by the CLI and the Airflow tasks.

Each step takes the settings plus small values (a path, a version id), does its work, and returns
a small JSON-able dict, so an Airflow task can pass it on as an XCom. Each step is safe to retry:
a rerun with the same inputs converges on the same rows and files.

    intake → split → train → evaluate → gate (→ promote)

The gate and approval steps are in :mod:`bcc_pipeline.gating` (re-exported here); what the evaluate
step and the gate share to measure a version is in :mod:`bcc_pipeline.measuring`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from . import __version__, registry
from .config import Settings
from .files import atomic_write, mark_home
from .gating import finish_approval, gate_step  # re-exported: the gate and approval steps live there
from .measuring import holdout_for, read_meta, role_arrays, score_paths, write_holdout_predictions
from .store import ImageRecord, ModelVersion, require_schema, session_scope

__all__ = [
    "code_version",
    "count_new_images",
    "evaluate_step",
    "finish_approval",
    "gate_step",
    "intake_step",
    "retrain",
    "should_retrain",
    "split_step",
    "train_step",
]

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{__version__}+g{sha}" if sha else __version__
    except (OSError, subprocess.SubprocessError):
        return __version__


def intake_step(
    settings: Settings, *, run_id: str | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    from .dataset import intake

    require_schema(settings.database_url)
    mark_home(settings.home)  # the home holds a dataset store now: never scored as an inbox
    return intake(settings, run_id=run_id, progress=progress).as_dict()


def count_new_images(settings: Settings) -> dict[str, Any]:
    """Usable labelled development images (not in the frozen holdout) that arrived after the champion's
    training data cut-off: extending the holdout is not new training data."""
    from .dataset import current_holdout

    require_schema(settings.database_url)
    holdout = current_holdout(settings)
    held = {e["sha256"] for e in holdout.split("holdout")} if holdout is not None else set()
    with session_scope(settings.database_url) as s:
        champ = registry.get_champion(s)
        q = select(ImageRecord.sha256, ImageRecord.first_seen_at).where(
            ImageRecord.label.is_not(None), ImageRecord.excluded_reason.is_(None)
        )
        rows = [r for r in s.execute(q) if r.sha256 not in held]
        cutoff = champ.data_cutoff if champ is not None else None
        if cutoff is not None and cutoff.tzinfo is None:
            cutoff = cutoff.replace(tzinfo=dt.UTC)  # SQLite gives naive UTC back

        def after(t: dt.datetime) -> bool:
            return cutoff is None or (t if t.tzinfo else t.replace(tzinfo=dt.UTC)) > cutoff

        new = sum(1 for r in rows if after(r.first_seen_at))
    return {"new_images": int(new), "total_images": len(rows), "champion": champ.version if champ else None}


def should_retrain(settings: Settings, min_new: int, force: bool = False) -> tuple[bool, str]:
    """Whether a retraining run should train, and why: yes when ``force`` is set or when at least
    ``min_new`` usable labelled images arrived after the champion's data cut-off (every image counts
    while there is no champion)."""
    if isinstance(min_new, bool) or not isinstance(min_new, int) or min_new < 0:
        raise ValueError(f"min_new must be an integer >= 0, got {min_new!r}")
    info = count_new_images(settings)
    new, champion = info["new_images"], info["champion"] or "none yet"
    seen = (
        f"{new} new labelled images since the champion's data (total {info['total_images']}, "
        f"champion {champion})"
    )
    if force:
        return True, f"training (forced): {seen}"
    if new < min_new:
        return False, f"skipping training: {new} < min_new_images={min_new}; {seen}"
    return True, f"training: {new} >= min_new_images={min_new}; {seen}"


def split_step(settings: Settings) -> dict[str, Any]:
    """Make the development manifest (train/validation/calibration) beside the frozen holdout, freezing
    one first when there is none. Returns paths, hashes and counts of all four roles, whether patient
    groups were used, the warnings a reader of the results must see, and the near-duplicates kept out."""
    from .holdout import split_roles
    from .manifests import ROLES

    require_schema(settings.database_url, tables=("holdout_events",))
    r = split_roles(settings)
    m, h = r.development, r.holdout
    counts = {role: dict(v) for role, v in m.doc["counts"].items()}
    counts.setdefault("calibration", {})
    counts["holdout"] = dict(h.doc["counts"]["holdout"]) if h else {}
    role_hashes = {role: m.role_hash(role) for role in ROLES if role != "holdout"}
    role_hashes["holdout"] = h.role_hash("holdout") if h else None
    log.info(
        "split: %d train / %d validation / %d calibration images (development %s); holdout %d images "
        "(frozen %s)%s",
        m.n_train,
        m.n_val,
        m.n("calibration"),
        m.hash[:12],
        h.n("holdout") if h else 0,
        h.hash[:12] if h else "none",
        "" if r.grouped else "; no patient groups",
    )
    for w in r.warnings:
        log.warning("split: %s", w)
    return {
        "manifest_path": str(m.path),
        "manifest_hash": m.hash,
        "holdout_path": str(h.path) if h else None,
        "holdout_hash": h.hash if h else None,
        "n_train": m.n_train,
        "n_val": m.n_val,
        "n_calibration": m.n("calibration"),
        "n_holdout": h.n("holdout") if h else 0,
        "counts": counts,
        "role_hashes": role_hashes,
        "grouped": r.grouped,
        "warnings": list(r.warnings),
        "near_duplicates": r.near_duplicates,
        "holdout_frozen_now": r.holdout_frozen_now,
    }


def train_step(
    settings: Settings,
    manifest_path: str,
    *,
    version: str | None = None,
    progress: Progress | None = None,
    holdout_path: str | None = None,
) -> dict[str, Any]:
    """Train a candidate on the manifest's training side (validation picks the epoch); write
    ``models/<version>/`` with the lineage and the holdout it will be measured on.

    Nothing is registered yet: :func:`evaluate_step` registers the candidate with its threshold.
    """
    from . import dataset, lineage, model, training
    from .images import PREPROCESSING_ID

    progress = progress or log.info
    version = version or registry.new_version_id()
    manifest = dataset.load_manifest(manifest_path)
    holdout = dataset.load_manifest(holdout_path) if holdout_path else dataset.current_holdout(settings)
    train_paths, train_labels = dataset.manifest_arrays(manifest, "train")
    val_paths, val_labels = dataset.manifest_arrays(manifest, "validation")
    out = settings.models_dir / version
    mark_home(settings.home)  # the home holds models now: never scored as an inbox
    progress(
        f"training {version}: {len(train_paths)} train / {len(val_paths)} validation images, "
        f"{settings.image_size}px, {settings.epochs} epochs, base weights {settings.base_weights}"
    )

    resolved = model.resolve_base_weights(settings.base_weights)
    weights_file = (
        str(model.keras_cache_dir() / model.IMAGENET_WEIGHTS_FILE) if resolved == "imagenet" else resolved
    )
    net = model.build_classifier(
        image_size=settings.image_size, base_weights=settings.base_weights, seed=settings.seed
    )
    common = {
        "image_size": settings.image_size,
        "batch_size": settings.batch_size,
        "max_pixels": settings.max_pixels,
        "min_side": settings.min_side,
    }
    train_ds = dataset.make_dataset(train_paths, train_labels, training=True, seed=settings.seed, **common)
    val_ds = dataset.make_dataset(val_paths, val_labels, **common)
    recalibrate = settings.bn_recalibration == "on" or (
        settings.bn_recalibration == "auto" and settings.from_scratch
    )
    recal_ds = dataset.make_dataset(train_paths, None, **common) if recalibrate else None
    steps = -(-len(train_paths) // settings.batch_size)
    result = training.fit(
        net,
        train_ds,
        val_ds,
        epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        workdir=out,
        recalibration_ds=recal_ds,
        steps_per_epoch=steps,
        progress=progress,
    )
    hashes = {role: manifest.role_hash(role) for role in ("train", "validation", "calibration")}
    hashes["holdout"] = holdout.role_hash("holdout") if holdout is not None else None
    meta = {
        "version": version,
        "architecture": "DenseNet201+GAP+Dropout(0.5)+BN+Dense(2,softmax)",
        "class_names": list(model.CLASS_NAMES),
        "preprocessing": PREPROCESSING_ID,
        "image_size": settings.image_size,
        "hyperparameters": settings.training_params(),
        "manifest_hash": manifest.hash,
        "manifest_path": str(manifest.path),
        "data_cutoff": manifest.data_cutoff,
        "holdout_path": str(holdout.path) if holdout is not None else None,
        "n_train": len(train_paths),
        "n_val": len(val_paths),
        "best_epoch": result.best_epoch,
        "bn_recalibrated": result.recalibrated,
        "train_seconds": round(result.seconds, 1),
        "code_version": code_version(),
        **model.count_params(net),
        "lineage": lineage.lineage(
            role_hashes=hashes,
            base_weights=settings.base_weights,
            base_weights_path=weights_file,
            model_name=net.name,
        ),
    }
    path, digest = model.save_artifact(net, out, meta)
    (out / "best.weights.h5").unlink(missing_ok=True)  # the artifact holds the same weights
    return {
        "version": version,
        "model_dir": str(out),
        "artifact_sha256": digest,
        "best_epoch": result.best_epoch,
        "train_seconds": round(result.seconds, 1),
    }


def evaluate_step(settings: Settings, version: str, *, progress: Progress | None = None) -> dict[str, Any]:
    """Fit the temperature and choose the threshold on the calibration split, measure the version on
    the frozen holdout (intervals, calibration before/after, plots), register the candidate."""
    from . import evaluation, model, model_card, plots, stats
    from .dataset import load_manifest

    progress = progress or log.info
    model_dir = settings.models_dir / version
    meta = read_meta(model_dir)
    net = model.load_artifact(model_dir / "model.keras", meta["artifact_sha256"])
    manifest = load_manifest(meta["manifest_path"])
    holdout = holdout_for(settings, meta)
    size, seed = int(meta["image_size"]), settings.seed

    cal_paths, cal_labels = role_arrays(manifest, "calibration")
    raw_cal = score_paths(settings, net, cal_paths, size)
    temperature = stats.fit_temperature(cal_labels, raw_cal)
    cal_probs = stats.calibrate(raw_cal, temperature)
    choice = evaluation.threshold_choice(
        cal_labels, cal_probs, target_sensitivity=settings.target_sensitivity
    )
    threshold = float(choice["threshold"])

    results: dict[str, dict[str, float]] = {}
    results["calibration"] = evaluation.compute_metrics(cal_labels, cal_probs, threshold=threshold)
    val_paths, val_labels = role_arrays(manifest, "validation")
    results["validation"] = evaluation.compute_metrics(
        val_labels,
        stats.calibrate(score_paths(settings, net, val_paths, size), temperature),
        threshold=threshold,
    )
    hold_paths, hold_labels = role_arrays(holdout, "holdout")
    raw_hold = score_paths(settings, net, hold_paths, size)
    hold_probs = stats.calibrate(raw_hold, temperature)
    results["holdout"] = evaluation.compute_metrics(hold_labels, hold_probs, threshold=threshold)
    before = evaluation.compute_metrics(hold_labels, raw_hold, threshold=threshold)
    for name in ("ece", "brier", "log_loss"):
        results["holdout"][f"{name}_uncalibrated"] = before[name]
    intervals = stats.metric_intervals(hold_labels, hold_probs, threshold, seed=seed)
    history = json.loads((model_dir / "history.json").read_text())
    plot_paths = plots.plot_all(
        history=history,
        y_true=hold_labels,
        prob_malignant=hold_probs,
        threshold=threshold,
        out_dir=model_dir / "plots",
        uncalibrated=raw_hold,
    )
    write_holdout_predictions(model_dir, holdout.split("holdout"), raw_hold, hold_probs)
    operating_point = {
        **choice,
        "chosen_on": "calibration",
        "calibrated": True,
        "holdout_sensitivity": intervals["sensitivity"].as_dict(),
        "holdout_specificity": intervals["specificity"].as_dict(),
    }
    at_bound = min(abs(temperature - b) for b in stats.TEMPERATURE_BOUNDS) < 1e-3
    calibration = {
        "method": "temperature scaling",
        "temperature": temperature,
        "fitted_on": "calibration",
        "at_search_bound": at_bound,
        "n_calibration": len(cal_labels),
        "holdout_n": len(hold_labels),
        **{
            f"{m}_{w}": results["holdout"][m + ("_uncalibrated" if w == "before" else "")]
            for m in ("ece", "brier")
            for w in ("before", "after")
        },
    }
    meta.update(
        threshold=threshold,
        temperature=temperature,
        operating_point=operating_point,
        calibration=calibration,
        metrics=results,
        bootstrap_seed=seed,
        holdout_intervals={k: v.as_dict() for k, v in intervals.items()},
    )
    meta["lineage"] = {
        **meta.get("lineage", {}),
        "manifests": {
            **meta.get("lineage", {}).get("manifests", {}),
            "holdout": holdout.role_hash("holdout"),
        },
    }
    # atomically: metadata.json holds the artifact's checksum, the only proof the model is intact
    atomic_write(model_dir / "metadata.json", json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")

    cutoff = dt.datetime.fromisoformat(meta["data_cutoff"]) if meta.get("data_cutoff") else None
    with session_scope(settings.database_url) as s:
        mv = s.get(ModelVersion, version)
        if mv is None:
            mv = ModelVersion(version=version, status="candidate")
            s.add(mv)
        mv.artifact_path = str(model_dir / "model.keras")
        mv.artifact_sha256 = meta["artifact_sha256"]
        mv.base_weights = meta["hyperparameters"]["base_weights"]
        mv.profile = meta["hyperparameters"]["profile"]
        mv.image_size = size
        mv.preprocessing = meta["preprocessing"]
        mv.hyperparameters = meta["hyperparameters"]
        mv.manifest_hash = meta["manifest_hash"]
        mv.n_train, mv.n_val = meta["n_train"], meta["n_val"]
        mv.threshold = threshold
        mv.temperature = temperature
        mv.operating_point = operating_point
        mv.lineage = meta["lineage"]
        mv.code_version = meta["code_version"]
        mv.data_cutoff = cutoff
        mv.plots_dir = str(model_dir / "plots")
        s.flush()
        for split, values in results.items():
            registry.save_metrics(s, version, split, values, intervals if split == "holdout" else None)
    shown = {k: v.as_dict() for k, v in intervals.items()}
    progress(
        f"evaluated {version}: temperature {temperature:.3f} and threshold {threshold:.4f} (target "
        f"sensitivity {choice['target']}, between {model_card.format_between(choice['between'])}) chosen on {len(cal_labels)} "
        f"calibration images"
    )
    for line in model_card.holdout_lines(shown, calibration):
        progress(line)
    model_card.write(settings, version)
    return {
        "version": version,
        "threshold": threshold,
        "temperature": temperature,
        "operating_point": operating_point,
        "calibration": calibration,
        "holdout": results["holdout"],
        "intervals": shown,
        "validation": results["validation"],
        "plots": plot_paths,
    }


def retrain(
    settings: Settings,
    *,
    actor: str | None = None,
    progress: Progress | None = None,
    skip_intake: bool = False,
) -> dict[str, Any]:
    """The whole retraining job: intake → split → train → evaluate → gate. Returns a summary."""
    progress = progress or log.info
    t0 = time.monotonic()
    summary: dict[str, Any] = {}
    if not skip_intake:
        summary["intake"] = intake_step(settings, progress=progress)
    summary["split"] = split_step(settings)
    manifest_path = summary["split"]["manifest_path"]
    summary["train"] = train_step(
        settings, manifest_path, progress=progress, holdout_path=summary["split"].get("holdout_path")
    )
    version = summary["train"]["version"]
    summary["evaluation"] = evaluate_step(settings, version, progress=progress)
    summary["gate"] = gate_step(settings, version, actor=actor, progress=progress)
    summary["gate"].pop("markdown", None)
    summary["version"] = version
    summary["seconds"] = round(time.monotonic() - t0, 1)
    return summary
