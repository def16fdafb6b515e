"""The mount table watch (bcc_pipeline.mounts.MountWatch) that scoring and intake use to see a bind mount
made while they run."""

from __future__ import annotations

from bcc_pipeline import mounts
from tests.support import bind_mounted


def test_a_mount_made_and_removed_between_two_looks_is_still_seen(tmp_path):
    (tmp_path / "a").mkdir()
    with mounts.MountWatch() as watch:
        assert not watch.changed()
        with bind_mounted(tmp_path / "a", tmp_path / "b"):
            pass
        assert watch.changed()  # made and removed again before anyone looked: seen all the same
        assert not watch.changed()  # reported once
    assert not watch.changed()  # closed: nothing to report


def test_without_a_mount_table_nothing_is_reported(tmp_path):
    with mounts.MountWatch(str(tmp_path / "no-such-mountinfo")) as watch:
        assert not watch.changed()
