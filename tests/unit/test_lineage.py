"""bcc_pipeline.lineage: what a version's numbers depend on besides its recipe."""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
from pathlib import Path

from bcc_pipeline import lineage


def test_lineage_records_packages_git_cpu_weights_and_the_four_manifests(tmp_path):
    weights = tmp_path / "base.h5"
    weights.write_bytes(b"weights" * 100)
    hashes = {"train": "a" * 64, "validation": "b" * 64, "calibration": "c" * 64, "holdout": "d" * 64}
    out = lineage.lineage(
        role_hashes=hashes,
        base_weights=str(weights),
        base_weights_path=str(weights),
        model_name="densenet201_bcc",
    )
    assert out["manifests"] == hashes and out["model"] == "densenet201_bcc"
    assert out["base_weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert out["packages"]["numpy"] == importlib.metadata.version("numpy")
    assert set(lineage.PACKAGES) <= set(out["packages"]) and "bcc-pipeline" in out["packages"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(lineage.__file__).parent, capture_output=True, text=True
    ).stdout.strip()
    assert out["git"]["commit"] == head and isinstance(out["git"]["dirty"], bool)
    assert set(out["cpu"]["flags"]) <= set(lineage.CPU_FLAGS)
    # random initialisation: no weights file, no hash
    assert (
        lineage.lineage(role_hashes=hashes, base_weights="none", base_weights_path=None, model_name="m")[
            "base_weights"
        ]["sha256"]
        is None
    )


def test_cpu_features_reads_the_flags_that_matter(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 fma avx512f "
        "avx512_bf16 amx_tile amx_bf16 avx512_vnni\n\nprocessor\t: 1\n"
    )
    cpu = lineage.cpu_features(info)
    assert cpu["model"] == "Test CPU 9000"
    assert cpu["flags"] == sorted(
        ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx512_vnni"]
    )
    assert lineage.cpu_features(tmp_path / "absent")["flags"] == []


def test_git_state_outside_a_checkout(tmp_path):
    assert lineage.git_state(tmp_path) == {"commit": None, "dirty": None}
