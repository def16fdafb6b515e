"""One frozen settings object, built from a profile, ``BCC_*`` environment variables and overrides.

Precedence, lowest to highest: the profile's values → ``BCC_*`` environment variables → explicit
overrides (the CLI's flags). Nothing happens at import time; call :func:`load_settings`.

Profiles:

``seed``
    The recipe of the original project exactly: DenseNet201 with ImageNet weights, 224×224 input,
    Adam(1e-4), binary cross-entropy, batch 16, 7 epochs, ReduceLROnPlateau, best checkpoint kept.
    The production default.
``demo``
    The same architecture and callbacks with a smaller input, fewer epochs and no pretrained
    weights, so the whole demo finishes in minutes on a 2-core CPU without a network.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .inference import BACKENDS, DEFAULT_BACKEND

__all__ = ["PROFILES", "Settings", "load_settings", "ENV_VARS"]

PROFILES: dict[str, dict[str, Any]] = {
    "seed": {
        "image_size": 224,
        "batch_size": 16,
        "epochs": 7,
        "learning_rate": 1e-4,
        "base_weights": "imagenet",
    },
    "demo": {
        "image_size": 96,
        "batch_size": 16,
        "epochs": 5,
        "learning_rate": 1e-4,
        "base_weights": "none",
    },
}


@dataclass(frozen=True)
class Settings:
    """Everything configurable. Paths are absolute."""

    profile: str = "seed"
    home: Path = Path("var").resolve()
    database_url: str = ""
    # model / training
    base_weights: str = "imagenet"  # "imagenet" | "none" | a path to a .h5/.weights.h5 file
    image_size: int = 224
    batch_size: int = 16
    epochs: int = 7
    learning_rate: float = 1e-4
    seed: int = 42
    val_fraction: float = 0.2
    bn_recalibration: str = "auto"  # auto (from-scratch runs only) | on | off
    # evaluation and quality gate
    target_sensitivity: float = 0.95
    gate_min_accuracy: float = 0.80
    gate_min_sensitivity: float = 0.90
    gate_tolerance: float = 0.02
    # images
    max_pixels: int = 50_000_000
    min_side: int = 32
    # scoring
    score_batch_size: int = 32
    settle_seconds: float = 2.0
    inference: str = DEFAULT_BACKEND
    # where a value came from, for `bcc config`: name -> "profile" | "env" | "override" | "default"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    # -- derived folders -------------------------------------------------------------------
    @property
    def landing_dir(self) -> Path:
        return self.home / "landing"

    @property
    def dataset_dir(self) -> Path:
        return self.home / "dataset"

    @property
    def inbox_dir(self) -> Path:
        return self.home / "inbox"

    @property
    def archive_dir(self) -> Path:
        return self.home / "archive"

    @property
    def quarantine_dir(self) -> Path:
        return self.home / "quarantine"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def managed_dirs(self) -> tuple[Path, ...]:
        """The folders the pipeline owns (and ``airflow/``, the embedded Airflow home). Nothing in them is
        ever scored, and an inbox may not lie inside one: scoring it would move training data, models or
        earlier results into ``archive/``. The one list; discovery and the inbox check both use it."""
        return (self.archive_dir, self.quarantine_dir, self.runs_dir, self.models_dir, self.dataset_dir,
                self.landing_dir, self.home / "airflow")

    @property
    def from_scratch(self) -> bool:
        return self.base_weights == "none"

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out

    def training_params(self) -> dict[str, Any]:
        """The hyperparameters recorded with every model version."""
        keys = ("profile", "base_weights", "image_size", "batch_size", "epochs", "learning_rate",
                "seed", "val_fraction", "bn_recalibration", "target_sensitivity")
        return {k: getattr(self, k) for k in keys}


# name -> (environment variable, type, documentation). The README's table is generated from this.
ENV_VARS: dict[str, tuple[str, type, str]] = {
    "profile": ("BCC_PROFILE", str, "Named profile: `seed` (the original recipe, default) or `demo`."),
    "home": ("BCC_HOME", Path, "Root of the working folders (landing, dataset, inbox, archive, ...). Default `./var`."),
    "database_url": ("BCC_DATABASE_URL", str, "SQLAlchemy URL of the project database. Default `sqlite:///$BCC_HOME/bcc.db`."),
    "base_weights": ("BCC_BASE_WEIGHTS", str, "`imagenet` (Keras cache), `none` (random init) or a path to a weights file."),
    "image_size": ("BCC_IMAGE_SIZE", int, "Square input size in pixels (seed 224, demo 96)."),
    "batch_size": ("BCC_BATCH_SIZE", int, "Training batch size (16)."),
    "epochs": ("BCC_EPOCHS", int, "Training epochs (seed 7, demo 5)."),
    "learning_rate": ("BCC_LEARNING_RATE", float, "Adam learning rate (1e-4)."),
    "seed": ("BCC_SEED", int, "Seed for the split, weight init and augmentation (42)."),
    "val_fraction": ("BCC_VAL_FRACTION", float, "Validation share of the group-aware stratified split (0.2)."),
    "bn_recalibration": ("BCC_BN_RECALIBRATION", str, "Re-estimate BatchNorm statistics: `auto` (from-scratch runs), `on`, `off`."),
    "target_sensitivity": ("BCC_TARGET_SENSITIVITY", float, "Malignant sensitivity the operating threshold must reach on validation (0.95)."),
    "gate_min_accuracy": ("BCC_GATE_MIN_ACCURACY", float, "Quality gate: absolute accuracy floor (0.80)."),
    "gate_min_sensitivity": ("BCC_GATE_MIN_SENSITIVITY", float, "Quality gate: absolute sensitivity floor (0.90)."),
    "gate_tolerance": ("BCC_GATE_TOLERANCE", float, "Quality gate: how much worse than the champion a candidate may be (0.02)."),
    "max_pixels": ("BCC_MAX_PIXELS", int, "Refuse images with more pixels than this (decompression-bomb guard, 50,000,000)."),
    "min_side": ("BCC_MIN_SIDE", int, "Refuse images whose shorter side is below this (32)."),
    "score_batch_size": ("BCC_SCORE_BATCH_SIZE", int, "Inference batch size for scoring (32)."),
    "settle_seconds": ("BCC_SETTLE_SECONDS", float, "Inbox files modified more recently than this are left for the next run (2)."),
    "inference": ("BCC_INFERENCE", str, "Scoring back-end: `openvino-bf16` (default), `openvino`, `keras`, `xla`, `keras-bf16`, `onnxruntime` (see Benchmarks)."),
}

_CHOICES = {
    "profile": tuple(PROFILES),
    "bn_recalibration": ("auto", "on", "off"),
    "inference": BACKENDS,
}


def _convert(name: str, raw: Any, typ: type, origin: str) -> Any:
    if typ is Path:
        return Path(os.path.expanduser(str(raw))).resolve()
    if isinstance(raw, typ) and not (typ is int and isinstance(raw, bool)):
        return raw
    try:
        if typ is int:
            return int(str(raw).replace("_", ""))
        if typ is float:
            return float(raw)
        return typ(raw)
    except (TypeError, ValueError) as exc:
        var = ENV_VARS[name][0]
        where = f"environment variable {var}" if origin == "env" else f"setting {name!r}"
        raise ConfigError(f"{where} must be {typ.__name__}, got {raw!r}") from exc


def _check(s: Settings) -> None:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"{ENV_VARS[name][0]}={getattr(s, name)!r}: {why}")

    for name, choices in _CHOICES.items():
        if getattr(s, name) not in choices:
            raise bad(name, f"must be one of {', '.join(choices)}")
    if s.image_size < 32:
        raise bad("image_size", "must be at least 32 (DenseNet201 downsamples 32×)")
    for name in ("batch_size", "epochs", "score_batch_size", "max_pixels", "min_side"):
        if getattr(s, name) < 1:
            raise bad(name, "must be a positive integer")
    if not 0.0 < s.val_fraction < 1.0:
        raise bad("val_fraction", "must be between 0 and 1")
    for name in ("target_sensitivity", "gate_min_accuracy", "gate_min_sensitivity"):
        if not 0.0 <= getattr(s, name) <= 1.0:
            raise bad(name, "must be between 0 and 1")
    if s.gate_tolerance < 0 or s.learning_rate <= 0 or s.settle_seconds < 0:
        raise ConfigError("gate tolerance, learning rate and settle seconds must be positive")
    if s.base_weights not in ("imagenet", "none") and not s.base_weights.strip():
        raise bad("base_weights", "use imagenet, none or a path to a weights file")


def load_settings(
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings: profile values, then ``BCC_*`` variables, then ``overrides``.

    ``profile`` (or ``overrides["profile"]``) beats ``BCC_PROFILE``. ``None`` values in
    ``overrides`` are ignored, so CLI flags that were not given fall through.
    """
    env = os.environ if env is None else env
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(ENV_VARS)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")

    explicit = overrides.pop("profile", None) or profile
    chosen = explicit or env.get("BCC_PROFILE") or "seed"
    if chosen not in PROFILES:
        raise ConfigError(f"unknown profile {chosen!r}; choose one of {', '.join(PROFILES)}")

    values: dict[str, Any] = {"profile": chosen}
    sources: dict[str, str] = {
        "profile": "override" if explicit else ("env" if env.get("BCC_PROFILE") else "default")
    }
    for name, value in PROFILES[chosen].items():
        values[name], sources[name] = value, "profile"
    for name, (var, typ, _doc) in ENV_VARS.items():
        if name == "profile":
            continue
        raw = env.get(var)
        if raw is not None and raw != "":
            values[name], sources[name] = _convert(name, raw, typ, "env"), "env"
    for name, raw in overrides.items():
        values[name], sources[name] = _convert(name, raw, ENV_VARS[name][1], "override"), "override"

    home = values.get("home") or Path("var").resolve()
    values["home"] = _convert("home", home, Path, "default")
    if not values.get("database_url"):
        values["database_url"] = f"sqlite:///{values['home'] / 'bcc.db'}"
        sources.setdefault("database_url", "default")
    settings = Settings(**values, sources=sources)
    _check(settings)
    return settings
