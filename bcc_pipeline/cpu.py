"""What numerics this machine computes with: its CPU class and the versions of the numerical packages.

**CPU class.** Two workers are of the same CPU class when they report the same vendor, the same model
name and the same set of numerics flags (:data:`NUMERICS_FLAGS`: the vector, fused multiply-add, VNNI,
bf16, fp16 and AMX instructions the kernels of TensorFlow/oneDNN, OpenVINO and ONNX Runtime choose
between). The class is ``<vendor>-<first 12 hex of sha256("vendor|model|flag,flag,...")>``, read from
``/proc/cpuinfo`` (the first processor; ``platform`` where that file is absent). Flags that do not change
which kernels run (security mitigations, virtualisation, power management) are left out, so a reboot or
a different hypervisor does not change the class; a different model name does, even with the same flags.

**Software.** The versions of the packages that compute a forward pass (:data:`NUMERICS_PACKAGES`),
hashed the same way. A back-end is validated for a (CPU class, software) pair: upgrading OpenVINO is
another pair, validated anew.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["NUMERICS_FLAGS", "NUMERICS_PACKAGES", "cpu_info", "parse_cpuinfo", "software_info"]

NUMERICS_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni_int8",
    "avx_ne_convert",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)
NUMERICS_PACKAGES = ("tensorflow", "keras", "numpy", "openvino", "nncf", "onnxruntime", "tf2onnx")
CPUINFO = Path("/proc/cpuinfo")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Vendor, model name and numerics flags of the first processor listed in ``/proc/cpuinfo`` text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough: a machine's processors are alike
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "vendor": fields.get("vendor_id", "") or platform.machine(),
        "model": fields.get("model name", "") or platform.processor() or platform.machine(),
        "flags": sorted(f for f in NUMERICS_FLAGS if f in flags),
    }


@functools.cache
def cpu_info() -> dict[str, Any]:
    """``{vendor, model, flags, bf16, amx, vnni, cpu_class}`` of this machine (see the module's doc)."""
    try:
        info = parse_cpuinfo(CPUINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        info = parse_cpuinfo("")
    flags = info["flags"]
    vendor = "".join(ch for ch in info["vendor"].lower() if ch.isalnum())[:16] or "cpu"
    return {
        **info,
        "bf16": any(f in flags for f in ("avx512_bf16", "amx_bf16")),
        "amx": any(f.startswith("amx") for f in flags),
        "vnni": any("vnni" in f for f in flags),
        "cpu_class": f"{vendor}-{_short_hash(info['vendor'] + '|' + info['model'] + '|' + ','.join(flags))}",
    }


@functools.cache
def software_info() -> dict[str, Any]:
    """``{packages: {name: version or None}, software: hash}`` of the numerical packages installed here."""
    packages: dict[str, str | None] = {}
    for name in NUMERICS_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    text = ",".join(f"{k}={v}" for k, v in sorted(packages.items()))
    return {"packages": packages, "software": f"sw-{_short_hash(text)}"}
