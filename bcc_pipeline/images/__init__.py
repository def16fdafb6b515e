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

Modules: :mod:`.probing` (identifying, headers, limits, completeness), :mod:`.decoding` (OpenCV/Pillow
decoding), :mod:`.preprocessing` (the preprocessing contract). Import from ``bcc_pipeline.images``.

Errors: every refusal is an :class:`~bcc_pipeline.errors.ImageError` subclass with a short human
``reason``; cv2/Pillow exceptions are translated with ``raise ... from exc``. Truncation is detected
structurally (JPEG must reach its EOI marker, PNG its IEND chunk, WebP its declared RIFF size) because
OpenCV silently returns a partially grey image for a truncated JPEG; Pillow, when used, loads with
``ImageFile.LOAD_TRUNCATED_IMAGES`` as the process has it (this module never changes it; it is ``False``
unless someone sets it). Pillow's global ``MAX_IMAGE_PIXELS`` is not touched either: headers are read by
instantiating Pillow's format plugins directly, which does not run Pillow's bomb check, and our own
``max_pixels`` applies instead. The one Pillow setting this package sets (on import, in :mod:`.probing`)
is the PNG metadata bound: one compressed ``iCCP``/``zTXt``/``iTXt`` chunk may inflate to
:data:`PNG_MAX_METADATA_CHUNK` (16 MiB: big scanner ICC profiles pass), all text to
:data:`PNG_MAX_TEXT_MEMORY`; a metadata bomb is refused as :class:`ImageTooLargeError` after inflating no
more than that. libpng's own warnings about such chunks never reach stderr: OpenCV is given the PNG
without the ancillary chunks it does not use. Reading a file that does not exist or cannot be read raises
:class:`~bcc_pipeline.errors.ImageError` (the base class) from :func:`decode_file`; :func:`sha256_file`
lets ``OSError`` through.
"""

from __future__ import annotations

from ..files import sha256_file  # re-exported: one definition, in files
from .decoding import decode, decode_file
from .preprocessing import PREPROCESSING_ID, load_for_model, preprocess
from .probing import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    IMAGE_EXTENSIONS,
    PNG_MAX_METADATA_CHUNK,
    PNG_MAX_TEXT_MEMORY,
    ImageInfo,
    max_file_bytes,
    probe,
    sha256_bytes,
    validate,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "IMAGE_EXTENSIONS",
    "PNG_MAX_METADATA_CHUNK",
    "PNG_MAX_TEXT_MEMORY",
    "PREPROCESSING_ID",
    "ImageInfo",
    "decode",
    "decode_file",
    "load_for_model",
    "max_file_bytes",
    "preprocess",
    "probe",
    "sha256_bytes",
    "sha256_file",
    "validate",
]
