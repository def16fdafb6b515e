"""The mount table watch (bcc_pipeline.mounts.MountWatch) that scoring and intake use to see a bind mount
made while they run."""

from __future__ import annotations

from bcc_pipeline import mounts
from tests.support import bind_mounted


def test_a_mount_made_and_removed_between_two_looks_is_still_seen(tmp_path):
    (tmp_path / "a").mkdir()
    with mounts.MountWatch() as watch:
        first = watch.generation()
        assert watch.generation() == first  # nothing changed
        with bind_mounted(tmp_path / "a", tmp_path / "b"):
            pass
        second = watch.generation()  # made and removed again before anyone looked: seen all the same
        assert second != first and watch.generation() == second


def test_a_judgement_holds_for_the_generation_it_was_made_in(tmp_path):
    """``stable`` judges again when the table changed while it judged: the verdict it returns saw the
    table of the generation it returns."""
    (tmp_path / "a").mkdir()
    calls = []

    def judge():
        calls.append(1)
        if len(calls) == 1:  # the table changes while the first judgement runs
            with bind_mounted(tmp_path / "a", tmp_path / "b"):
                pass
        return len(calls)

    with mounts.MountWatch() as watch:
        verdict, generation = watch.stable(judge)
        assert verdict == 2 and generation == watch.generation()


def test_without_a_mount_table_nothing_is_reported(tmp_path):
    with mounts.MountWatch(str(tmp_path / "no-such-mountinfo")) as watch:
        assert watch.generation() == watch.generation() == 0
        assert watch.stable(lambda: "ok") == ("ok", 0)
