"""The `bcc` command line end to end, as a person runs it: demo data → intake → train (tiny: 32 px,
1 epoch) → evaluate → gate → promote, then the registry commands. Real subprocesses, real files, real
SQLite and PostgreSQL databases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BCC = [sys.executable, "-m", "bcc_pipeline.cli"]


def run_bcc(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*BCC, *args], env=env, capture_output=True, text=True, timeout=900)
    if ok and proc.returncode != 0:
        raise AssertionError(f"bcc {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def bcc_json(env: dict[str, str], *args: str):
    return json.loads(run_bcc(env, *args, "--json").stdout)


@pytest.fixture
def cli_env(tmp_path: Path):
    def make(database_url: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BCC_")}
        env.update(
            {
                "BCC_HOME": str(tmp_path / "home"),
                "BCC_DATABASE_URL": database_url,
                "BCC_SETTLE_SECONDS": "0",
                "BCC_GATE_MIN_ACCURACY": "0",
                "BCC_GATE_MIN_SENSITIVITY": "0",
                "TF_CPP_MIN_LOG_LEVEL": "3",
                # one real back-end validation at promotion; the full set has its own tests
                "BCC_PUBLISH_BACKENDS": "openvino",
            }
        )
        return env

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
    model_dir = Path(env["BCC_HOME"]) / "models" / version
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["image_size"] == 32 and meta["preprocessing"] == "densenet-torch-v1"
    assert 0.0 <= meta["threshold"] <= 1.0 and meta["bn_recalibrated"] is True
    for name in ("training_curves", "confusion_matrix", "roc"):
        assert (model_dir / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    models = bcc_json(env, "models")
    assert [(m["version"], m["status"]) for m in models] == [(version, "champion")]
    v = models[0]["validation"]
    assert {"accuracy", "sensitivity", "specificity", "roc_auc", "f1", "ece", "log_loss", "tp"} <= set(v)
    assert v["tp"] + v["fn"] + v["tn"] + v["fp"] == models[0]["n_val"]
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

    back = bcc_json(env, "rollback", "--reason", "testing rollback")
    assert (back["from_version"], back["to_version"], back["decision"]) == (v2, v1, "rollback")
    again = bcc_json(env, "promote", v2, "--reason", "testing manual promotion", "--actor", "alice")
    assert (again["to_version"], again["actor"]) == (v2, "alice")
    statuses = {m["version"]: m["status"] for m in bcc_json(env, "models")}
    assert statuses == {v1: "retired", v2: "champion"}


@pytest.mark.slow
@pytest.mark.postgres
def test_cli_end_to_end_postgres(cli_env, pg_url):
    env = cli_env(pg_url)
    _check_first_model(env, _train_once(env))


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
