"""The pinned model version of a scoring run, loaded on first use for the run's inference back-end.

The back-end is the plan's, checked on this worker (:func:`bcc_pipeline.validation.shard_backend`: a
back-end not validated for this CPU class is validated on the reference set first, or replaced by fp32
Keras). A prediction within ``BCC_GUARD_BAND`` of the threshold is re-scored with fp32 Keras (the
reference, loaded only when first needed) before its label is stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from ..config import REFERENCE_BACKEND, Settings
from ..errors import ArtifactError
from ..inference import Predictor, load_predictor

__all__ = ["PinnedModel", "probability"]

log = logging.getLogger(__name__)


def probability(out: Any, mv: Mapping[str, Any]) -> Any:
    """The *calibrated* P(malignant) as float64 (N,) from model version ``mv``'s raw output ``(N, 2)``
    softmax or ``(N, 1)``: clipped to [0, 1], then ``mv``'s temperature applied with
    :func:`bcc_pipeline.stats.calibrate` (a version without one is scored uncalibrated, as it was
    evaluated). The one place a model output becomes the probability that is stored and compared with the
    threshold (scoring, the guard band's fp32 re-scoring and back-end validation all call it)."""
    import numpy as np

    version = mv["version"]
    if out.ndim == 2 and out.shape[1] == 2:
        p = out[:, 1]
    elif out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        p = out.reshape(-1)
    else:
        raise ArtifactError(f"model {version} returned shape {out.shape}; expected (N, 2) or (N, 1)")
    if not np.all(np.isfinite(p)):
        raise ArtifactError(f"model {version} returned non-finite probabilities")
    from ..stats import calibrate

    return calibrate(np.clip(p.astype("float64"), 0.0, 1.0), mv.get("temperature"))


class PinnedModel:
    """``predict(x)`` for a batch ``x`` (N, S, S, 3) → the calibrated P(malignant) as float64 (N,)
    (:func:`probability`; the threshold is on this scale).

    The artifact is loaded (checksum verified) at the first call. ``backend``/``precision``: what this
    worker scores with (``pinned``: what the plan asked for; ``why``: how that was decided);
    ``rescored`` marks the last batch's images re-scored with fp32 Keras, ``rescored_fp32`` counts them all.
    The fp32 reference is loaded at the first image inside the guard band (none: never loaded);
    ``reference_load`` is then (wall-clock start, seconds), start-up that benchmarks keep apart.
    Without ``settings`` (no database) the pinned back-end is used as it is and nothing is re-scored.
    """

    def __init__(
        self, mv: dict[str, Any], backend: str, *, settings: Settings | None = None, forced: bool = False
    ):
        self.mv, self.settings, self.forced = mv, settings, forced
        self.pinned = self.backend = backend
        self.why = "pinned"
        self.precision: str | None = None
        self.load_seconds = 0.0
        self.rescored_fp32 = 0
        self.rescored: Any = None
        self.reference_load: tuple[float, float] | None = None
        self.guard_band = settings.guard_band if settings is not None else 0.0
        self._fn: Predictor | None = None
        self._ref: Predictor | None = None

    def _load(self, backend: str) -> Predictor:
        if self.settings is None:
            return load_predictor(
                self.mv["artifact_path"],
                self.mv["artifact_sha256"],
                image_size=int(self.mv["image_size"]),
                backend=backend,
                version=self.mv["version"],
            )
        from ..validation import load_for

        return load_for(self.settings, self.mv, backend)

    def _ready(self) -> Predictor:
        if self._fn is None:
            if self.settings is not None:
                from ..validation import shard_backend

                self.backend, self.why = shard_backend(
                    self.settings, self.mv, self.pinned, forced=self.forced
                )
            self._fn = self._load(self.backend)
            self.load_seconds, self.precision = self._fn.load_seconds, self._fn.precision
            log.info(
                "scoring with model %s (%dpx, threshold %.4f, temperature %s), %s inference (%s; %s)",
                self.mv["version"],
                int(self.mv["image_size"]),
                self.mv["threshold"],
                self.mv.get("temperature"),
                self.backend,
                self.precision,
                self.why,
            )
        return self._fn

    def predict(self, x: Any) -> Any:
        import numpy as np

        version = self.mv["version"]
        p = probability(self._ready()(x), self.mv)
        if p.shape[0] != x.shape[0]:
            raise ArtifactError(
                f"model {version} returned {p.shape[0]} probabilities for {x.shape[0]} images"
            )
        near = np.abs(p - float(self.mv["threshold"])) <= self.guard_band
        if self.backend == REFERENCE_BACKEND or self.guard_band <= 0:
            near[:] = False
        if near.any():  # too close to the threshold to trust reduced precision: the reference decides
            if self._ref is None:
                started = time.time()
                self._ref = self._load(REFERENCE_BACKEND)
                self.reference_load = (started, time.time() - started)
            p[near] = probability(self._ref(x[near]), self.mv)
            self.rescored_fp32 += int(near.sum())
        self.rescored = near
        return p

    def sources(self) -> list[tuple[str, str | None]]:
        """(back-end, precision) that computed each probability of the last batch."""
        ref = (REFERENCE_BACKEND, self._ref.precision if self._ref is not None else "f32")
        return [ref if again else (self.backend, self.precision) for again in self.rescored]
