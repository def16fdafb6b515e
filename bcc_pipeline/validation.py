"""Back-end validation: no back-end other than fp32 Keras labels an image until it is proven, per model
version, on the CPU class and software that will score.

Measuring (:func:`validate_backends`: a version's calibration, holdout and fixed reference images scored
with every back-end and compared with fp32 Keras, recorded in ``backend_validations``) is
:mod:`bcc_pipeline.backend_measure`; its names are re-exported here. This module reads those records,
chooses the back-end a run scores with, and shows them.

**The rule.** A back-end is *validated* for a model version on a CPU class (and software) when it flips
no label and its max |Δp| is at most ``BCC_BACKEND_MAX_DELTA``. fp32 Keras is the reference and always
qualifies.

**Choosing a back-end** (:func:`resolve_backend`, at planning time; :func:`shard_backend`, on the worker
that scores a shard):

* ``auto`` (the default): the fastest back-end (measured images/s) validated for the champion on this
  CPU class; fp32 Keras when none is. When the version was validated only on other CPU classes, the
  back-ends validated there are validated here first, on the reference set (seconds).
* an explicit back-end that is not validated here is refused with one line, unless
  ``force_unvalidated`` is given; the plan and the run's counts then say so.
* a shard whose worker differs from the planner's CPU class validates the pinned back-end on the
  reference set first; if it does not pass there the shard scores with fp32 Keras (recorded).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from .backend_measure import (  # re-exported: the measuring half of back-end validation
    REFERENCE_SEED,
    REFERENCE_TILES,
    compare,
    development_images,
    load_for,
    passes,
    reference_images,
    result_line,
    validate_backends,
    validate_published,
)
from .backend_store import validation_rows
from .config import BACKENDS, DEFAULT_INFERENCE, REFERENCE_BACKEND, Settings
from .cpu import cpu_info, software_info
from .errors import BCCError, ConfigError, StoreError
from .store import session_scope

__all__ = [
    "REFERENCE_SEED",
    "REFERENCE_TILES",
    "champion_validations",
    "compare",
    "development_images",
    "format_validations",
    "load_for",
    "passes",
    "reference_images",
    "resolve_backend",
    "shard_backend",
    "validate_backends",
    "validate_published",
    "validated_summary",
    "validations_here",
]

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


# -- reading and choosing ----------------------------------------------------------------------
def validations_here(settings: Settings, version: str) -> list[dict[str, Any]]:
    """The validations of ``version`` recorded for this machine's CPU class and software, ``validated``
    judged by the rule with today's ``BCC_BACKEND_MAX_DELTA`` (a tightened limit applies at once)."""
    cpu, sw = cpu_info()["cpu_class"], software_info()["software"]
    rows = [
        r
        for r in validation_rows(settings.database_url, version)
        if r["cpu_class"] == cpu and r["software"] == sw
    ]
    for r in rows:
        r["validated"] = r["error"] is None and passes(r, settings.backend_max_delta)
    return rows


def _fastest(rows: list[dict[str, Any]]) -> str:
    ok = [r for r in rows if r["validated"]]
    if not ok:
        return REFERENCE_BACKEND
    return max(ok, key=lambda r: (r["images_per_second"] or 0.0, r["backend"] == REFERENCE_BACKEND))[
        "backend"
    ]


def resolve_backend(
    settings: Settings,
    version: str,
    requested: str | None = None,
    *,
    force_unvalidated: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The back-end a scoring run of ``version`` pins (see the module's doc).

    Returns ``{inference, requested, validated, force_unvalidated, cpu_class, reason}``; raises
    :class:`ConfigError` (one line) for an explicit back-end not validated here without ``force_unvalidated``.
    """
    requested = requested or settings.inference
    cpu = cpu_info()["cpu_class"]
    out = {"requested": requested, "force_unvalidated": False, "cpu_class": cpu}
    if requested not in (DEFAULT_INFERENCE, *BACKENDS):
        raise ConfigError(
            f"unknown inference back-end {requested!r}; choose auto or one of {', '.join(BACKENDS)}"
        )
    here = validations_here(settings, version)
    if requested == DEFAULT_INFERENCE:
        if not here and (
            elsewhere := [
                r["backend"]
                for r in validation_rows(settings.database_url, version)
                if r["validated"] and r["backend"] != REFERENCE_BACKEND
            ]
        ):
            (progress or log.info)(
                f"model {version} was validated on another CPU class; validating "
                f"{', '.join(sorted(set(elsewhere)))} here on the reference set first"
            )
            try:
                validate_backends(
                    settings,
                    version,
                    [REFERENCE_BACKEND, *sorted(set(elsewhere))],
                    reference_only=True,
                    progress=progress,
                )
            except (BCCError, RuntimeError, OSError) as exc:
                log.warning("validating on this CPU class failed (%s); scoring with fp32 Keras", exc)
            here = validations_here(settings, version)
        backend = _fastest(here)
        reason = (
            "the fastest back-end validated for this CPU class"
            if backend != REFERENCE_BACKEND
            else "no other back-end is validated for this CPU class"
            if here
            else f"no back-end validation of {version} is recorded"
        )
        return {**out, "inference": backend, "validated": True, "reason": reason}
    if requested == REFERENCE_BACKEND or any(r["backend"] == requested and r["validated"] for r in here):
        return {**out, "inference": requested, "validated": True, "reason": "requested, validated"}
    if not force_unvalidated:
        raise ConfigError(
            f"back-end {requested} is not validated for model {version} on this CPU class ({cpu}); "
            f"run `bcc validate-backends {version} --backend {requested}`, use auto, or pass "
            "--force-unvalidated"
        )
    log.warning(
        "scoring with %s, NOT validated for model %s on CPU class %s (forced)", requested, version, cpu
    )
    return {
        **out,
        "inference": requested,
        "validated": False,
        "force_unvalidated": True,
        "reason": "requested with force_unvalidated, not validated",
    }


def shard_backend(
    settings: Settings, mv: dict[str, Any], pinned: str, *, forced: bool = False
) -> tuple[str, str]:
    """(the back-end a shard scores with, why) on this worker, for the plan's ``pinned`` back-end.

    The pinned back-end when it is the reference, forced, or validated for this CPU class; otherwise it is
    validated here on the reference set first, and fp32 Keras is used when it does not pass."""
    if pinned == REFERENCE_BACKEND or forced:
        return pinned, "pinned" + (
            " (forced, not validated)" if forced and pinned != REFERENCE_BACKEND else ""
        )
    try:
        here = {r["backend"]: r for r in validations_here(settings, mv["version"])}
        if pinned not in here:
            log.info(
                "back-end %s of model %s is not validated on this CPU class (%s); validating it on the "
                "reference set first",
                pinned,
                mv["version"],
                cpu_info()["cpu_class"],
            )
            validate_backends(settings, mv["version"], [REFERENCE_BACKEND, pinned], reference_only=True)
            here = {r["backend"]: r for r in validations_here(settings, mv["version"])}
    except (BCCError, RuntimeError, OSError) as exc:
        log.warning("cannot validate %s on this worker (%s); scoring with fp32 Keras", pinned, exc)
        return REFERENCE_BACKEND, f"{pinned} could not be validated on this CPU class: fp32 Keras instead"
    if here.get(pinned, {}).get("validated"):
        return pinned, "pinned, validated for this CPU class"
    log.warning(
        "back-end %s did not pass validation for model %s on this CPU class; scoring with fp32 Keras",
        pinned,
        mv["version"],
    )
    return REFERENCE_BACKEND, f"{pinned} is not validated on this CPU class: fp32 Keras instead"


# -- showing -----------------------------------------------------------------------------------


def format_validations(rows: Sequence[dict[str, Any]]) -> str:
    """The human table ``bcc validate-backends`` and ``bcc model-info`` print."""
    if not rows:
        return "no back-end validations recorded (`bcc validate-backends VERSION`)"
    lines = []
    for key in dict.fromkeys((r["model_version"], r["cpu_class"], r["software"]) for r in rows):
        group = [r for r in rows if (r["model_version"], r["cpu_class"], r["software"]) == key]
        g = group[0]
        roles = ", ".join(f"{n} {role}" for role, n in g["images"].items())
        lines.append(
            f"{key[0]} on {key[1]} ({g['cpu'].get('model', '?')}; {key[2]}), {g['n_images']} images "
            f"({roles}), threshold {g['threshold']:.4f}, max |Δp| allowed {g['max_delta_allowed']:g}:"
        )
        lines += ["  " + result_line(r) for r in group]
    return "\n".join(lines)


def champion_validations(settings: Settings) -> tuple[list[dict[str, Any]], str]:
    """The champion's recorded validations (every CPU class) and their table; empty when there is no
    database, schema or champion yet (``bcc model-info`` works without one)."""
    from .registry import get_champion

    try:
        with session_scope(settings.database_url) as s:
            champ = get_champion(s)
            version = champ.version if champ is not None else None
        if version is None:
            return [], "back-end validations: no champion yet"
        rows = validation_rows(settings.database_url, version)
    except StoreError as exc:
        return [], f"back-end validations: unavailable ({exc})"
    return rows, "back-end validations of the champion:\n" + format_validations(rows)


def validated_summary(settings: Settings, version: str) -> str:
    """``bcc models``' short column: the back-ends validated for ``version`` on this CPU class."""
    try:
        ok = [r["backend"] for r in validations_here(settings, version) if r["validated"]]
    except StoreError:
        return "?"
    return ",".join(b for b in ok if b != REFERENCE_BACKEND) or "-"
