"""Retraining as plain functions, one per step, called one by one by the CLI and the Airflow tasks.

Each step takes the settings plus small values (a path, a version id), does its work, and returns
a small JSON-able dict, so an Airflow task can pass it on as an XCom. Each step is safe to retry:
a rerun with the same inputs converges on the same rows and files.

    intake → split → train → evaluate → gate (→ promote)
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

from sqlalchemy import func, select

from . import __version__, registry
from .config import Settings
from .errors import ArtifactError, DatasetError
from .files import atomic_write
from .store import ImageRecord, ModelVersion, require_schema, session_scope

__all__ = [
    "code_version",
    "count_new_images",
    "evaluate_step",
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
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return f"{__version__}+g{sha}" if sha else __version__
    except (OSError, subprocess.SubprocessError):
        return __version__


def intake_step(settings: Settings, *, run_id: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    from .dataset import intake

    require_schema(settings.database_url)
    return intake(settings, run_id=run_id, progress=progress).as_dict()


def count_new_images(settings: Settings) -> dict[str, Any]:
    """Usable labelled images that arrived after the champion's training data cut-off."""
    require_schema(settings.database_url)
    with session_scope(settings.database_url) as s:
        champ = registry.get_champion(s)
        q = select(func.count()).select_from(ImageRecord).where(
            ImageRecord.label.is_not(None), ImageRecord.excluded_reason.is_(None))
        total = s.scalar(q) or 0
        if champ is not None and champ.data_cutoff is not None:
            q = q.where(ImageRecord.first_seen_at > champ.data_cutoff)
        new = s.scalar(q) or 0
    return {"new_images": int(new), "total_images": int(total),
            "champion": champ.version if champ else None}


def should_retrain(settings: Settings, min_new: int, force: bool = False) -> tuple[bool, str]:
    """Whether a retraining run should train, and why: yes when ``force`` is set or when at least
    ``min_new`` usable labelled images arrived after the champion's data cut-off (every image counts
    while there is no champion)."""
    if isinstance(min_new, bool) or not isinstance(min_new, int) or min_new < 0:
        raise ValueError(f"min_new must be an integer >= 0, got {min_new!r}")
    info = count_new_images(settings)
    new, champion = info["new_images"], info["champion"] or "none yet"
    seen = (f"{new} new labelled images since the champion's data (total {info['total_images']}, "
            f"champion {champion})")
    if force:
        return True, f"training (forced): {seen}"
    if new < min_new:
        return False, f"skipping training: {new} < min_new_images={min_new}; {seen}"
    return True, f"training: {new} >= min_new_images={min_new}; {seen}"


def split_step(settings: Settings) -> dict[str, Any]:
    from .dataset import prepare_split

    require_schema(settings.database_url)
    m = prepare_split(settings)
    counts = json.loads(m.path.read_text())["counts"]
    return {"manifest_path": str(m.path), "manifest_hash": m.hash, "n_train": m.n_train, "n_val": m.n_val,
            "counts": counts}


def train_step(settings: Settings, manifest_path: str, *, version: str | None = None,
               progress: Progress | None = None) -> dict[str, Any]:
    """Train a candidate on the manifest's training side; write ``models/<version>/``.

    Nothing is registered yet: :func:`evaluate_step` registers the candidate with its threshold.
    """
    from . import dataset, model, training
    from .images import PREPROCESSING_ID

    progress = progress or log.info
    version = version or registry.new_version_id()
    manifest = dataset.load_manifest(manifest_path)
    train_paths, train_labels = dataset.manifest_arrays(manifest, "train")
    val_paths, val_labels = dataset.manifest_arrays(manifest, "validation")
    out = settings.models_dir / version
    progress(f"training {version}: {len(train_paths)} train / {len(val_paths)} validation images, "
             f"{settings.image_size}px, {settings.epochs} epochs, base weights {settings.base_weights}")

    net = model.build_classifier(image_size=settings.image_size, base_weights=settings.base_weights,
                                 seed=settings.seed)
    common = {"image_size": settings.image_size, "batch_size": settings.batch_size,
              "max_pixels": settings.max_pixels, "min_side": settings.min_side}
    train_ds = dataset.make_dataset(train_paths, train_labels, training=True, seed=settings.seed, **common)
    val_ds = dataset.make_dataset(val_paths, val_labels, **common)
    recalibrate = settings.bn_recalibration == "on" or (settings.bn_recalibration == "auto" and settings.from_scratch)
    recal_ds = dataset.make_dataset(train_paths, None, **common) if recalibrate else None
    steps = -(-len(train_paths) // settings.batch_size)
    result = training.fit(net, train_ds, val_ds, epochs=settings.epochs, learning_rate=settings.learning_rate,
                          workdir=out, recalibration_ds=recal_ds, steps_per_epoch=steps, progress=progress)
    meta = {
        "version": version, "architecture": "DenseNet201+GAP+Dropout(0.5)+BN+Dense(2,softmax)",
        "class_names": list(model.CLASS_NAMES), "preprocessing": PREPROCESSING_ID,
        "image_size": settings.image_size, "hyperparameters": settings.training_params(),
        "manifest_hash": manifest.hash, "manifest_path": str(manifest.path), "data_cutoff": manifest.data_cutoff,
        "n_train": len(train_paths), "n_val": len(val_paths), "best_epoch": result.best_epoch,
        "bn_recalibrated": result.recalibrated, "train_seconds": round(result.seconds, 1),
        "code_version": code_version(), **model.count_params(net),
    }
    path, digest = model.save_artifact(net, out, meta)
    (out / "best.weights.h5").unlink(missing_ok=True)  # the artifact holds the same weights
    return {"version": version, "model_dir": str(out), "artifact_sha256": digest,
            "best_epoch": result.best_epoch, "train_seconds": round(result.seconds, 1)}


def _predict(settings: Settings, net: Any, paths: list[str], image_size: int):
    from . import dataset, training

    ds = dataset.make_dataset(paths, None, image_size=image_size, batch_size=settings.score_batch_size,
                              max_pixels=settings.max_pixels, min_side=settings.min_side, cache=False)
    return training.predict_malignant(net, ds)


def _read_meta(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "metadata.json").read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {model_dir / 'metadata.json'}: {exc}") from exc


def _training_hashes(model_dir: Path) -> set[str]:
    """sha256 of the images a registered model was trained on (empty when unknown)."""
    from .dataset import load_manifest

    try:
        manifest = load_manifest(_read_meta(model_dir)["manifest_path"])
    except (ArtifactError, KeyError, DatasetError):
        return set()
    return {e["sha256"] for e in manifest.split("train")}


def _validation_probs(model_dir: Path) -> dict[str, float]:
    rows = json.loads((model_dir / "validation_predictions.json").read_text())
    return {r["sha256"]: float(r["prob_malignant"]) for r in rows}


def evaluate_step(settings: Settings, version: str, *, progress: Progress | None = None) -> dict[str, Any]:
    """Choose the operating threshold on validation, compute metrics and plots, register the candidate."""
    import numpy as np

    from . import dataset, evaluation, model

    progress = progress or log.info
    model_dir = settings.models_dir / version
    meta = _read_meta(model_dir)
    net = model.load_artifact(model_dir / "model.keras", meta["artifact_sha256"])
    manifest = dataset.load_manifest(meta["manifest_path"])
    size = int(meta["image_size"])
    results: dict[str, dict[str, float]] = {}
    val_paths, val_labels = dataset.manifest_arrays(manifest, "validation")
    val_probs = _predict(settings, net, val_paths, size)
    threshold = evaluation.choose_threshold(val_labels, val_probs, target_sensitivity=settings.target_sensitivity)
    results["validation"] = evaluation.compute_metrics(val_labels, val_probs, threshold=threshold)
    results["validation@0.5"] = evaluation.compute_metrics(val_labels, val_probs, threshold=0.5)
    train_paths, train_labels = dataset.manifest_arrays(manifest, "train")
    results["train"] = evaluation.compute_metrics(train_labels, _predict(settings, net, train_paths, size),
                                                  threshold=threshold)
    history = json.loads((model_dir / "history.json").read_text())
    plots = evaluation.plot_all(history=history, y_true=val_labels, prob_malignant=val_probs,
                                threshold=threshold, out_dir=model_dir / "plots")
    # atomically: the gate reads these back to compare candidate and champion on the same images
    atomic_write(model_dir / "validation_predictions.json", json.dumps(
        [{"sha256": e["sha256"], "label": e["label"], "prob_malignant": float(p)}
         for e, p in zip(manifest.split("validation"), np.asarray(val_probs), strict=True)], indent=0))
    meta.update(threshold=threshold, metrics=results)
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
        mv.code_version = meta["code_version"]
        mv.data_cutoff = cutoff
        mv.plots_dir = str(model_dir / "plots")
        s.flush()
        for split, values in results.items():
            registry.save_metrics(s, version, split, values)
    v = results["validation"]
    progress(f"evaluated {version}: threshold {threshold:.4f}; validation accuracy {v['accuracy']:.4f}, "
             f"sensitivity {v['sensitivity']:.4f}, specificity {v['specificity']:.4f}, ROC AUC {v['roc_auc']:.4f}")
    return {"version": version, "threshold": threshold, "validation": v, "plots": plots}


def _duel_images(manifest: Any, champion_dir: Path) -> tuple[list[int], dict[str, Any]]:
    """The candidate's validation images (indexes into the manifest's validation side) to compare
    the champion on, and a description of that choice for the gate's evidence.

    Images the champion was trained on are left out (the split may move a group from the champion's
    training side to this validation side). When leaving them out would leave a single class (or
    none), no fair comparison on unseen images exists: then every validation image is used, and
    ``fallback`` says so, with how many of them the champion had seen."""
    entries = manifest.split("validation")
    seen = _training_hashes(champion_dir)
    keep = [i for i, e in enumerate(entries) if e["sha256"] not in seen]
    n_seen = len(entries) - len(keep)
    info: dict[str, Any] = {"validation_images": len(entries), "champion_trained_on": n_seen, "fallback": None}
    classes = {entries[i]["label"] for i in keep}
    if n_seen and len(classes) < 2:
        left = f"only {sorted(classes)[0]}" if classes else "no"
        info["fallback"] = (f"compared on all {len(entries)} validation images, {n_seen} of which the champion "
                            f"was trained on: without them {left} images would remain, and a comparison "
                            "needs both classes")
        keep = list(range(len(entries)))
    info["images"] = len(keep)
    return keep, info


def gate_step(settings: Settings, version: str, *, actor: str | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """Compare the candidate with the champion on the candidate's validation images, then promote or
    reject it. Idempotent: a decided candidate returns its recorded decision."""
    from . import dataset, evaluation, model

    progress = progress or log.info
    actor = actor or registry.default_actor()
    with session_scope(settings.database_url) as s:
        cand = registry.get_version(s, version)
        decided = registry.decision_for(s, version)
        if decided is not None:
            current = registry.get_champion(s)
            return {"version": version, "decision": decided.decision, "reason": decided.reason,
                    "champion": current.version if current else None}
        cand_metrics = registry.metrics_of(s, version, "validation")
        champ = registry.get_champion(s)
        champ_info = None if champ is None else (champ.version, champ.artifact_path, champ.artifact_sha256,
                                                  champ.image_size, champ.threshold)
        manifest_path = _read_meta(Path(cand.artifact_path).parent)["manifest_path"]
        cand_artifact, cand_thr = cand.artifact_path, cand.threshold

    champ_metrics, comparison = None, None
    if champ_info is not None:
        cv, cpath, csha, csize, cthr = champ_info
        manifest = dataset.load_manifest(manifest_path)
        paths, labels = dataset.manifest_arrays(manifest, "validation")
        keep, comparison = _duel_images(manifest, Path(cpath).parent)
        progress(f"scoring champion {cv} on {version}'s validation images ({len(keep)} of {len(paths)}; "
                 f"{comparison['champion_trained_on']} were in the champion's training data)"
                 + (f"; falling back: {comparison['fallback']}" if comparison["fallback"] else ""))
        if len(keep) < len(paths):
            # the candidate's metrics on the same subset, from its recorded validation predictions
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
            cand_probs = _validation_probs(Path(cand_artifact).parent)
            cand_metrics = evaluation.compute_metrics(
                labels, [cand_probs[manifest.split("validation")[i]["sha256"]] for i in keep], threshold=cand_thr)
        net = model.load_artifact(cpath, csha)
        champ_metrics = evaluation.compute_metrics(labels, _predict(settings, net, paths, csize), threshold=cthr)
    decision = registry.evaluate_gate(
        cand_metrics, champ_metrics, min_accuracy=settings.gate_min_accuracy,
        min_sensitivity=settings.gate_min_sensitivity, tolerance=settings.gate_tolerance,
        champion_version=champ_info[0] if champ_info else None, comparison=comparison)
    with session_scope(settings.database_url) as s:
        row = registry.record_gate_decision(s, version, decision, actor=actor)
        champion = registry.get_champion(s)
        out = {"version": version, "decision": row.decision, "reason": row.reason,
               "champion": champion.version if champion else None}
    progress(f"gate: {version} {out['decision']}: {out['reason']}")
    if out["decision"] == "promoted":  # prove each inference back-end on the new champion (never undoes this)
        from .validation import validate_published

        validate_published(settings, version, progress=progress)
    return out


def retrain(settings: Settings, *, actor: str | None = None, progress: Progress | None = None,
            skip_intake: bool = False) -> dict[str, Any]:
    """The whole retraining job: intake → split → train → evaluate → gate. Returns a summary."""
    progress = progress or log.info
    t0 = time.monotonic()
    summary: dict[str, Any] = {}
    if not skip_intake:
        summary["intake"] = intake_step(settings, progress=progress)
    summary["split"] = split_step(settings)
    manifest_path = summary["split"]["manifest_path"]
    summary["train"] = train_step(settings, manifest_path, progress=progress)
    version = summary["train"]["version"]
    summary["evaluation"] = evaluate_step(settings, version, progress=progress)
    summary["gate"] = gate_step(settings, version, actor=actor, progress=progress)
    summary["version"] = version
    summary["seconds"] = round(time.monotonic() - t0, 1)
    return summary
