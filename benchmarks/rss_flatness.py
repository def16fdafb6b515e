"""Peak memory of `bcc score` on 500 vs 5,000 small images: is it flat in the inbox size?

Each size runs in a fresh `bcc score --json` process (SQLite, a fresh BCC_HOME, a tiny 32 px champion, the
default batch size); its peak RSS is the kernel's ``ru_maxrss`` for that one child (``os.wait4``). The
requirement: the 5,000-image peak may be at most 1.2× the 500-image peak.

    .venv/bin/python benchmarks/rss_flatness.py [--sizes 500 5000] [--image-size 64] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.support: the test suite's tiny model and champion registration
    sys.path.insert(0, str(ROOT))


def make_home(root: Path, n: int, image_px: int) -> dict[str, str]:
    import cv2
    import numpy as np

    from bcc_pipeline.config import load_settings
    from tests.support import install_artifact, register_version

    home = root / f"home-{n}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BCC_")}
    env.update({"BCC_HOME": str(home), "BCC_SETTLE_SECONDS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"})
    s = load_settings(env=env)
    dest = install_artifact(root / "tiny" / "model.keras", s.models_dir, "v-bench")
    sha = (root / "tiny" / "sha256").read_text().strip()
    register_version(s, "v-bench", artifact=(dest, sha), image_size=32, profile="demo", code_version="bench")
    rng = np.random.default_rng(n)
    for i in range(n):
        d = s.inbox_dir / f"patient_{i % 50:02d}"
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(
            str(d / f"img_{i:05d}.png"), rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)
        )
    old = time.time() - 60
    for p in s.inbox_dir.rglob("*.png"):
        os.utime(p, (old, old))
    return env


def save_tiny_model(root: Path) -> None:
    """The tiny champion the tests use (the engine does not care about the architecture), saved in a
    child process so that this one never loads TensorFlow."""
    code = f"""
import pathlib
from tests.support import save_tiny_artifact
p, sha = save_tiny_artifact({str(root / "tiny")!r}, 32)
pathlib.Path({str(root / "tiny" / "sha256")!r}).write_text(sha)
"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, stderr=subprocess.DEVNULL)


def score(env: dict[str, str]) -> tuple[int, dict]:
    """Run `bcc score --json`; return (peak RSS in bytes of that process, its summary)."""
    out = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bcc_pipeline.cli", "score", "--json"],
        env=env,
        stdout=out,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bcc score failed with exit code {proc.returncode}")
    out.seek(0)
    return usage.ru_maxrss * 1024, json.loads(out.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 5000])
    ap.add_argument("--image-size", type=int, default=64, help="side of the generated PNGs (64)")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bcc-rss-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        save_tiny_model(root)
        results = []
        for n in args.sizes:
            env = make_home(root, n, args.image_size)
            peak, summary = score(env)
            assert summary["scored"] == n, summary
            results.append(
                {
                    "images": n,
                    "peak_rss_mib": round(peak / 2**20, 1),
                    "seconds": summary["seconds"],
                    "images_per_second": summary["images_per_second"],
                }
            )
            print(json.dumps(results[-1]), flush=True)
        if len(results) >= 2:
            ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
            print(json.dumps({"ratio": round(ratio, 3), "limit": 1.2, "ok": ratio <= 1.2}))
            return 0 if ratio <= 1.2 else 1
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
