"""Reading, checking, decoding and preprocessing images: the one image contract of the pipeline.

Every image that enters training, evaluation or scoring goes through this module, so that all three see
exactly the same pixels:

``probe``
    Identifies the format from the magic bytes and reads the dimensions from the header only; no pixel
    data is decoded and no pixel buffer is allocated.
``validate``
    ``probe`` plus the size limits. A decompression bomb (a tiny file that declares, say, 40000×40000
    pixels) is refused here, in microseconds, before any decoder sees it.
``decode``
    ``validate``, then a full decode to RGB ``uint8`` of shape ``(H, W, 3)``. OpenCV decodes first; Pillow
    takes over where OpenCV is wrong or unable (GIF, CMYK/YCbCr/LAB TIFF and JPEG, EXIF-rotated JPEG or
    TIFF, a single transparent colour declared with ``tRNS``/``transparency``, anything OpenCV refuses).
``preprocess``
    Resize to ``size × size`` and apply DenseNet's "torch" normalisation; identical to
    ``keras.applications.densenet.preprocess_input`` on the resized image.

Pixel conventions (decisions recorded here because model artifacts depend on them, see
:data:`PREPROCESSING_ID`):

* 16-bit samples become 8-bit as ``round(v / 257)`` (``(v + 128) // 257``), which maps 0 → 0,
  65535 → 255 and ``257·k`` → ``k`` exactly.
* Transparency is **composited on white**: ``out = (c·a + 255·(255 − a)) / 255`` rounded. Slide scans have
  a white background, and dropping alpha would expose whatever colour (often black) an editor left under
  transparent pixels. An alpha channel the header does not declare (e.g. the unused 4th byte of a 32-bit
  BMP) is ignored rather than composited.
* Grayscale is replicated to three channels.
* EXIF orientation (JPEG, TIFF) is applied, so the array is the image as a viewer shows it.
  :class:`ImageInfo` reports the *stored* width and height (before rotation).
* Animated GIF/WebP and multi-page TIFF: the first frame/page only.

Errors: every refusal is an :class:`~bcc_pipeline.errors.ImageError` subclass with a short human
``reason``; cv2/Pillow exceptions are translated with ``raise ... from exc``. Truncation is detected
structurally (JPEG must reach its EOI marker, PNG its IEND chunk, WebP its declared RIFF size) because
OpenCV silently returns a partially grey image for a truncated JPEG; Pillow, when used, loads with
``ImageFile.LOAD_TRUNCATED_IMAGES`` as the process has it (this module never changes it; it is ``False``
unless someone sets it). Pillow's global ``MAX_IMAGE_PIXELS`` is not touched either: headers are read by
instantiating Pillow's format plugins directly, which does not run Pillow's bomb check, and our own
``max_pixels`` applies instead. Reading a file that does not exist or cannot be read raises
:class:`~bcc_pipeline.errors.ImageError` (the base class) from :func:`decode_file`; :func:`sha256_file`
lets ``OSError`` through.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
)

from .config import DEFAULTS
from .errors import (
    ImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)
from .files import sha256_file  # re-exported: one definition, in files

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "IMAGE_EXTENSIONS",
    "PREPROCESSING_ID",
    "ImageInfo",
    "decode",
    "decode_file",
    "load_for_model",
    "preprocess",
    "probe",
    "sha256_bytes",
    "max_file_bytes",
    "sha256_file",
    "validate",
]

IMAGE_EXTENSIONS: Final[frozenset[str]] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
)
"""File extensions (lower case, with the dot) that are considered image files."""

PREPROCESSING_ID: Final[str] = "densenet-torch-v1"
"""Names the pixel contract of :func:`decode` + :func:`preprocess`; recorded in model artifacts."""

DEFAULT_MAX_PIXELS: Final[int] = DEFAULTS["max_pixels"]
DEFAULT_MIN_SIDE: Final[int] = DEFAULTS["min_side"]

_TORCH_MEAN: Final[np.ndarray] = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_TORCH_STD: Final[np.ndarray] = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _normalisation_table() -> np.ndarray:
    """``((v / 255) - mean) / std`` in float32 for every uint8 value ``v`` and channel: a (1, 256, 3) table.
    Looking values up (``cv2.LUT``) gives bit-for-bit the arithmetic's result, about twice as fast."""
    v = np.repeat(np.arange(256, dtype=np.float32)[:, None], 3, axis=1)
    v /= np.float32(255.0)
    v -= _TORCH_MEAN
    v /= _TORCH_STD
    return np.ascontiguousarray(v.reshape(1, 256, 3))


_NORMALISE_LUT: Final[np.ndarray] = _normalisation_table()

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
# Pillow modes whose pixels OpenCV's IMREAD_UNCHANGED decode represents faithfully, per format.
_OPENCV_MODES: Final[dict[str, frozenset[str]]] = {
    "PNG": frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L"}),
    "JPEG": frozenset({"L", "RGB"}),
    "TIFF": frozenset({"L", "RGB", "RGBA", "I;16", "I;16B", "I;16L"}),
    "BMP": frozenset({"1", "L", "P", "RGB", "RGBA"}),
}
_ALPHA_MODES: Final[frozenset[str]] = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_EXIF_ORIENTATION_TAG: Final[int] = 0x0112

PathArg = str | os.PathLike[str]


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
    try:
        im = _PIL_PLUGINS[fmt](io.BytesIO(data))
    except Exception as exc:  # Pillow raises SyntaxError/OSError/ValueError/... for bad headers
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


# --------------------------------------------------------------------------------------------- decoding


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit samples to 8-bit by rounding ``v / 257``.

    Converted in slices of rows so the uint32 temporaries stay small: a whole near-limit 16-bit image
    would otherwise need several times its own size in scratch memory."""
    out = np.empty(arr.shape, dtype=np.uint8)
    step = max(1, (4 << 20) // max(1, arr[0].size if arr.ndim > 1 else 1))  # ~4 Mi samples per slice
    for i in range(0, arr.shape[0], step):
        out[i:i + step] = (arr[i:i + step].astype(np.uint32) + 128) // 257
    return out


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 over a white background using ``alpha`` (H, W) uint8, rounded."""
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF: treat as unrotated, like OpenCV would
        return 1


def _wants_pillow(info: ImageInfo, im: Image.Image | None) -> bool:
    """Whether Pillow, not OpenCV, must decode this image (see the module docstring)."""
    if im is None:  # WEBP: libwebp through OpenCV
        return False
    if info.format == "GIF" or im.mode not in _OPENCV_MODES.get(info.format, frozenset()):
        return True
    if "transparency" in im.info:  # tRNS colour key: composite it the same way everywhere
        return True
    return info.format in {"JPEG", "TIFF"} and _orientation(im) not in (0, 1)


def _decode_opencv(info: ImageInfo, im: Image.Image | None, data: bytes) -> np.ndarray | None:
    """RGB uint8 via OpenCV, or ``None`` when OpenCV cannot (or should not be trusted to) decode it."""
    try:
        arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None
    if arr is None or arr.ndim not in (2, 3) or arr.shape[:2] != (info.height, info.width):
        return None
    if arr.dtype == np.uint16:
        arr = _to_uint8(arr)
    elif arr.dtype != np.uint8:
        return None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    channels = arr.shape[2]
    if channels == 2:  # gray + alpha
        return _composite_on_white(
            cv2.cvtColor(np.ascontiguousarray(arr[..., 0]), cv2.COLOR_GRAY2RGB), arr[..., 1]
        )
    if channels == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if channels == 4:
        rgb = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
        # WebP (im is None): libwebp only returns 4 channels when the image has alpha.
        if im is None or _has_alpha(im):
            return _composite_on_white(rgb, arr[..., 3])
        return rgb
    return None


def _decode_pillow(info: ImageInfo, im: Image.Image | None, data: bytes, path: PathArg | None) -> np.ndarray:
    """RGB uint8 via Pillow, with a full (truncation-checked) load and EXIF orientation applied."""
    try:
        if im is None:
            im = Image.open(io.BytesIO(data), formats=[info.format])
        im.load()
        im = ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{info.width}x{info.height} is too large for Pillow ({exc})", path) from exc
    except Exception as exc:  # OSError("image file is truncated"), SyntaxError, ValueError, ...
        raise TruncatedImageError(f"truncated or corrupt image data: {exc}", path) from exc
    mode = im.mode
    try:
        if mode == "I" or mode.startswith("I;16"):
            values = np.asarray(im)
            if values.size and (int(values.min()) < 0 or int(values.max()) > 0xFFFF):
                raise UnsupportedImageError(
                    "unsupported image mode: 32-bit integer samples beyond 16 bits", path
                )
            return cv2.cvtColor(_to_uint8(values.astype(np.uint16)), cv2.COLOR_GRAY2RGB)
        if mode == "F":
            raise UnsupportedImageError("unsupported image mode: 32-bit floating point samples", path)
        if _has_alpha(im):
            rgba = np.asarray(im.convert("RGBA"))
            return _composite_on_white(rgba[..., :3], rgba[..., 3])
        return np.asarray(im.convert("RGB"))
    except ImageError:
        raise
    except Exception as exc:  # ValueError("conversion not supported") and the like
        raise UnsupportedImageError(f"unsupported image mode {mode!r}: {exc}", path) from exc


def decode(
    data: bytes,
    *,
    path: PathArg | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> np.ndarray:
    """Decode an encoded image to RGB ``uint8`` of shape ``(H, W, 3)``, C-contiguous.

    Runs :func:`validate` first (so a bomb is never decoded), then checks the data is complete, then
    decodes with OpenCV or Pillow as described in the module docstring. Raises the
    :class:`~bcc_pipeline.errors.ImageError` subclasses of :func:`validate`, and
    :class:`TruncatedImageError` / :class:`UnsupportedImageError` for data that cannot be decoded.
    """
    info, im = _open_header(data, path)
    _check_limits(info, path, max_pixels, min_side)
    _check_complete(info, data, path)
    rgb = None if _wants_pillow(info, im) else _decode_opencv(info, im, data)
    if rgb is None:
        rgb = _decode_pillow(info, im, data, path)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:  # pragma: no cover - defensive
        raise UnsupportedImageError(f"decoder produced an unexpected array {rgb.shape} {rgb.dtype}", path)
    return np.ascontiguousarray(rgb)


def decode_file(
    path: PathArg,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> tuple[np.ndarray, str]:
    """Read ``path`` once; return its RGB pixels (see :func:`decode`) and the SHA-256 of its bytes.

    A file that cannot be read raises :class:`~bcc_pipeline.errors.ImageError` ("cannot read file: ...").
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}", path) from exc
    rgb = decode(data, path=path, max_pixels=max_pixels, min_side=min_side)
    return rgb, sha256_bytes(data)


# ----------------------------------------------------------------------------------------- preprocessing


def preprocess(rgb: np.ndarray, size: int) -> np.ndarray:
    """The model input for one RGB image: float32 ``(size, size, 3)``.

    Resizes with ``cv2.resize`` to ``size × size`` (aspect ratio not kept): ``INTER_AREA`` when neither side
    grows, ``INTER_LINEAR`` when either side is enlarged; then DenseNet "torch" normalisation
    ``(x / 255 - mean) / std`` with ImageNet mean ``[0.485, 0.456, 0.406]`` and std
    ``[0.229, 0.224, 0.225]``, computed in float32 exactly as
    ``keras.applications.densenet.preprocess_input`` does. Raises ``ValueError`` for anything but a
    non-empty ``uint8`` array of shape ``(H, W, 3)`` or a non-positive ``size``.
    """
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected dtype uint8, got {rgb.dtype}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    size = int(size)
    height, width = rgb.shape[:2]
    if (height, width) == (size, size):
        resized = rgb
    else:
        interpolation = cv2.INTER_AREA if height >= size and width >= size else cv2.INTER_LINEAR
        resized = cv2.resize(np.ascontiguousarray(rgb), (size, size), interpolation=interpolation)
    return cv2.LUT(np.ascontiguousarray(resized), _NORMALISE_LUT)


def load_for_model(
    path: PathArg,
    size: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> tuple[np.ndarray, str]:
    """:func:`decode_file` then :func:`preprocess`: ``(float32 (size, size, 3), sha256 of the file)``."""
    rgb, digest = decode_file(path, max_pixels=max_pixels, min_side=min_side)
    return preprocess(rgb, size), digest
