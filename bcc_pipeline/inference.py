"""Inference back-ends: one compiled function from a model artifact to the model's output, per batch.

Scoring asks :func:`load_predictor` for the back-end named by ``BCC_INFERENCE`` (pinned in each scoring
run's plan, so every shard of a run uses the same one). All take a float32 batch ``(N, size, size, 3)``
preprocessed by :func:`bcc_pipeline.images.preprocess` and return the model's softmax ``(N, 2)``:

=================  ==================================================================================
``keras``          TensorFlow, fp32, one ``tf.function`` (exactly what training and evaluation ran).
``xla``            The same function compiled with XLA (``jit_compile=True``).
``keras-bf16``     The model rebuilt under Keras' ``mixed_bfloat16`` policy (weights fp32, maths bf16;
                   the output layer stays fp32).
``openvino``       OpenVINO on the CPU, fp32 (``INFERENCE_PRECISION_HINT=f32``).
``openvino-bf16``  OpenVINO on the CPU with bf16 maths where the processor has it (AVX512-BF16, AMX);
                   fp32 elsewhere.
``onnxruntime``    ONNX Runtime on the CPU, fp32 (needs the ``onnx`` extra: ``tf2onnx``, ``onnxruntime``).
=================  ==================================================================================

What each costs and how far its probabilities stray from ``keras`` is measured by ``make bench``
(``benchmarks/``); the default is the fastest one that agreed on at least 99.5 % of the labels there.

Converting a Keras model for OpenVINO or ONNX Runtime takes tens of seconds, so the converted model is
kept beside the artifact (``<artifact dir>/compiled/<format>-<artifact sha>/``) with the checksums of its
files; the next run loads it in about a second. A cache whose checksums do not match is rebuilt; a
read-only models folder means converting (into a temporary folder) every time, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import model as model_lib
from .config import BACKENDS, DEFAULT_BACKEND  # re-exported: declared with the settings
from .errors import ArtifactError, ConfigError
from .files import sha256_file

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "Predictor", "load_predictor"]

log = logging.getLogger(__name__)


@dataclass
class Predictor:
    """A loaded model: ``predictor(batch) -> (N, 2)`` float32 probabilities."""

    backend: str
    precision: str
    fn: Callable[[Any], Any]
    load_seconds: float
    converted: bool = False  # True when this load converted the model (no usable cache)
    model: Any = None  # the Keras model, for the Keras back-ends

    def __call__(self, x: Any) -> Any:
        import numpy as np

        return np.asarray(self.fn(np.ascontiguousarray(x, dtype=np.float32)))


def _check_input(shape: tuple, image_size: int, version: str) -> None:
    if tuple(shape) != (image_size, image_size, 3):
        raise ArtifactError(f"model {version} takes input {tuple(shape)}, but its registry row says "
                            f"image_size {image_size}")


# -- Keras / TensorFlow -----------------------------------------------------------------------
def _to_bf16(net: Any) -> Any:
    """A copy of ``net`` computing in bfloat16 (variables fp32), the last layer kept in fp32."""
    import keras

    last = net.layers[-1].name

    def clone(layer: Any) -> Any:
        if isinstance(layer, keras.layers.InputLayer) or layer.name == last:
            return layer.__class__.from_config(layer.get_config())
        cfg = layer.get_config()
        cfg["dtype"] = "mixed_bfloat16"
        return layer.__class__.from_config(cfg)

    copy = keras.models.clone_model(net, clone_function=clone, recursive=True)
    copy.set_weights(net.get_weights())
    return copy


def _keras_fn(net: Any, image_size: int, *, jit: bool) -> Callable[[Any], Any]:
    import tensorflow as tf

    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)

    @tf.function(input_signature=[spec], jit_compile=jit)
    def infer(x):
        return tf.cast(net(x, training=False), tf.float32)

    return lambda arr: infer(tf.convert_to_tensor(arr)).numpy()


# -- converted formats, cached beside the artifact --------------------------------------------
def _cache_dir(artifact_path: Path, fmt: str, sha: str) -> Path:
    return artifact_path.parent / "compiled" / f"{fmt}-{sha[:16]}"


def _cached(folder: Path, sha: str, names: tuple[str, ...]) -> bool:
    """True when ``folder`` holds ``names`` converted from artifact ``sha``, all checksums matching."""
    try:
        meta = json.loads((folder / "source.json").read_text(encoding="utf-8"))
        if meta.get("artifact_sha256") != sha:
            return False
        return all(sha256_file(folder / n) == meta["files"][n] for n in names)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _publish(folder: Path, sha: str, names: tuple[str, ...], write: Callable[[Path], None]) -> Path | None:
    """Write a conversion into a temporary folder beside ``folder`` and rename it into place.

    Returns the folder to load from, or ``None`` when the models folder is not writable.
    """
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        log.warning("cannot cache the converted model under %s (%s); converting in memory", folder.parent, exc)
        return None
    try:
        write(tmp)
        files = {n: sha256_file(tmp / n) for n in names}
        (tmp / "source.json").write_text(json.dumps({"artifact_sha256": sha, "files": files}, indent=1) + "\n",
                                         encoding="utf-8")
        if _cached(folder, sha, names):  # another process (a parallel shard) published it meanwhile: use that
            return folder
        if folder.exists():  # a stale or damaged cache: move it aside, then replace it
            stale = folder.with_name(f".{folder.name}.stale-{uuid.uuid4().hex[:8]}")
            os.rename(folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process published first: use theirs if it is good
            if not _cached(folder, sha, names):
                raise
        return folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _converted(artifact_path: Path, sha: str, fmt: str, names: tuple[str, ...], image_size: int, version: str,
               write: Callable[[Any, Path], None]) -> Iterator[tuple[Path, bool]]:
    """Yield ``(folder holding the converted files names, converted now?)`` for artifact ``sha``.

    A good cache is used after the artifact's checksum is verified; otherwise the Keras model is loaded
    (checksum verified), ``write(net, folder)`` converts it into the cache, or into a temporary folder
    removed afterwards when the cache cannot be written.
    """
    folder = _cache_dir(artifact_path, fmt, sha)
    if _cached(folder, sha, names):
        model_lib.verify_artifact(artifact_path, sha)
        yield folder, False
        return
    net = model_lib.load_artifact(artifact_path, sha)
    _check_input(tuple(net.input_shape[1:]), image_size, version)
    where = _publish(folder, sha, names, lambda d: write(net, d))
    if where is not None:
        net = None  # free the Keras model before the caller compiles the converted one
        yield where, True
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"bcc-{fmt}-"))
    try:
        write(net, tmp)
        net = None  # free the Keras model before the caller compiles the converted one
        yield tmp, True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _openvino(artifact_path: Path, sha: str, image_size: int, version: str, bf16: bool) -> tuple[Callable, str, bool]:
    try:
        import openvino as ov
    except ImportError as exc:  # pragma: no cover - openvino is a dependency
        raise ConfigError(f"BCC_INFERENCE=openvino needs the openvino package ({exc})") from exc

    def write(net: Any, folder: Path) -> None:
        with warnings.catch_warnings():  # Keras notes the traced input's name; harmless
            warnings.simplefilter("ignore", UserWarning)
            ov_model = ov.convert_model(net, input=[(-1, image_size, image_size, 3)])
        ov.save_model(ov_model, str(folder / "model.xml"), compress_to_fp16=False)

    core = ov.Core()
    with _converted(artifact_path, sha, "openvino", ("model.xml", "model.bin"), image_size, version,
                    write) as (folder, converted):
        model = core.read_model(str(folder / "model.xml"))
        shape = model.inputs[0].get_partial_shape()
        _check_input(tuple(d.get_length() for d in list(shape)[1:]), image_size, version)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
        try:
            compiled = core.compile_model(model, "CPU", config)
        except RuntimeError:  # a processor without bf16: OpenVINO's own choice (fp32)
            if not bf16:
                raise
            compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    raw = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    precision = next((short for long_, short in (("bfloat16", "bf16"), ("float16", "f16"), ("float32", "f32"))
                      if long_ in raw), raw)
    request = compiled.create_infer_request()

    def run(x: Any) -> Any:
        return request.infer({0: x})[0].copy()

    return run, precision, converted


def _onnxruntime(artifact_path: Path, sha: str, image_size: int, version: str) -> tuple[Callable, str, bool]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError("BCC_INFERENCE=onnxruntime needs the onnx extra: pip install -e '.[onnx]'") from exc
    import numpy as np

    def write(net: Any, folder: Path) -> None:
        try:
            import tf2onnx  # noqa: F401 - Keras' ONNX export uses it
        except ImportError as exc:
            raise ConfigError("BCC_INFERENCE=onnxruntime needs the onnx extra: pip install -e '.[onnx]'") from exc
        net(np.zeros((1, image_size, image_size, 3), "float32"))  # export needs a built, called model
        net.export(str(folder / "model.onnx"), format="onnx", verbose=False)

    with _converted(artifact_path, sha, "onnx", ("model.onnx",), image_size, version, write) as (folder, converted):
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    dims = tuple(inp.shape[1:])
    if all(isinstance(d, int) for d in dims):
        _check_input(dims, image_size, version)
    name = inp.name
    return (lambda x: session.run(None, {name: x})[0]), "f32", converted


# -- the entry point --------------------------------------------------------------------------
def load_predictor(artifact_path: str | os.PathLike[str], sha256: str, *, image_size: int,
                   backend: str = DEFAULT_BACKEND, version: str = "?") -> Predictor:
    """Load model artifact ``artifact_path`` (checksum ``sha256`` verified) for inference with ``backend``."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown inference back-end {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(artifact_path)
    t0 = time.monotonic()
    converted, net = False, None
    if backend in ("keras", "xla", "keras-bf16"):
        net = model_lib.load_artifact(path, sha256)
        _check_input(tuple(net.input_shape[1:]), image_size, version)
        precision = "f32"
        if backend == "keras-bf16":
            net, precision = _to_bf16(net), "bf16"
        fn = _keras_fn(net, image_size, jit=backend == "xla")
    elif backend in ("openvino", "openvino-bf16"):
        fn, precision, converted = _openvino(path, sha256, image_size, version, bf16=backend == "openvino-bf16")
    else:
        fn, precision, converted = _onnxruntime(path, sha256, image_size, version)
    seconds = time.monotonic() - t0
    log.info("model %s ready for %s inference (%s) in %.1fs%s", version, backend, precision, seconds,
             " (converted)" if converted else "")
    return Predictor(backend=backend, precision=precision, fn=fn, load_seconds=seconds, converted=converted,
                     model=net)
