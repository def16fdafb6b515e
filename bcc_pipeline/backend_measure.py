"""Measuring inference back-ends against fp32 Keras, per model version, on this machine.

:func:`validate_backends` scores a model version's images with every available back-end and compares
each with fp32 Keras (:data:`bcc_pipeline.config.REFERENCE_BACKEND`, what the metrics were measured
with). The images: the version's ``calibration`` images from its manifest and its frozen ``holdout``
(``holdout_path`` in its metadata; the ``validation`` images stand in for a role it does not have), plus a
fixed reference set of :data:`REFERENCE_TILES` synthetic tiles (rendered by
:func:`bcc_pipeline.demo_data.render_tile` with seed :data:`REFERENCE_SEED`: the same pixels on every
machine, nothing downloaded). Recorded per back-end in ``backend_validations``: label flips at the
version's threshold (malignant→benign and benign→malignant separately), max and 99th-percentile |Δp|,
throughput, the CPU (:mod:`bcc_pipeline.cpu`) and package versions; :func:`passes` is the rule a row is
judged by. Choosing a back-end from these rows, and showing them, is :mod:`bcc_pipeline.validation`.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .backend_store import CompiledModels, record_validation
from .config import BACKENDS, REFERENCE_BACKEND, Settings
from .cpu import cpu_info, software_info
from .errors import BCCError, ConfigError, DatasetError
from .store import ModelVersion, scoring_fields, session_scope

__all__ = [
    "REFERENCE_SEED",
    "REFERENCE_TILES",
    "compare",
    "development_images",
    "load_for",
    "passes",
    "reference_images",
    "result_line",
    "validate_backends",
    "validate_published",
]

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
REFERENCE_SEED = 20261128
REFERENCE_TILES = 48
REFERENCE_TILE_PX = 224  # rendered at the demo tiles' size, then preprocessed like any scored file
SPEED_SAMPLES = 4  # timed batches at least, per back-end
DEVELOPMENT_IMAGES = 300  # at most this many images calibrate an INT8 conversion (NNCF's default subset)


# -- images ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def reference_images(image_size: int) -> Any:
    """The fixed reference set, preprocessed for ``image_size``: float32 ``(REFERENCE_TILES, S, S, 3)``.

    Latent scores spread evenly from clearly benign to clearly malignant, so the set has probabilities
    on both sides of any threshold."""
    import numpy as np

    from .demo_data import DEFAULT_SEPARATION, render_tile
    from .images import preprocess

    rng = np.random.default_rng(REFERENCE_SEED)
    zs = np.linspace(-0.5, DEFAULT_SEPARATION + 0.5, REFERENCE_TILES)
    x = np.stack([preprocess(render_tile(float(z), rng, size=REFERENCE_TILE_PX), image_size) for z in zs])
    x.setflags(write=False)
    return x


def _manifest(mv: dict[str, Any], key: str = "manifest_path") -> Any:
    """A manifest named in the ``metadata.json`` beside a version's artifact (``manifest_path``: the one it
    was trained from; ``holdout_path``: the frozen holdout it was measured on), or None."""
    from .dataset import load_manifest

    try:
        meta = json.loads((Path(mv["artifact_path"]).parent / "metadata.json").read_text(encoding="utf-8"))
        return load_manifest(meta[key]) if meta.get(key) else None
    except (OSError, ValueError, KeyError, TypeError, DatasetError):
        return None


def _load(settings: Settings, paths: Sequence[str], image_size: int) -> Any:
    import numpy as np

    from .images import load_for_model

    return np.stack(
        [
            load_for_model(p, image_size, max_pixels=settings.max_pixels, min_side=settings.min_side)[0]
            for p in paths
        ]
    )


def _role_images(settings: Settings, manifest: Any, role: str, image_size: int) -> tuple[str, Any] | None:
    """(the role read, its images) for ``role``; the validation images stand in for a role not in the manifest."""
    from .dataset import manifest_arrays

    name = role if manifest.split(role) else "validation"
    paths, _labels = manifest_arrays(manifest, name)
    return (name, _load(settings, paths, image_size)) if paths else None


def _evaluation_images(settings: Settings, mv: dict[str, Any], reference_only: bool) -> dict[str, Any]:
    """role -> images to compare on: calibration, holdout (from the version's frozen holdout manifest when it
    has one; the validation images stand in for a role it lacks), reference."""
    manifest = None if reference_only else _manifest(mv)
    out: dict[str, Any] = {}
    if manifest is not None:
        holdout = _manifest(mv, "holdout_path")
        for role in ("calibration", "holdout"):
            source = (
                holdout
                if role == "holdout" and holdout is not None and holdout.split("holdout")
                else manifest
            )
            got = _role_images(settings, source, role, int(mv["image_size"]))
            if got is not None and got[0] not in out:
                out[got[0]] = got[1]
    out["reference"] = reference_images(int(mv["image_size"]))
    return out


def development_images(settings: Settings, mv: dict[str, Any]) -> Any:
    """The images a version was developed on (its training and validation sides, never holdout or
    calibration), at most :data:`DEVELOPMENT_IMAGES`, evenly spaced: what an INT8 conversion calibrates on."""
    from .dataset import manifest_arrays

    manifest = _manifest(mv)
    if manifest is None:
        raise ConfigError(
            f"openvino-int8 needs the development images of model {mv['version']}, but its "
            "manifest cannot be read"
        )
    paths = [p for role in ("train", "validation") for p in manifest_arrays(manifest, role)[0]]
    step = max(1, len(paths) // DEVELOPMENT_IMAGES)
    return _load(settings, paths[::step][:DEVELOPMENT_IMAGES], int(mv["image_size"]))


# -- comparing ---------------------------------------------------------------------------------
def compare(ref: Any, p: Any, threshold: float) -> dict[str, Any]:
    """Label flips at ``threshold`` and |Δp| of probabilities ``p`` against the reference ``ref``."""
    import numpy as np

    ref, p = np.asarray(ref, dtype=np.float64), np.asarray(p, dtype=np.float64)
    delta = np.abs(p - ref)
    ref_m, p_m = ref >= threshold, p >= threshold
    return {
        "flips_malignant_to_benign": int(np.sum(ref_m & ~p_m)),
        "flips_benign_to_malignant": int(np.sum(~ref_m & p_m)),
        "max_delta": float(delta.max()) if delta.size else 0.0,
        "p99_delta": float(np.percentile(delta, 99)) if delta.size else 0.0,
    }


def passes(c: dict[str, Any], max_delta: float) -> bool:
    """The validation rule on a :func:`compare` result: no label flipped and max |Δp| at most ``max_delta``."""
    return (
        c["flips_malignant_to_benign"] == 0
        and c["flips_benign_to_malignant"] == 0
        and c["max_delta"] is not None
        and c["max_delta"] <= max_delta
    )


def _probabilities(predictor: Any, x: Any, batch: int, mv: dict[str, Any]) -> tuple[Any, float]:
    """P(malignant) of every image in ``x``, and images/s: the best full batch's rate over at least
    :data:`SPEED_SAMPLES` timed batches (other work on the machine only ever slows a batch down, so the best
    one is the back-end's own speed; every back-end is measured alike)."""
    import numpy as np

    from .scoring.predictor import probability

    for warm in {batch: x[:batch], len(x) % batch: x[len(x) - len(x) % batch :]}.values():
        if len(warm):  # warm-up, not timed: tracing and compiling for each batch shape, first allocations
            probability(predictor(warm), mv)
    starts = list(range(0, len(x), batch))
    out, rates = [], []
    for attempt in range(max(1, -(-SPEED_SAMPLES // len(starts)))):
        for i in starts:
            t0 = time.perf_counter()
            p = probability(predictor(x[i : i + batch]), mv)
            seconds = time.perf_counter() - t0
            if attempt == 0:
                out.append(p)
            if seconds > 0 and (len(p) == batch or len(x) < batch):
                rates.append(len(p) / seconds)
    return np.concatenate(out), round(max(rates), 2) if rates else 0.0


def _version(settings: Settings, version: str) -> dict[str, Any]:
    with session_scope(settings.database_url) as s:
        mv = s.get(ModelVersion, version)
        if mv is None:
            raise ConfigError(f"model version {version!r} is not in the registry (`bcc models` lists them)")
        return scoring_fields(mv)


def load_for(settings: Settings, mv: dict[str, Any], backend: str) -> Any:
    """:func:`bcc_pipeline.inference.load_predictor` for version ``mv`` with the database's cache ledger
    and (for INT8) the version's development images."""
    from .inference import load_predictor

    return load_predictor(
        mv["artifact_path"],
        mv["artifact_sha256"],
        image_size=int(mv["image_size"]),
        backend=backend,
        version=mv["version"],
        ledger=CompiledModels(settings.database_url, mv["version"]),
        calibration=lambda: development_images(settings, mv),
    )


def validate_backends(
    settings: Settings,
    version: str,
    backends: Sequence[str] | None = None,
    *,
    reference_only: bool = False,
    record: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compare ``backends`` (default: all) with fp32 Keras on ``version``'s images; record the results.

    ``reference_only``: only the fixed reference set (what a worker of a new CPU class runs, in seconds);
    ``record=False``: measure without writing ``backend_validations`` (the benchmark).
    Returns ``{version, cpu, packages, images: {role: n}, results: [row], skipped: {backend: why}}``; each
    row as stored in ``backend_validations`` (``validated`` says whether it passed the rule).
    """
    import numpy as np

    progress = progress or log.info
    # the reference is always measured too: its speed is what "the fastest validated back-end" beats
    wanted = list(BACKENDS if backends is None else dict.fromkeys([REFERENCE_BACKEND, *backends]))
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        raise ConfigError(f"unknown inference back-end {unknown[0]!r}; choose one of {', '.join(BACKENDS)}")
    mv = _version(settings, version)
    roles = _evaluation_images(settings, mv, reference_only)
    x = np.concatenate(list(roles.values()))
    images = {role: int(len(v)) for role, v in roles.items()}
    cpu, sw = cpu_info(), software_info()
    batch, thr = settings.score_batch_size, mv["threshold"]
    progress(
        f"validating back-ends of {version} on {len(x)} images ({images}) against fp32 Keras, CPU class "
        f"{cpu['cpu_class']} ({cpu['model']})"
    )
    ref_pred = load_for(settings, mv, REFERENCE_BACKEND)
    ref, ref_speed = _probabilities(ref_pred, x, batch, mv)
    del ref_pred
    base = {
        "model_version": version,
        "cpu_class": cpu["cpu_class"],
        "software": sw["software"],
        "n_images": int(len(x)),
        "images": images,
        "max_delta_allowed": settings.backend_max_delta,
        "threshold": thr,
        "cpu": {k: cpu[k] for k in ("vendor", "model", "flags", "bf16", "amx", "vnni")},
        "packages": sw["packages"],
        "error": None,
    }
    results, skipped = [], {}
    for backend in wanted:
        row = {
            **base,
            "backend": backend,
            "precision": "f32",
            "validated": False,
            "max_delta": None,
            "p99_delta": None,
            "images_per_second": None,
            "flips_malignant_to_benign": 0,
            "flips_benign_to_malignant": 0,
        }
        if backend == REFERENCE_BACKEND:
            row.update(validated=True, max_delta=0.0, p99_delta=0.0, images_per_second=ref_speed)
        else:
            try:
                pred = load_for(settings, mv, backend)
                p, speed = _probabilities(pred, x, batch, mv)
                row.update(compare(ref, p, thr), precision=pred.precision, images_per_second=speed)
                del pred
            except ConfigError as exc:  # not installed here, or no development images: not available
                skipped[backend] = str(exc)
                progress(f"  {backend:14s} skipped: {exc}")
                continue
            except (BCCError, RuntimeError, ValueError, MemoryError) as exc:
                row["error"] = (
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                )
            row["validated"] = row["error"] is None and passes(row, settings.backend_max_delta)
        if record:
            record_validation(settings.database_url, row)
        results.append(row)
        progress("  " + result_line(row))
    return {
        "version": version,
        "cpu": cpu,
        "packages": sw["packages"],
        "images": images,
        "results": results,
        "skipped": skipped,
    }


def validate_published(settings: Settings, version: str, progress: Progress | None = None) -> dict[str, Any]:
    """Validate the back-ends of a version that just became champion (``BCC_PUBLISH_BACKENDS``, default all).
    A failure leaves the promotion as it is: the back-ends are then simply not validated (auto scores with
    fp32 Keras)."""
    progress = progress or log.info
    wanted = settings.publish_backend_list
    if not wanted:
        progress(
            f"back-ends of {version} not validated (BCC_PUBLISH_BACKENDS=none): scoring uses fp32 Keras "
            "until `bcc validate-backends` proves one"
        )
        return {"version": version, "validated": []}
    try:
        r = validate_backends(settings, version, None if wanted == BACKENDS else wanted, progress=progress)
    except Exception as exc:  # noqa: BLE001 - never undo a promotion over this; say what happened
        progress(
            f"back-end validation of {version} failed ({type(exc).__name__}: {exc}); "
            "scoring uses fp32 Keras until `bcc validate-backends` succeeds"
        )
        return {"version": version, "validated": [], "error": f"{type(exc).__name__}: {exc}"}
    return {"version": version, "validated": [r["backend"] for r in r["results"] if r["validated"]]}


def result_line(r: dict[str, Any]) -> str:
    """One back-end's validation row on one line (its verdict, flips, |Δp| and speed)."""
    if r.get("error"):
        return f"{r['backend']:14s} NOT VALIDATED  error: {r['error']}"
    verdict = "validated" if r["validated"] else "NOT VALIDATED"
    speed = f"{r['images_per_second']:8.1f}" if r.get("images_per_second") is not None else "     n/a"
    return (
        f"{r['backend']:14s} {verdict:13s}  {r['precision'] or '?':5s} flips m→b {r['flips_malignant_to_benign']:3d} "
        f"b→m {r['flips_benign_to_malignant']:3d}  max|Δp| {r['max_delta']:.2e}  p99 {r['p99_delta']:.2e}  "
        f"{speed} img/s"
    )
