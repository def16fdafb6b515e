"""The one preprocessing contract of the pipeline: resize, then DenseNet's "torch" normalisation through a
lookup table. Training, evaluation and scoring all call :func:`preprocess`."""

from __future__ import annotations

from typing import Final

import cv2
import numpy as np

from .decoding import decode_file
from .probing import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, PathArg

__all__ = ["PREPROCESSING_ID", "load_for_model", "preprocess"]

PREPROCESSING_ID: Final[str] = "densenet-torch-v1"
"""Names the pixel contract of :func:`decode` + :func:`preprocess`; recorded in model artifacts."""

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
