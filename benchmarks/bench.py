"""BCC pipeline benchmarks: every figure is a ratio measured within one process or one run.

    make bench                       # full run (about 15 minutes on 2 cores)
    BENCH_QUICK=1 make bench         # smaller inputs, fewer repeats (under 5 minutes)
    .venv/bin/python benchmarks/bench.py --only scoring options   # some sections only

Sections (each in a fresh child process, one after another, so they do not share CPU or memory):

``scoring``   DenseNet201 at 224×224, batch 32, the back-end ``BCC_INFERENCE=auto`` picks once the model's
              back-ends are validated on the reference set (``auto_vs_keras``: its bare forward pass against
              fp32 Keras on the same batches). ``scoring_vs_forward``: the real scoring path (PNG/JPEG
              files → validated, decoded, preprocessed → model → rows committed → files archived), steady
              state (after the first batch, which carries the model's start-up; the guard band's fp32
              Keras reference, loaded at the first image near the threshold, is start-up too: its load time
              is taken out of the window), divided by the scoring path's model step on in-memory tensors of
              the same round's images: the back-end, and fp32 Keras re-scoring the images within
              ``BCC_GUARD_BAND`` of the threshold. What the scoring path adds to the model is what it
              measures; ``scoring_vs_backend_forward`` divides by the bare back-end instead, so the guard
              band's cost shows as the gap between the two. ``scoring_vs_naive``: the scoring path against
              the seed's way, ``model.predict`` on one image at a time (fp32 Keras, OpenCV decode).
``options``   Each inference back-end (``bcc_pipeline.inference``) on the same images: throughput relative
              to fp32 Keras, label agreement at the model's threshold, max |Δprob|, and whether it passes the
              validation rule (``bcc_pipeline.validation.passes``: no flip, max |Δp| ≤ 0.01); ``auto``: the
              fastest back-end that passes.
``trained``   With ``--trained-model VERSION`` (``BENCH_TRAINED_MODEL``): ``bcc validate-backends`` on that
              version of the ``BCC_HOME``/``BCC_DATABASE_URL`` deployment (e.g. the ``make demo`` champion),
              measured without recording: the "validated" column on a trained model.
``training``  Seconds per epoch of ``model.fit`` fed by the real training pipeline (``dataset.make_dataset``:
              decode, cache, shuffle, augment, batch) divided by ``model.fit`` on in-memory tensors (the same
              model and compiled step); adjacent epochs in pairs, the figure is the median pair.
``rss``       Peak RSS of ``bcc score`` on 5,000 small images against 500 (fresh processes).
``store``     Upserting 100,000 prediction rows into PostgreSQL and SQLite.
``scaling``   Scoring throughput with 1, 2 and 4 shards run as concurrent processes.

The DenseNet201 has random convolution weights (nothing is downloaded here), the same compute as the real
one; its head is fitted to the synthetic H&E tiles' features so that its probabilities spread over [0, 1]
and label agreement between back-ends means something. Results: ``benchmarks/results/latest.json`` and a
markdown table on stdout (``--readme README.md`` also puts it into the README).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # tests.support: the test suite's helpers (champion registration, databases)
    sys.path.insert(0, str(ROOT))
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0", "false", "no")
SIZE = 224
BATCH = 32
SECTIONS = ("scoring", "options", "training", "rss", "store", "scaling", "trained")
# sections that share one child process (scoring and options share the loaded Keras reference model)
GROUPS = (("training",), ("scoring", "options"), ("rss",), ("store",), ("scaling",), ("trained",))
MAX_DELTA = 0.01  # the validation rule's default BCC_BACKEND_MAX_DELTA

# How much work each section does: (quick, full)
N = {
    "score_rounds": (3, 5),  # scoring path: rounds of (forward pass, scoring run)
    "score_files_per_round": (96, 192),
    "naive_files": (24, 96),  # seed-style per-image predict
    "option_images": (64, 384),  # images every back-end scores (agreement + throughput)
    "train_images": (32, 32),  # images per training epoch
    "train_epochs": (5, 7),  # measured epochs per input kind (pairs; the figure is the median pair)
    "train_size": (96, 224),  # training input size
    "scale_files": (128, 640),  # scaling: files per shard count
    "store_rows": (100_000, 100_000),
    "rss_sizes": ((500, 5000), (500, 5000)),
}


def n(key: str) -> Any:
    return N[key][0 if QUICK else 1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("bcc_pipeline").setLevel(logging.WARNING)


# -- shared set-up: the benchmark model and images -----------------------------------------------
def tile_bank(count: int, size: int, seed: int = 5) -> tuple[Any, Any]:
    """``count`` synthetic H&E tiles (uint8) and their labels, half benign, half malignant."""
    import numpy as np

    from bcc_pipeline.demo_data import DEFAULT_SEPARATION, render_tile

    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(count)])
    tiles = np.stack([render_tile(DEFAULT_SEPARATION * y, rng, size=size) for y in labels])
    return tiles, labels


def preprocess_all(tiles: Any, size: int) -> Any:
    import numpy as np

    from bcc_pipeline.images import preprocess

    return np.stack([preprocess(t, size) for t in tiles])


def write_files(folder: Path, tiles: Any, count: int, *, start: int = 0) -> list[Path]:
    """``count`` distinct image files (even: PNG, odd: JPEG) cycling through ``tiles``; each file's
    content differs (its number is written on it) so the scorer sees no duplicates."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + count):
        rgb = tiles[i % len(tiles)].copy()
        cv2.putText(rgb, str(i), (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (20, 20, 20), 2)
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        path = folder / f"patient_{i % 20:02d}" / f"img_{i:06d}.{'png' if i % 2 == 0 else 'jpg'}"
        path.parent.mkdir(exist_ok=True)
        ok = cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 92] if i % 2 else [])
        assert ok, path
        out.append(path)
    old = time.time() - 120
    for p in out:
        os.utime(p, (old, old))
    return out


def prepare_model(work: Path) -> dict[str, Any]:
    """DenseNet201 (random base) with a head fitted on the tiles' features; saved as a real artifact."""
    import keras
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from bcc_pipeline.model import build_classifier, save_artifact

    t0 = time.monotonic()
    net = build_classifier(image_size=SIZE, base_weights="none", seed=11)
    tiles, labels = tile_bank(64, SIZE, seed=21)
    x = preprocess_all(tiles, SIZE)
    feats = keras.Model(net.input, net.get_layer("gap").output).predict(x, batch_size=BATCH, verbose=0)
    mean, var = feats.mean(axis=0), feats.var(axis=0) + 1e-6
    bn = net.get_layer("bn")
    gamma, beta, _mm, _mv = bn.get_weights()
    bn.set_weights([np.ones_like(gamma), np.zeros_like(beta), mean, var - bn.epsilon])
    z = (feats - mean) / np.sqrt(var)
    clf = LogisticRegression(C=0.002, max_iter=2000).fit(z, labels)
    w, b = clf.coef_[0].astype("float32"), np.float32(clf.intercept_[0])
    net.get_layer("probs").set_weights(
        [np.stack([-w / 2, w / 2], axis=1), np.array([-b / 2, b / 2], "float32")]
    )
    path, sha = save_artifact(net, work / "model", {"image_size": SIZE, "note": "benchmark model"})
    p = net.predict(x, batch_size=BATCH, verbose=0)[:, 1]
    info = {
        "artifact": str(path),
        "sha256": sha,
        "image_size": SIZE,
        "seconds": round(time.monotonic() - t0, 1),
        "fit_accuracy": float(((p >= 0.5) == labels).mean()),
        "prob_quantiles": [round(float(q), 3) for q in np.quantile(p, [0.05, 0.25, 0.5, 0.75, 0.95])],
    }
    (work / "model" / "bench.json").write_text(json.dumps(info, indent=1))
    return info


def make_home(
    work: Path,
    name: str,
    model: dict[str, Any],
    database_url: str | None = None,
    validate: list[str] | None = None,
):
    """A fresh BCC_HOME with the benchmark model registered as champion; returns its Settings. ``validate``:
    back-ends validated there on the reference set, so that ``auto`` may pick them (untimed)."""
    from bcc_pipeline.config import load_settings
    from tests.support import install_artifact, register_version

    home = work / name
    shutil.rmtree(home, ignore_errors=True)  # a kept work folder from an earlier run
    env = {"BCC_HOME": str(home), "BCC_SETTLE_SECONDS": "0"}
    if database_url:
        env["BCC_DATABASE_URL"] = database_url
    s = load_settings(env=env)
    # the whole model folder, with compiled/ conversions, if any
    dest = install_artifact(Path(model["artifact"]).parent, s.models_dir, "v-bench")
    register_version(
        s,
        "v-bench",
        artifact=(dest, model["sha256"]),
        image_size=model["image_size"],
        profile="bench",
        code_version="bench",
    )
    if validate:
        from bcc_pipeline.validation import validate_backends

        r = validate_backends(s, "v-bench", validate, reference_only=True, progress=lambda m: None)
        log(
            f"{name}: validated on the reference set: "
            + ", ".join(f"{x['backend']} {'yes' if x['validated'] else 'no'}" for x in r["results"])
        )
    return s


def candidates() -> list[str]:
    """The back-ends the scoring homes validate (ONNX Runtime's export takes ~40 s: full runs only; INT8
    needs development images, which the benchmark model has not)."""
    from bcc_pipeline.inference import BACKENDS

    return [b for b in BACKENDS if b != "openvino-int8" and not (b == "onnxruntime" and QUICK)]


def load_model_info(work: Path) -> dict[str, Any]:
    return json.loads((work / "model" / "bench.json").read_text())


_KERAS: dict[str, Any] = {}


def keras_reference(model: dict[str, Any]) -> Any:
    """The fp32 Keras predictor of the benchmark model, loaded once per process (about 9 s)."""
    from bcc_pipeline.inference import load_predictor

    if "pred" not in _KERAS:
        _KERAS["pred"] = load_predictor(
            Path(model["artifact"]), model["sha256"], image_size=SIZE, backend="keras"
        )
    return _KERAS["pred"]


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


# -- sections ---------------------------------------------------------------------------------
def section_scoring(work: Path) -> dict[str, Any]:
    """Rounds of (forward pass, scoring run) and a last forward pass; each round's scoring throughput is
    divided by the mean of the forward passes either side of it, and the figure is the median round, so
    that a noisy neighbour on a shared machine moves both sides of a ratio alike."""
    import cv2
    import numpy as np

    from bcc_pipeline import images
    from bcc_pipeline.scoring import run_dir, score_inbox
    from bcc_pipeline.validation import load_for, resolve_backend

    model = load_model_info(work)
    s = make_home(work, "home-scoring", model, validate=candidates())
    backend = resolve_backend(s, "v-bench", "auto")["inference"]
    log(f"scoring: auto picks {backend}")
    tiles, _ = tile_bank(64, SIZE, seed=31)
    rounds, per_round = n("score_rounds"), n("score_files_per_round")
    staged = write_files(work / "staged", tiles, rounds * per_round)
    log(f"scoring: {len(staged)} files written ({rounds} rounds of {per_round})")

    # The forward side, on each round's own images already in memory, batch for batch: the scoring path's
    # model step (the back-end, and fp32 Keras for the images within the guard band of the threshold:
    # PinnedModel, as score_shard uses it) and, for auto's speed, the bare back-end.
    from bcc_pipeline import registry
    from bcc_pipeline.scoring.predictor import PinnedModel
    from bcc_pipeline.store import session_scope

    with session_scope(s.database_url) as ss:
        v = registry.get_version(ss, "v-bench")
        mv = {
            "version": "v-bench",
            "image_size": SIZE,
            "artifact_path": v.artifact_path,
            "artifact_sha256": v.artifact_sha256,
            "threshold": v.threshold,
            "temperature": v.temperature,
        }
    pred = load_for(s, mv, backend)
    step = PinnedModel(mv, backend, settings=s)

    def tensors(paths: list[Path]) -> list[Any]:
        return [
            np.stack([images.load_for_model(p, SIZE)[0] for p in paths[i : i + BATCH]])
            for i in range(0, len(paths), BATCH)
        ]

    def forward(fn: Any, batches: list[Any]) -> float:
        for b in batches:  # warm: loads what it needs (the step: the reference, if an image is near)
            fn(b)
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        return rate(sum(len(b) for b in batches), time.perf_counter() - t0)

    steady, whole, loads, precision, rescored, ref_loads = [], [], [], None, [], []
    fwd, bare, ratios, bare_ratios = [], [], [], []
    for r in range(rounds):
        round_files = staged[r * per_round : (r + 1) * per_round]
        batches = tensors(round_files)
        before = forward(step.predict, batches), forward(pred, batches)
        for p in round_files:  # into the inbox (same folder layout)
            dest = s.inbox_dir / p.relative_to(work / "staged")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dest)
        summary = score_inbox(s, batch_size=BATCH)
        assert summary["scored"] == per_round and summary["status"] == "finished", summary
        precision = summary.get("precision")
        assert summary["inference"] == backend, summary
        shard = json.loads((run_dir(s, summary["run_id"]) / "shard-0.json").read_text())
        # from the first batch's probabilities on (model loaded and warm) to the end; the first batch's
        # images are left out of the count, though its commit and moves fall inside the window
        window = shard["loop_finished"] - shard["first_predicted"]
        ref_load = shard.get("reference_load_seconds") or 0.0
        if ref_load and shard["reference_load_started"] >= shard["first_predicted"]:
            window -= ref_load  # the guard band's fp32 reference started inside the window
        rescored.append(shard["rescored_fp32"])
        ref_loads.append(ref_load)
        steady.append(rate(per_round - BATCH, window))
        whole.append(rate(per_round, shard["loop_finished"] - shard["loop_started"]))
        loads.append(shard["model_load_seconds"])
        after = forward(step.predict, batches), forward(pred, batches)
        fwd.append(statistics.mean([before[0], after[0]]))
        bare.append(statistics.mean([before[1], after[1]]))
        ratios.append(steady[-1] / fwd[-1])
        bare_ratios.append(steady[-1] / bare[-1])
        log(
            f"scoring: round {r + 1}: model step {fwd[-1]:.1f} img/s ({backend} alone {bare[-1]:.1f}), "
            f"scoring path {steady[-1]:.1f} img/s; {rescored[-1]} re-scored in fp32 near the threshold"
            + (f", reference loaded in {ref_load:.1f}s" if ref_load else "")
        )
    keras_fwd = forward(keras_reference(model), batches)  # fp32 Keras on the same batches: auto's baseline
    log(
        f"scoring: fp32 Keras forward {keras_fwd:.1f} img/s; auto ({backend}) {statistics.median(bare):.1f} img/s"
    )

    # the seed's way: one image at a time through model.predict (fp32 Keras), OpenCV decode
    archived = sorted(p for p in s.archive_dir.rglob("img_*") if p.is_file())[: n("naive_files") + 2]
    net = keras_reference(model).model  # the same artifact, loaded by load_artifact

    def seed_style(path: Path) -> float:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        x = images.preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), SIZE)
        return float(net.predict(x[None], verbose=0)[0, 1])

    for p in archived[:2]:
        seed_style(p)
    t0 = time.perf_counter()
    for p in archived[2:]:
        seed_style(p)
    naive = rate(len(archived) - 2, time.perf_counter() - t0)
    log(f"scoring: seed-style per-image predict {naive:.1f} img/s")
    return {
        "backend": backend,
        "precision": precision,
        "image_size": SIZE,
        "batch_size": BATCH,
        "keras_forward_images_per_s": round(keras_fwd, 2),
        "rounds": rounds,
        "files_per_round": per_round,
        "formats": "half PNG, half JPEG (quality 92), 224×224",
        "forward_images_per_s": [round(v, 2) for v in fwd],
        "backend_forward_images_per_s": [round(v, 2) for v in bare],
        "scoring_images_per_s_steady": [round(v, 2) for v in steady],
        "scoring_images_per_s_with_startup": [round(v, 2) for v in whole],
        "round_ratios": [round(v, 3) for v in ratios],
        "round_ratios_vs_backend": [round(v, 3) for v in bare_ratios],
        "model_load_seconds": loads,
        "rescored_fp32": rescored,
        "reference_load_seconds": ref_loads,
        "naive_images_per_s": round(naive, 2),
        "naive_files": len(archived) - 2,
        "figures": {
            "scoring_vs_forward": statistics.median(ratios),
            "scoring_vs_backend_forward": statistics.median(bare_ratios),
            "scoring_vs_naive": statistics.median(steady) / naive,
            "auto_vs_keras": statistics.median(bare) / keras_fwd,
        },
    }


def section_options(work: Path) -> dict[str, Any]:
    import importlib.util

    import numpy as np

    from bcc_pipeline.inference import BACKENDS, load_predictor
    from bcc_pipeline.validation import compare, passes

    model = load_model_info(work)
    tiles, _ = tile_bank(n("option_images"), SIZE, seed=41)
    x = preprocess_all(tiles, SIZE)
    development = preprocess_all(tile_bank(64, SIZE, seed=43)[0], SIZE)  # INT8 calibrates on other tiles
    batches = [x[i : i + BATCH] for i in range(0, len(x), BATCH)]
    art = Path(model["artifact"])
    threshold = 0.5

    def timed(pred: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        out = np.concatenate([pred(b) for b in batches])[:, 1].astype("float64")
        return out, rate(len(x), time.perf_counter() - t0)

    def run(backend: str) -> dict[str, Any]:
        pred = (
            keras_reference(model)
            if backend == "keras"
            else load_predictor(
                art, model["sha256"], image_size=SIZE, backend=backend, calibration=lambda: development
            )
        )
        pred(batches[0])  # warm (traces / compiles)
        probs, speed = timed(pred)
        return {
            "probs": probs,
            "images_per_s": speed,
            "load_seconds": pred.load_seconds,
            "converted": pred.converted,
            "precision": pred.precision,
            "predictor": pred,
        }

    rows: dict[str, Any] = {}
    ref = run("keras")
    for backend in BACKENDS:
        if backend == "keras":
            continue
        if backend == "onnxruntime" and QUICK:
            rows[backend] = {"skipped": "quick run (its ONNX export alone takes about 40 s); see a full run"}
            continue
        if backend == "onnxruntime" and not (
            importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("tf2onnx")
        ):
            rows[backend] = {"skipped": "onnxruntime/tf2onnx not installed (pip install -e '.[onnx]')"}
            continue
        try:
            r = run(backend)
        except Exception as exc:  # noqa: BLE001 - one back-end failing is a result, not a crash
            rows[backend] = {"skipped": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        del r["predictor"]
        rows[backend] = r
        log(f"options: {backend} {r['images_per_s']:.1f} img/s ({r['precision']})")
    again, speed2 = timed(ref["predictor"])  # the reference again at the end: the machine's drift
    keras_rate = statistics.mean([ref["images_per_s"], speed2])
    log(f"options: keras {ref['images_per_s']:.1f} / {speed2:.1f} img/s")
    table = {
        "keras": {
            "images_per_s": round(keras_rate, 2),
            "speedup": 1.0,
            "agreement": 1.0,
            "max_abs_dprob": float(np.abs(again - ref["probs"]).max()),
            "precision": "f32",
            "load_seconds": round(ref["load_seconds"], 1),
            "validated": True,
        }
    }
    for backend, r in rows.items():
        if "skipped" in r:
            table[backend] = r
            continue
        agree = float(((r["probs"] >= threshold) == (ref["probs"] >= threshold)).mean())
        table[backend] = {
            "images_per_s": round(r["images_per_s"], 2),
            "speedup": r["images_per_s"] / keras_rate,
            "agreement": agree,
            "max_abs_dprob": float(np.abs(r["probs"] - ref["probs"]).max()),
            "precision": r["precision"],
            "load_seconds": round(r["load_seconds"], 1),
            "converted": r["converted"],
            "validated": passes(compare(ref["probs"], r["probs"], threshold), MAX_DELTA),
        }
    auto = max((b for b, t in table.items() if t.get("validated")), key=lambda b: table[b]["speedup"])
    near = float(((ref["probs"] > 0.4) & (ref["probs"] < 0.6)).mean())
    return {
        "images": len(x),
        "threshold": threshold,
        "batch_size": BATCH,
        "image_size": SIZE,
        "share_of_images_with_p_in_0.4_0.6": near,
        "backends": table,
        "max_delta": MAX_DELTA,
        "auto": auto,
        "auto_speedup": table[auto]["speedup"],
    }


def section_trained(work: Path) -> dict[str, Any]:
    """``bcc validate-backends`` on a trained version of the deployment in BCC_HOME, not recorded."""
    from bcc_pipeline.config import load_settings
    from bcc_pipeline.validation import validate_backends

    version = os.environ.get("BENCH_TRAINED_MODEL")
    if not version:
        return {"skipped": "no trained model given (--trained-model VERSION or BENCH_TRAINED_MODEL)"}
    s = load_settings()
    r = validate_backends(s, version, record=False, progress=log)
    keras = next(x for x in r["results"] if x["backend"] == "keras")["images_per_second"]
    rows = {
        x["backend"]: {
            k: x[k]
            for k in (
                "validated",
                "precision",
                "flips_malignant_to_benign",
                "flips_benign_to_malignant",
                "max_delta",
                "p99_delta",
                "images_per_second",
                "error",
            )
        }
        for x in r["results"]
    }
    for row in rows.values():
        row["speedup"] = (row["images_per_second"] or 0.0) / keras if keras else None
    auto = max(
        (b for b, x in rows.items() if x["validated"]), key=lambda b: rows[b]["images_per_second"] or 0
    )
    return {
        "version": version,
        "images": r["images"],
        "threshold": r["results"][0]["threshold"],
        "max_delta": s.backend_max_delta,
        "cpu": r["cpu"],
        "backends": rows,
        "skipped": r["skipped"],
        "auto": auto,
    }


def section_training(work: Path) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf

    from bcc_pipeline.dataset import make_dataset
    from bcc_pipeline.model import build_classifier
    from bcc_pipeline.training import compile_model

    size, count, epochs, batch = n("train_size"), n("train_images"), n("train_epochs"), 16
    tiles, labels = tile_bank(count, size, seed=51)
    files = write_files(work / "train-images", tiles, count)
    y = np.eye(2, dtype="float32")[labels]
    x = preprocess_all(tiles, size)
    net = build_classifier(image_size=size, base_weights="none", seed=3)
    compile_model(net, 1e-4)
    # in memory: the preprocessed tensors, shuffled and batched (same element spec, so the same trace)
    memory = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(count, seed=1).batch(batch).prefetch(2)
    ds = make_dataset(
        [str(p) for p in files], labels.tolist(), image_size=size, batch_size=batch, training=True
    )
    t0 = time.monotonic()
    net.fit(memory, epochs=1, steps_per_epoch=1, verbose=0)  # traces the train step
    trace = time.monotonic() - t0
    t1 = time.monotonic()
    net.fit(ds.take(1), epochs=1, verbose=0)  # a retrace here would show up in this time, not in the epochs
    second = time.monotonic() - t1
    log(
        f"training: first fit step (graph tracing) {trace:.0f}s at {size}px; first pipeline step {second:.1f}s"
    )
    wait_for_prepare(work)

    def epoch(kind: str) -> float:
        t = time.perf_counter()
        net.fit(memory if kind == "memory" else ds, epochs=1, verbose=0)
        return time.perf_counter() - t

    mem, pipe = [], []
    for e in range(epochs):  # pairs of adjacent epochs, in alternating order so drift cancels
        for kind in ("memory", "pipeline") if e % 2 == 0 else ("pipeline", "memory"):
            (mem if kind == "memory" else pipe).append(epoch(kind))
        log(f"training: pair {e + 1}: in-memory {mem[-1]:.2f}s, pipeline {pipe[-1]:.2f}s")
    return {
        "image_size": size,
        "images": count,
        "batch_size": batch,
        "epochs": epochs,
        "trace_seconds": round(trace, 1),
        "first_pipeline_step_seconds": round(second, 1),
        "memory_epoch_seconds": [round(v, 2) for v in mem],
        "pipeline_epoch_seconds": [round(v, 2) for v in pipe],
        "epoch_ratios": [round(p / m, 3) for p, m in zip(pipe, mem, strict=True)],
        "figures": {
            "training_pipeline_overhead": statistics.median(p / m for p, m in zip(pipe, mem, strict=True))
        },
    }


def section_rss(work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    import rss_flatness

    rss_flatness.save_tiny_model(work)
    out = []
    for count in n("rss_sizes"):
        env = rss_flatness.make_home(work, count, 64)
        peak, summary = rss_flatness.score(env)
        assert summary["scored"] == count, summary
        out.append(
            {
                "images": count,
                "peak_rss_mib": round(peak / 2**20, 1),
                "images_per_second": summary["images_per_second"],
                "inference": summary.get("inference"),
            }
        )
        log(f"rss: {count} images, peak {out[-1]['peak_rss_mib']} MiB")
    return {
        "runs": out,
        "figures": {"rss_ratio_5000_vs_500": out[-1]["peak_rss_mib"] / out[0]["peak_rss_mib"]},
    }


def _pg_database() -> tuple[str | None, Any, str | None]:
    """(url, drop, None) of a fresh PostgreSQL database, or (None, None, why) when there is no server."""
    from tests.support import create_pg_database

    try:
        url, drop = create_pg_database("bcc_bench")
    except Exception as exc:  # noqa: BLE001
        from tests.support import PG_ADMIN_URL

        return None, None, f"PostgreSQL unavailable at {PG_ADMIN_URL}: {type(exc).__name__}"
    return url, drop, None


def section_store(work: Path) -> dict[str, Any]:
    """Prediction rows through ``store.insert_rows`` with RETURNING: the call the scorer makes per batch."""
    import hashlib

    from sqlalchemy import func, select

    from bcc_pipeline.store import Prediction, get_engine, insert_rows, upgrade, utcnow
    from tests.support import register_version

    total = n("store_rows")
    now = utcnow()

    def make(i: int, salt: bytes = b"") -> dict[str, Any]:
        return {
            "image_sha256": hashlib.sha256(salt + i.to_bytes(8, "little")).hexdigest(),
            "model_version": "v-bench",
            "prob_malignant": (i % 1000) / 1000,
            "label": "malignant" if i % 2 else "benign",
            "threshold": 0.5,
            "source_path": f"patient_{i % 50:02d}/img_{i:07d}.png",
            "run_id": "bench",
            "scored_at": now,
        }

    rows = [make(i) for i in range(total)]
    fresh = [make(i, b"fresh") for i in range(20_000)]
    key = ("image_sha256", "model_version")
    sha_col = Prediction.__table__.c.image_sha256

    def measure(url: str) -> dict[str, Any]:
        upgrade(url)
        register_version(url, "v-bench", image_size=SIZE, profile="bench", code_version="bench")
        engine = get_engine(url)
        res: dict[str, Any] = {}
        for label, part, per_tx, expect in (
            ("bulk_1000_per_tx", rows, 1000, total),
            ("rerun_all_conflicts", rows, 1000, 0),
            ("per_scoring_batch_32_per_tx", fresh, BATCH, len(fresh)),
        ):
            written = 0
            t0 = time.perf_counter()
            for i in range(0, len(part), per_tx):
                with engine.begin() as conn:
                    written += len(
                        insert_rows(conn, Prediction, part[i : i + per_tx], key=key, returning=sha_col)
                    )
            res[label] = round(rate(len(part), time.perf_counter() - t0))
            assert written == expect, (label, written, expect)
        with engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(Prediction)).scalar_one()
        assert count == total + len(fresh), count
        return res

    out: dict[str, Any] = {
        "rows": total,
        "call": "store.insert_rows(..., returning=image_sha256), one "
        "transaction per 1000 rows (and per 32: a scoring batch)",
    }
    out["sqlite"] = measure(f"sqlite:///{work / 'store.db'}")
    log(f"store: sqlite {out['sqlite']}")
    url, drop, why = _pg_database()
    figures = {}
    if url is None:
        out["postgresql"] = {"skipped": why}
    else:
        try:
            out["postgresql"] = measure(url)
        finally:
            drop()
        log(f"store: postgresql {out['postgresql']}")
        figures["store_rows_per_s_postgresql"] = out["postgresql"]["bulk_1000_per_tx"]
    figures["store_rows_per_s_sqlite"] = out["sqlite"]["bulk_1000_per_tx"]
    out["figures"] = figures
    return out


def section_scaling(work: Path) -> dict[str, Any]:
    from bcc_pipeline.scoring import finalize_run, plan_shards

    model = load_model_info(work)
    tiles, _ = tile_bank(64, SIZE, seed=61)
    out = []
    for shards in (1, 2, 4):
        s = make_home(work, f"home-scale-{shards}", model, validate=["openvino", "openvino-bf16"])
        write_files(s.inbox_dir, tiles, n("scale_files"))
        run_id = f"bench-{shards}"
        plan_shards(s, run_id, shards)
        code = (
            "import sys; from bcc_pipeline.config import load_settings; "
            "from bcc_pipeline.scoring import score_shard; "
            f"score_shard(load_settings(), sys.argv[1], int(sys.argv[2]), batch_size={BATCH})"
        )
        env = dict(os.environ, BCC_HOME=str(s.home), BCC_SETTLE_SECONDS="0", TF_CPP_MIN_LOG_LEVEL="3")
        env.pop("BCC_DATABASE_URL", None)
        t0 = time.monotonic()
        procs = [
            subprocess.Popen([sys.executable, "-c", code, run_id, str(k)], env=env, stderr=subprocess.DEVNULL)
            for k in range(shards)
        ]
        codes = [p.wait() for p in procs]
        wall = time.monotonic() - t0
        if any(codes):
            raise SystemExit(f"scaling: a shard process failed: {codes}")
        summary = finalize_run(s, run_id)
        assert summary["scored"] == n("scale_files"), summary
        out.append(
            {
                "shards": shards,
                "images_per_s": summary["images_per_second"],
                "wall_seconds_with_startup": round(wall, 1),
            }
        )
        log(f"scaling: {shards} shard(s) {summary['images_per_second']} img/s, {wall:.0f}s with start-up")
    base = out[0]["images_per_s"]
    for r in out:
        r["relative_to_1"] = round(r["images_per_s"] / base, 3)
    return {
        "files": n("scale_files"),
        "runs": out,
        "figures": {"scaling_4_vs_1_shards": out[-1]["images_per_s"] / base},
    }


def section_prepare(work: Path) -> dict[str, Any]:
    if not (work / "model" / "bench.json").exists():
        log("preparing the benchmark model (DenseNet201 224px, head fitted on synthetic tiles)")
        prepare_model(work)
    return {"model": load_model_info(work)}


def wait_for_prepare(work: Path) -> None:
    """Training's untimed graph tracing runs beside the model preparation; its timed epochs wait for it."""
    flag = os.environ.get("BENCH_WAIT_FOR")
    if flag:
        t0 = time.monotonic()
        while not Path(flag).exists() and time.monotonic() - t0 < 900:
            time.sleep(0.5)
        log(f"training: waited {time.monotonic() - t0:.0f}s for the model preparation to finish")


def run_section(name: str, work: Path) -> dict[str, Any]:
    quiet_tf()
    if name in ("scoring", "options", "scaling"):
        section_prepare(work)
    if name == "trained" and not os.environ.get("BENCH_TRAINED_MODEL"):
        return {"skipped": "no trained model given (--trained-model VERSION or BENCH_TRAINED_MODEL)"}
    return globals()[f"section_{name}"](work)


# -- the orchestrator -------------------------------------------------------------------------
TARGETS = {
    "scoring_vs_forward": (">=", 0.90),
    "scoring_vs_naive": (">=", 3.0),
    "training_pipeline_overhead": ("<=", 1.10),
    "rss_ratio_5000_vs_500": ("<=", 1.2),
    "store_rows_per_s_postgresql": (">=", 20_000),
    "store_rows_per_s_sqlite": (None, None),
    "scaling_4_vs_1_shards": (None, None),
    "scoring_vs_backend_forward": (None, None),  # the guard band's cost shows as its gap to the above
    "auto_vs_keras": (None, None),  # >= 2 wherever a reduced-precision back-end validates (README)
}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        info["memory_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("tensorflow", "keras", "openvino", "onnxruntime"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return info


def judge(figures: dict[str, float]) -> dict[str, Any]:
    out = {}
    for name, value in figures.items():
        op, target = TARGETS.get(name, (None, None))
        ok = None if op is None else (value >= target if op == ">=" else value <= target)
        out[name] = {"value": round(value, 3), "target": None if op is None else f"{op} {target:g}", "ok": ok}
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Run {result['finished_at'][:16].replace('T', ' ')} UTC, {'quick' if result['quick'] else 'full'}, "
        f"on {m.get('cpu', '?')} ({m.get('cores')} cores, {m.get('memory_gib', '?')} GiB), "
        f"TensorFlow {m.get('tensorflow')}, OpenVINO {m.get('openvino')}.",
        "",
        "| figure | value | target | met |",
        "|---|---:|---|---|",
    ]
    for name, f in result["figures"].items():
        met = "—" if f["ok"] is None else ("yes" if f["ok"] else "**no**")
        value = f"{f['value']:,.0f}" if f["value"] >= 1000 else f"{f['value']:.3f}"
        lines.append(f"| `{name}` | {value} | {f['target'] or ''} | {met} |")
    opts = result["sections"].get("options")
    if opts and "backends" in opts:
        lines += [
            "",
            f"Inference back-ends, DenseNet201 {opts['image_size']}px, batch {opts['batch_size']}, "
            f"{opts['images']} images, against fp32 Keras:",
            "",
            "| back-end | precision | images/s | speedup | label agreement | max abs Δprob | validated |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for b, t in opts["backends"].items():
            if "skipped" in t:
                lines.append(f"| `{b}` | — | — | — | — | skipped: {t['skipped']} | — |")
                continue
            mark = " (auto)" if b == opts.get("auto") else ""
            lines.append(
                f"| `{b}`{mark} | {t['precision']} | {t['images_per_s']:.1f} | {t['speedup']:.2f}× | "
                f"{t['agreement'] * 100:.1f} % | {t['max_abs_dprob']:.4f} | "
                f"{'—' if 'validated' not in t else 'yes' if t['validated'] else 'no'} |"
            )
        lines += [
            "",
            "validated: no label flipped and max abs Δprob ≤ "
            f"{opts.get('max_delta', MAX_DELTA):g} on these images (random-base model).",
        ]
    tr = result["sections"].get("trained")
    if tr and "backends" in tr:
        counts = ", ".join(f"{v} {k}" for k, v in tr["images"].items())
        lines += [
            "",
            f"Validation on the trained model {tr['version']} ({counts} images, threshold "
            f"{tr['threshold']:.4f}), against fp32 Keras:",
            "",
            "| back-end | precision | images/s | speedup | flips m→b | flips b→m | max abs Δprob | validated |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for b, t in tr["backends"].items():
            if t["error"]:
                lines.append(f"| `{b}` | — | — | — | — | — | error: {t['error'][:80]} | no |")
                continue
            mark = " (auto)" if b == tr["auto"] else ""
            lines.append(
                f"| `{b}`{mark} | {t['precision']} | {t['images_per_second'] or 0:.1f} | "
                f"{t['speedup'] or 0:.2f}× | {t['flips_malignant_to_benign']} | "
                f"{t['flips_benign_to_malignant']} | {t['max_delta']:.4f} | {'yes' if t['validated'] else 'no'} |"
            )
    sc = result["sections"].get("scoring")
    if sc and "forward_images_per_s" in sc:
        med = statistics.median
        how = f"auto → {sc['backend']}" if sc.get("keras_forward_images_per_s") else sc["backend"]
        line = (
            f"Scoring ({how}, {sc['rounds']} rounds of {sc['files_per_round']} files, "
            f"medians): model step {med(sc['forward_images_per_s']):.1f} images/s "
            + (
                f"({sc['backend']} alone {med(sc['backend_forward_images_per_s']):.1f}), "
                if sc.get("backend_forward_images_per_s")
                else ""
            )
            + f"scoring path "
            f"{med(sc['scoring_images_per_s_steady']):.1f} images/s steady "
            f"({med(sc['scoring_images_per_s_with_startup']):.1f} with model start-up"
            + (
                f"; {sum(sc['rescored_fp32'])} images near the threshold re-scored in fp32 Keras, its load "
                f"taken out of the steady window"
                if sum(sc.get("rescored_fp32") or [0])
                else ""
            )
            + "), "
            f"seed-style per-image `predict` {sc['naive_images_per_s']:.1f} images/s."
        )
        if sc.get("keras_forward_images_per_s"):
            line += (
                f" fp32 Keras forward pass {sc['keras_forward_images_per_s']:.1f} images/s: auto is "
                f"{med(sc.get('backend_forward_images_per_s') or sc['forward_images_per_s']) / sc['keras_forward_images_per_s']:.2f}× fp32 Keras."
            )
        lines += ["", line]
    scl = result["sections"].get("scaling")
    if scl and "runs" in scl:
        lines += [
            "",
            "Shards run concurrently: "
            + ", ".join(f"{r['shards']} → {r['images_per_s']:.1f} images/s" for r in scl["runs"])
            + ".",
        ]
    failed = {k: v for k, v in result["sections"].items() if "error" in v}
    for k, v in failed.items():
        lines.append(f"\nSection `{k}` failed: {v['error']}")
    return "\n".join(lines) + "\n"


def update_readme(path: Path, table: str) -> None:
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    text = path.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        log(f"{path} has no {begin} … {end} markers; not updated")
        return
    head, rest = text.split(begin, 1)
    _old, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{table}{end}{tail}", encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    ap.add_argument("--readme", help="put the markdown table into this README between the bench markers")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument(
        "--trained-model",
        help="also validate this trained model version of the BCC_HOME deployment "
        "(e.g. the make demo champion; BENCH_TRAINED_MODEL)",
    )
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--done", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else None

    if args.section:  # child process: one section
        try:
            res = {name: run_section(name, Path(args.result).parent) for name in args.section.split(",")}
            Path(args.result).write_text(json.dumps(res, indent=1, default=float))
        finally:
            if args.done:
                Path(args.done).touch()
        return 0

    if args.trained_model:
        os.environ["BENCH_TRAINED_MODEL"] = args.trained_model
    started = time.monotonic()
    work = work or Path(tempfile.mkdtemp(prefix="bcc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sections: dict[str, Any] = {}
    try:
        wanted = set(args.only or SECTIONS) - (
            set() if os.environ.get("BENCH_TRAINED_MODEL") else {"trained"}
        )
        groups = [[m for m in g if m in wanted] for g in GROUPS]
        groups = [g for g in groups if g]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
        beside = None
        if "training" in wanted and {"scoring", "options", "scaling"} & wanted:
            # the benchmark model is prepared while training traces its graph (neither is timed)
            flag = work / "prepare.done"
            flag.unlink(missing_ok=True)
            beside = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--section",
                    "prepare",
                    "--result",
                    str(work / "prepare.json"),
                    "--done",
                    str(flag),
                ],
                env=env,
            )
            env_training = dict(env, BENCH_WAIT_FOR=str(flag))
        for group in groups:
            log("== " + " + ".join(group))
            t0 = time.monotonic()
            res_file = work / f"{'-'.join(group)}.json"
            proc = subprocess.run(
                [sys.executable, __file__, "--section", ",".join(group), "--result", str(res_file)],
                env=env_training if (beside and group == ["training"]) else env,
            )
            if beside is not None:  # never leave it running into a timed section
                if beside.wait() != 0:
                    log("the model preparation failed; the sections that need it will fail too")
                beside = None
            done = json.loads(res_file.read_text()) if proc.returncode == 0 and res_file.exists() else {}
            for name in group:
                sections[name] = done.get(name) or {
                    "error": f"section exited with code {proc.returncode} (see the log above)"
                }
                sections[name]["section_seconds"] = round(time.monotonic() - t0, 1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures: dict[str, float] = {}
    for res in sections.values():
        figures.update(res.get("figures", {}))
    result = {
        "quick": QUICK,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine(),
        "figures": judge(figures),
        "sections": sections,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    os.replace(tmp, out)
    table = markdown(result)
    print(table)
    print(f"(written to {out}; {result['seconds']:.0f}s)")
    if args.readme:
        update_readme(Path(args.readme), table)
    missed = [k for k, f in result["figures"].items() if f["ok"] is False]
    if missed:
        print("targets missed: " + ", ".join(missed))
    return 1 if any("error" in v for v in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
