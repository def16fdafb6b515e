"""Measuring a model version: what the evaluate step (:mod:`bcc_pipeline.pipelines`) and the gate
(:mod:`bcc_pipeline.gating`) share.

A version's ``metadata.json``, the frozen holdout it is measured on, the images of a manifest role,
scoring images with a loaded model, the images a registered model was trained on, and the holdout
predictions the evaluate step writes and the gate reads back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import ArtifactError, DatasetError
from .files import atomic_write

__all__ = [
    "holdout_for",
    "holdout_probs",
    "read_meta",
    "role_arrays",
    "score_paths",
    "training_hashes",
    "write_holdout_predictions",
]


# -- the development manifest and the frozen holdout: the one place that knows how they are found ----------
def holdout_for(settings: Settings, meta: dict[str, Any]) -> Any:
    """The holdout a version is measured on: the one recorded when it was trained, else the current one."""
    from . import dataset

    path = meta.get("holdout_path")
    holdout = dataset.load_manifest(path) if path else dataset.current_holdout(settings)
    if holdout is None or not holdout.split("holdout"):
        raise DatasetError(
            "there is no frozen holdout to measure this version on; freeze one first (`bcc holdout freeze`)"
        )
    return holdout


def role_arrays(manifest: Any, role: str) -> tuple[list[str], list[int]]:
    from . import dataset

    paths, labels = dataset.manifest_arrays(manifest, role)
    if not paths:
        raise DatasetError(f"the manifest {manifest.path} has no {role} images")
    return paths, labels


def score_paths(settings: Settings, net: Any, paths: list[str], image_size: int):
    from . import dataset, training

    ds = dataset.make_dataset(
        paths,
        None,
        image_size=image_size,
        batch_size=settings.score_batch_size,
        max_pixels=settings.max_pixels,
        min_side=settings.min_side,
        cache=False,
    )
    return training.predict_malignant(net, ds)


def read_meta(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "metadata.json").read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {model_dir / 'metadata.json'}: {exc}") from exc


def training_hashes(model_dir: Path) -> set[str]:
    """sha256 of the images a registered model was trained on (empty when unknown)."""
    from .dataset import load_manifest

    try:
        manifest = load_manifest(read_meta(model_dir)["manifest_path"])
    except (ArtifactError, KeyError, DatasetError):
        return set()
    return {e["sha256"] for e in manifest.split("train")}


def write_holdout_predictions(
    model_dir: Path, entries: list[dict[str, Any]], raw: Any, calibrated: Any
) -> None:
    """Write the version's holdout predictions (before and after calibration) for :func:`holdout_probs`."""
    import numpy as np

    # atomically: the gate reads these back to compare candidate and champion on the same images
    atomic_write(
        model_dir / "holdout_predictions.json",
        json.dumps(
            [
                {
                    "sha256": e["sha256"],
                    "label": e["label"],
                    "prob_uncalibrated": float(r),
                    "prob_malignant": float(p),
                }
                for e, r, p in zip(entries, np.asarray(raw), calibrated, strict=True)
            ],
            indent=0,
        ),
    )


def holdout_probs(model_dir: Path) -> dict[str, float]:
    rows = json.loads((model_dir / "holdout_predictions.json").read_text())
    return {r["sha256"]: float(r["prob_malignant"]) for r in rows}
