"""Helpers for driving the `bcc` command line in subprocesses, as a person runs it, and the checks of a
trained version that both the CLI's end-to-end test (SQLite) and the PostgreSQL retraining DAG test
make through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BCC = [sys.executable, "-m", "bcc_pipeline.cli"]


def run_bcc(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*BCC, *args], env=env, capture_output=True, text=True, timeout=900)
    if ok and proc.returncode != 0:
        raise AssertionError(f"bcc {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def bcc_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(run_bcc(env, *args, "--json").stdout)


def bcc_cli_env(bcc: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its BCC_* variables, plus ``bcc``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BCC_")}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "3", **bcc})
    return env


def check_trained_model_dir(model_dir: Path) -> None:
    """What training leaves in ``models/<version>/`` at 32 px: the metadata and the plots."""
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["image_size"] == 32 and meta["preprocessing"] == "densenet-torch-v1"
    assert 0.0 <= meta["threshold"] <= 1.0 and meta["bn_recalibrated"] is True
    for name in ("training_curves", "confusion_matrix", "roc"):
        assert (model_dir / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_listed_validation(model: Mapping[str, Any]) -> None:
    """A row of `bcc models --json` carries the version's validation metrics and confusion counts."""
    v = model["validation"]
    assert {"accuracy", "sensitivity", "specificity", "roc_auc", "f1", "ece", "log_loss", "tp"} <= set(v)
    assert v["tp"] + v["fn"] + v["tn"] + v["fp"] == model["n_val"]


def check_rollback_and_promote(env: dict[str, str], champion: str, previous: str) -> None:
    """`bcc rollback` from ``champion`` back to ``previous``, then `bcc promote` of ``champion`` again."""
    back = bcc_json(env, "rollback", "--reason", "testing rollback")
    assert (back["from_version"], back["to_version"], back["decision"]) == (champion, previous, "rollback")
    again = bcc_json(env, "promote", champion, "--reason", "testing manual promotion", "--actor", "alice")
    assert (again["from_version"], again["to_version"], again["actor"]) == (previous, champion, "alice")
    statuses = {m["version"]: m["status"] for m in bcc_json(env, "models")}
    assert statuses == {previous: "retired", champion: "champion"}
