"""Every error the library raises on purpose.

    BCCError                       base class; ``str(exc)`` is a one-line human message
    ├── ConfigError                a BCC_* variable or CLI flag has a bad value
    ├── StoreError                 the project database is unreachable or not migrated
    │   └── DatabaseUrlError       a database URL no retry can make work (no such driver here; also a
    │                              ConfigError)
    ├── ImageError                 a file cannot be used as an image (has ``reason`` and ``path``)
    │   ├── NotAnImageError        content is not an image, whatever the extension says
    │   ├── UnsupportedImageError  an image format or mode we cannot decode
    │   ├── TruncatedImageError    header fine, data cut short or corrupt
    │   ├── ImageTooLargeError     more pixels than the limit (decompression bomb guard)
    │   └── ImageTooSmallError     smaller than the minimum side length
    ├── DatasetError               intake/split problems (e.g. too few images of a class)
    ├── WeightsUnavailableError    pretrained weights requested but not obtainable offline
    ├── ArtifactError              a model artifact is missing or unreadable
    │   └── ChecksumMismatchError  a model artifact's sha256 differs from the recorded one
    └── RegistryError              unknown model version, illegal status change
        └── NoChampionError        an operation needs a champion and there is none

Foreign errors (cv2, PIL, SQLAlchemy, Keras) are translated at the boundary with
``raise ... from exc`` so callers only ever need to catch ``BCCError``.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "BCCError",
    "ChecksumMismatchError",
    "ConfigError",
    "DatabaseUrlError",
    "DatasetError",
    "ImageError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "NoChampionError",
    "NotAnImageError",
    "RegistryError",
    "StoreError",
    "TruncatedImageError",
    "UnsupportedImageError",
    "WeightsUnavailableError",
]


class BCCError(Exception):
    """Base class of every error raised on purpose by ``bcc_pipeline``."""


class ConfigError(BCCError):
    pass


class StoreError(BCCError):
    pass


class DatabaseUrlError(StoreError, ConfigError):
    """A database URL that cannot work here whatever is retried: its driver is not installed, or it is an
    asyncio driver, or the URL cannot be parsed."""


class ImageError(BCCError):
    """A file that cannot be used as an image. ``reason`` is short and human readable."""

    def __init__(self, reason: str, path: object = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class NotAnImageError(ImageError):
    pass


class UnsupportedImageError(ImageError):
    pass


class TruncatedImageError(ImageError):
    pass


class ImageTooLargeError(ImageError):
    pass


class ImageTooSmallError(ImageError):
    pass


class DatasetError(BCCError):
    pass


class WeightsUnavailableError(BCCError):
    pass


class ArtifactError(BCCError):
    pass


class ChecksumMismatchError(ArtifactError):
    pass


class RegistryError(BCCError):
    pass


class NoChampionError(RegistryError):
    pass
