"""The pinned model version of a scoring run, loaded on first use for the run's inference back-end."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import ArtifactError
from ..inference import load_predictor

__all__ = ["PinnedModel"]

log = logging.getLogger(__name__)


class PinnedModel:
    """``predict(x)`` for a batch ``x`` (N, S, S, 3) → the *calibrated* P(malignant) as float64 (N,):
    the model's probability clipped to [0, 1], then the version's temperature applied with
    :func:`bcc_pipeline.stats.calibrate` (the one function evaluation uses too; a version without a
    temperature is scored uncalibrated, as it was evaluated). The threshold is on this scale.

    The artifact is loaded (checksum verified) at the first call; ``load_seconds`` and ``precision`` say
    what that took and what the back-end computes in.
    """

    def __init__(self, mv: dict[str, Any], backend: str):
        self.mv = mv
        self.backend = backend
        self.precision: str | None = None
        self.load_seconds = 0.0
        self._fn: Any = None

    def predict(self, x: Any) -> Any:
        import numpy as np

        from ..stats import calibrate

        if self._fn is None:
            self._fn = load_predictor(self.mv["artifact_path"], self.mv["artifact_sha256"],
                                      image_size=int(self.mv["image_size"]), backend=self.backend,
                                      version=self.mv["version"])
            self.load_seconds, self.precision = self._fn.load_seconds, self._fn.precision
            log.info("scoring with model %s (%dpx, threshold %.4f, temperature %s), %s inference (%s)",
                     self.mv["version"], int(self.mv["image_size"]), self.mv["threshold"],
                     self.mv.get("temperature"), self.backend, self.precision)
        out = self._fn(x)
        if out.ndim == 2 and out.shape[1] == 2:
            p = out[:, 1]
        elif out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
            p = out.reshape(-1)
        else:
            raise ArtifactError(f"model {self.mv['version']} returned shape {out.shape}; expected (N, 2) or (N, 1)")
        if p.shape[0] != x.shape[0] or not np.all(np.isfinite(p)):
            raise ArtifactError(f"model {self.mv['version']} returned non-finite or missing probabilities")
        return calibrate(np.clip(p.astype("float64"), 0.0, 1.0), self.mv.get("temperature"))
