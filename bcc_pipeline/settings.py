"""The declaration of every setting: :class:`Settings`, one field per setting made by :func:`setting`.

Each field states the setting's name, type, environment variable, default, allowed values or bounds
and a one-line doc (a :class:`Setting`). :data:`SETTINGS`, :data:`ENV_VARS`, :data:`DEFAULTS` and
:data:`PROFILES` are derived from those fields, and so are the loading, the validation, ``bcc config``
and the README table in :mod:`bcc_pipeline.config`, which re-exports this module's public names. Like
it, this module imports nothing heavy.

Profiles:

``seed``
    The recipe of the original project exactly: DenseNet201 with ImageNet weights, 224×224 input,
    Adam(1e-4), binary cross-entropy, batch 16, 7 epochs, ReduceLROnPlateau, best checkpoint kept.
    The production default; its values are the declared defaults of the recipe settings.
``demo``
    The same architecture and callbacks with a smaller input, fewer epochs and no pretrained
    weights, so the whole demo finishes in minutes on a 2-core CPU without a network.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BACKENDS",
    "DEFAULTS",
    "DEFAULT_BACKEND",
    "DEFAULT_INFERENCE",
    "ENV_VARS",
    "HOME_MARKER",
    "INFERENCE_CHOICES",
    "MANAGED_FOLDERS",
    "MANAGED_MARKER",
    "PROFILES",
    "REFERENCE_BACKEND",
    "SETTINGS",
    "Setting",
    "Settings",
    "setting",
]

#: Inference back-ends :func:`bcc_pipeline.inference.load_predictor` knows (described there).
BACKENDS = ("keras", "xla", "keras-bf16", "openvino", "openvino-bf16", "openvino-int8", "onnxruntime")
#: fp32 Keras: what the metrics were measured with; every other back-end is validated against it.
REFERENCE_BACKEND = "keras"
#: What scoring falls back to when no other back-end is validated (the reference itself).
DEFAULT_BACKEND = REFERENCE_BACKEND
#: ``BCC_INFERENCE``: a back-end, or ``auto``, the fastest back-end validated for the champion on this CPU
#: class (:mod:`bcc_pipeline.validation`), fp32 Keras when none is.
DEFAULT_INFERENCE = "auto"
INFERENCE_CHOICES = (DEFAULT_INFERENCE, *BACKENDS)

#: The file that marks a folder as a BCC home (:attr:`Settings.home_marker`).
HOME_MARKER = ".bcc-home"
#: The file that marks a folder a home manages but that lives elsewhere (``landing/`` as a link to a
#: shared mount): a folder that holds it, like a home, is never scored as an inbox.
MANAGED_MARKER = ".bcc-managed"
#: The folders of a home that the pipeline manages (:attr:`Settings.managed_dirs`).
MANAGED_FOLDERS = ("archive", "quarantine", "runs", "models", "dataset", "landing", "airflow")

#: What each profile changes in the recipe settings; ``seed`` is the declared defaults themselves.
_PROFILE_CHANGES: dict[str, dict[str, Any]] = {
    "seed": {},
    "demo": {"image_size": 64, "epochs": 6, "base_weights": "none"},
}


@dataclass(frozen=True)
class Setting:
    """The declaration of one setting (``name`` and ``type`` come from its :class:`Settings` field)."""

    env: str
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive: bool = False  # the bounds themselves are refused
    why: str = ""  # appended to the error message
    shown: str = ""  # the default as the README shows it, when the value itself says too little
    recipe: bool = False  # set by every profile
    recorded: bool = False  # recorded with every model version (Settings.training_params)
    octal: bool = False  # an int written in octal (a umask): parsed, validated and shown in base 8
    name: str = ""
    type: type = object

    @property
    def rule(self) -> str:
        """What a valid value is, in words ("" when any value of the type is)."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        lo, hi = self.minimum, self.maximum
        if self.octal and lo is not None and hi is not None:
            return f"octal, from {int(lo):03o} to {int(hi):03o}"
        if lo is not None and hi is not None:
            return f"{'strictly ' if self.exclusive else ''}between {lo:g} and {hi:g}"
        if lo is not None:
            if self.type is int and lo == 1 and not self.exclusive:
                return "a positive integer"
            return f"greater than {lo:g}" if self.exclusive else f"at least {lo:g}"
        if hi is not None:
            return f"less than {hi:g}" if self.exclusive else f"at most {hi:g}"
        if self.type is str and str(self.default).strip():  # a blank default means "derived"
            return "non-blank"
        return ""

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not valid for this setting, or ``None`` when it is."""
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every bound it is held to
            return "must be a finite number" + (f", {self.rule}" if self.rule else "")
        lo, hi = self.minimum, self.maximum
        if self.choices:
            bad = value not in self.choices
        elif lo is not None or hi is not None:
            bad = (lo is not None and (value <= lo if self.exclusive else value < lo)) or (
                hi is not None and (value >= hi if self.exclusive else value > hi)
            )
        else:
            bad = self.rule == "non-blank" and not str(value).strip()
        if not bad:
            return None
        return f"must be {self.rule}" + (f" ({self.why})" if self.why else "")


def setting(env: str, default: Any, doc: str, **rules: Any) -> Any:
    """A :class:`Settings` field declaring one setting; ``rules`` are :class:`Setting`'s other fields."""
    return field(default=default, metadata={"setting": Setting(env, default, doc, **rules)})


@dataclass(frozen=True)
class Settings:
    """Everything configurable, each field declared once. Paths are absolute
    (:func:`~bcc_pipeline.config.load_settings`)."""

    profile: str = setting(
        "BCC_PROFILE",
        "seed",
        "Named profile: `seed` (the original recipe) or `demo` (small, from scratch).",
        choices=tuple(_PROFILE_CHANGES),
        recorded=True,
    )
    home: Path = setting(
        "BCC_HOME",
        Path("var"),
        "Root of the working folders (landing, dataset, inbox, archive, ...).",
        shown="./var",
    )
    database_url: str = setting(
        "BCC_DATABASE_URL", "", "SQLAlchemy URL of the project database.", shown="sqlite:///$BCC_HOME/bcc.db"
    )
    # model / training
    base_weights: str = setting(
        "BCC_BASE_WEIGHTS",
        "imagenet",
        "`imagenet` (Keras cache), `none` (random init) or a path to a weights file.",
        why="use imagenet, none or a path to a weights file",
        recipe=True,
        recorded=True,
    )
    image_size: int = setting(
        "BCC_IMAGE_SIZE",
        224,
        "Square input size in pixels.",
        minimum=32,
        why="DenseNet201 downsamples 32×",
        recipe=True,
        recorded=True,
    )
    batch_size: int = setting(
        "BCC_BATCH_SIZE", 16, "Training batch size.", minimum=1, recipe=True, recorded=True
    )
    epochs: int = setting("BCC_EPOCHS", 7, "Training epochs.", minimum=1, recipe=True, recorded=True)
    learning_rate: float = setting(
        "BCC_LEARNING_RATE",
        1e-4,
        "Adam learning rate.",
        minimum=0,
        exclusive=True,
        recipe=True,
        recorded=True,
    )
    seed: int = setting("BCC_SEED", 42, "Seed for the split, weight init and augmentation.", recorded=True)
    val_fraction: float = setting(
        "BCC_VAL_FRACTION",
        0.2,
        "Validation share of the group-aware stratified split.",
        minimum=0,
        maximum=1,
        exclusive=True,
        recorded=True,
    )
    calibration_fraction: float = setting(
        "BCC_CALIBRATION_FRACTION",
        0.2,
        "Share of the development data "
        "(everything but the holdout) set aside, by patient group and "
        "stratified, for the threshold and the probability calibration; "
        "the validation share applies to the rest.",
        minimum=0,
        maximum=0.5,
    )
    holdout_fraction: float = setting(
        "BCC_HOLDOUT_FRACTION",
        0.2,
        "Share of the labelled store frozen as the "
        "holdout (by patient group, stratified) when the first split finds none; "
        "0: no automatic holdout.",
        minimum=0,
        maximum=0.5,
    )
    bn_recalibration: str = setting(
        "BCC_BN_RECALIBRATION",
        "auto",
        "Re-estimate BatchNorm statistics after training (`auto`: from-scratch runs only).",
        choices=("auto", "on", "off"),
        recorded=True,
    )
    # evaluation and quality gate
    target_sensitivity: float = setting(
        "BCC_TARGET_SENSITIVITY",
        0.95,
        "Malignant sensitivity the operating threshold must reach on validation.",
        minimum=0,
        maximum=1,
        recorded=True,
    )
    gate_min_accuracy: float = setting(
        "BCC_GATE_MIN_ACCURACY", 0.80, "Quality gate: absolute accuracy floor.", minimum=0, maximum=1
    )
    gate_min_sensitivity: float = setting(
        "BCC_GATE_MIN_SENSITIVITY", 0.90, "Quality gate: absolute sensitivity floor.", minimum=0, maximum=1
    )
    gate_margin: float = setting(
        "BCC_GATE_MARGIN",
        0.05,
        "Quality gate: non-inferiority margin; promote only "
        "when the lower 95% bound of candidate - champion on the holdout (sensitivity, "
        "ROC AUC) is above -margin.",
        minimum=0,
        maximum=1,
        exclusive=True,
    )
    require_approval: bool = setting(
        "BCC_REQUIRE_APPROVAL",
        False,
        "A passing candidate waits for a person's "
        "approval (Airflow approval task or `registry.record_approval`) before it "
        "becomes champion. Recommended in production.",
    )
    # images
    max_pixels: int = setting(
        "BCC_MAX_PIXELS",
        50_000_000,
        "Refuse images with more pixels than this (decompression-bomb guard).",
        minimum=1,
    )
    min_side: int = setting("BCC_MIN_SIDE", 32, "Refuse images whose shorter side is below this.", minimum=1)
    # files
    umask: int = setting(
        "BCC_UMASK",
        0o027,
        "Permission bits taken away from every file and folder BCC creates "
        "(the database, models, the dataset store, the converted-model cache): by default they "
        "are group-readable and not world-readable.",
        minimum=0,
        maximum=0o077,
        octal=True,
        why="the owner always keeps read and write",
    )
    # scoring
    score_batch_size: int = setting(
        "BCC_SCORE_BATCH_SIZE", 32, "Inference batch size for scoring.", minimum=1
    )
    score_shards: int = setting(
        "BCC_SCORE_SHARDS",
        1,
        "Shards of a `bcc_score` run that does not choose (the scheduled nightly run): one scoring "
        "task per shard, spread over the Celery workers; set it to the number of workers. Read "
        "when the DAG file is parsed.",
        minimum=1,
        maximum=64,
    )
    settle_seconds: float = setting(
        "BCC_SETTLE_SECONDS",
        2.0,
        "Inbox files modified more recently than this are left for the next run.",
        minimum=0,
        maximum=86400,
        why="a longer wait leaves every file for a later run, and the runs look finished",
    )
    inbox_roots: str = setting(
        "BCC_INBOX_ROOTS",
        "",
        "Folders (separated by `os.pathsep`, `:` on Linux) an inbox "
        "must lie in; `bcc score --inbox` and the DAG's `inbox` refuse any other.",
        shown="$BCC_HOME/inbox",
    )
    inference: str = setting(
        "BCC_INFERENCE",
        DEFAULT_INFERENCE,
        "Scoring back-end; `auto`: the fastest one "
        "validated for the champion on this CPU class, else fp32 `keras` (see Benchmarks).",
        choices=INFERENCE_CHOICES,
    )
    backend_max_delta: float = setting(
        "BCC_BACKEND_MAX_DELTA",
        0.01,
        "A back-end is validated for a model "
        "version when it flips no label and its largest probability change "
        "against fp32 Keras is at most this.",
        minimum=0,
        maximum=1,
    )
    guard_band: float = setting(
        "BCC_GUARD_BAND",
        0.02,
        "Predictions this close to the threshold are re-scored "
        "with fp32 Keras before their label is stored (0: never).",
        minimum=0,
        maximum=1,
    )
    publish_backends: str = setting(
        "BCC_PUBLISH_BACKENDS",
        "all",
        "Back-ends validated automatically when a "
        "version becomes champion: `all`, `none` or a comma-separated list (the rest "
        "with `bcc validate-backends`).",
    )
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
        return tuple(self.home / name for name in MANAGED_FOLDERS)

    @property
    def allowed_inbox_roots(self) -> tuple[Path, ...]:
        """The folders an inbox must lie in (``inbox_roots``; by default only ``$BCC_HOME/inbox``)."""
        roots = [r for r in self.inbox_roots.split(os.pathsep) if r.strip()]
        return tuple(Path(os.path.expanduser(r)).resolve() for r in roots) or (self.inbox_dir,)

    @property
    def home_marker(self) -> Path:
        """``$BCC_HOME/.bcc-home``, written by ``bcc db upgrade``, ``bcc demo`` and whenever intake, training
        or scoring creates the home's folders (:func:`bcc_pipeline.files.mark_home`): it makes a BCC home
        recognisable, so that no deployment ever scores (moves) another one's folders."""
        return self.home / HOME_MARKER

    @property
    def publish_backend_list(self) -> tuple[str, ...]:
        """``publish_backends`` as back-end names (all of them for ``all``, none for ``none``)."""
        text = self.publish_backends.strip().lower()
        if text == "all":
            return BACKENDS
        if text in ("none", ""):
            return ()
        return tuple(dict.fromkeys(b.strip() for b in text.split(",") if b.strip()))

    @property
    def from_scratch(self) -> bool:
        return self.base_weights == "none"

    def __repr__(self) -> str:  # the database URL's credentials never reach a log or a traceback
        from .store import safe_url

        shown = {
            n: safe_url(v) if n == "database_url" else v for n, v in ((n, getattr(self, n)) for n in SETTINGS)
        }
        return f"Settings({', '.join(f'{n}={v!r}' for n, v in shown.items())})"

    def as_dict(self) -> dict[str, Any]:
        """Every setting by name; paths as strings, octal settings as octal text (``"027"``)."""
        return {name: _shown_value(spec, getattr(self, name)) for name, spec in SETTINGS.items()}

    def training_params(self) -> dict[str, Any]:
        """The hyperparameters recorded with every model version."""
        return {name: getattr(self, name) for name, spec in SETTINGS.items() if spec.recorded}


def _shown_value(spec: Setting, value: Any) -> Any:
    if spec.octal:
        return f"{value:03o}"
    return str(value) if isinstance(value, Path) else value


def _declared() -> dict[str, Setting]:
    types = typing.get_type_hints(Settings)
    return {
        f.name: dataclasses.replace(f.metadata["setting"], name=f.name, type=types[f.name])
        for f in dataclasses.fields(Settings)
        if "setting" in f.metadata
    }


#: Every setting's declaration, by name, in declaration order.
SETTINGS: Mapping[str, Setting] = _declared()
#: name -> declared default (the ``seed`` profile's values).
DEFAULTS: Mapping[str, Any] = {name: spec.default for name, spec in SETTINGS.items()}
#: name -> (environment variable, type, one-line doc).
ENV_VARS: dict[str, tuple[str, type, str]] = {n: (s.env, s.type, s.doc) for n, s in SETTINGS.items()}
#: profile name -> the value of every recipe setting under that profile.
PROFILES: dict[str, dict[str, Any]] = {
    profile: {**{n: s.default for n, s in SETTINGS.items() if s.recipe}, **changes}
    for profile, changes in _PROFILE_CHANGES.items()
}
