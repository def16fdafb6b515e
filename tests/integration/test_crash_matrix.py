"""The crash matrix: a real scoring process is SIGKILLed at each named point of a run, with the inbox on
the same filesystem as the archive and on another one (/dev/shm, where it is a separate tmpfs), then
scoring runs again. For every file, afterwards:

* exactly one prediction (per content) or one quarantine entry (``rejections`` row);
* exactly one archived or quarantined copy;
* no leftovers: nothing left in the inbox but the file scoring ignores, no temporary files of a move
  (``.bcc-move-*``) or of an atomic write (``.bcc-tmp-*``, ``*.tmp``), no ``~N`` second copies, every
  ledger row with ``moved_to``;
* and the killed run is recorded as ``abandoned`` (its process is gone).

The kill points are the hooks of :class:`bcc_pipeline.scoring.Hooks`: before the model scores a batch,
after a batch's commit before its files move, and in the middle of a move (the file at its destination,
the inbox name not removed yet); and intake's one named point, ``on_committed`` (a file's outcome
committed, the file not yet removed or quarantined), with ``landing/`` on either filesystem: afterwards
every landing file is exactly one ``images`` row or one ``rejections`` row, one stored or quarantined
copy, and nothing is left in ``landing/``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from bcc_pipeline import scoring
from bcc_pipeline.images import sha256_file
from bcc_pipeline.intake import intake
from bcc_pipeline.store import ImageRecord, InboxFile, Prediction, Rejection, ScoringRun, session_scope
from tests.integration.test_scoring_crash import HOOK_POINTS, kill_at, scoring_env

N_VALID, N_BAD = 7, 2


def _second_filesystem(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm: no second filesystem to put the inbox on")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the archive: no second filesystem")
    return Path(tempfile.mkdtemp(prefix="bcc-crash-", dir=shm))


def _fill(inbox: Path, png_writer) -> dict[str, str]:
    """A handful of images (one content twice), two broken files and one ignored file; rel -> sha256 (None
    for the broken ones)."""
    shas: dict[str, str | None] = {}
    for i in range(N_VALID):
        rel = f"patient_{i % 2}/img_{i}.png"
        png_writer(inbox / rel, seed=500 + i, size=40)
        shas[rel] = sha256_file(inbox / rel)
    shutil.copyfile(inbox / "patient_0/img_0.png", inbox / "copy_of_img_0.png")
    shas["copy_of_img_0.png"] = shas["patient_0/img_0.png"]
    for i in range(N_BAD):
        (inbox / f"bad_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated" * (i + 1))
        shas[f"bad_{i}.png"] = None
    (inbox / "notes.txt").write_text("ignored, stays")
    return shas


def _temporaries(folder: Path) -> list[Path]:
    """What an interrupted write or move left below ``folder``: a move's ``.bcc-move-*`` copy, an atomic
    write's or a conversion's ``.bcc-tmp-*`` file or folder, or any other ``*.tmp`` name."""
    return [
        p
        for p in folder.rglob("*")
        if p.name.startswith((".bcc-move-", ".bcc-tmp-")) or p.name.endswith(".tmp")
    ]


def _check(settings, url: str, inbox: Path, shas: dict[str, str | None], extra_dirs: list[Path]) -> None:
    valid = {rel: sha for rel, sha in shas.items() if sha}
    bad = sorted(rel for rel, sha in shas.items() if sha is None)
    left = sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file() or p.is_symlink())
    assert left == ["notes.txt"]
    with session_scope(url) as s:
        preds = Counter(s.scalars(select(Prediction.image_sha256)))
        rejections = Counter(s.scalars(select(Rejection.path)))
        rows = s.scalars(select(InboxFile)).all()
        runs = {r.run_id: r.status for r in s.scalars(select(ScoringRun))}
    assert preds == Counter(set(valid.values()))  # one prediction per content, nothing else
    assert rejections == Counter(bad)  # one quarantine entry per broken file
    assert all(r.moved_to for r in rows), [(r.path, r.move_error) for r in rows if not r.moved_to]
    archived = [p for p in settings.archive_dir.rglob("*") if p.is_file()]
    quarantined = [
        p for p in settings.quarantine_dir.rglob("*") if p.is_file() and not p.name.endswith(".reason.txt")
    ]
    assert Counter(sha256_file(p) for p in archived) == Counter(valid.values())  # one copy per file
    assert sorted(p.name for p in quarantined) == bad
    for p in archived + quarantined:
        assert "~" not in p.name
    for folder in [settings.home, inbox, *extra_dirs]:
        assert not _temporaries(folder), "a temporary file was left"
    assert sorted(runs.values()).count("abandoned") == 1 and list(runs.values()).count("finished") == 1


@pytest.mark.slow
@pytest.mark.parametrize("where", ["same-filesystem", "other-filesystem"])
@pytest.mark.parametrize("hook", HOOK_POINTS)
def test_kill_at_every_point_then_rerun(
    hook, where, make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    extra: list[Path] = []
    if where == "other-filesystem":
        inbox = _second_filesystem(tmp_path) / "inbox"
        extra.append(inbox.parent)
    else:
        inbox = tmp_path / "inbox"
    try:
        settings = make_settings(sqlite_url, settle_seconds=0, inbox_roots=str(inbox))
        register_champion(settings)
        shas = _fill(inbox, png_writer)
        env = scoring_env(settings.home, sqlite_url, BCC_INBOX_ROOTS=str(inbox))
        kill_at(env, hook, 2 if hook != "on_move_linked" else 3, inbox=inbox)
        summary = scoring.score_inbox(settings, inbox=inbox, batch_size=4)  # run again, as a person would
        assert summary["status"] == "finished" and summary["move_failed"] == 0
        _check(settings, sqlite_url, inbox, shas, extra)
    finally:
        for folder in extra:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_killed_mid_move_across_filesystems_then_touched_then_rerun(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """Killed once a copy is published on the archive's filesystem and before the inbox file is removed;
    the inbox files are then touched (or copied again with the same bytes): the rerun finishes the move
    with that copy instead of leaving it as an unrecorded second copy beside a ``~1``."""
    inbox = _second_filesystem(tmp_path) / "inbox"
    try:
        settings = make_settings(sqlite_url, settle_seconds=0, inbox_roots=str(inbox))
        register_champion(settings)
        shas = _fill(inbox, png_writer)
        env = scoring_env(settings.home, sqlite_url, BCC_INBOX_ROOTS=str(inbox))
        kill_at(env, "on_move_linked", 3, inbox=inbox)
        for p in inbox.rglob("*"):
            if p.is_file():
                os.utime(p)
        summary = scoring.score_inbox(settings, inbox=inbox, batch_size=4)
        assert summary["status"] == "finished" and summary["move_failed"] == 0
        _check(settings, sqlite_url, inbox, shas, [inbox.parent])
    finally:
        shutil.rmtree(inbox.parent, ignore_errors=True)


# Intake with its on_committed hook blocking at the ``block_at``-th call (same arguments as the scoring
# script of test_scoring_crash, so its kill_at drives both).
INTAKE_BLOCKED = """
import os, sys, time
from bcc_pipeline.config import load_settings
from bcc_pipeline.intake import intake
hook, block_at, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
calls = [0]
def block(*args):
    calls[0] += 1
    if calls[0] == block_at:
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(3600)
intake(load_settings(), run_id="killed", **{hook: block})
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["same-filesystem", "other-filesystem"])
@pytest.mark.parametrize("block_at", [1, 2, 3])
def test_intake_killed_after_a_commit_then_rerun(
    block_at, where, make_settings, sqlite_url, png_writer, tmp_path
):
    from bcc_pipeline.store import upgrade

    settings = make_settings(sqlite_url, settle_seconds=0)
    upgrade(sqlite_url, home=settings.home)
    extra: list[Path] = []
    land = settings.landing_dir
    if where == "other-filesystem":
        extra.append(_second_filesystem(tmp_path))
        land.parent.mkdir(parents=True, exist_ok=True)
        land.symlink_to(extra[0], target_is_directory=True)
    try:
        png_writer(land / "benign" / "a.png", seed=1)
        png_writer(land / "benign" / "b.png", seed=2)
        shutil.copyfile(land / "benign" / "b.png", land / "benign" / "b_again.png")  # a duplicate
        png_writer(land / "malignant" / "c.png", seed=3)
        shutil.copyfile(land / "benign" / "a.png", land / "malignant" / "conflict.png")  # both labels
        (land / "malignant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        contents = {sha256_file(p) for p in land.rglob("*.png") if p.name != "broken.png"}
        env = scoring_env(settings.home, sqlite_url, BCC_PROFILE="demo")
        kill_at(env, "on_committed", block_at, script=INTAKE_BLOCKED)
        report = intake(settings, run_id="rerun")
        assert report.failed == []
        assert [p for p in land.rglob("*") if p.is_file() or p.is_symlink()] == []  # nothing left in landing
        with session_scope(sqlite_url) as s:
            images = Counter(s.scalars(select(ImageRecord.sha256)))
            rejections = Counter(s.scalars(select(Rejection.path)))
            unmoved = s.scalars(select(Rejection).where(Rejection.moved_to.is_(None))).all()
        assert images == Counter(contents)  # one row per content
        assert rejections == Counter(["malignant/broken.png", "malignant/conflict.png"]) and not unmoved
        stored = [p for p in settings.dataset_dir.rglob("*") if p.is_file() and "manifests" not in p.parts]
        assert Counter(sha256_file(p) for p in stored) == Counter(contents)  # one stored copy per content
        quarantined = sorted(
            p.name
            for p in settings.quarantine_dir.rglob("*")
            if p.is_file() and not p.name.endswith(".reason.txt")
        )
        assert quarantined == ["broken.png", "conflict.png"]  # one copy each, no ~1
        for folder in [settings.home, *extra]:
            assert not _temporaries(folder), "a temporary file was left"
    finally:
        for folder in extra:
            shutil.rmtree(folder, ignore_errors=True)
