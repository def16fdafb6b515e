"""`bcc score` on a hostile inbox the test builds itself, through the real command line (subprocesses),
on SQLite and PostgreSQL: every valid image gets exactly one prediction, every bad file is quarantined
with a reason, the link's target is untouched, ignored entries stay, peak RSS stays under 2 GiB, and a
second run adds no rows."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from bcc_pipeline.images import sha256_file
from bcc_pipeline.store import ImageRecord, InboxFile, Prediction, Rejection, session_scope

BCC = [sys.executable, "-m", "bcc_pipeline.cli"]
GIB = 1024**3


def _noise(h: int, w: int, seed: int, channels: int = 3, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = 65535 if dtype == np.uint16 else 255
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, top + 1, size=shape, dtype=np.int64).astype(dtype)


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((1 + 3 * width) * 8), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def build_hostile_inbox(inbox: Path, outside: Path) -> dict[str, object]:
    """Returns {"valid": [rel...], "bad": [rel...], "ignored": [entries...], "link_target": Path}."""
    import cv2

    inbox.mkdir(parents=True, exist_ok=True)
    valid: list[str] = []

    def ok(rel: str, img: Image.Image, fmt: str, **kw) -> None:
        _save(img, inbox / rel, fmt, **kw)
        valid.append(rel)

    rgb = lambda seed: Image.fromarray(_noise(48, 64, seed))  # noqa: E731
    ok("plain.png", rgb(1), "PNG")
    ok("gray.png", Image.fromarray(_noise(48, 64, 2, channels=1)), "PNG")
    ok("gray16.png", Image.fromarray(_noise(48, 64, 3, channels=1, dtype=np.uint16)), "PNG")
    p16 = inbox / "rgb16.png"
    cv2.imwrite(str(p16), _noise(48, 64, 4, dtype=np.uint16))
    valid.append("rgb16.png")
    ok("rgba.png", Image.fromarray(_noise(48, 64, 5, channels=4), "RGBA"), "PNG")
    ok("cmyk.jpg", rgb(6).convert("CMYK"), "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    ok("exif_rotated.jpg", rgb(7), "JPEG", quality=90, exif=exif)
    ok("progressive.jpeg", rgb(8), "JPEG", quality=90, progressive=True)
    ok("scan.tif", rgb(9), "TIFF")
    ok("scan.bmp", rgb(10), "BMP")
    ok("anim.gif", rgb(11).convert("P"), "GIF")
    ok("photo.webp", rgb(12), "WEBP", lossless=True)
    ok("UPPER.PNG", rgb(13), "PNG")
    ok("größe_細胞_🔬 scan.png", rgb(14), "PNG")
    ok("a" * 196 + ".png", rgb(15), "PNG")
    ok("patient_x/slide_1/deep.png", rgb(16), "PNG")
    ok("patient_x/slide_2/other.jpg", rgb(17), "JPEG", quality=90)
    ok("x.png/inside_folder.png", rgb(18), "PNG")  # a folder named x.png: what it holds is scored
    shutil.copyfile(inbox / "plain.png", inbox / "patient_x" / "copy of plain.png")  # duplicate content
    valid.append("patient_x/copy of plain.png")

    bad: list[str] = []

    def reject(rel: str, data: bytes) -> None:
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(data)
        bad.append(rel)

    jpeg = io.BytesIO()
    rgb(20).save(jpeg, "JPEG", quality=90)
    reject("empty.png", b"")
    reject("truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    reject("letter.jpg", b"Dear lab,\nthis is not an image.\n" * 20)
    reject("page.png", b"<!DOCTYPE html><html><body>nope</body></html>")
    reject("garbage.png", b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    reject("bomb.png", _png_bomb())
    reject(
        "patient_x/tiny.png",
        (lambda b: (Image.fromarray(_noise(8, 8, 21)).save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
    )
    outside.mkdir(parents=True, exist_ok=True)
    target = _save(rgb(30), outside / "secret.png", "PNG")  # a valid image: it must still not be scored
    (inbox / "link_to_outside.png").symlink_to(target)
    bad.append("link_to_outside.png")

    (inbox / "empty_dir.png").mkdir()
    (inbox / ".hidden.png").write_bytes((inbox / "plain.png").read_bytes())
    (inbox / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (inbox / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (inbox / "notes.txt").write_text("not an image extension")
    ignored = ["empty_dir.png", "x.png", ".hidden.png", ".DS_Store", "Thumbs.db", "notes.txt"]
    return {"valid": valid, "bad": bad, "ignored": ignored, "link_target": target}


def _env(home: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BCC_")}
    env.update(
        {
            "BCC_HOME": str(home),
            "BCC_DATABASE_URL": url,
            "BCC_SETTLE_SECONDS": "0",
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "BCC_SCORE_BATCH_SIZE": "8",
        }
    )
    return env


def _bcc(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*BCC, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bcc {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def _bcc_peak_rss(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run `bcc` and return its result with the peak RSS in bytes of that very process (os.wait4),
    not the maximum over every child this test process ever had."""
    import tempfile

    with tempfile.TemporaryFile() as err_file:
        p = subprocess.Popen([*BCC, *args], env=env, stdout=subprocess.PIPE, stderr=err_file)
        out = p.stdout.read()  # stderr goes to a file, so this cannot deadlock on a full pipe
        p.stdout.close()
        _pid, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        err_file.seek(0)
        err = err_file.read()
    proc = subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode(errors="replace"))
    assert proc.returncode == 0, f"bcc {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc, usage.ru_maxrss * 1024


def _counts(url: str) -> dict[str, int]:
    with session_scope(url) as s:
        return {
            m.__tablename__: s.scalar(select(func.count()).select_from(m)) or 0
            for m in (Prediction, Rejection, ImageRecord, InboxFile)
        }


@pytest.mark.slow
def test_hostile_inbox(db_url, make_settings, register_champion, tmp_path):
    settings = make_settings(db_url, settle_seconds=0)
    version = register_champion(settings)
    inbox = settings.inbox_dir
    built = build_hostile_inbox(inbox, tmp_path / "outside")
    target: Path = built["link_target"]
    target_before = (target.read_bytes(), os.stat(target))
    shas = {rel: sha256_file(inbox / rel) for rel in built["valid"]}
    env = _env(settings.home, db_url)

    proc, peak = _bcc_peak_rss(env, "score", "--json")
    assert peak < 2 * GIB, f"peak RSS {peak / GIB:.2f} GiB"
    r = json.loads(proc.stdout)
    run = r["run_id"]
    distinct = len(set(shas.values()))
    assert r["model_version"] == version and r["status"] == "finished"
    assert (r["scored"], r["duplicates"], r["rejected"], r["ignored"], r["skipped"]) == (
        distinct,
        len(shas) - distinct,
        len(built["bad"]),
        len(built["ignored"]),
        0,
    )
    assert all(isinstance(r[k], int) for k in ("scored", "duplicates", "rejected", "ignored", "skipped"))
    assert isinstance(r["images_per_second"], float) and r["images_per_second"] > 0
    reasons = {x["path"]: x["reason"] for x in r["rejections"]}
    assert set(reasons) == set(built["bad"]) and all(reasons.values())
    assert "40000x40000" in reasons["bomb.png"] and "empty" in reasons["empty.png"]
    assert "HTML" in reasons["page.png"] and "text" in reasons["letter.jpg"]
    assert "truncated" in reasons["truncated.jpg"] and "minimum" in reasons["patient_x/tiny.png"]
    assert "symbolic link" in reasons["link_to_outside.png"]

    # files: valid ones archived (same relative path), bad ones quarantined with a reason, ignored ones stay
    for rel in built["valid"]:
        assert (settings.archive_dir / run / rel).is_file(), rel
        assert not os.path.lexists(inbox / rel)
    for rel in built["bad"]:
        q = settings.quarantine_dir / run / rel
        assert os.path.lexists(q) and not os.path.lexists(inbox / rel), rel
        assert (q.parent / (q.name + ".reason.txt")).read_text(encoding="utf-8").strip() == reasons[rel]
    for rel in built["ignored"]:
        assert os.path.lexists(inbox / rel), rel
    # the link went to quarantine as a link; its target was never read, moved or changed
    q_link = settings.quarantine_dir / run / "link_to_outside.png"
    assert q_link.is_symlink() and os.readlink(q_link) == str(target)
    after = os.stat(target)
    assert target.read_bytes() == target_before[0]
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        target_before[1].st_ino,
        target_before[1].st_mtime_ns,
        target_before[1].st_size,
    )
    assert sha256_file(target) not in {p for p in shas.values()}

    # predictions: exactly one per valid content, from the champion, none for anything else
    preds = json.loads(_bcc(env, "predictions", "--format", "json").stdout)
    assert sorted(p["sha256"] for p in preds) == sorted(set(shas.values()))
    assert {p["model_version"] for p in preds} == {version}
    for p in preds:
        assert 0.0 <= p["prob_malignant"] <= 1.0 and p["label"] in ("benign", "malignant")
        assert p["source_path"] in shas and p["scored_at"]
    with session_scope(db_url) as s:
        dup = s.scalars(select(InboxFile).where(InboxFile.status == "duplicate")).one()
        assert dup.path in ("plain.png", "patient_x/copy of plain.png") and dup.sha256 == shas["plain.png"]
    before = _counts(db_url)

    # a second run over what is left adds no rows at all
    r2 = json.loads(_bcc(env, "score", "--json").stdout)
    assert (r2["scored"], r2["duplicates"], r2["rejected"], r2["ignored"]) == (0, 0, 0, len(built["ignored"]))
    assert _counts(db_url) == before
    # the same valid files dropped in again: all duplicates, no new prediction
    for rel in built["valid"]:
        dest = inbox / "again" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(settings.archive_dir / run / rel, dest)
    r3 = json.loads(_bcc(env, "score", "--json").stdout)
    assert (r3["scored"], r3["duplicates"], r3["rejected"]) == (0, len(shas), 0)
    assert _counts(db_url)["predictions"] == before["predictions"]
