"""The README's Guarantees table names, for each guarantee, the tests that prove it: every test it names
must exist (a renamed or deleted test would leave a guarantee proved by nothing)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _guarantee_rows() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Guarantees\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "`" in line.rsplit("|", 2)[1]]


def _named_tests(cell: str) -> list[tuple[str, str]]:
    """``(file, test)`` for each ``file.py::test`` (a file under tests/unit unless a path is given) and each
    ``::test`` (in the file named last before it)."""
    named, current = [], None
    for ref in re.findall(r"`([^`]*::test_\w+)`", cell):
        file, test = ref.split("::")
        if file:
            current = file if "/" in file else f"tests/unit/{file}"
        assert current is not None, f"{ref!r} names no file and follows none"
        named.append((current, test))
    return named


def test_every_test_the_guarantees_table_names_exists() -> None:
    rows = _guarantee_rows()
    assert len(rows) > 20  # the table was found and read
    missing = []
    for row in rows:
        cell = row.rstrip().rstrip("|").rsplit("|", 1)[1]
        named = _named_tests(cell)
        assert named, f"a guarantee names no test: {row[:100]}"
        for file, test in named:
            path = ROOT / file
            if not path.is_file() or not re.search(rf"^def {test}\(", path.read_text(), re.MULTILINE):
                missing.append(f"{file}::{test}")
    assert not missing, f"the README's Guarantees table names tests that do not exist: {missing}"
