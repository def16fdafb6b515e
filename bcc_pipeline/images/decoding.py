"""Decoding a checked image to RGB ``uint8`` pixels: OpenCV first, Pillow where OpenCV is wrong or unable
(see the pixel conventions in the package docstring)."""

from __future__ import annotations

import io
from typing import Final

import cv2
import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageError, ImageTooLargeError, TruncatedImageError, UnsupportedImageError
from .probing import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ImageInfo,
    PathArg,
    _check_complete,
    _check_limits,
    _open_header,
    sha256_bytes,
)

__all__ = ["decode", "decode_file"]

# Pillow modes whose pixels OpenCV's IMREAD_UNCHANGED decode represents faithfully, per format.
_OPENCV_MODES: Final[dict[str, frozenset[str]]] = {
    "PNG": frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L"}),
    "JPEG": frozenset({"L", "RGB"}),
    "TIFF": frozenset({"L", "RGB", "RGBA", "I;16", "I;16B", "I;16L"}),
    "BMP": frozenset({"1", "L", "P", "RGB", "RGBA"}),
}
# Ancillary PNG chunks (colour profiles, text, times, ...) do not change the pixels OpenCV returns, but
# libpng checks them and prints what it dislikes ("libpng warning: iCCP: known incorrect sRGB profile")
# straight to the process's stderr. OpenCV therefore gets the PNG without them; tRNS (such images are
# decoded by Pillow anyway) and the APNG frame chunks stay.
_PNG_KEPT_ANCILLARY: Final[frozenset[bytes]] = frozenset({b"tRNS", b"acTL", b"fcTL", b"fdAT"})
_ALPHA_MODES: Final[frozenset[str]] = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_EXIF_ORIENTATION_TAG: Final[int] = 0x0112


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit samples to 8-bit by rounding ``v / 257``.

    Converted in slices of rows so the uint32 temporaries stay small: a whole near-limit 16-bit image
    would otherwise need several times its own size in scratch memory."""
    out = np.empty(arr.shape, dtype=np.uint8)
    step = max(1, (4 << 20) // max(1, arr[0].size if arr.ndim > 1 else 1))  # ~4 Mi samples per slice
    for i in range(0, arr.shape[0], step):
        out[i : i + step] = (arr[i : i + step].astype(np.uint32) + 128) // 257
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


def _png_pixel_chunks(data: bytes) -> bytes:
    """``data`` (a complete PNG) without the ancillary chunks libpng would only warn about; ``data`` itself
    when it has none."""
    view, keep, start, pos = memoryview(data), [], 0, 8
    while pos + 8 <= len(data):
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")
        if kind[0] & 0x20 and kind not in _PNG_KEPT_ANCILLARY:  # lower-case first letter: ancillary
            keep.append(view[start:pos])
            start = end
        if kind == b"IEND":
            break
        pos = end
    if not keep:
        return data
    keep.append(view[start:])
    return b"".join(keep)


def _decode_opencv(info: ImageInfo, im: Image.Image | None, data: bytes) -> np.ndarray | None:
    """RGB uint8 via OpenCV, or ``None`` when OpenCV cannot (or should not be trusted to) decode it."""
    if info.format == "PNG":
        data = _png_pixel_chunks(data)
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
