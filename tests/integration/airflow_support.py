"""Helpers for the Airflow tests: an isolated AIRFLOW_HOME per test, the real `airflow` CLI in
subprocesses (Airflow reads its configuration once per process, so each test gets its own), and a
tiny registered champion so scoring DAG runs need no DenseNet training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def airflow_env(home: Path, *, metadata_url: str | None, bcc: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BCC_"))}
    home.mkdir(parents=True, exist_ok=True)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(REPO),
    })
    if metadata_url:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = metadata_url
    env.update(bcc)
    return env


def airflow(env: dict[str, str], *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"airflow {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def migrate(env: dict[str, str]) -> None:
    airflow(env, "db", "migrate", timeout=300)


def _json_out(text: str) -> Any:
    """The JSON document in an `airflow ... -o json` output (warnings may precede it on stdout)."""
    for line in text.splitlines():
        if line.startswith(("[", "{")):
            return json.loads(line)
    raise AssertionError(f"no JSON in airflow output:\n{text[-3000:]}")


def dags_test(env: dict[str, str], dag_id: str, conf: dict[str, Any] | None = None) -> dict[str, str]:
    """`airflow dags test` (which calls dag.test()), then the task states of that run from the DB."""
    args = ["dags", "test", dag_id]
    if conf is not None:
        args += ["-c", json.dumps(conf)]
    proc = airflow(env, *args, check=False)  # exits 1 when the run fails: the states below tell
    runs = _json_out(airflow(env, "dags", "list-runs", dag_id, "-o", "json").stdout)
    run = max(runs, key=lambda r: r.get("start_date") or "")
    states = _json_out(airflow(env, "tasks", "states-for-dag-run", dag_id, run["run_id"], "-o", "json").stdout)
    out: dict[str, str] = {"__run__": run["state"], "__run_id__": run["run_id"], "__log__": proc.stdout + proc.stderr}
    for row in states:
        key = row["task_id"] if str(row.get("map_index", "-1")) in ("-1", "None", "") else f"{row['task_id']}[{row['map_index']}]"
        out[key] = row["state"]
    return out


def register_tiny_champion(database_url: str, models_dir: Path, *, version: str = "vtiny-champion",
                           image_size: int = 32, threshold: float = 0.5) -> str:
    """The tiny classifier of tests/conftest.py saved as a checksummed artifact and registered as
    champion (with validation metrics, so the gate has something to compare)."""
    from bcc_pipeline import model as model_mod
    from bcc_pipeline import registry
    from bcc_pipeline.store import ModelVersion, session_scope, upgrade
    from tests.conftest import build_tiny_classifier

    net = build_tiny_classifier(image_size)
    path, digest = model_mod.save_artifact(net, models_dir / version, {"version": version, "image_size": image_size})
    upgrade(database_url)
    with session_scope(database_url) as s:
        s.add(ModelVersion(version=version, status="champion", artifact_path=str(path), artifact_sha256=digest,
                           base_weights="none", profile="test", image_size=image_size,
                           preprocessing="densenet-torch-v1", hyperparameters={}, manifest_hash="0" * 64,
                           n_train=0, n_val=0, threshold=threshold, code_version="test"))
        s.flush()
        registry.save_metrics(s, version, "validation", {"accuracy": 0.5, "sensitivity": 0.5, "roc_auc": 0.5})
    return version


def evaluate_version(database_url: str, version: str, plots_dir: Path, *, n: int = 60, seed: int = 0) -> dict[str, Any]:
    """Validation and holdout metrics plus the three plots for ``version``, written by the real
    evaluation functions on a synthetic labelled set (what a retrain records), so the pages have a
    model with quality to show. Returns the validation metrics."""
    import numpy as np
    from sqlalchemy import update

    from bcc_pipeline import evaluation, registry
    from bcc_pipeline.store import ModelVersion, session_scope

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    with session_scope(database_url) as s:
        for split in ("validation", "holdout"):
            y = np.arange(n) % 2
            p = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.2, n), 0.001, 0.999)
            metrics = evaluation.compute_metrics(y, p, threshold=0.5)
            registry.save_metrics(s, version, split, metrics)
            if split == "validation":
                out = metrics
                history = {"loss": [0.69, 0.52, 0.41, 0.35], "val_loss": [0.68, 0.55, 0.47, 0.44],
                           "accuracy": [0.55, 0.74, 0.82, 0.86], "val_accuracy": [0.56, 0.71, 0.79, 0.81]}
                evaluation.plot_all(history=history, y_true=y, prob_malignant=p, threshold=0.5, out_dir=plots_dir)
        s.execute(update(ModelVersion).where(ModelVersion.version == version).values(plots_dir=str(plots_dir)))
    return out
