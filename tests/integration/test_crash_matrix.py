"""The crash matrix: a real scoring process is SIGKILLed at each named point of a run, with the inbox on
the same filesystem as the archive and on another one (/dev/shm, where it is a separate tmpfs), then
scoring runs again. For every file, afterwards:

* exactly one prediction (per content) or one quarantine entry (``rejections`` row);
* exactly one archived or quarantined copy;
* no leftovers: nothing left in the inbox but the file scoring ignores, no temporary files of a move
  (``.bcc-move-*``), no ``~N`` second copies, every ledger row with ``moved_to``;
* and the killed run is recorded as ``abandoned`` (its process is gone).

The kill points are the hooks of :class:`bcc_pipeline.scoring.Hooks`: before the model scores a batch,
after a batch's commit before its files move, and in the middle of a move (the file at its destination,
the inbox name not removed yet). Intake's kill points are not in this matrix (scoring only).
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
from bcc_pipeline.store import InboxFile, Prediction, Rejection, ScoringRun, session_scope
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
    quarantined = [p for p in settings.quarantine_dir.rglob("*")
                   if p.is_file() and not p.name.endswith(".reason.txt")]
    assert Counter(sha256_file(p) for p in archived) == Counter(valid.values())  # one copy per file
    assert sorted(p.name for p in quarantined) == bad
    for p in archived + quarantined:
        assert "~" not in p.name
    for folder in [settings.home, inbox, *extra_dirs]:
        assert not [p for p in folder.rglob(".bcc-move-*")], "a move's temporary file was left"
    assert sorted(runs.values()).count("abandoned") == 1 and list(runs.values()).count("finished") == 1


@pytest.mark.slow
@pytest.mark.parametrize("where", ["same-filesystem", "other-filesystem"])
@pytest.mark.parametrize("hook", HOOK_POINTS)
def test_kill_at_every_point_then_rerun(hook, where, make_settings, sqlite_url, register_champion, png_writer,
                                        tmp_path):
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
