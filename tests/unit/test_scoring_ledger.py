"""The scoring ledger (bcc_pipeline.scoring.ledger): the migration that brings ``inbox_files`` and the
``latest_predictions`` view goes up, down and up again; a batch is claimed once, a known content is a
duplicate, and moves are recorded."""

from __future__ import annotations

from sqlalchemy import select

from bcc_pipeline import store
from bcc_pipeline.images import ImageInfo
from bcc_pipeline.scoring import ledger
from bcc_pipeline.scoring.loader import Item
from bcc_pipeline.store import Prediction, Rejection, session_scope


def test_migration_0002_up_down_up(db_url):
    store.upgrade(db_url)
    eng = store.get_engine(db_url)
    from sqlalchemy import inspect

    assert "inbox_files" in inspect(eng).get_table_names()
    assert "latest_predictions" in inspect(eng).get_view_names()
    assert store.downgrade(db_url, "0001") == "0001"
    eng.dispose()
    insp = inspect(store.get_engine(db_url))
    assert "inbox_files" not in insp.get_table_names() and "latest_predictions" not in insp.get_view_names()
    assert store.upgrade(db_url, "0002") == "0002"


def _item(rel: str, sha: str, kind: str = "ok", reason: str | None = None) -> Item:
    it = Item.of(rel)
    it.kind, it.sha, it.reason = kind, sha, reason
    it.info = ImageInfo("PNG", 40, 40) if kind == "ok" else None
    return it


def test_a_batch_is_claimed_once_and_a_known_content_is_a_duplicate(
    make_settings, migrated_url, register_champion
):
    s = make_settings(migrated_url)
    version = register_champion(s, threshold=0.5)
    engine = store.get_engine(migrated_url)
    assert ledger.champion_version(engine) == version
    mv = ledger.model_version(engine, version, "r1")
    batch = [_item("a.png", "a" * 64), _item("b.png", "b" * 64), _item("bad.png", None, "rejected", "why")]
    dest = {it.key: f"/dest/{it.rel}" for it in batch}
    probs = {"a" * 64: 0.9, "b" * 64: 0.1}
    mine, scored = ledger.commit_batch(engine, "r1", 0, mv, batch, probs, dest)
    assert [it.rel for it in mine] == ["a.png", "b.png", "bad.png"] and scored == {batch[0].key, batch[1].key}
    # the same batch again (a second attempt of the shard): nothing is claimed, nothing written
    again, scored_again = ledger.commit_batch(engine, "r1", 0, mv, batch, probs, dest)
    assert again == [] and scored_again == set()
    # the same content under another path, in another run: claimed, but a duplicate
    copy = [_item("copy of a.png", "a" * 64)]
    mine2, scored2 = ledger.commit_batch(engine, "r2", 0, mv, copy, {"a" * 64: 0.9}, {copy[0].key: "/d/c"})
    assert len(mine2) == 1 and scored2 == set()
    assert ledger.predicted(engine, version, ["a" * 64, "c" * 64]) == {"a" * 64}
    with session_scope(migrated_url) as ses:
        labels = dict(ses.execute(select(Prediction.image_sha256, Prediction.label)).all())
        assert labels == {"a" * 64: "malignant", "b" * 64: "benign"}
        assert ses.scalars(select(Rejection.path)).all() == ["bad.png"]
    # nothing moved yet; then where each went is recorded
    assert sorted(r.path for r in ledger.unmoved_rows(engine, "r1")) == ["a.png", "b.png", "bad.png"]
    ledger.record_moves(
        engine,
        [
            {
                "run_id": "r1",
                "key": it.key,
                "path": it.path,
                "rejected": it.kind == "rejected",
                "moved_to": dest[it.key],
                "error": None,
            }
            for it in batch
        ],
    )
    assert ledger.unmoved_rows(engine, "r1") == []
    known = ledger.known_rows(engine, "r1", [batch[0].key])
    assert [r.moved_to for r in known[batch[0].key]] == ["/dest/a.png"]
    tallies = ledger.run_tallies(engine, "r1")
    assert dict(tallies["by_status"]) == {"scored": 2, "rejected": 1}
    assert tallies["rejections"] == [{"path": "bad.png", "reason": "why"}] and tallies["unmoved"] == []
    with session_scope(migrated_url) as ses:
        assert ses.scalars(select(Rejection.moved_to)).all() == ["/dest/bad.png"]


def test_migration_0006_down_and_up(db_url):
    """The liveness columns of scoring_runs and the move attempts of the ledger come and go with 0006."""
    from sqlalchemy import inspect

    store.upgrade(db_url)
    assert store.downgrade(db_url, "0005") == "0005"
    insp = inspect(store.get_engine(db_url))
    assert not {"host", "pid", "heartbeat_at", "error"} & {
        c["name"] for c in insp.get_columns("scoring_runs")
    }
    assert "move_attempts" not in {c["name"] for c in insp.get_columns("inbox_files")}
    assert store.upgrade(db_url, "0006") == "0006"
    store.dispose_engine(db_url)
    insp = inspect(store.get_engine(db_url))
    assert {"host", "pid", "heartbeat_at", "error"} <= {c["name"] for c in insp.get_columns("scoring_runs")}
    assert "move_attempts" in {c["name"] for c in insp.get_columns("inbox_files")}
