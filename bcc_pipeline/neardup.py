"""Near-duplicate images: a perceptual hash of the decoded pixels and a Hamming-distance rule.

Exact copies share a sha256 and are caught at intake. A re-encoded (JPEG at another quality) or resized
copy of an image has different bytes but nearly the same picture; if one copy is in training and the
other in the holdout, the holdout measures memory, not generalisation. The difference hash (dHash)
sees through both:

1. decode with :func:`bcc_pipeline.images.decode` (the pipeline's one decoder: EXIF orientation,
   transparency on white, 16-bit to 8-bit, as the model sees the image);
2. convert to grey (ITU-R BT.601 luma) and shrink to 9×8 pixels with area averaging, which removes
   the detail a re-encoding or resizing changes;
3. one bit per horizontally adjacent pair: is the right pixel brighter than the left? 8 rows × 8 pairs
   = 64 bits, stored as 16 hex digits in ``images.phash``.

A tile turned by 90, 180 or 270 degrees, or mirrored, is the same tissue (training itself flips and turns
tiles), but its hash is another. So the hash of each of the 7 other orientations is kept too
(``images.phash_turns``, :func:`turned_hashes`), and two images are compared in all 8 orientations of one
against the other as it is.

Two images are near-duplicates when their hashes differ in at most :data:`NEAR_DUPLICATE_BITS` bits.
Caveat: a nearly uniform tile (empty background) has a hash made of noise, and such tiles can match
each other; they carry no tissue and should not be in a data set anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import cv2
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from . import images
from .errors import ImageError
from .store import ImageRecord

__all__ = [
    "NEAR_DUPLICATE_BITS",
    "ensure_phashes",
    "hamming",
    "image_hashes",
    "near_duplicates",
    "near_pairs",
    "perceptual_hash",
    "turned_hashes",
]

log = logging.getLogger(__name__)

#: At most this many of the 64 dHash bits may differ for two images to count as near-duplicates.
#: Measured on synthetic demo tiles (224 px, 300 distinct tiles of 60 patients, 100 of them copied):
#: a JPEG re-encoding at quality 50, 75 or 95 moved the hash by 0-3 bits, a resize to 50, 75 or 150 %
#: saved as JPEG by 0-3 bits, while the closest pair of distinct tiles was 13 bits apart (the mean over
#: all pairs 32, as expected for unrelated images). 6 sits with a margin of 3 bits above the copies and
#: 7 below the closest distinct pair; it is also the usual dHash rule ("a few bits" of 64). Compared in all
#: 8 orientations (measured 2026-12-07 on 300 demo tiles of 60 patients, 224 px, seed 5), the closest
#: distinct pair was 13 bits apart (14 in one orientation): the margin stays.
NEAR_DUPLICATE_BITS = 6


def _grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def _thumbnail(grey: np.ndarray) -> np.ndarray:
    return cv2.resize(np.ascontiguousarray(grey), (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)


def _dhash(grey: np.ndarray) -> str:
    small = _thumbnail(grey)
    return np.packbits((small[:, 1:] > small[:, :-1]).ravel()).tobytes().hex()


def perceptual_hash(rgb: np.ndarray) -> str:
    """The 64-bit difference hash of a decoded RGB ``uint8`` image, as 16 hex digits."""
    return _dhash(_grey(rgb))


#: A tile more than this share of whose hash compares pixels that are (nearly) equal is mostly flat: white
#: padding at a slide's border, empty glass. Its hash is set by where the flat part lies, so turned, it
#: matches other padded tiles rather than itself (measured 2026-12-07: 60 distinct half-padded border
#: tiles gave 19 false pairs in one orientation and 112 in eight). Such a tile is compared as it is only.
#: Demo tiles of tissue (200 tiles, 224 px): median share 0.06, largest 0.22: all of them are turned.
FLAT_SHARE = 0.25


def _orientations(grey: np.ndarray) -> list[np.ndarray]:
    """The 7 other orientations of an image: turned 90, 180 and 270 degrees, mirrored, and those turned."""
    turned = [np.rot90(grey, k) for k in (1, 2, 3)]
    mirrored = np.fliplr(grey)
    return turned + [mirrored] + [np.rot90(mirrored, k) for k in (1, 2, 3)]


def image_hashes(rgb: np.ndarray) -> tuple[str, str]:
    """(:func:`perceptual_hash`, :func:`turned_hashes`) of one image, its grey conversion made once (turning
    the grey image is turning the image: the conversion is per pixel)."""
    grey = _grey(rgb)
    small = _thumbnail(grey)
    if float(np.mean(np.abs(np.diff(small, axis=1)) <= 1)) > FLAT_SHARE:
        return _dhash(grey), ""
    return _dhash(grey), "".join(_dhash(o) for o in _orientations(grey))


def turned_hashes(rgb: np.ndarray) -> str:
    """The :func:`perceptual_hash` of each of the image's 7 other orientations, joined (112 hex digits); ``""``
    for a mostly flat tile (:data:`FLAT_SHARE`), compared in its own orientation only."""
    return image_hashes(rgb)[1]


def _all_hashes(record: dict[str, Any]) -> list[str]:
    """A record's hash and, where known (``turns``), those of its other orientations."""
    turns = record.get("turns") or ""
    return [record["phash"]] + [turns[i : i + 16] for i in range(0, len(turns), 16)]


def hamming(a: str, b: str) -> int:
    """How many of the 64 bits of two hex hashes differ."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _as_ints(hashes: Sequence[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def near_duplicates(
    queries: Sequence[dict[str, Any]],
    references: Sequence[dict[str, Any]],
    max_bits: int = NEAR_DUPLICATE_BITS,
) -> list[dict[str, Any]]:
    """For each query (``sha256``, ``phash``, optional ``turns``) the closest reference within ``max_bits``
    in any of the query's orientations, if any.

    Returns ``{"sha256", "near_sha256", "distance"}`` per matching query; records without a hash and
    a query's own sha256 among the references are skipped (exact copies are not this check's job)."""
    refs = [r for r in references if r.get("phash")]
    if not refs:
        return []
    ref_bits = _as_ints([r["phash"] for r in refs])
    out = []
    for q in queries:
        if not q.get("phash"):
            continue
        dist = _closest(ref_bits, q)
        order = np.argsort(dist, kind="stable")
        for i in order:
            if int(dist[i]) > max_bits:
                break
            if refs[i]["sha256"] != q["sha256"]:
                out.append(
                    {"sha256": q["sha256"], "near_sha256": refs[i]["sha256"], "distance": int(dist[i])}
                )
                break
    return out


def _closest(ref_bits: np.ndarray, q: dict[str, Any]) -> np.ndarray:
    """Per reference, the fewest bits its hash differs from the query's in any of the query's orientations."""
    return np.min([np.bitwise_count(ref_bits ^ np.uint64(int(h, 16))) for h in _all_hashes(q)], axis=0)


def near_pairs(
    records: Sequence[dict[str, Any]], max_bits: int = NEAR_DUPLICATE_BITS
) -> list[dict[str, Any]]:
    """Near-duplicates among ``records`` themselves: every pair within ``max_bits``, as ``{"sha256",
    "near_sha256", "distance"}`` with ``near_sha256`` the record listed first. Records without a hash, and
    two records of one content, are skipped (exact copies are not this check's job)."""
    hashed = [r for r in records if r.get("phash")]
    if len(hashed) < 2:
        return []
    bits = _as_ints([r["phash"] for r in hashed])
    out = []
    for i in range(1, len(hashed)):
        dist = _closest(bits[:i], hashed[i])
        for j in np.flatnonzero(dist <= max_bits):  # almost always none: the pairs are found cheaply
            if hashed[j]["sha256"] != hashed[i]["sha256"]:
                out.append(
                    {
                        "sha256": hashed[i]["sha256"],
                        "near_sha256": hashed[j]["sha256"],
                        "distance": int(dist[j]),
                    }
                )
    return out


def ensure_phashes(session: Session, shas: Iterable[str]) -> dict[str, tuple[str | None, str | None]]:
    """The perceptual hash of each image and of its other orientations (``phash``, ``turns``), computed from
    its stored copy (and saved) where a row from an older release has none. An image whose copy cannot be
    decoded keeps ``None`` (logged)."""
    wanted = list(shas)
    out: dict[str, tuple[str | None, str | None]] = {}
    for start in range(0, len(wanted), 500):
        rows = session.scalars(select(ImageRecord).where(ImageRecord.sha256.in_(wanted[start : start + 500])))
        for row in rows:
            if (row.phash is None or row.phash_turns is None) and row.stored_path:
                try:
                    rgb, _ = images.decode_file(row.stored_path)
                    row.phash, row.phash_turns = image_hashes(rgb)
                except ImageError as exc:
                    log.warning("no perceptual hash for %s (%s): %s", row.sha256, row.stored_path, exc)
            out[row.sha256] = (row.phash, row.phash_turns)
    session.flush()
    return out
