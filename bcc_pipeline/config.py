"""One frozen settings object, built from a profile, ``BCC_*`` environment variables and overrides.

Precedence, lowest to highest: the declared default → the profile's values → ``BCC_*`` environment
variables → explicit overrides (the CLI's flags). Nothing happens at import time; call :func:`load_settings`.

Every setting is declared once, as a field of :class:`Settings`, in :mod:`bcc_pipeline.settings`
(which also describes the profiles); its public names are re-exported here. This module derives from
those declarations the loading and validation, ``bcc config`` and the README's configuration table
(``python -m bcc_pipeline.config --readme README.md``).

This module imports nothing heavy (the CLI, the DAG files and :mod:`bcc_pipeline.images` import it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .settings import (
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_INFERENCE,
    DEFAULTS,
    ENV_VARS,
    HOME_MARKER,
    INFERENCE_CHOICES,
    MANAGED_MARKER,
    PROFILES,
    REFERENCE_BACKEND,
    SETTINGS,
    Setting,
    Settings,
    _shown_value,
)

__all__ = [
    "BACKENDS",
    "DEFAULTS",
    "DEFAULT_BACKEND",
    "DEFAULT_INFERENCE",
    "ENV_VARS",
    "HOME_MARKER",
    "INFERENCE_CHOICES",
    "MANAGED_MARKER",
    "PROFILES",
    "REFERENCE_BACKEND",
    "SETTINGS",
    "Setting",
    "Settings",
    "load_settings",
    "markdown_table",
    "update_readme",
]


def _convert(name: str, raw: Any, origin: str) -> Any:
    typ = SETTINGS[name].type
    if typ is Path:
        return Path(os.path.expanduser(str(raw))).resolve()
    if isinstance(raw, typ) and not (typ is int and isinstance(raw, bool)):
        return raw
    if typ is bool:
        word = str(raw).strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        where = f"environment variable {SETTINGS[name].env}" if origin == "env" else f"setting {name!r}"
        raise ConfigError(f"{where} must be a boolean (1/0, true/false, yes/no, on/off), got {raw!r}")
    try:
        if typ is int and SETTINGS[name].octal:
            text = str(raw).strip().lower()
            return int(text.removeprefix("0o") or "x", 8)
        if typ is int:
            return int(str(raw).replace("_", ""))
        if typ is float:
            return float(raw)
        return typ(raw)
    except (TypeError, ValueError) as exc:
        where = f"environment variable {SETTINGS[name].env}" if origin == "env" else f"setting {name!r}"
        kind = "an octal number such as 027" if SETTINGS[name].octal else typ.__name__
        raise ConfigError(f"{where} must be {kind}, got {raw!r}") from exc


def _check(s: Settings) -> None:
    for name, spec in SETTINGS.items():
        value = getattr(s, name)
        why = spec.problem(value)
        if why:
            raise ConfigError(f"{spec.env}={_shown_value(spec, value)!r}: {why}")
    unknown = [b for b in s.publish_backend_list if b not in BACKENDS]
    if unknown:  # a list setting: each item is checked here (the declaration's rules are for one value)
        raise ConfigError(
            f"BCC_PUBLISH_BACKENDS={s.publish_backends!r}: {unknown[0]!r} is not a back-end; use all, "
            f"none or some of {', '.join(BACKENDS)}"
        )


def load_settings(
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings: declared defaults, profile values, then ``BCC_*`` variables, then ``overrides``.

    ``profile`` (or ``overrides["profile"]``) beats ``BCC_PROFILE``. ``None`` values in
    ``overrides`` are ignored, so CLI flags that were not given fall through.
    """
    env = os.environ if env is None else env
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(SETTINGS)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")

    profile_var = SETTINGS["profile"].env
    explicit = overrides.pop("profile", None) or profile
    chosen = explicit or env.get(profile_var) or DEFAULTS["profile"]
    if chosen not in PROFILES:
        raise ConfigError(f"unknown profile {chosen!r}; choose one of {', '.join(PROFILES)}")

    values: dict[str, Any] = {"profile": chosen}
    sources: dict[str, str] = {
        "profile": "override" if explicit else ("env" if env.get(profile_var) else "default")
    }
    for name, value in PROFILES[chosen].items():
        values[name], sources[name] = value, "profile"
    for name, spec in SETTINGS.items():
        raw = env.get(spec.env)
        if name != "profile" and raw is not None and raw != "":
            values[name], sources[name] = _convert(name, raw, "env"), "env"
    for name, raw in overrides.items():
        values[name], sources[name] = _convert(name, raw, "override"), "override"

    values["home"] = _convert("home", values.get("home") or DEFAULTS["home"], "default")
    if not values.get("database_url"):
        values["database_url"] = f"sqlite:///{values['home'] / 'bcc.db'}"
        sources.setdefault("database_url", "default")
    settings = Settings(**values, sources=sources)
    _check(settings)
    return settings


# -- the README's configuration table -----------------------------------------------------------
README_BEGIN, README_END = "<!-- config:begin -->", "<!-- config:end -->"


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if not isinstance(value, int | float):
        return str(value)
    return f"{value:_}" if isinstance(value, int) else f"{value:g}"


def markdown_table() -> str:
    """The README's configuration table, one row per declared setting."""
    rows = ["| variable | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for name, spec in SETTINGS.items():
        default = f"`{spec.shown or (f'{spec.default:03o}' if spec.octal else _shown(spec.default))}`"
        for profile, values in PROFILES.items():
            if name in values and values[name] != spec.default:
                default += f" ({profile}: `{_shown(values[name])}`)"
        if spec.choices:
            allowed = ", ".join(f"`{c}`" for c in spec.choices)
        else:
            allowed = spec.rule + (f" ({spec.why})" if spec.rule and spec.why else "")
        typ = "path" if spec.type is Path else spec.type.__name__
        rows.append(f"| `{spec.env}` | {typ} | {default} | {allowed} | {spec.doc} |")
    return "\n".join(rows) + "\n"


def update_readme(path: Path | str) -> bool:
    """Put :func:`markdown_table` between the config markers of ``path``; ``True`` when the file changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise ConfigError(f"{path} has no {README_BEGIN} … {README_END} markers")
    head, rest = text.split(README_BEGIN, 1)
    _old, tail = rest.split(README_END, 1)
    new = f"{head}{README_BEGIN}\n{markdown_table()}{README_END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bcc_pipeline.config [--readme README.md]``: print the table, or write it into a README."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bcc_pipeline.config", description=main.__doc__)
    ap.add_argument("--readme", help="write the table between the config markers of this file")
    args = ap.parse_args(argv)
    if args.readme:
        print(f"{args.readme}: {'updated' if update_readme(args.readme) else 'already up to date'}")
    else:
        sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
