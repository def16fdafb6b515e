"""Where a model version came from: package versions, code commit, CPU features, base weights, data.

:func:`lineage` returns one JSON-able dict, stored with the version (``model_versions.lineage``) and
in its ``metadata.json``, and shown in its model card. Nothing here imports TensorFlow: versions are
read with :mod:`importlib.metadata`.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import sha256_file

__all__ = ["CPU_FLAGS", "PACKAGES", "cpu_features", "git_state", "lineage", "package_versions"]

#: Distributions whose versions change the numbers a model produces.
PACKAGES = (
    "tensorflow",
    "keras",
    "numpy",
    "openvino",
    "onnxruntime",
    "scikit-learn",
    "scipy",
    "bcc-pipeline",
)
#: CPU flags (``/proc/cpuinfo``) that decide which kernels, and so which rounding, the runtimes use.
CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "f16c",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(where: Path | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout holding this package."""
    cwd = where or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return {"commit": sha or None, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU model and which of :data:`CPU_FLAGS` it has (empty flags where /proc/cpuinfo is absent)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {
        "model": model,
        "machine": platform.machine(),
        "flags": sorted(f for f in CPU_FLAGS if f in flags),
    }


def lineage(
    *,
    role_hashes: Mapping[str, str | None],
    base_weights: str,
    base_weights_path: str | None,
    model_name: str,
) -> dict[str, Any]:
    """Everything a version's numbers depend on besides its recipe (kept in ``hyperparameters``).

    ``base_weights_path``: the weights file the base network was initialised from (its sha256 is
    recorded), or None for random initialisation."""
    weights: dict[str, Any] = {"setting": base_weights, "path": base_weights_path, "sha256": None}
    if base_weights_path and Path(base_weights_path).is_file():
        weights["sha256"] = sha256_file(Path(base_weights_path))
    return {
        "packages": package_versions(),
        "git": git_state(),
        "cpu": cpu_features(),
        "python": platform.python_version(),
        "model": model_name,
        "base_weights": weights,
        "manifests": dict(role_hashes),
    }
