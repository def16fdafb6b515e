"""Discovery and the managed folders (bcc_pipeline.scoring.inbox): what in the inbox is scored, ignored
or skipped, and that no folder the pipeline manages is ever scored."""

from __future__ import annotations

import os

import pytest

from bcc_pipeline import scoring
from bcc_pipeline.errors import ConfigError


def test_discover_sorts_the_inbox(make_settings, png_writer, tmp_path):
    s = make_settings(None, settle_seconds=60)
    inbox = s.inbox_dir
    old = png_writer(inbox / "a" / "old.png")
    os.utime(old, (1, 1))
    png_writer(inbox / "fresh.png")  # just written: skipped
    (inbox / "notes.txt").write_text("x")
    (inbox / ".DS_Store").write_bytes(b"x")
    (inbox / "Thumbs.db").write_bytes(b"x")
    (inbox / ".hidden").mkdir()
    png_writer(inbox / ".hidden" / "in_hidden.png")
    (inbox / "x.png").mkdir()
    os.utime(png_writer(inbox / "x.png" / "inside.png"), (1, 1))
    (inbox / "link.png").symlink_to(tmp_path / "elsewhere.png")
    (inbox / "dirlink").symlink_to(tmp_path)
    os.mkfifo(inbox / "pipe.png")
    found = scoring.discover(s)
    assert found["pending"] == ["a/old.png", "x.png/inside.png"]
    assert found["links"] == ["dirlink", "link.png"]
    assert found["skipped"] == ["fresh.png"]
    ignored = {i["path"]: i["reason"] for i in found["ignored"]}
    assert set(ignored) == {".DS_Store", ".hidden", "Thumbs.db", "notes.txt", "x.png", "pipe.png"}
    assert "folder" in ignored["x.png"] and "regular" in ignored["pipe.png"]


def test_inbox_inside_archive_is_refused(make_settings):
    s = make_settings(None)
    with pytest.raises(ConfigError, match="inside"):
        scoring.discover(s, s.archive_dir / "x")


def test_inbox_at_home_skips_every_managed_folder(make_settings, png_writer):
    """``bcc score --inbox $BCC_HOME``: what lies in the home is scored, what lies in a managed folder
    (archive, quarantine, runs, models, dataset, landing and the embedded Airflow home) is not."""
    s = make_settings(None, settle_seconds=0)
    assert s.home / "airflow" in s.managed_dirs
    for managed in s.managed_dirs:
        png_writer(managed / "sub" / "inside.png")
    png_writer(s.inbox_dir / "x.png")
    png_writer(s.home / "top.png")
    found = scoring.discover(s, s.home)
    assert found["pending"] == ["inbox/x.png", "top.png"]
    assert found["links"] == [] and found["skipped"] == []
    assert not [i for i in found["ignored"] if "inside" in i["path"]]
    for managed in s.managed_dirs:  # and none of them may be the inbox itself
        with pytest.raises(ConfigError, match="manages"):
            scoring.discover(s, managed / "sub")
