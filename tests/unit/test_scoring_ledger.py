"""The scoring ledger (bcc_pipeline.scoring.ledger): the migration that brings ``inbox_files`` and the
``latest_predictions`` view goes up, down and up again."""

from __future__ import annotations

from bcc_pipeline import store


def test_migration_0002_up_down_up(db_url):
    store.upgrade(db_url)
    eng = store.get_engine(db_url)
    from sqlalchemy import inspect

    assert "inbox_files" in inspect(eng).get_table_names()
    assert "latest_predictions" in inspect(eng).get_view_names()
    from alembic import command

    with eng.begin() as conn:  # store has no downgrade(); Alembic's own command, as `alembic downgrade`
        cfg = store._alembic_config(db_url)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert store.current_revision(db_url) == "0001"
    eng.dispose()
    insp = inspect(store.get_engine(db_url))
    assert "inbox_files" not in insp.get_table_names() and "latest_predictions" not in insp.get_view_names()
    assert store.upgrade(db_url) == "0002"
