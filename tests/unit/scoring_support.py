"""Small helpers the scoring tests (``tests/unit/test_scoring_*.py``) share: settings that need no settle
time, an inbox of tiny PNGs, row counts, and what is left in the inbox and the archive."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from bcc_pipeline.store import session_scope

__all__ = ["Crash", "archived", "count_rows", "fill_inbox", "inbox_files", "scoring_settings"]


def scoring_settings(make_settings, url, **kw):
    return make_settings(url, settle_seconds=0, **kw)


def fill_inbox(inbox: Path, png_writer, n: int, *, prefix: str = "img", seed0: int = 0) -> list[Path]:
    out = []
    for i in range(n):
        out.append(png_writer(inbox / f"patient_{i % 3}" / f"{prefix}{i:03d}.png", seed=seed0 + i, size=40))
    return out


def count_rows(url: str, model: type) -> int:
    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def inbox_files(inbox: Path) -> list[str]:
    return sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file() or p.is_symlink())


def archived(s) -> list[Path]:
    return [p for p in s.archive_dir.rglob("*") if p.is_file()]


class Crash(BaseException):
    """Stands in for SIGKILL: nothing after it runs (not even except Exception handlers)."""
