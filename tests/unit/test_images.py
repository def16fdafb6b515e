"""Unit tests of ``bcc_pipeline.images``: every image is made here, with Pillow/numpy (cv2 for 16-bit RGB)."""

from __future__ import annotations

import hashlib
import io
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from bcc_pipeline import images
from bcc_pipeline.errors import (
    ImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)
from bcc_pipeline.images import (
    IMAGE_EXTENSIONS,
    PREPROCESSING_ID,
    ImageInfo,
    decode,
    decode_file,
    load_for_model,
    preprocess,
    probe,
    sha256_bytes,
    sha256_file,
    validate,
)

W, H = 80, 48  # deliberately not square, so transposed results are noticed


# ------------------------------------------------------------------------------------------------ helpers


def _rgb_source(width: int = W, height: int = H) -> np.ndarray:
    """A smooth colourful image (JPEG-friendly) with a saturated red block in the top-left corner."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack(
        [
            (x * 255 // max(width - 1, 1)),
            (y * 255 // max(height - 1, 1)),
            ((x + y) * 255 // max(width + height - 2, 1)),
        ],
        axis=-1,
    ).astype(np.uint8)
    arr[:12, :12] = (255, 0, 0)
    return arr


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A small but well-formed PNG header declaring a huge RGB image (only a few zero rows compressed)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((1 + 3 * width) * 8), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def _assert_rgb(arr: np.ndarray, height: int, width: int) -> None:
    assert arr.shape == (height, width, 3)
    assert arr.dtype == np.uint8
    assert arr.flags["C_CONTIGUOUS"]


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return _rgb_source()


@pytest.fixture(scope="module")
def png_bytes(rgb: np.ndarray) -> bytes:
    return _encode(Image.fromarray(rgb), "PNG")


@pytest.fixture(scope="module")
def jpeg_bytes(rgb: np.ndarray) -> bytes:
    return _encode(Image.fromarray(rgb), "JPEG", quality=95)


# ---------------------------------------------------------------------------------------- module surface


def test_module_surface() -> None:
    assert set(images.__all__) >= {
        "IMAGE_EXTENSIONS",
        "PREPROCESSING_ID",
        "ImageInfo",
        "decode",
        "decode_file",
        "load_for_model",
        "preprocess",
        "probe",
        "sha256_bytes",
        "sha256_file",
        "validate",
    }
    assert all(hasattr(images, name) for name in images.__all__)
    assert PREPROCESSING_ID == "densenet-torch-v1"
    assert IMAGE_EXTENSIONS == frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"})
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


def test_module_imports_neither_tensorflow_nor_airflow() -> None:
    code = (
        "import sys, bcc_pipeline.images; "
        "bad = [m for m in ('tensorflow', 'keras', 'airflow') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_image_info_is_frozen() -> None:
    info = ImageInfo("PNG", 3, 2)
    assert info.pixels == 6
    with pytest.raises(AttributeError):
        info.width = 5  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- hashing


def test_sha256_file_streams_large_file(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, 2_621_440 + 17, dtype=np.uint8).tobytes()  # > 2 MiB
    target = tmp_path / "blob.bin"
    target.write_bytes(data)
    assert sha256_file(target) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(target)) == sha256_bytes(data)


def test_sha256_file_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing.png")


def test_sha256_bytes() -> None:
    assert sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_sha256_bytes_rejects_str() -> None:
    with pytest.raises(TypeError):
        sha256_bytes("abc")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- probe/validate


@pytest.mark.parametrize(
    ("fmt", "expected", "kwargs"),
    [
        ("PNG", "PNG", {}),
        ("JPEG", "JPEG", {}),
        ("TIFF", "TIFF", {}),
        ("BMP", "BMP", {}),
        ("GIF", "GIF", {}),
        ("WEBP", "WEBP", {"lossless": True}),
        ("WEBP", "WEBP", {"quality": 80}),
    ],
)
def test_probe_reads_format_and_size(
    rgb: np.ndarray, fmt: str, expected: str, kwargs: dict[str, object]
) -> None:
    data = _encode(Image.fromarray(rgb), fmt, **kwargs)
    assert probe(data) == ImageInfo(expected, W, H)


def test_probe_webp_extended_header(rgb: np.ndarray) -> None:
    rgba = np.dstack([rgb, np.full((H, W), 128, np.uint8)])
    data = _encode(Image.fromarray(rgba, "RGBA"), "WEBP", quality=80, exif=Image.Exif().tobytes())
    assert data[12:16] == b"VP8X"
    assert probe(data) == ImageInfo("WEBP", W, H)


def test_probe_empty() -> None:
    with pytest.raises(NotAnImageError) as info:
        probe(b"", path="x.png")
    assert info.value.reason == "empty file"
    assert info.value.path == "x.png"


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        (b"Hello, this is a plain text file.\nNot a picture at all.\n", NotAnImageError, "text"),
        (b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>", NotAnImageError, "HTML"),
        (b"  <html lang='en'><head><title>x</title></head></html>", NotAnImageError, "HTML"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", NotAnImageError, "PDF"),
        (b"BMW service record\n", NotAnImageError, "text"),
        (bytes(range(256)) * 4, NotAnImageError, "signature"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10"/>', UnsupportedImageError, "SVG"),
    ],
)
def test_probe_refuses_non_images(data: bytes, error: type[ImageError], words: str) -> None:
    with pytest.raises(error) as info:
        probe(data)
    assert words in info.value.reason


def test_probe_png_signature_then_garbage() -> None:
    data = b"\x89PNG\r\n\x1a\n" + np.random.default_rng(7).integers(0, 256, 300, dtype=np.uint8).tobytes()
    with pytest.raises((NotAnImageError, TruncatedImageError)) as info:
        probe(data)
    assert "PNG" in info.value.reason


def test_probe_header_cut_short(jpeg_bytes: bytes) -> None:
    with pytest.raises(TruncatedImageError):
        probe(jpeg_bytes[:40])


def test_validate_within_limits(png_bytes: bytes) -> None:
    assert validate(png_bytes) == ImageInfo("PNG", W, H)
    assert validate(png_bytes, max_pixels=W * H, min_side=H) == ImageInfo("PNG", W, H)


def test_validate_refuses_png_bomb_fast_without_memory() -> None:
    data = _png_bomb()
    assert len(data) < 20_000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ImageTooLargeError) as info:
            validate(data, path="bomb.png")
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 5 * 1024 * 1024
    assert info.value.reason == "40000x40000 = 1600000000 pixels exceeds the limit of 50000000"
    assert info.value.path == "bomb.png"
    # The header itself is fine: probe reports the declared size without decoding anything.
    assert probe(data) == ImageInfo("PNG", 40_000, 40_000)


def test_validate_custom_pixel_limit(png_bytes: bytes) -> None:
    with pytest.raises(ImageTooLargeError) as info:
        validate(png_bytes, max_pixels=W * H - 1)
    assert f"{W}x{H}" in info.value.reason


def test_validate_too_small() -> None:
    data = _encode(Image.new("RGB", (64, 16), (10, 20, 30)), "PNG")
    with pytest.raises(ImageTooSmallError) as info:
        validate(data)
    assert "64x16" in info.value.reason and "32" in info.value.reason
    assert validate(data, min_side=16) == ImageInfo("PNG", 64, 16)


def test_validate_rejects_bad_limits(png_bytes: bytes) -> None:
    with pytest.raises(ValueError):
        validate(png_bytes, max_pixels=0)


# ------------------------------------------------------------------------------------------------ decode


def test_decode_rgb_png(png_bytes: bytes, rgb: np.ndarray) -> None:
    out = decode(png_bytes)
    _assert_rgb(out, H, W)
    np.testing.assert_array_equal(out, rgb)


def test_decode_rgba_png_composites_on_white(rgb: np.ndarray) -> None:
    alpha = np.full((H, W), 255, np.uint8)
    alpha[:, : W // 4] = 0
    alpha[:, W // 4 : W // 2] = 128
    data = _encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG")
    out = decode(data)
    _assert_rgb(out, H, W)
    assert (out[:, : W // 4] == 255).all()  # fully transparent -> white
    np.testing.assert_array_equal(out[:, W // 2 :], rgb[:, W // 2 :])  # opaque -> unchanged
    half = rgb[:, W // 4 : W // 2].astype(np.int32)
    expected = (half * 128 + 255 * 127 + 127) // 255
    np.testing.assert_array_equal(out[:, W // 4 : W // 2], expected)


def test_decode_grayscale_png(rgb: np.ndarray) -> None:
    gray = rgb[..., 1].copy()
    out = decode(_encode(Image.fromarray(gray, "L"), "PNG"))
    _assert_rgb(out, H, W)
    np.testing.assert_array_equal(out, np.dstack([gray, gray, gray]))


def test_decode_gray_alpha_png() -> None:
    la = Image.fromarray(np.dstack([np.full((H, W), 40, np.uint8), np.full((H, W), 0, np.uint8)]), "LA")
    out = decode(_encode(la, "PNG"))
    assert (out == 255).all()


_SIXTEEN_BIT_VALUES = np.array([0, 383, 25_700, 32_896, 65_280, 65_535], dtype=np.uint16)


def test_decode_16bit_grayscale_png() -> None:
    values = np.resize(_SIXTEEN_BIT_VALUES, H * W).reshape(H, W).astype(np.uint16)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    data = _encode(img, "PNG")
    assert data[24] == 16  # IHDR bit depth
    out = decode(data)
    _assert_rgb(out, H, W)
    expected = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    # The rounding convention, pinned: round(v / 257).
    assert [int(v) for v in out[0, :6, 0]] == [0, 1, 100, 128, 254, 255]


def test_decode_16bit_rgb_png() -> None:
    rgb16 = np.zeros((H, W, 3), np.uint16)
    rgb16[..., 0] = 65_535
    rgb16[..., 1] = 25_700
    rgb16[..., 2] = 65_280
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    assert ok
    out = decode(buf.tobytes())
    _assert_rgb(out, H, W)
    assert (out[..., 0] == 255).all() and (out[..., 1] == 100).all() and (out[..., 2] == 254).all()


def test_decode_palette_png(rgb: np.ndarray) -> None:
    pal = Image.fromarray(rgb).quantize(colors=16)
    assert pal.mode == "P"
    out = decode(_encode(pal, "PNG"))
    _assert_rgb(out, H, W)
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))


def test_decode_palette_png_with_transparency() -> None:
    pal = Image.new("P", (W, H), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.paste(1, (0, 0, W // 2, H))
    data = _encode(pal, "PNG", transparency=0)
    out = decode(data)
    assert (out[:, : W // 2] == (200, 10, 10)).all()
    assert (out[:, W // 2 :] == 255).all()  # the transparent index is composited on white, not black


def test_decode_cmyk_jpeg(rgb: np.ndarray) -> None:
    cmyk = Image.fromarray(rgb).convert("CMYK")
    data = _encode(cmyk, "JPEG", quality=95)
    out = decode(data)
    _assert_rgb(out, H, W)
    assert _mean_abs_diff(out, rgb) < 8
    assert out[2:10, 2:10, 0].mean() > 200 and out[2:10, 2:10, 1:].mean() < 50  # the red block is red
    np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_decode_cmyk_tiff(rgb: np.ndarray) -> None:
    out = decode(_encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"))
    _assert_rgb(out, H, W)
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_decode_applies_exif_orientation(rgb: np.ndarray, fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90° clockwise for display
    data = _encode(Image.fromarray(rgb), fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    assert probe(data) == ImageInfo(fmt, W, H)  # stored size
    out = decode(data)
    _assert_rgb(out, W, H)  # displayed size: rotated
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(out, reference)
    # The red block of the stored top-left corner is now in the top-right corner.
    assert out[2:10, -10:-2, 0].mean() > 200 and out[2:10, -10:-2, 1:].mean() < 50
    assert out[2:10, 2:10, 0].mean() < 200


def test_decode_progressive_jpeg(rgb: np.ndarray) -> None:
    data = _encode(Image.fromarray(rgb), "JPEG", quality=95, progressive=True)
    assert Image.open(io.BytesIO(data)).info.get("progressive")
    out = decode(data)
    _assert_rgb(out, H, W)
    assert _mean_abs_diff(out, rgb) < 4


def test_decode_baseline_jpeg_with_trailing_padding(jpeg_bytes: bytes, rgb: np.ndarray) -> None:
    out = decode(jpeg_bytes + b"\x00" * 64)
    _assert_rgb(out, H, W)
    assert _mean_abs_diff(out, rgb) < 4


def test_decode_grayscale_jpeg(rgb: np.ndarray) -> None:
    out = decode(_encode(Image.fromarray(rgb[..., 1].copy(), "L"), "JPEG", quality=95))
    _assert_rgb(out, H, W)
    assert _mean_abs_diff(out[..., 0], rgb[..., 1]) < 4


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}), ("BMP", {}), ("WEBP", {"lossless": True})],
)
def test_decode_lossless_formats(rgb: np.ndarray, fmt: str, kwargs: dict[str, object]) -> None:
    out = decode(_encode(Image.fromarray(rgb), fmt, **kwargs))
    _assert_rgb(out, H, W)
    np.testing.assert_array_equal(out, rgb)


def test_decode_lossy_webp(rgb: np.ndarray) -> None:
    out = decode(_encode(Image.fromarray(rgb), "WEBP", quality=90))
    _assert_rgb(out, H, W)
    assert _mean_abs_diff(out, rgb) < 6


def test_decode_webp_with_alpha(rgb: np.ndarray) -> None:
    alpha = np.full((H, W), 255, np.uint8)
    alpha[:, : W // 2] = 0
    out = decode(_encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "WEBP", lossless=True))
    assert (out[:, : W // 2] == 255).all()
    np.testing.assert_array_equal(out[:, W // 2 :], rgb[:, W // 2 :])


def test_decode_gif(rgb: np.ndarray) -> None:
    data = _encode(Image.fromarray(rgb).quantize(colors=32), "GIF")
    out = decode(data)
    _assert_rgb(out, H, W)
    np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert _mean_abs_diff(out, rgb) < 12


def test_decode_leaves_pillow_globals_alone(png_bytes: bytes, jpeg_bytes: bytes) -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    decode(png_bytes)
    decode(jpeg_bytes)
    with pytest.raises(ImageTooLargeError):
        decode(_png_bomb())
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_decode_zero_bytes() -> None:
    with pytest.raises(NotAnImageError, match="empty file"):
        decode(b"")


def test_decode_truncated_jpeg(jpeg_bytes: bytes) -> None:
    with pytest.raises(TruncatedImageError) as info:
        decode(jpeg_bytes[: len(jpeg_bytes) // 2], path="half.jpg")
    assert info.value.reason.startswith("truncated or corrupt image data")
    assert info.value.path == "half.jpg"


def test_decode_truncated_jpeg_with_eoi_bytes_in_a_segment(rgb: np.ndarray) -> None:
    # A comment holding the bytes FF D9 must not be mistaken for the end-of-image marker.
    data = _encode(Image.fromarray(rgb), "JPEG", quality=95, comment=b"x\xff\xd9y" * 8)
    assert decode(data).shape == (H, W, 3)
    with pytest.raises(TruncatedImageError):
        decode(data[: len(data) * 3 // 4])
    with pytest.raises(TruncatedImageError):
        decode(data[:-2])  # only the final EOI removed


def test_decode_truncated_progressive_jpeg(rgb: np.ndarray) -> None:
    data = _encode(Image.fromarray(rgb), "JPEG", quality=95, progressive=True)
    with pytest.raises(TruncatedImageError):
        decode(data[: len(data) * 2 // 3])


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("PNG", {}),
        ("WEBP", {"lossless": True}),
        ("GIF", {}),
        ("TIFF", {}),
        ("BMP", {}),
    ],
)
def test_decode_truncated_other_formats(rgb: np.ndarray, fmt: str, kwargs: dict[str, object]) -> None:
    data = _encode(Image.fromarray(rgb), fmt, **kwargs)
    with pytest.raises(TruncatedImageError) as info:
        decode(data[: len(data) // 2])
    assert info.value.reason.startswith("truncated or corrupt image data")


def test_decode_png_signature_then_garbage() -> None:
    data = b"\x89PNG\r\n\x1a\n" + b"this is certainly not a PNG chunk stream" * 10
    with pytest.raises((NotAnImageError, TruncatedImageError)) as info:
        decode(data)
    assert info.value.reason


def test_decode_png_bomb_is_refused_fast() -> None:
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 50000000"):
        decode(_png_bomb())
    assert time.perf_counter() - started < 1.0


def test_decode_too_small() -> None:
    with pytest.raises(ImageTooSmallError):
        decode(_encode(Image.new("RGB", (20, 100)), "PNG"))


# ------------------------------------------------------------------------------------------- decode_file


def test_decode_file_returns_pixels_and_hash(tmp_path: Path, png_bytes: bytes, rgb: np.ndarray) -> None:
    target = tmp_path / "slide.png"
    target.write_bytes(png_bytes)
    out, digest = decode_file(target)
    np.testing.assert_array_equal(out, rgb)
    assert digest == hashlib.sha256(png_bytes).hexdigest()
    # The name does not matter, the content does.
    misnamed = tmp_path / "slide.jpg"
    misnamed.write_bytes(png_bytes)
    assert decode_file(misnamed)[1] == digest


def test_decode_file_text_named_jpg(tmp_path: Path) -> None:
    target = tmp_path / "notes.jpg"
    target.write_text("patient notes, definitely not pixels\n" * 5)
    with pytest.raises(NotAnImageError) as info:
        decode_file(target)
    assert "text" in info.value.reason
    assert info.value.path == str(target)
    assert str(target) in str(info.value)


def test_decode_file_html_named_png(tmp_path: Path) -> None:
    target = tmp_path / "download.png"
    target.write_text("<!doctype html><html><head><title>Login</title></head><body></body></html>")
    with pytest.raises(NotAnImageError, match="HTML"):
        decode_file(target)


def test_decode_file_zero_bytes(tmp_path: Path) -> None:
    target = tmp_path / "empty.png"
    target.write_bytes(b"")
    with pytest.raises(NotAnImageError, match="empty file"):
        decode_file(target)


def test_decode_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read file") as info:
        decode_file(tmp_path / "missing.png")
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_decode_file_passes_limits(tmp_path: Path, png_bytes: bytes) -> None:
    target = tmp_path / "slide.png"
    target.write_bytes(png_bytes)
    with pytest.raises(ImageTooSmallError):
        decode_file(target, min_side=H + 1)
    with pytest.raises(ImageTooLargeError):
        decode_file(target, max_pixels=100)


# -------------------------------------------------------------------------------------------- preprocess


def test_preprocess_matches_keras_densenet(rgb: np.ndarray) -> None:
    from keras.applications import densenet  # imported here: the module under test must not need keras

    for source, size, interpolation in [
        (rgb, 32, cv2.INTER_AREA),  # shrink
        (rgb, 96, cv2.INTER_LINEAR),  # enlarge
        (rgb, 64, cv2.INTER_LINEAR),  # one side grows: linear
        (_rgb_source(40, 40), 40, None),  # already the right size
    ]:
        out = preprocess(source, size)
        assert out.shape == (size, size, 3)
        assert out.dtype == np.float32
        resized = (
            source if interpolation is None else cv2.resize(source, (size, size), interpolation=interpolation)
        )
        expected = np.asarray(densenet.preprocess_input(resized.astype("float32").copy()))
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_preprocess_values() -> None:
    white = np.full((50, 50, 3), 255, np.uint8)
    out = preprocess(white, 50)
    expected = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out[0, 0], expected, atol=1e-5)
    assert not np.shares_memory(out, white)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 1), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10, 10, 3), np.uint16),
        np.zeros((0, 10, 3), np.uint8),
        [[[0, 0, 0]]],
    ],
)
def test_preprocess_rejects_bad_input(bad: object) -> None:
    with pytest.raises(ValueError):
        preprocess(bad, 8)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_preprocess_rejects_bad_size(rgb: np.ndarray, size: object) -> None:
    with pytest.raises(ValueError):
        preprocess(rgb, size)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- load_for_model


def test_load_for_model(tmp_path: Path, rgb: np.ndarray) -> None:
    data = _encode(Image.fromarray(rgb), "BMP")
    target = tmp_path / "slide.bmp"
    target.write_bytes(data)
    x, digest = load_for_model(target, 32)
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x, preprocess(rgb, 32))
    assert digest == sha256_bytes(data)


def test_load_for_model_refuses_bad_files(tmp_path: Path) -> None:
    target = tmp_path / "page.png"
    target.write_bytes(b"<html><body>oops</body></html>")
    with pytest.raises(NotAnImageError):
        load_for_model(target, 32)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_bomb())
    with pytest.raises(ImageTooLargeError):
        load_for_model(bomb, 32, max_pixels=1_000_000)


# -- big PNG metadata: real ICC profiles pass, metadata bombs are refused ------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png_with_chunks(chunks: list[tuple[bytes, bytes]], size: int = 48) -> tuple[bytes, np.ndarray]:
    """An RGB PNG built by hand with ``chunks`` between IHDR and IDAT, and its pixels."""
    px = np.random.default_rng(5).integers(0, 256, (size, size, 3), dtype=np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in px)
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
    out += b"".join(_png_chunk(k, d) for k, d in chunks)
    return out + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""), px


def _deflate_zeros(n_bytes: int) -> bytes:
    """zlib data that inflates to ``n_bytes`` zero bytes, made without holding them in memory."""
    comp, block = zlib.compressobj(9), bytes(1 << 20)
    parts = [comp.compress(block) for _ in range(n_bytes >> 20)]
    return b"".join(parts) + comp.flush()


_ICC_3MIB = bytes(range(256)) * (3 << 12)  # 3 MiB, the size of a big scanner ICC profile


@pytest.mark.parametrize(
    "chunk",
    [
        (b"iCCP", b"scanner profile\x00\x00" + zlib.compress(_ICC_3MIB)),
        (b"zTXt", b"Description\x00\x00" + zlib.compress(b"slide scan notes " * 200_000)),
        (b"iTXt", b"XML:com.adobe.xmp\x00\x01\x00\x00\x00" + zlib.compress(b"<x:xmpmeta/>" * 300_000)),
    ],
    ids=["iCCP", "zTXt", "iTXt"],
)
def test_png_with_megabytes_of_metadata_is_decoded(chunk: tuple[bytes, bytes]) -> None:
    data, px = _png_with_chunks([chunk])
    assert validate(data) == ImageInfo("PNG", 48, 48)
    np.testing.assert_array_equal(decode(data), px)


@pytest.mark.parametrize(
    ("kind", "head", "inflated"),
    [
        (b"iCCP", b"bomb\x00\x00", 64 << 20),
        (b"zTXt", b"Comment\x00\x00", 512 << 20),
    ],
    ids=["iCCP-64MiB", "zTXt-512MiB"],
)
def test_png_metadata_bombs_are_refused_fast_with_bounded_memory(
    kind: bytes, head: bytes, inflated: int
) -> None:
    data, _ = _png_with_chunks([(kind, head + _deflate_zeros(inflated))])
    assert len(data) < 1 << 20  # a small file
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ImageTooLargeError, match="metadata decompression bomb"):
            decode(data)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 2.0
    assert peak < images.PNG_MAX_METADATA_CHUNK * 3  # inflating stops at the per-chunk bound


@pytest.mark.parametrize("kind", [b"iCCP", b"IHDR"])
def test_a_png_repeating_a_chunk_allowed_once_is_refused_fast(kind: bytes) -> None:
    """400 ``iCCP`` chunks of 16 MiB each under the per-chunk bound (6 GiB inflated from a 6 MB file; 11 s
    to validate), or a second ``IHDR``: the specification allows one; refused before anything inflates."""
    if kind == b"iCCP":
        chunk = (b"iCCP", b"profile\x00\x00" + _deflate_zeros(1 << 20))
        data, _ = _png_with_chunks([chunk] * 400)
    else:
        data, _ = _png_with_chunks([(b"IHDR", struct.pack(">IIBBBBB", 48, 48, 8, 2, 0, 0, 0))])
    t0 = time.perf_counter()
    with pytest.raises(TruncatedImageError, match=f"more than one {kind.decode()} chunk"):
        validate(data)
    assert time.perf_counter() - t0 < 1.0


def test_libpng_warnings_never_reach_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    """libpng prints "libpng warning: iCCP: ..." to fd 2 for a flawed colour profile; decoding says nothing."""
    data, px = _png_with_chunks(
        [
            (b"iCCP", b"flawed\x00\x00" + zlib.compress(b"not an ICC profile" * 20)),
            (b"tEXt", b"Comment\x00fine"),
            (b"gAMA", struct.pack(">I", 0)),
        ]
    )
    capfd.readouterr()
    out = decode(data)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    np.testing.assert_array_equal(out, px)
