"""Inference back-ends: one compiled function from a model artifact to the model's output, per batch.

Scoring asks :func:`load_predictor` for the back-end its run's plan pinned (``BCC_INFERENCE``; ``auto``
and the rule that no unvalidated back-end labels an image live in :mod:`bcc_pipeline.validation`). All
take a float32 batch ``(N, size, size, 3)`` preprocessed by :func:`bcc_pipeline.images.preprocess` and
return the model's softmax ``(N, 2)``:

=================  ==================================================================================
``keras``          TensorFlow, fp32, one ``tf.function`` (exactly what training and evaluation ran): the
                   reference every other back-end is validated against.
``xla``            The same function compiled with XLA (``jit_compile=True``); a batch smaller than the
                   largest one seen is zero-padded to it, so that XLA compiles once per run.
``keras-bf16``     The model rebuilt under Keras' ``mixed_bfloat16`` policy (weights fp32, maths bf16;
                   the output layer stays fp32).
``openvino``       OpenVINO on the CPU, fp32 (``INFERENCE_PRECISION_HINT=f32``).
``openvino-bf16``  OpenVINO on the CPU with bf16 maths where the processor has it (AVX512-BF16, AMX);
                   fp32 elsewhere.
``openvino-int8``  OpenVINO with INT8 weights and activations: NNCF post-training quantization calibrated
                   on the version's development images (needs the ``int8`` extra: ``nncf``).
``onnxruntime``    ONNX Runtime on the CPU, fp32 (needs the ``onnx`` extra: ``tf2onnx``, ``onnxruntime``).
=================  ==================================================================================

Converting a Keras model for OpenVINO or ONNX Runtime takes tens of seconds, so the converted model is
kept beside the artifact (``<artifact dir>/compiled/<format>-<artifact sha>/``). The checksums of its
files are recorded in the database when the conversion is published (``compiled_models``, through the
``ledger`` scoring passes); before each load the files are read once, hashed, compared with that record
and only then handed to the runtime from memory. A file that differs, or a cache with no record, is
never used: it is converted again (and recorded). A read-only models folder means converting (into a
temporary folder) every time, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import model as model_lib
from .compiled_cache import CacheLedger, check_input, converted_model  # CacheLedger re-exported
from .config import BACKENDS, DEFAULT_BACKEND, REFERENCE_BACKEND  # re-exported: declared with the settings
from .errors import ConfigError

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "REFERENCE_BACKEND",
    "CacheLedger",
    "Calibration",
    "Predictor",
    "load_predictor",
]

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

    if not jit:
        return lambda arr: infer(tf.convert_to_tensor(arr)).numpy()
    import numpy as np

    # XLA compiles once per batch shape (tens of seconds for DenseNet201): a smaller batch is padded to the
    # largest seen so far, so a scoring run (full batches and a remainder) compiles once, not per size
    biggest = [0]

    def padded(arr: Any) -> Any:
        n = len(arr)
        biggest[0] = max(biggest[0], n)
        if n < biggest[0]:
            arr = np.concatenate([arr, np.zeros((biggest[0] - n, *arr.shape[1:]), arr.dtype)])
        return infer(tf.convert_to_tensor(arr)).numpy()[:n]

    return padded


# -- converted formats, cached beside the artifact (bcc_pipeline.compiled_cache) ------------------
Calibration = Callable[[], Any]
"""Returns the float32 batch ``(N, S, S, 3)`` an INT8 conversion is calibrated on (development images)."""


def _openvino(
    artifact_path: Path,
    sha: str,
    image_size: int,
    version: str,
    mode: str,
    ledger: CacheLedger | None,
    calibration: Calibration | None,
) -> tuple[Callable, str, bool]:
    """OpenVINO with ``mode`` f32, bf16 (where the CPU has it) or int8 (NNCF post-training quantization)."""
    try:
        import openvino as ov
    except ImportError as exc:  # pragma: no cover - openvino is a dependency
        raise ConfigError(f"BCC_INFERENCE=openvino needs the openvino package ({exc})") from exc
    if mode == "int8":
        try:
            import nncf  # noqa: F401 - imported here to fail before any conversion
        except ImportError as exc:
            raise ConfigError(
                "BCC_INFERENCE=openvino-int8 needs the int8 extra: pip install -e '.[int8]'"
            ) from exc
        if calibration is None:
            raise ConfigError(
                f"openvino-int8 needs the development images of model {version} to calibrate on"
            )

    def write(net: Any, folder: Path) -> None:
        with warnings.catch_warnings():  # Keras notes the traced input's name; harmless
            warnings.simplefilter("ignore", UserWarning)
            ov_model = ov.convert_model(net, input=[(-1, image_size, image_size, 3)])
        if mode == "int8":
            ov_model = _quantize(ov_model, calibration)
        ov.save_model(ov_model, str(folder / "model.xml"), compress_to_fp16=False)

    core = ov.Core()
    fmt = "openvino-int8" if mode == "int8" else "openvino"
    with converted_model(
        artifact_path, sha, fmt, ("model.xml", "model.bin"), image_size, version, write, ledger
    ) as (blobs, converted):
        model = core.read_model(blobs["model.xml"], blobs["model.bin"])
    shape = model.inputs[0].get_partial_shape()
    check_input(tuple(d.get_length() for d in list(shape)[1:]), image_size, version)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16" if mode == "bf16" else "f32"}
    try:
        compiled = core.compile_model(model, "CPU", config)
    except RuntimeError:  # a processor without bf16: OpenVINO's own choice (fp32)
        if mode != "bf16":
            raise
        compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    raw = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    precision = next(
        (
            short
            for long_, short in (("bfloat16", "bf16"), ("float16", "f16"), ("float32", "f32"))
            if long_ in raw
        ),
        raw,
    )
    if mode == "int8":
        precision = "int8"  # the quantized layers run in int8, the rest in the precision above
    request = compiled.create_infer_request()

    def run(x: Any) -> Any:
        return request.infer({0: x})[0].copy()

    return run, precision, converted


def _quantize(ov_model: Any, calibration: Calibration) -> Any:
    """NNCF post-training quantization of ``ov_model`` on the calibration batch (one image per step)."""
    import nncf
    import numpy as np

    x = np.asarray(calibration(), dtype=np.float32)
    if x.ndim != 4 or x.shape[0] < 1:
        raise ConfigError(f"openvino-int8 needs calibration images, got an array of shape {x.shape}")
    logging.getLogger("nncf").setLevel(logging.WARNING)
    data = nncf.Dataset([x[i : i + 1] for i in range(x.shape[0])])
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is for results (--json)
        return nncf.quantize(
            ov_model, data, subset_size=int(x.shape[0]), preset=nncf.QuantizationPreset.MIXED
        )


def _onnxruntime(
    artifact_path: Path, sha: str, image_size: int, version: str, ledger: CacheLedger | None
) -> tuple[Callable, str, bool]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError("BCC_INFERENCE=onnxruntime needs the onnx extra: pip install -e '.[onnx]'") from exc
    import numpy as np

    def write(net: Any, folder: Path) -> None:
        try:
            import tf2onnx  # noqa: F401 - Keras' ONNX export uses it
        except ImportError as exc:
            raise ConfigError(
                "BCC_INFERENCE=onnxruntime needs the onnx extra: pip install -e '.[onnx]'"
            ) from exc
        net(np.zeros((1, image_size, image_size, 3), "float32"))  # export needs a built, called model
        net.export(str(folder / "model.onnx"), format="onnx", verbose=False)

    with converted_model(artifact_path, sha, "onnx", ("model.onnx",), image_size, version, write, ledger) as (
        blobs,
        converted,
    ):
        session = ort.InferenceSession(blobs["model.onnx"], providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    dims = tuple(inp.shape[1:])
    if all(isinstance(d, int) for d in dims):
        check_input(dims, image_size, version)
    name = inp.name
    return (lambda x: session.run(None, {name: x})[0]), "f32", converted


# -- the entry point --------------------------------------------------------------------------
def load_predictor(
    artifact_path: str | os.PathLike[str],
    sha256: str,
    *,
    image_size: int,
    backend: str = DEFAULT_BACKEND,
    version: str = "?",
    ledger: CacheLedger | None = None,
    calibration: Calibration | None = None,
) -> Predictor:
    """Load model artifact ``artifact_path`` (checksum ``sha256`` verified) for inference with ``backend``.

    ``ledger``: where the checksums of converted models are recorded and checked (scoring and validation
    pass the database's, :class:`bcc_pipeline.backend_store.CompiledModels`; without one the cache's own
    source.json is trusted). ``calibration``: the development images ``openvino-int8`` is calibrated on.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown inference back-end {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(artifact_path)
    t0 = time.monotonic()
    converted, net = False, None
    if backend in ("keras", "xla", "keras-bf16"):
        net = model_lib.load_artifact(path, sha256)
        check_input(tuple(net.input_shape[1:]), image_size, version)
        precision = "f32"
        if backend == "keras-bf16":
            net, precision = _to_bf16(net), "bf16"
        fn = _keras_fn(net, image_size, jit=backend == "xla")
        if backend != "xla":
            # trace the graph now (seconds for DenseNet201), so that it counts as start-up and not as the
            # first batch's time; XLA compiles per batch shape, at its first real batch
            import numpy as np

            fn(np.zeros((1, image_size, image_size, 3), np.float32))
    elif backend.startswith("openvino"):
        mode = {"openvino": "f32", "openvino-bf16": "bf16", "openvino-int8": "int8"}[backend]
        fn, precision, converted = _openvino(path, sha256, image_size, version, mode, ledger, calibration)
    else:
        fn, precision, converted = _onnxruntime(path, sha256, image_size, version, ledger)
    seconds = time.monotonic() - t0
    log.info(
        "model %s ready for %s inference (%s) in %.1fs%s",
        version,
        backend,
        precision,
        seconds,
        " (converted)" if converted else "",
    )
    return Predictor(
        backend=backend, precision=precision, fn=fn, load_seconds=seconds, converted=converted, model=net
    )
