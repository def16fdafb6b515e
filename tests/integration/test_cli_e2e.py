"""The `bcc` command line end to end, as a person runs it: demo data → intake → train (tiny: 32 px,
1 epoch) → evaluate → gate → promote, then the registry commands. Real subprocesses, real files, a real
SQLite database. (On PostgreSQL, test_dags.py::test_retrain_dag_postgres_promotes trains through the
retraining DAG and then makes the same registry checks through this CLI.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .cli_support import (
    bcc_cli_env,
    bcc_json,
    check_listed_validation,
    check_rollback_and_promote,
    check_trained_model_dir,
    run_bcc,
)


@pytest.fixture
def cli_env(tmp_path: Path):
    def make(database_url: str) -> dict[str, str]:
        return bcc_cli_env(
            {
                "BCC_HOME": str(tmp_path / "home"),
                "BCC_DATABASE_URL": database_url,
                "BCC_SETTLE_SECONDS": "0",
                "BCC_GATE_MIN_ACCURACY": "0",
                "BCC_GATE_MIN_SENSITIVITY": "0",
                # one real back-end validation (an OpenVINO conversion) at promotion; the full set has
                # its own tests, and the other tests that train validate only fp32 Keras
                "BCC_PUBLISH_BACKENDS": "openvino",
            }
        )

    return make


def _train_once(env: dict[str, str]) -> dict:
    assert bcc_json(env, "db", "upgrade")["revision"]
    # a frozen holdout big enough for the gate to decide (scoring 64-px tiles costs seconds)
    holdout = Path(env["BCC_HOME"]).parent / "holdout-tiles"
    made = bcc_json(
        env,
        "demo-data",
        "--benign",
        "12",
        "--malignant",
        "12",
        "--size",
        "64",
        "--holdout-out",
        str(holdout),
        "--holdout",
        "60",
    )
    assert (made["benign"], made["malignant"], made["n_files"]) == (12, 12, 24)
    assert bcc_json(env, "holdout", "extend", "--from", str(holdout), "--reason", "e2e")["n"] == 60
    intake = bcc_json(env, "intake")
    assert intake["accepted"] == 24 and intake["rejected"] == 0
    return bcc_json(env, "train", "--profile", "demo", "--image-size", "32", "--epochs", "1", "--skip-intake")


def _check_first_model(env: dict[str, str], r: dict) -> str:
    version = r["version"]
    assert r["gate"]["decision"] == "promoted" and r["gate"]["champion"] == version
    assert "no champion yet" in r["gate"]["reason"]
    check_trained_model_dir(Path(env["BCC_HOME"]) / "models" / version)
    models = bcc_json(env, "models")
    assert [(m["version"], m["status"]) for m in models] == [(version, "champion")]
    check_listed_validation(models[0])
    # nothing to roll back to: a one-line error, no traceback
    bad = run_bcc(env, "rollback", "--reason", "test", ok=False)
    assert bad.returncode == 1 and "replaced no earlier champion" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    return version


@pytest.mark.slow
def test_cli_end_to_end_sqlite(cli_env, tmp_path):
    env = cli_env(f"sqlite:///{tmp_path / 'e2e.db'}")
    v1 = _check_first_model(env, _train_once(env))

    # A second candidate (the same network, registered under another version) goes through the real
    # evaluate → gate path, where the champion is re-scored on the candidate's validation images.
    from bcc_pipeline.config import load_settings
    from bcc_pipeline.pipelines import evaluate_step, gate_step

    settings = load_settings(env=env)
    v2 = v1 + "-copy"
    shutil.copytree(settings.models_dir / v1, settings.models_dir / v2)
    evaluate_step(settings, v2)
    g = gate_step(settings, v2, actor="pytest")
    assert g["decision"] == "promoted" and g["champion"] == v2
    assert "vs champion" in g["reason"]
    assert gate_step(settings, v2)["decision"] == "promoted"  # a retried gate changes nothing

    check_rollback_and_promote(env, v2, v1)


def test_model_info_reports_the_seed_parameter_counts():
    env = {k: v for k, v in os.environ.items() if not k.startswith("BCC_")}
    env["BCC_BASE_WEIGHTS"] = "none"
    info = bcc_json(env, "model-info", "--profile", "seed")
    assert info["input_shape"] == [224, 224, 3]
    assert (info["total_params"], info["trainable_params"], info["non_trainable_params"]) == (
        18333506,
        18100610,
        232896,
    )
    assert "DenseNet201" in info["architecture"]


def test_offline_imagenet_weights_fail_with_the_way_out(tmp_path):
    from bcc_pipeline.model import _network_reachable

    if _network_reachable():
        pytest.skip("the network is reachable here")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BCC_", "KERAS_HOME"))}
    env.update({"HOME": str(tmp_path), "BCC_BASE_WEIGHTS": "imagenet"})
    proc = run_bcc(env, "model-info", "--profile", "seed", "--json", ok=False)
    assert proc.returncode == 1 and proc.stdout == ""
    line = proc.stderr.strip().splitlines()[-1]
    assert "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5" in line
    assert str(tmp_path / ".keras" / "models") in line and "BCC_BASE_WEIGHTS=none" in line


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--epochs", "0"], "BCC_EPOCHS=0: must be a positive integer"),
        (["models"], "bcc db upgrade"),
        (["promote", "v-none", "--reason", "x"], "bcc db upgrade"),
    ],
)
def test_errors_are_one_line(tmp_path, args, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BCC_")}
    env["BCC_HOME"] = str(tmp_path)
    proc = run_bcc(env, *args, ok=False)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_config_shows_each_value_with_its_source_and_the_readme_table(tmp_path):
    from bcc_pipeline.config import PROFILES, SETTINGS, markdown_table

    env = {k: v for k, v in os.environ.items() if not k.startswith("BCC_")}
    env.update({"BCC_HOME": str(tmp_path), "BCC_EPOCHS": "3"})
    doc = bcc_json(env, "config", "--profile", "demo")
    assert set(doc["settings"]) == set(SETTINGS) and doc["env"]["epochs"] == "BCC_EPOCHS"
    assert (doc["settings"]["epochs"], doc["sources"]["epochs"]) == (3, "env")
    assert (doc["settings"]["image_size"], doc["sources"]["image_size"]) == (
        PROFILES["demo"]["image_size"],
        "profile",
    )
    human = run_bcc(env, "config").stdout.splitlines()
    assert any(line.split()[:2] == ["epochs", "3"] and "(env, BCC_EPOCHS)" in line for line in human)
    assert run_bcc(env, "config", "--markdown").stdout == markdown_table()
