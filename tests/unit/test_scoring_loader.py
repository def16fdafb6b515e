"""Loading inbox files (bcc_pipeline.scoring.loader): reading, validating, decoding and preprocessing in
threads, with the memory budget. No database anywhere: the loader works on files alone."""

from __future__ import annotations

import ast
import os
import threading
from pathlib import Path

import numpy as np

from bcc_pipeline import files, scoring
from bcc_pipeline.scoring.loader import Item, Loader, MemoryBudget


def test_loader_imports_no_database_code():
    src = Path(scoring.__file__).with_name("loader.py").read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
            imported.update(f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not [m for m in imported if "sqlalchemy" in m or "store" in m or "ledger" in m or "registry" in m]


def test_loader_reads_decodes_and_rejects_without_a_database(tmp_path, png_writer):
    inbox = tmp_path / "inbox"
    png_writer(inbox / "a" / "ok.png", size=48, seed=1)
    png_writer(inbox / "tiny.png", size=8, seed=2)
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (inbox / "link.png").symlink_to(tmp_path / "elsewhere.png")
    png_writer(inbox / "done.png", seed=3)
    for p in inbox.rglob("*.png"):
        if not p.is_symlink():
            os.utime(p, (1, 1))
    png_writer(inbox / "fresh.png", seed=4)  # just written: still settling
    rels = ["a/ok.png", "broken.png", "done.png", "fresh.png", "gone.png", "link.png", "tiny.png"]
    prepared: list[list[str]] = []

    def prepare(items: list[Item]) -> None:  # what the shard does with the ledger
        prepared.append([it.rel for it in items])
        for it in items:
            if it.rel == "done.png":
                it.kind = "done"

    with Loader(
        str(inbox), image_size=32, max_pixels=1_000_000, min_side=16, settle=30, prepare=prepare
    ) as loader:
        batches = list(loader.batches(rels, 3))
    assert [[it.rel for it in b] for b in batches] == [rels[0:3], rels[3:6], rels[6:]] == prepared
    got = {it.rel: it for b in batches for it in b}
    ok = got["a/ok.png"]
    assert ok.kind == "ok" and ok.sha == files.sha256_file(inbox / "a" / "ok.png")
    assert ok.x.shape == (32, 32, 3) and ok.x.dtype == np.float32
    assert (ok.info.width, ok.info.height, ok.info.format) == (48, 48, "PNG")
    assert ok.key == Item.of("a/ok.png").key and ok.path == "a/ok.png"
    assert got["done.png"].kind == "done" and got["done.png"].sha is None  # never read
    assert got["fresh.png"].kind == "skipped" and got["gone.png"].kind == "missing"
    assert got["broken.png"].kind == "rejected" and "truncated or corrupt" in got["broken.png"].reason
    assert got["link.png"].kind == "rejected" and got["link.png"].is_link
    assert "symbolic link" in got["link.png"].reason
    assert got["tiny.png"].kind == "rejected" and "minimum" in got["tiny.png"].reason
    assert all(it.x is None for it in got.values() if it.kind != "ok")


def test_memory_budget_bounds_and_is_fair():
    budget = MemoryBudget(100)
    log, lock = [], threading.Lock()

    def work(amount):
        got = budget.acquire(amount)
        with lock:
            log.append(budget.used)
        threading.Event().wait(0.01)
        budget.release(got)

    threads = [threading.Thread(target=work, args=(a,)) for a in (30, 30, 250, 30, 30, 30, 30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.used == 0 and len(log) == 7
    assert all(u <= 100 for u in log if u != 250)  # only the oversized one may exceed, and then alone
    assert 250 in log


def test_clean_reason_keeps_a_reason_on_one_line():
    """Reasons go to log lines and the database: newlines, NUL, escape sequences, line separators and
    bytes that are not UTF-8 are escaped (files.one_line), the text stays readable and bounded."""
    from bcc_pipeline.scoring.loader import clean_reason

    raw = "bad chunk\nforged: line\r\x00\x1b[31mred\u2028more\udcff end"
    cleaned = clean_reason(raw)
    assert cleaned == files.one_line(raw)
    assert cleaned == "bad chunk\\nforged: line\\r\\x00\\x1b[31mred\\xe2\\x80\\xa8more\\xff end"
    assert cleaned.encode("utf-8") and cleaned.isprintable()
    assert len(clean_reason("x\n" * 5000, limit=100)) == 100
