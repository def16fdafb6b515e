"""A whole scoring run (bcc_pipeline.scoring.run and the package surface): ``score_inbox`` end to end and
again, ``bcc score`` and ``bcc predictions``. In-process, with a tiny champion model."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys

import pytest
from sqlalchemy import func, select, text

from bcc_pipeline import scoring, store
from bcc_pipeline.errors import ConfigError
from bcc_pipeline.store import ImageRecord, InboxFile, Prediction, Rejection, ScoringRun, session_scope
from bcc_pipeline.validation import validate_backends
from tests.support import archived, count_rows, fill_inbox, inbox_files, scoring_settings


def test_importing_scoring_does_not_import_tensorflow():
    code = (
        "import sys, bcc_pipeline.scoring, bcc_pipeline.files, bcc_pipeline.cli; "
        "bad = [m for m in ('tensorflow', 'keras', 'airflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_score_inbox_end_to_end_and_rerun_adds_nothing(
    make_settings, migrated_url, register_champion, png_writer
):
    s = scoring_settings(make_settings, migrated_url)
    version = register_champion(s, threshold=0.5)
    imgs = fill_inbox(s.inbox_dir, png_writer, 9)
    shutil.copyfile(imgs[0], s.inbox_dir / "same content.png")  # duplicate content under another name
    (s.inbox_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (s.inbox_dir / "readme.md").write_text("left alone")

    r = scoring.score_inbox(s, batch_size=4)
    assert (r["scored"], r["duplicates"], r["rejected"], r["ignored"], r["skipped"]) == (9, 1, 1, 1, 0)
    assert r["status"] == "finished" and r["model_version"] == version and r["move_failed"] == 0
    assert r["rejections"] == [{"path": "broken.png", "reason": r["rejections"][0]["reason"]}]
    assert "truncated or corrupt" in r["rejections"][0]["reason"]
    assert inbox_files(s.inbox_dir) == ["readme.md"]
    run = r["run_id"]
    arch = s.archive_dir / run
    assert sorted(str(p.relative_to(arch)) for p in archived(s)) == sorted(
        [str(p.relative_to(s.inbox_dir)) for p in imgs] + ["same content.png"]
    )
    q = s.quarantine_dir / run
    assert (q / "broken.png").exists() and "truncated" in (q / "broken.png.reason.txt").read_text()

    with session_scope(migrated_url) as ses:
        preds = ses.scalars(select(Prediction)).all()
        assert len(preds) == 9 and {p.model_version for p in preds} == {version}
        for p in preds:
            assert p.label == ("malignant" if p.prob_malignant >= 0.5 else "benign") and p.threshold == 0.5
            assert p.run_id == run and p.source_path.startswith("patient_")
        ledger = {f.path: f for f in ses.scalars(select(InboxFile))}
        assert ledger["same content.png"].status == "duplicate"
        assert ledger["same content.png"].sha256 == ledger["patient_0/img000.png"].sha256
        assert all(f.moved_to for f in ledger.values())
        assert (
            ses.scalar(select(func.count()).select_from(ImageRecord).where(ImageRecord.label.is_(None))) == 9
        )
        rej = ses.scalars(select(Rejection)).one()
        assert (rej.stage, rej.path, rej.run_id) == ("scoring", "broken.png", run) and rej.moved_to
        row = ses.get(ScoringRun, run)
        assert row.status == "finished" and row.finished_at and row.counts["scored"] == 9
        assert row.model_version == version
        view = ses.execute(
            text("SELECT image_sha256, model_status, champion_version FROM latest_predictions")
        ).all()
        assert len(view) == 9 and {(v.model_status, v.champion_version) for v in view} == {
            ("champion", version)
        }

    # the same files again (e.g. restored from the archive): nothing new, all duplicates
    for p in archived(s):
        dest = s.inbox_dir / "again" / p.relative_to(arch)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
    r2 = scoring.score_inbox(s, batch_size=4)
    assert (r2["scored"], r2["duplicates"], r2["rejected"]) == (0, 10, 0)
    assert count_rows(migrated_url, Prediction) == 9
    # and a rerun of a finished run id changes nothing at all
    r3 = scoring.score_inbox(s, run_id=run)
    assert (r3["scored"], r3["duplicates"], r3["rejected"]) == (9, 1, 1) and count_rows(
        migrated_url, Prediction
    ) == 9


def test_cli_score_and_predictions(
    make_settings, migrated_url, register_champion, png_writer, monkeypatch, capsys
):
    from bcc_pipeline.cli import main

    s = scoring_settings(make_settings, migrated_url)
    version = register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 5)
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", migrated_url)
    monkeypatch.setenv("BCC_SETTLE_SECONDS", "0")
    validate_backends(s, version, ["xla"])  # an explicit back-end scores only once validated
    assert main(["score", "--json", "--batch-size", "2", "--inference", "xla"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["inference"] == "xla" and summary["precision"] == "f32"
    for k in ("scored", "duplicates", "rejected", "ignored", "skipped"):
        assert isinstance(summary[k], int)
    assert summary["scored"] == 5 and summary["model_version"] == version and summary["run_id"]
    assert isinstance(summary["images_per_second"], float) and summary["rejections"] == []

    assert main(["predictions", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5
    for row in rows:
        assert {"sha256", "source_path", "model_version", "prob_malignant", "label", "scored_at"} <= set(row)
        assert dt.datetime.fromisoformat(row["scored_at"]).tzinfo is not None
    malignant = sum(r["label"] == "malignant" for r in rows)
    assert main(["predictions", "--json", "--label", "malignant"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == malignant
    assert main(["predictions", "--format", "json", "--since", "1h", "--limit", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["predictions", "--format", "json", "--since", "2999-01-01"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["predictions", "--format", "json", "--model-version", "nope"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["predictions", "--format", "json", "--latest"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 5
    assert main(["predictions", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sha256,source_path,model_version,prob_malignant,label") and len(lines) == 6
    assert main(["predictions"]) == 0
    assert "patient_" in capsys.readouterr().out
    assert main(["predictions", "--since", "yesterday-ish"]) == 1


def test_cli_score_without_champion_exits_non_zero(make_settings, sqlite_url, monkeypatch, capsys):
    from bcc_pipeline.cli import main

    s = scoring_settings(make_settings, sqlite_url)
    store.upgrade(sqlite_url)
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", sqlite_url)
    assert main(["score", "--json"]) == 1
    err = capsys.readouterr().err
    assert "no champion" in err and len(err.strip().splitlines()) == 1


# -- failed and abandoned runs ----------------------------------------------------------------
def test_a_run_that_cannot_load_its_model_is_recorded_as_failed(
    make_settings, sqlite_url, register_champion, png_writer
):
    import pytest

    from bcc_pipeline.errors import ArtifactError

    s = scoring_settings(make_settings, sqlite_url)
    version = register_champion(s)
    (s.models_dir / version / "model.keras").write_bytes(b"not a model any more")
    fill_inbox(s.inbox_dir, png_writer, 2)
    with pytest.raises(ArtifactError) as failed:
        scoring.score_inbox(s, run_id="broken-model")
    with session_scope(sqlite_url) as ses:
        run = ses.get(ScoringRun, "broken-model")
        assert run.status == "failed" and run.finished_at is not None
        assert run.error == str(failed.value) and version in run.error
    assert len(inbox_files(s.inbox_dir)) == 2  # nothing moved, nothing scored
    assert scoring.finalize_run(s, "broken-model")["status"] == "failed"


def test_a_running_run_whose_process_is_gone_becomes_abandoned(
    make_settings, sqlite_url, register_champion, monkeypatch, capsys
):
    import os
    import socket

    from bcc_pipeline.cli import main

    s = scoring_settings(make_settings, sqlite_url)
    version = register_champion(s)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    now = store.utcnow()
    here = socket.gethostname()
    with session_scope(sqlite_url) as ses:
        for run_id, host, pid, beat in [
            ("killed", here, int(dead.stdout), now),
            ("silent", "elsewhere", 4242, now - dt.timedelta(hours=2)),
            ("alive", here, os.getpid(), now),
        ]:
            ses.add(
                ScoringRun(
                    run_id=run_id,
                    model_version=version,
                    started_at=beat,
                    heartbeat_at=beat,
                    status="running",
                    counts={},
                    host=host,
                    pid=pid,
                )
            )
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", sqlite_url)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "last scoring" in out
    with session_scope(sqlite_url) as ses:
        runs = {r.run_id: r for r in ses.scalars(select(ScoringRun))}
        assert runs["killed"].status == "abandoned" and runs["killed"].finished_at is not None
        assert "PID" in runs["killed"].error
        assert runs["silent"].status == "abandoned" and runs["alive"].status == "running"
        ses.add(
            ScoringRun(
                run_id="killed-2",
                model_version=version,
                started_at=now,
                heartbeat_at=now,
                status="running",
                counts={},
                host=here,
                pid=int(dead.stdout),
            )
        )
    scoring.score_inbox(s)  # the next run notices too
    with session_scope(sqlite_url) as ses:
        assert ses.get(ScoringRun, "killed-2").status == "abandoned"


def test_a_run_id_with_control_characters_never_reaches_a_log_line_raw(
    make_settings, sqlite_url, register_champion, png_writer, caplog
):
    """A run id holding a newline and an ANSI escape (``bcc score --run-id``, an Airflow run id) is escaped
    in every log line and progress line the run writes."""
    import logging

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    png_writer(s.inbox_dir / "x.png", seed=1, size=40)
    lines: list[str] = []
    with caplog.at_level(logging.INFO, logger="bcc_pipeline"):
        r = scoring.score_inbox(s, run_id="ev\nil\x1b[31m", progress=lines.append)
    assert r["scored"] == 1
    shown = lines + [rec.getMessage() for rec in caplog.records if rec.name.startswith("bcc_pipeline")]
    assert any("ev\\nil\\x1b[31m" in line for line in shown)
    assert not [line for line in shown if "\n" in line or "\x1b" in line]


def test_a_database_error_while_scoring_names_the_database_and_hides_its_password(tmp_path):
    """ "database or disk is full" alone does not say where: the error names the database, password masked."""
    from sqlalchemy import create_engine

    from bcc_pipeline.errors import StoreError
    from bcc_pipeline.scoring.db import transaction

    db = tmp_path / "scoring.db"
    with pytest.raises(StoreError) as err, transaction(create_engine(f"sqlite:///{db}")) as conn:
        conn.execute(text("select * from no_such_table"))
    assert str(db) in str(err.value) and "no such table" in str(err.value)
    secret = create_engine("postgresql+psycopg2://bcc:s3cret-pw@127.0.0.1:1/bcc?connect_timeout=2")
    with pytest.raises(StoreError) as err, transaction(secret):
        pass
    assert "127.0.0.1:1/bcc" in str(err.value) and "s3cret-pw" not in str(err.value)


def test_a_finished_run_is_never_scored_again_and_its_record_stays(
    make_settings, migrated_url, register_champion, png_writer, tmp_path
):
    """Round 21: a finished shard run again (a cleared DAG task) re-scored nothing but rewrote its result
    (precision None, new timings) and reopened the run; ``score_inbox`` with the run id of a finished run
    repeated its counts as if it had just done the work (``bcc score`` now says it did nothing); a
    different inbox was silently left out."""
    s = scoring_settings(make_settings, migrated_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 3)
    first = scoring.score_inbox(s, run_id="night-1")
    assert first["scored"] == 3 and first["precision"] == "f32"
    with session_scope(migrated_url) as ses:
        kept = ses.get(ScoringRun, "night-1")
        kept_row = (kept.status, kept.finished_at, kept.counts)

    png_writer(s.inbox_dir / "new.png", seed=99, size=40)  # lands after the run
    # the DAG's tasks cleared and run again: a finished shard is not run again, the run's record stays
    again = scoring.score_shard(s, "night-1", 0)
    assert again["precision"] == "f32" and again["scored"] == 3
    assert (s.inbox_dir / "new.png").exists()
    summary = scoring.finalize_run(s, "night-1")
    assert summary["status"] == "finished" and summary["finished_at"] == first["finished_at"]
    with session_scope(migrated_url) as ses:
        row = ses.get(ScoringRun, "night-1")
        assert (row.status, row.finished_at, row.counts) == kept_row

    # `score_inbox` (`bcc score --run-id`) of a finished run: nothing done, its summary as recorded, said
    r = scoring.score_inbox(s, run_id="night-1")
    assert r["finished_before"] and r["finished_at"] == first["finished_at"] and r["precision"] == "f32"
    assert count_rows(migrated_url, Prediction) == 3 and (s.inbox_dir / "new.png").exists()
    # round 22: its shard's result file deleted, or not a result: refused, the record stays as it was
    result = scoring.run_dir(s, "night-1") / "shard-0.json"
    for damage in (result.unlink, lambda: result.write_text("{}")):
        damage()
        with pytest.raises(ConfigError, match="night-1 has finished, but the result of its shard 0"):
            scoring.score_inbox(s, run_id="night-1")
        with session_scope(migrated_url) as ses:
            row = ses.get(ScoringRun, "night-1")
            assert (row.status, row.finished_at, row.counts) == kept_row

    # an unfinished run resumed with another inbox: refused, not silently left out
    other = tmp_path / "inbox2"
    other.mkdir()
    s2 = scoring_settings(make_settings, migrated_url, inbox_roots=f"{s.inbox_dir}{os.pathsep}{other}")
    scoring.plan_shards(s2, "night-2", 1)
    with pytest.raises(ConfigError, match="planned for the inbox .* not .*inbox2"):
        scoring.score_inbox(s2, run_id="night-2", inbox=other)
    assert scoring.score_inbox(s2, run_id="night-2")["scored"] == 1


def test_a_planned_run_finished_after_another_run_took_its_files_says_so(
    make_settings, migrated_url, register_champion, png_writer, monkeypatch, capsys
):
    """Round 21: a run killed after planning, another run scoring its files, then the first one finished
    (`bcc score --run-id`): before, each file was warned about as "left the inbox before it was scored" and
    the summary line said 0 of everything for 4 planned files. Now they are counted as scored and moved by
    another run, and `bcc score` shows every count that happened."""
    from bcc_pipeline.cli import main

    s = scoring_settings(make_settings, migrated_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 4)
    scoring.plan_shards(s, "killed", 1)  # its process dies here
    assert scoring.score_inbox(s, run_id="other")["scored"] == 4
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", migrated_url)
    monkeypatch.setenv("BCC_SETTLE_SECONDS", "0")
    assert main(["score", "--run-id", "killed"]) == 0
    out = capsys.readouterr().out
    assert "also: 4 scored and moved by another run" in out and "(keras, -;" in out
    with session_scope(migrated_url) as ses:
        counts = ses.get(ScoringRun, "killed").counts
    assert (counts["taken_by_other_runs"], counts["missing"], counts["planned"]) == (4, 0, 4)


@pytest.mark.parametrize("after", ["plan", "shard"])
def test_bcc_score_killed_between_its_steps_is_abandoned_at_once(
    make_settings, sqlite_url, register_champion, png_writer, after
):
    """Round 28: `bcc score` (plan, shard and finalize in one process) killed after its shard wrote its
    result and before finalize began stayed `running` for an hour: the shard had let go of the run. The
    one process keeps its hold from plan to finalize now."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 2)
    step = {"plan": "score_shard", "shard": "finalize_run"}[after]
    code = (
        f"import os, bcc_pipeline.scoring.run as m\nm.{step} = lambda *a, **k: os._exit(9)\n"
        "from bcc_pipeline import scoring\nfrom bcc_pipeline.config import load_settings\n"
        f"s = load_settings(env={{'BCC_HOME': {str(s.home)!r}, 'BCC_DATABASE_URL': {sqlite_url!r}, "
        "'BCC_SETTLE_SECONDS': '0'})\nscoring.score_inbox(s, run_id='killed')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr[-2000:]
    assert scoring.mark_abandoned(store.get_engine(sqlite_url), runs_dir=s.runs_dir) == ["killed"]
    assert scoring.score_inbox(s, run_id="killed")["status"] == "finished"  # its rerun finishes it


@pytest.mark.parametrize("where", ["plan", "finalize"])
def test_a_run_killed_while_planning_or_finalizing_is_abandoned_at_once(
    make_settings, sqlite_url, register_champion, png_writer, where
):
    """Round 22: a scoring run killed while its plan task or its finalize task ran stayed `running` for up
    to an hour (no process was recorded for those steps, only for shards). Now the planning and the
    finalizing process are recorded, so the next run (or `bcc status`) marks it `abandoned` at once; a
    plan that finished lets go, and is not abandoned while it waits for its shards."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 2)
    scoring.plan_shards(s, "waiting", 1)  # planned in this process, which lets go of it
    # the step killed in the middle (SIGKILL: no handler runs) in a process of its own
    die = "import os, bcc_pipeline.scoring.{m} as m; m.sweep_interrupted = lambda *a, **k: os._exit(9)\n"
    step = {
        "plan": "scoring.plan_shards(s, 'killed', 1)",
        "finalize": "scoring.score_shard(s, 'killed', 0); scoring.finalize_run(s, 'killed')",
    }[where]
    if where == "finalize":
        scoring.plan_shards(s, "killed", 1)
    code = (
        die.format(m="plan" if where == "plan" else "run")
        + "from bcc_pipeline import scoring\nfrom bcc_pipeline.config import load_settings\n"
        + f"s = load_settings(env={{'BCC_HOME': {str(s.home)!r}, 'BCC_DATABASE_URL': {sqlite_url!r}}})\n"
        + step
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr[-2000:]
    assert scoring.mark_abandoned(store.get_engine(sqlite_url)) == ["killed"]
    with session_scope(sqlite_url) as ses:
        assert ses.get(ScoringRun, "waiting").status == "running"
        assert "PID" in ses.get(ScoringRun, "killed").error


def test_one_shard_is_never_scored_by_two_processes_at_once(
    make_settings, sqlite_url, register_champion, png_writer
):
    """Round 23: the same run id started twice at once: the second process counted the first one's files
    as scored and moved by another run (its stored counts doubled), overwrote the shard's result with an
    idle one, and the run flipped between finished and running. Now a shard is held by one process
    (`flock`), and a second one is refused with one line while the first works."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 3)
    code = (
        "from bcc_pipeline import scoring\nfrom bcc_pipeline.config import load_settings\n"
        f"s = load_settings(env={{'BCC_HOME': {str(s.home)!r}, 'BCC_DATABASE_URL': {sqlite_url!r}, "
        "'BCC_SETTLE_SECONDS': '0'})\nscoring.score_inbox(s, run_id='twice')\n"
    )
    twins = []

    def start_the_twin(n):  # the first process is in its shard: the same run id started again
        if not twins:
            twins.append(
                subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            )

    r = scoring.score_inbox(s, run_id="twice", hooks=scoring.Hooks(on_model_batch=start_the_twin))
    assert twins and twins[0].returncode != 0
    assert "shard 0 of scoring run twice is being scored by another process now" in twins[0].stderr
    assert (r["status"], r["scored"], r["taken_by_other_runs"]) == ("finished", 3, 0)
    with session_scope(sqlite_url) as ses:
        row = ses.get(ScoringRun, "twice")
        assert (
            row.status == "finished" and row.counts["scored"] == 3 and row.counts["taken_by_other_runs"] == 0
        )


def test_a_shard_that_finishes_never_lets_go_of_another_shards_hold(
    make_settings, sqlite_url, register_champion, png_writer
):
    """Round 23: shards of one run in several processes; one that finished cleared the run's host and PID
    although another shard's process held it (it beat last), so that process, killed afterwards, left the
    run `running` for an hour. A process lets go only of its own hold now. (One host and PID per run: a
    shard that beats after another overwrites its hold, until the other beats again.)"""
    import socket

    from bcc_pipeline.scoring import run_records

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 2)
    scoring.plan_shards(s, "two", 2)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with session_scope(sqlite_url) as ses:  # shard 1, in that process, beat last
            row = ses.get(ScoringRun, "two")
            row.host, row.pid = socket.gethostname(), other.pid
        run_records.heartbeat(store.get_engine(sqlite_url), "two", alive=False)  # shard 0 here is done
        with session_scope(sqlite_url) as ses:
            assert ses.get(ScoringRun, "two").pid == other.pid
        other.kill()
        other.wait()
        assert scoring.mark_abandoned(store.get_engine(sqlite_url)) == ["two"]  # its process is gone: said
    finally:
        if other.poll() is None:
            other.kill()


def test_a_run_whose_shard_another_process_holds_is_not_abandoned(
    make_settings, sqlite_url, register_champion, png_writer
):
    """Round 23: shards of one run in two processes; the one that beat last (recorded) was killed while the
    other still scored, and the next run or `bcc status` marked the run `abandoned` under it. A shard's
    process holds its lock, and a run a process of this machine holds a shard of is alive."""
    import socket

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 2)
    scoring.plan_shards(s, "two", 2)
    lock = scoring.run_dir(s, "two") / "shard-0.lock"
    holder = subprocess.Popen(  # shard 0's process: holds its lock, still working
        [
            sys.executable,
            "-c",
            f"import fcntl, os, sys, time\nfd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        )
        with session_scope(sqlite_url) as ses:  # shard 1's process beat last, and was killed
            row = ses.get(ScoringRun, "two")
            row.host, row.pid = socket.gethostname(), int(dead.stdout)
        engine = store.get_engine(sqlite_url)
        assert scoring.mark_abandoned(engine, runs_dir=s.runs_dir) == []
        with session_scope(sqlite_url) as ses:
            assert ses.get(ScoringRun, "two").status == "running"
        holder.kill()
        holder.wait()
        assert scoring.mark_abandoned(engine, runs_dir=s.runs_dir) == ["two"]  # now nothing holds it
    finally:
        if holder.poll() is None:
            holder.kill()


def test_a_shard_killed_after_another_shard_let_go_of_the_run_is_abandoned_at_once(
    make_settings, sqlite_url, register_champion, png_writer
):
    """Round 24 residual: one host and PID per run. Shard 0 SIGKILLed in its process, then shard 1 finished
    in another and let go of the run: no process was recorded, so the run stayed `running` until its
    heartbeat was an hour old. A shard's lock now names the process that took it, and an unfinished shard
    whose process of this machine is gone (and holds nothing) abandons the run at once."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 4)
    scoring.plan_shards(s, "two", 2)
    code = (
        "import os, signal\nfrom bcc_pipeline import scoring\nfrom bcc_pipeline.config import load_settings\n"
        f"s = load_settings(env={{'BCC_HOME': {str(s.home)!r}, 'BCC_DATABASE_URL': {sqlite_url!r}, "
        "'BCC_SETTLE_SECONDS': '0'})\nprint(os.getpid(), flush=True)\n"
        "kill = scoring.Hooks(on_model_batch=lambda n: os.kill(os.getpid(), signal.SIGKILL))\n"
        "scoring.score_shard(s, 'two', 0, hooks=kill)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    scoring.score_shard(s, "two", 1)  # finishes and lets go of the run: no process is recorded
    engine = store.get_engine(sqlite_url)
    with session_scope(sqlite_url) as ses:
        row = ses.get(ScoringRun, "two")
        assert row.status == "running" and row.host is None
    assert scoring.mark_abandoned(engine, runs_dir=s.runs_dir) == ["two"]
    with session_scope(sqlite_url) as ses:
        row = ses.get(ScoringRun, "two")
        assert (
            row.status == "abandoned"
            and f"shard 0 ({os.uname().nodename}, PID {killed.stdout.split()[0]})" in (row.error)
        )
    scoring.score_shard(s, "two", 0)  # rerunning the run's id finishes it
    assert scoring.finalize_run(s, "two")["status"] == "finished"


def test_a_lock_file_that_names_no_process_never_stops_the_check_of_other_runs(
    make_settings, sqlite_url, register_champion, png_writer
):
    """Round 26: a shard lock holding this host and a huge number (or digits other than 0-9) as its process
    made every `bcc status` and `bcc score` end in `unexpected error: OverflowError` (ValueError). Such a
    lock names no process: the run is judged by its heartbeat, and the other runs are checked."""
    import socket

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 2)
    engine = store.get_engine(sqlite_url)
    for run_id, pid in (("huge", "9" * 40), ("other-digits", "\u00b2\u00b3"), ("negative", "-5")):
        scoring.plan_shards(s, run_id, 1)
        (scoring.run_dir(s, run_id) / "shard-0.lock").write_text(f"{socket.gethostname()}\t{pid}\n")
    assert scoring.mark_abandoned(engine, runs_dir=s.runs_dir) == []  # no process named: heartbeat decides
    assert scoring.quiet_runs(engine, s.runs_dir) == []
    with session_scope(sqlite_url) as ses:
        assert ses.get(ScoringRun, "huge").status == "running"
    assert scoring.score_inbox(s, run_id="next")["status"] == "finished"  # its check of them went through


def test_a_run_held_by_a_live_but_silent_shard_stays_running_and_status_says_so(
    make_settings, sqlite_url, register_champion, png_writer, monkeypatch, capsys
):
    """Round 24 residual: a shard whose process hangs but lives holds its lock, so its run stays `running`
    for good (rightly: it may still finish) and nobody was told. `bcc status` now warns, naming the shard
    and its process, once the run has been silent for an hour."""
    from bcc_pipeline.cli import main

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 2)
    scoring.plan_shards(s, "hung", 1)
    code = (
        "import time\nfrom bcc_pipeline.config import load_settings\nfrom bcc_pipeline.scoring.plan import "
        f"hold_shard\ns = load_settings(env={{'BCC_HOME': {str(s.home)!r}, 'BCC_DATABASE_URL': {sqlite_url!r}}})"
        "\nhold_shard(s, 'hung', 0)\nprint('held', flush=True)\ntime.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        long_ago = store.utcnow() - dt.timedelta(hours=2)
        with session_scope(sqlite_url) as ses:
            row = ses.get(ScoringRun, "hung")
            row.status, row.heartbeat_at, row.host, row.pid = "running", long_ago, None, None
        engine = store.get_engine(sqlite_url)
        assert scoring.quiet_runs(engine, s.runs_dir, stale_after=7200 + 60) == []  # not silent that long
        monkeypatch.setenv("BCC_HOME", str(s.home))
        monkeypatch.setenv("BCC_DATABASE_URL", sqlite_url)
        assert main(["status"]) == 0
        out = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
        assert len(out) == 1 and out[0].startswith(
            "scoring         WARNING: scoring run hung: shard 0 is held"
        )
        assert f"PID {holder.pid} on {os.uname().nodename}" in out[0] and "may hang" in out[0]
        with session_scope(sqlite_url) as ses:
            assert ses.get(ScoringRun, "hung").status == "running"  # alive: not abandoned under it
        holder.kill()
        holder.wait()
        assert scoring.quiet_runs(engine, s.runs_dir) == []
        assert scoring.mark_abandoned(engine, runs_dir=s.runs_dir) == ["hung"]
    finally:
        if holder.poll() is None:
            holder.kill()


def test_a_shard_lock_that_cannot_be_had_fails_the_run_in_one_line(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """Round 24: `runs/<run>/shard-0.lock` that is a symbolic link (or a folder, or on a filesystem without
    locks) gave an unexpected error and left the run `running`, with no process, for an hour. It is a
    one-line refusal now, the run `failed` with the reason, and nothing is written through the link."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 1)
    scoring.plan_shards(s, "r1", 1)
    target = tmp_path / "not-ours"
    (scoring.run_dir(s, "r1") / "shard-0.lock").symlink_to(target)
    with pytest.raises(ConfigError, match="cannot hold shard 0 of scoring run r1: .*shard-0.lock"):
        scoring.score_shard(s, "r1", 0)
    assert not target.exists()
    with session_scope(sqlite_url) as ses:
        row = ses.get(ScoringRun, "r1")
        assert row.status == "failed" and row.finished_at is not None and "shard-0.lock" in row.error


def test_status_counts_what_a_run_that_was_never_finalized_did(
    make_settings, sqlite_url, register_champion, png_writer, monkeypatch, capsys
):
    """Round 24: a run killed (or failed) after it committed predictions kept only its planned count, and
    `bcc status` said "0 scored" for a run that had scored and archived images. Its counts come from its
    ledger now, said to be so far."""
    from bcc_pipeline.cli import main

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 4)

    class Killed(BaseException):
        pass

    def die_after_first(paths):
        raise Killed

    with pytest.raises(Killed):
        scoring.score_inbox(
            s, run_id="cut", batch_size=2, hooks=scoring.Hooks(on_batch_committed=die_after_first)
        )
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", sqlite_url)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "last scoring    cut (failed)" in out and "2 scored" in out and "so far" in out


def test_status_after_a_run_that_scored_nothing_shows_no_unknown_precision(
    make_settings, sqlite_url, register_champion, monkeypatch, capsys
):
    """Round 24 (cosmetic): after a run with nothing to score, `bcc status` showed `keras inference (?)`,
    as if something were unknown; nothing was scored, so there is no precision to show."""
    from bcc_pipeline.cli import main

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    assert scoring.score_inbox(s, run_id="empty")["scored"] == 0
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", sqlite_url)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "last scoring    empty (finished)" in out and "inference (-)" in out and "(?)" not in out
