"""The DenseNet201 classifier of the seed recipe, its base weights, and checksummed artifacts.

Architecture (names are fixed, so saved models and logs read the same everywhere)::

    image (S×S×3, DenseNet "torch" preprocessing already applied by images.preprocess)
      → densenet201 (include_top=False)
      → gap  GlobalAveragePooling2D
      → dropout  Dropout(0.5)
      → bn  BatchNormalization
      → probs  Dense(2, softmax)      # column 0 = benign, column 1 = malignant

At 224×224 this has 18,333,506 parameters: 18,100,610 trainable and 232,896 not, as in the seed.

Base weights are ``imagenet`` (Keras' own download and cache), ``none`` (random init) or a path to
a weights file for the convolutional base. Offline, a missing ImageNet file fails fast with a message
that says where to put it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ArtifactError, ChecksumMismatchError, ConfigError, WeightsUnavailableError
from .files import atomic_write, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = [
    "CLASS_NAMES",
    "IMAGENET_WEIGHTS_FILE",
    "IMAGENET_WEIGHTS_URL",
    "MIN_IMAGE_SIZE",
    "build_classifier",
    "count_params",
    "keras_cache_dir",
    "load_artifact",
    "resolve_base_weights",
    "save_artifact",
    "verify_artifact",
]

CLASS_NAMES = ("benign", "malignant")
IMAGENET_WEIGHTS_FILE = "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/densenet/" + IMAGENET_WEIGHTS_FILE
)
MIN_IMAGE_SIZE = 32


def keras_cache_dir() -> Path:
    """Where Keras looks for downloaded weights: ``$KERAS_HOME/models`` or ``~/.keras/models``."""
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(base) / "models"


def _network_reachable(host: str = "storage.googleapis.com", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_base_weights(base_weights: str) -> str | None:
    """Turn the ``base_weights`` setting into what Keras accepts, or fail with a way out.

    Returns ``None`` for random init, ``"imagenet"`` when the cached file is present or the network
    is reachable, or an absolute path to an existing weights file.
    """
    if base_weights == "none":
        return None
    if base_weights == "imagenet":
        cached = keras_cache_dir() / IMAGENET_WEIGHTS_FILE
        if cached.is_file() or _network_reachable():
            return "imagenet"
        raise WeightsUnavailableError(
            f"ImageNet weights requested but {IMAGENET_WEIGHTS_FILE} is not in {keras_cache_dir()} "
            "and the network is unreachable. Either place that file there (download it from "
            f"{IMAGENET_WEIGHTS_URL}), or set BCC_BASE_WEIGHTS=/path/to/{IMAGENET_WEIGHTS_FILE}, "
            "or set BCC_BASE_WEIGHTS=none to train from random initialisation."
        )
    path = Path(base_weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"base weights file {path} does not exist; pass an existing .h5 file, "
            "or use BCC_BASE_WEIGHTS=imagenet or BCC_BASE_WEIGHTS=none"
        )
    return str(path.resolve())


def build_classifier(*, image_size: int, base_weights: str, seed: int | None = None) -> keras.Model:
    """Build the seed's DenseNet201 classifier (see the module docstring for the layers).

    Args:
        image_size: square input side in pixels, at least 32.
        base_weights: ``imagenet``, ``none`` or a path to a weights file for the DenseNet201 base.
        seed: seeds Keras' initialisers when given, for repeatable from-scratch runs.
    """
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    weights = resolve_base_weights(base_weights)

    import keras

    if seed is not None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    try:
        base = keras.applications.DenseNet201(
            include_top=False, weights=weights, input_tensor=None, input_shape=(image_size, image_size, 3)
        )
    except Exception as exc:  # noqa: BLE001 - Keras raises ValueError/OSError/HTTP errors here
        raise WeightsUnavailableError(
            f"cannot load DenseNet201 base weights {base_weights!r}: {exc}"
        ) from exc
    x = base(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="bcc_densenet201")


def count_params(model: keras.Model) -> dict[str, int]:
    """Total, trainable and non-trainable parameter counts, as ``model.summary()`` reports them."""
    import numpy as np

    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    non_trainable = int(sum(np.prod(w.shape) for w in model.non_trainable_weights))
    return {
        "total_params": trainable + non_trainable,
        "trainable_params": trainable,
        "non_trainable_params": non_trainable,
    }


# -- artifacts --------------------------------------------------------------------------------
def save_artifact(
    model: keras.Model, out_dir: str | os.PathLike[str], metadata: dict[str, Any]
) -> tuple[Path, str]:
    """Save ``model.keras`` and ``metadata.json`` into ``out_dir`` atomically.

    The model goes to a temporary file in the same folder first and is renamed into place, so a
    crash never leaves a half-written ``model.keras``. Returns the path and its sha256, which is also
    written into ``metadata.json`` (as ``artifact_sha256``).
    """
    out = Path(out_dir)
    digest = ""

    def write(tmp: Path) -> None:
        nonlocal digest
        model.save(tmp)
        digest = sha256_file(tmp)

    final = atomic_write(out / "model.keras", write)
    meta = dict(metadata, artifact="model.keras", artifact_sha256=digest)
    atomic_write(out / "metadata.json", json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return final, digest


def _recorded_sha256(path: Path, expected_sha256: str | None) -> str:
    if not path.is_file():
        raise ArtifactError(f"model artifact {path} does not exist")
    if expected_sha256 is not None:
        return expected_sha256
    meta_path = path.parent / "metadata.json"
    try:
        return json.loads(meta_path.read_text())["artifact_sha256"]
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"no recorded checksum for {path} (metadata.json unreadable): {exc}") from exc


def _require_sha256(path: Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise ChecksumMismatchError(
            f"model artifact {path} has sha256 {actual[:12]}…, expected {expected[:12]}…; "
            "the file was changed or corrupted after it was registered; refusing to load it"
        )


def verify_artifact(path: str | os.PathLike[str], expected_sha256: str | None = None) -> Path:
    """Check a saved model's sha256 against ``expected_sha256`` (default: ``metadata.json`` beside it).

    Raises :class:`ChecksumMismatchError` on a mismatch and :class:`ArtifactError` when the file or its
    recorded checksum is missing; returns the path.
    """
    path = Path(path)
    expected = _recorded_sha256(path, expected_sha256)
    _require_sha256(path, sha256_file(path), expected)
    return path


def load_artifact(path: str | os.PathLike[str], expected_sha256: str | None = None) -> keras.Model:
    """Load a saved model after checking its sha256.

    ``expected_sha256`` defaults to the value in ``metadata.json`` beside the file; a mismatch (or a
    missing checksum) raises instead of loading a model nobody can vouch for. The bytes that are checked
    are the bytes that are loaded: the file is read once, through one descriptor, into a private copy
    (hashed as it is copied) that Keras loads, so a file swapped between the check and the load is never
    loaded (nor converted and cached under the good file's checksum).
    """
    import tempfile

    path = Path(path)
    expected = _recorded_sha256(path, expected_sha256)
    with tempfile.TemporaryDirectory(prefix="bcc-model-") as private:  # mode 0700: this process's alone
        copy = Path(private) / path.name
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as src, open(copy, "xb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
        except OSError as exc:
            raise ArtifactError(f"cannot read model artifact {path}: {exc}") from exc
        _require_sha256(path, digest.hexdigest(), expected)
        import keras

        try:
            return keras.models.load_model(copy, compile=False)
        except Exception as exc:  # noqa: BLE001 - Keras raises many types for a bad file
            raise ArtifactError(f"cannot load model artifact {path}: {exc}") from exc
