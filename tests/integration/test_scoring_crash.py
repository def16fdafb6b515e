"""Crash safety and concurrency of batch scoring with real processes, on SQLite and PostgreSQL.

* A real scoring process is SIGKILLed mid-run, between a batch's commit and its file moves, then
  `bcc score` is run again, and every invariant is checked: each valid content has exactly one
  prediction, every file is in archive/ or quarantine/ (ignored ones stay in the inbox), nothing is
  duplicated or lost, the counts add up. (Other crash points, and rerunning the same run id, are tested
  in-process in tests/unit/test_scoring_moves.py.)
* Shards run concurrently in separate processes never score a file twice.

The killed process runs what `bcc score` runs (``score_inbox`` with the settings from the environment)
with the ``on_batch_committed`` hook blocking at one batch, so that the kill lands where the test wants
it rather than after the run ended.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bcc_pipeline.images import sha256_file
from bcc_pipeline.store import InboxFile, Prediction, ScoringRun, session_scope

N_VALID, N_DUP, N_BAD = 100, 6, 4

# Scores the inbox as `bcc score` does, with one hook of scoring.Hooks blocking: at the ``block_at``-th
# call of that hook it writes a marker file and then blocks, so the test's SIGKILL lands exactly there (no
# timing guesswork). Hooks: on_model_batch (before the model scores a batch), on_batch_committed (a batch
# committed, its files not moved yet), on_move_linked (in the middle of a move: the file is at its
# destination, the inbox name not removed yet). An optional fourth argument is the inbox.
BLOCKED = """
import json, os, sys, time
from bcc_pipeline.config import load_settings
from bcc_pipeline.scoring import Hooks, score_inbox
hook, block_at, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
inbox = sys.argv[4] if len(sys.argv) > 4 else None
calls = [0]
def block(*args):
    calls[0] += 1
    if calls[0] == block_at:
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(3600)
print(json.dumps(score_inbox(load_settings(), inbox=inbox, hooks=Hooks(**{hook: block}))))
"""
HOOK_POINTS = ("on_model_batch", "on_batch_committed", "on_move_linked")


def scoring_env(home: Path, url: str, **extra: str) -> dict[str, str]:
    """The environment of a scoring subprocess: this home and database, no settle time, batches of 4."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BCC_")}
    env.update(
        {
            "BCC_HOME": str(home),
            "BCC_DATABASE_URL": url,
            "BCC_SETTLE_SECONDS": "0",
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "BCC_SCORE_BATCH_SIZE": "4",
            **extra,
        }
    )
    return env


_env = scoring_env


def _n_predictions(url: str) -> int:
    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(Prediction)) or 0


def kill_at(
    env: dict[str, str], hook: str, block_at: int, inbox: Path | None = None, script: str = BLOCKED
) -> None:
    """Start scoring (or another ``script`` that takes the same arguments), block it at the ``block_at``-th
    call of ``hook`` and SIGKILL it there."""
    marker = Path(env["BCC_HOME"]) / f".blocked-{hook}"
    marker.unlink(missing_ok=True)
    args = [sys.executable, "-c", script, hook, str(block_at), str(marker)] + ([str(inbox)] if inbox else [])
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while not marker.exists():
            assert proc.poll() is None, f"scoring ended before the kill: {proc.stderr.read()[-2000:]!r}"
            assert time.monotonic() < deadline, f"{hook} was called fewer than {block_at} times"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
        marker.unlink(missing_ok=True)
    assert proc.returncode == -signal.SIGKILL


def _kill_after_commit(env: dict[str, str], block_at: int) -> None:
    """Start scoring, blocking after its ``block_at``-th batch is committed, and SIGKILL it there."""
    kill_at(env, "on_batch_committed", block_at)


def _build(settings, png_writer) -> dict[str, object]:
    inbox = settings.inbox_dir
    valid = []
    for i in range(N_VALID):
        valid.append(f"patient_{i % 7}/img_{i:04d}.png")
        png_writer(inbox / valid[-1], seed=1000 + i, size=48)
    for i in range(N_DUP):  # the same content under another name
        rel = f"copies/copy_{i}.png"
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(inbox / valid[i * 5], inbox / rel)
        valid.append(rel)
    bad = []
    for i in range(N_BAD):
        bad.append(f"patient_{i}/bad_{i}.png")
        (inbox / bad[-1]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"no chunks here" * (i + 1))
    (inbox / "notes.txt").write_text("ignored, stays")
    return {"valid": valid, "bad": bad, "shas": {rel: sha256_file(inbox / rel) for rel in valid}}


def _check_invariants(settings, url: str, built: dict[str, object]) -> None:
    inbox = settings.inbox_dir
    shas: dict[str, str] = built["shas"]
    left = sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file())
    assert left == ["notes.txt"]
    with session_scope(url) as s:
        preds = s.execute(select(Prediction.image_sha256, Prediction.model_version)).all()
        ledger = s.scalars(select(InboxFile)).all()
        runs = list(s.scalars(select(ScoringRun.run_id)))
    # exactly one prediction per valid content, none for anything else
    assert sorted(p.image_sha256 for p in preds) == sorted(set(shas.values()))
    # every file taken on exactly once, and moved
    by_path: dict[str, list[InboxFile]] = {}
    for row in ledger:
        by_path.setdefault(row.path, []).append(row)
    assert set(by_path) == set(shas) | set(built["bad"])
    assert all(len(rows) == 1 and rows[0].moved_to for rows in by_path.values()), [
        (p, [(r.run_id, r.status, r.moved_to) for r in rows])
        for p, rows in by_path.items()
        if len(rows) != 1 or not rows[0].moved_to
    ]
    for rel in shas:
        row = by_path[rel][0]
        assert row.status in ("scored", "duplicate") and row.sha256 == shas[rel]
        assert row.moved_to == str(settings.archive_dir / row.run_id / rel) and Path(row.moved_to).is_file()
    for rel in built["bad"]:
        row = by_path[rel][0]
        assert row.status == "rejected" and Path(row.moved_to).is_file()
        assert Path(row.moved_to + ".reason.txt").read_text().strip() == row.reason
    # no stray copies anywhere
    archived = [p for p in settings.archive_dir.rglob("*") if p.is_file()]
    quarantined = [
        p for p in settings.quarantine_dir.rglob("*") if p.is_file() and not p.name.endswith(".reason.txt")
    ]
    assert len(archived) == len(shas) and len(quarantined) == len(built["bad"])
    # the counts of all runs add up
    from bcc_pipeline.scoring import finalize_run

    totals = {"scored": 0, "duplicates": 0, "rejected": 0}
    for run in runs:
        summary = finalize_run(settings, run)
        for k in totals:
            totals[k] += summary[k]
    assert totals == {
        "scored": len(set(shas.values())),
        "duplicates": len(shas) - len(set(shas.values())),
        "rejected": len(built["bad"]),
    }


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun(db_url, make_settings, register_champion, png_writer):
    settings = make_settings(db_url, settle_seconds=0)
    register_champion(settings)
    built = _build(settings, png_writer)
    env = _env(settings.home, db_url)

    # killed between a batch's commit and its file moves: the hardest moment
    _kill_after_commit(env, block_at=3)  # the 3rd batch is committed, its files not moved
    with session_scope(db_url) as s:
        killed = s.scalars(select(ScoringRun)).one()
        unmoved = s.scalar(select(func.count()).select_from(InboxFile).where(InboxFile.moved_to.is_(None)))
    assert killed.status == "running" and killed.finished_at is None
    assert unmoved >= 1  # committed rows whose files had not moved yet
    assert _n_predictions(db_url) < len(set(built["shas"].values()))
    # run again, as a person would after a crash: a new run finishes the job
    proc = subprocess.run(
        [sys.executable, "-m", "bcc_pipeline.cli", "score", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout)
    assert final["status"] == "finished" and final["run_id"] != killed.run_id
    assert final["recovered"] == unmoved  # moved where the killed run meant them to go
    _check_invariants(settings, db_url, built)


SHARD = """
import sys
from bcc_pipeline.config import load_settings
from bcc_pipeline.scoring import score_shard
import json
print(json.dumps(score_shard(load_settings(), sys.argv[1], int(sys.argv[2]), batch_size=4)))
"""


@pytest.mark.slow
def test_concurrent_shards_in_separate_processes(db_url, make_settings, register_champion, png_writer):
    from bcc_pipeline.scoring import finalize_run, plan_shards

    settings = make_settings(db_url, settle_seconds=0)
    register_champion(settings)
    built = _build(settings, png_writer)
    env = _env(settings.home, db_url)
    plan = plan_shards(settings, "sharded", 2)
    assert plan["n_files"] == len(built["shas"]) + len(built["bad"])
    # (the same shard started twice at once, an Airflow retry while the first attempt still runs, is
    # refused by the shard's lock: tests/unit/test_scoring_run.py and test_scoring_shard.py)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHARD, "sharded", str(k)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sum(r["scored"] for r in results) == len(set(built["shas"].values()))
    assert sum(r["rejected"] for r in results) == len(built["bad"])
    summary = finalize_run(settings, "sharded")
    assert summary["status"] == "finished" and summary["shards_finished"] == 2
    assert _n_predictions(db_url) == len(set(built["shas"].values()))
    _check_invariants(settings, db_url, built)
