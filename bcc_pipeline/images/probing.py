"""Identifying an encoded image and checking it without decoding pixels: the format from the magic bytes,
the dimensions from the header, the size limits (a decompression bomb is refused here, in microseconds,
before any decoder sees it) and whether the data is structurally complete.

Headers are read by instantiating Pillow's format plugins directly, which does not run Pillow's global
``MAX_IMAGE_PIXELS`` bomb check (never changed here); our own ``max_pixels`` applies instead.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Final

from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
)

from ..config import DEFAULTS
from ..errors import (
    ImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "IMAGE_EXTENSIONS",
    "PNG_MAX_METADATA_CHUNK",
    "PNG_MAX_TEXT_MEMORY",
    "ImageInfo",
    "PathArg",
    "max_file_bytes",
    "probe",
    "sha256_bytes",
    "validate",
]

IMAGE_EXTENSIONS: Final[frozenset[str]] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
)
"""File extensions (lower case, with the dot) that are considered image files."""

# The size limits every reader of images applies unless told otherwise (the settings pass their own).
DEFAULT_MAX_PIXELS: Final[int] = DEFAULTS["max_pixels"]
DEFAULT_MIN_SIDE: Final[int] = DEFAULTS["min_side"]

_PNG_SIGNATURE: Final[bytes] = b"\x89PNG\r\n\x1a\n"
_BMP_HEADER_SIZES: Final[frozenset[int]] = frozenset({12, 16, 40, 52, 56, 64, 108, 124})

# Pillow plugin classes used to read headers without Image.open() (and so without its global bomb check).
_PIL_PLUGINS: Final[dict[str, type[ImageFile.ImageFile]]] = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
    "GIF": GifImagePlugin.GifImageFile,
}

PathArg = str | os.PathLike[str]

PNG_MAX_METADATA_CHUNK: Final[int] = 16 << 20
"""The most one compressed PNG metadata chunk (``iCCP``, ``zTXt``, ``iTXt``) may inflate to. Scanner files
carry ICC profiles of a few MiB, beyond Pillow's default of 1 MiB; a chunk that inflates past this (a
metadata bomb) is refused as corrupt after decompressing at most this much. The 16 MiB of metadata that
:func:`max_file_bytes` allows for."""
PNG_MAX_TEXT_MEMORY: Final[int] = 64 << 20
"""The most all of a PNG's text chunks together may hold once inflated."""

# Pillow is configured here, once, for every reader of images (both limits are Pillow's module globals).
PngImagePlugin.MAX_TEXT_CHUNK = PNG_MAX_METADATA_CHUNK
PngImagePlugin.MAX_TEXT_MEMORY = PNG_MAX_TEXT_MEMORY


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: the format name and the stored (pre-EXIF-rotation) dimensions."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


# ----------------------------------------------------------------------------------------------- hashing


def max_file_bytes(max_pixels: int) -> int:
    """The largest file an image within ``max_pixels`` can be: 16-bit RGBA, uncompressed, plus 16 MiB of
    metadata. Intake and scoring refuse bigger files before reading them."""
    return max_pixels * 8 + (16 << 20)


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------ identifying


def _sniff(data: bytes) -> str | None:
    """The supported format named by the magic bytes, or ``None``."""
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    # "BM" alone is too weak (a text file may start with it): also require a known DIB header size.
    if (
        data.startswith(b"BM")
        and len(data) >= 18
        and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES
    ):
        return "BMP"
    return None


def _unknown_content(data: bytes, path: PathArg | None) -> ImageError:
    """The error for content that is none of the supported formats, with a human reason."""
    head = data[:1024]
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in stripped:
        return NotAnImageError("not an image: content looks like HTML", path)
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in stripped):
        return UnsupportedImageError("unsupported image format: SVG (vector graphics)", path)
    if stripped.startswith(b"<?xml"):
        return NotAnImageError("not an image: content looks like XML", path)
    if head.startswith(b"%PDF"):
        return NotAnImageError("not an image: content looks like a PDF document", path)
    if head.startswith(b"PK\x03\x04"):
        return NotAnImageError("not an image: content looks like a ZIP archive", path)
    if head.startswith(b"\x1f\x8b"):
        return NotAnImageError("not an image: content looks like a gzip archive", path)
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace").strip()
        if brand in {"heic", "heix", "hevc", "heim", "heis", "mif1", "msf1", "avif", "avis"}:
            return UnsupportedImageError(f"unsupported image format: HEIF/AVIF (brand {brand!r})", path)
        return NotAnImageError(f"not an image: content looks like an ISO media file (brand {brand!r})", path)
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return UnsupportedImageError("unsupported image format: JPEG 2000", path)
    if head.startswith(b"8BPS"):
        return UnsupportedImageError("unsupported image format: Photoshop PSD", path)
    if len(data) >= 132 and data[128:132] == b"DICM":
        return UnsupportedImageError("unsupported image format: DICOM", path)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the 1 KiB boundary is still text.
        text = head[: exc.start].decode("utf-8") if exc.start >= len(head) - 3 else ""
    if text and sum(ch.isprintable() or ch in "\t\r\n\f" for ch in text) >= 0.95 * len(text):
        return NotAnImageError("not an image: content looks like text", path)
    if head.startswith(b"BM"):
        return TruncatedImageError(
            "truncated or corrupt image data: BMP signature with an invalid header", path
        )
    return NotAnImageError(f"not an image: unrecognised file signature {data[:8].hex(' ')}", path)


def _webp_size(data: bytes) -> tuple[int, int]:
    """Canvas width and height from a WebP header (VP8X, VP8 or VP8L first chunk)."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    if chunk == b"VP8 " and len(data) >= 30:
        if data[23:26] != b"\x9d\x01\x2a":
            raise ValueError("bad VP8 key frame start code")
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
        return width, height
    if chunk == b"VP8L" and len(data) >= 25:
        if data[20] != 0x2F:
            raise ValueError("bad VP8L signature")
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    raise ValueError(f"first chunk {chunk!r} unknown or cut short")


_PNG_ONCE = (b"IHDR", b"iCCP", b"PLTE")
"""Chunks the PNG specification allows once. Pillow limits each ``iCCP`` it inflates but not their number
(nor counts them towards its text budget), so 400 of them inflated 6 GiB: counted here, by hand, before
Pillow sees the file."""


def _require_png_chunk_counts(data: bytes, path: PathArg | None) -> None:
    """Refuse a PNG whose header chunks (up to the first ``IDAT``) repeat one the specification allows once."""
    seen: set[bytes] = set()
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind in (b"IDAT", b"IEND"):
            return
        if kind in _PNG_ONCE:
            if kind in seen:
                raise TruncatedImageError(
                    f"corrupt PNG: more than one {kind.decode()} chunk (the PNG specification allows one)",
                    path,
                )
            seen.add(kind)
        pos += 12 + length


def _open_header(data: bytes, path: PathArg | None) -> tuple[ImageInfo, Image.Image | None]:
    """Identify ``data`` and read its header; the Pillow image (lazy, nothing decoded) when one was made."""
    if not data:
        raise NotAnImageError("empty file", path)
    fmt = _sniff(data)
    if fmt is None:
        raise _unknown_content(data, path)
    if fmt == "WEBP":
        try:
            width, height = _webp_size(data)
        except ValueError as exc:
            raise TruncatedImageError(
                f"truncated or corrupt image data: unreadable WEBP header ({exc})", path
            ) from exc
        return ImageInfo("WEBP", width, height), None
    if fmt == "PNG":
        _require_png_chunk_counts(data, path)
    try:
        im = _PIL_PLUGINS[fmt](io.BytesIO(data))
    except Exception as exc:  # Pillow raises SyntaxError/OSError/ValueError/... for bad headers
        if fmt == "PNG" and isinstance(exc, ValueError) and "MAX_TEXT" in str(exc):
            raise ImageTooLargeError(
                f"PNG metadata inflates past {PNG_MAX_METADATA_CHUNK >> 20} MiB in one chunk or "
                f"{PNG_MAX_TEXT_MEMORY >> 20} MiB in all (a metadata decompression bomb)",
                path,
            ) from exc
        raise TruncatedImageError(
            f"truncated or corrupt image data: {fmt} signature followed by an unreadable header ({exc})", path
        ) from exc
    width, height = im.size
    if isinstance(im, TiffImagePlugin.TiffImageFile):
        # Pillow reports a TIFF's size already rotated by its Orientation tag; we report the stored size.
        width = im.tag_v2.get(TiffImagePlugin.IMAGEWIDTH, width)
        height = im.tag_v2.get(TiffImagePlugin.IMAGELENGTH, height)
    return ImageInfo(fmt, int(width), int(height)), im


def probe(data: bytes, *, path: PathArg | None = None) -> ImageInfo:
    """Format and stored dimensions of an encoded image, from its header only (no pixel decoding).

    Raises :class:`NotAnImageError` for empty or non-image content, :class:`UnsupportedImageError` for an
    image format outside :data:`IMAGE_EXTENSIONS` (SVG, HEIF, ...), :class:`TruncatedImageError` when the
    signature is right but the header cannot be read.
    """
    info, _ = _open_header(data, path)
    return info


def _check_limits(info: ImageInfo, path: PathArg | None, max_pixels: int, min_side: int) -> None:
    if max_pixels < 1 or min_side < 1:
        raise ValueError(f"max_pixels and min_side must be positive (got {max_pixels}, {min_side})")
    dims = f"{info.width}x{info.height}"
    if info.pixels > max_pixels:
        raise ImageTooLargeError(f"{dims} = {info.pixels} pixels exceeds the limit of {max_pixels}", path)
    if min(info.width, info.height) < min_side:
        raise ImageTooSmallError(f"{dims} is below the minimum side length of {min_side} pixels", path)


def validate(
    data: bytes,
    *,
    path: PathArg | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> ImageInfo:
    """:func:`probe` plus the size limits; never decodes pixel data.

    Raises :class:`ImageTooLargeError` when ``width * height > max_pixels`` and :class:`ImageTooSmallError`
    when ``min(width, height) < min_side``, besides everything :func:`probe` raises.
    """
    info = probe(data, path=path)
    _check_limits(info, path, max_pixels, min_side)
    return info


# ----------------------------------------------------------------------------------- structural checks


def _jpeg_complete(data: bytes) -> bool:
    """Whether the JPEG marker structure reaches an EOI marker (bytes after it are allowed)."""
    n = len(data)
    pos = 2  # after SOI
    while pos < n:
        if data[pos] != 0xFF:  # stray bytes between segments: libjpeg skips them, so do we
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return False
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return False
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return True
        if marker == 0x01 or 0xD0 <= marker <= 0xD7 or marker == 0xD8:
            continue
        if pos + 2 > n:
            return False
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > n:
            return False
        pos += length
        if marker == 0xDA:  # start of scan: skip entropy-coded data up to the next real marker
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return False
                following = data[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    pos += 2
                elif following == 0xFF:
                    pos += 1
                else:
                    break
    return False


def _png_complete(data: bytes) -> bool:
    """Whether the PNG chunk sequence is intact up to and including IEND."""
    n = len(data)
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= n:
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            return False
        if kind == b"IEND":
            return True
        pos = end
    return False


def _check_complete(info: ImageInfo, data: bytes, path: PathArg | None) -> None:
    problem: str | None = None
    if info.format == "JPEG" and not _jpeg_complete(data):
        problem = "JPEG data ends before its end-of-image marker"
    elif info.format == "PNG" and not _png_complete(data):
        problem = "PNG chunks are cut short or the IEND chunk is missing"
    elif info.format == "WEBP" and len(data) < 8 + int.from_bytes(data[4:8], "little"):
        problem = f"WEBP file is {len(data)} bytes but its header declares {8 + int.from_bytes(data[4:8], 'little')}"
    if problem:
        raise TruncatedImageError(f"truncated or corrupt image data: {problem}", path)
