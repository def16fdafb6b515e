"""Database URLs for people: every credential in one masked (:func:`safe_url`), and a driver's error cut to
one line with the URL's credentials masked wherever they appear in it (:func:`_error_line`). Used by the
store's errors, ``bcc config`` and every message that shows a database URL."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote_plus

from sqlalchemy.engine import make_url

__all__ = ["safe_url"]

_MASK = "***"


_WHOLE_STRINGS = ("dsn", "odbc_connect")
"""Query parameters that hold a whole connection string (``?dsn=password=...``, ``?odbc_connect=...PWD=...``),
which the driver uses, credentials included: masked as a whole."""


def _secret_key(key: str) -> bool:
    """Whether a URL query parameter carries a credential (``password``, ``sslpassword``, a passphrase or
    key, tokens...; also misspelt, ``passwrd``: what the operator typed there is a password all the same)
    or a whole connection string that may hold one. Masking a harmless value (``sslkey=/path``) costs
    nothing; showing a password does."""
    k = key.lower()
    return any(w in k for w in ("pass", "pwd", "secret", "token", "key", "cred")) or k in (
        "pw",
        *_WHOLE_STRINGS,
    )


_INNER = re.compile(r"(?i)\b((?:pass\w*|pwd|secret\w*|token)\s*=\s*)('[^']*'|\{[^}]*\}|[^\s;&]+)")
"""A credential inside a connection string or option value (``password=x``, ``PWD=x;``, quoted or not)."""


def _inner_secrets(value: str) -> list[str]:
    """The credentials inside a connection string (``password=x``, ``PWD=x;``, quoted or not)."""
    return [m[2].strip("'{}") for m in _INNER.finditer(value)]


def _mask_inner(value: Any) -> Any:
    """``value`` with every credential inside it masked (``?options=-c password=x``)."""
    if isinstance(value, str):
        return _INNER.sub(lambda m: m[1] + _MASK, value)
    return tuple(_mask_inner(v) for v in value)


def _whole_password(url: Any) -> str | None:
    """``url`` as text with the '@'s of its user info encoded, where its authority holds more than one
    '@' (``bcc:Pa55@Tail@host``, with the password's '@' not written ``%40``); else None. make_url ends
    the password at the first '@' and takes ``Tail@host`` for the host. Parsed by hand, as no URL parser
    takes that intent: all before the authority's LAST '@' is user info, the user all before its first ':'."""
    text = url.render_as_string(hide_password=False) if hasattr(url, "render_as_string") else url
    m = re.match(r"([^:/?#]+://)([^/?#]*)(.*)", text, re.S) if isinstance(text, str) else None
    if not m or m[2].count("@") < 2:
        return None
    userinfo, _, host = m[2].rpartition("@")
    return f"{m[1]}{userinfo.replace('@', '%40')}@{host}{m[3]}"


def safe_url(url: Any) -> str:
    """``url`` (text or a SQLAlchemy URL) for messages and ``bcc config``: the password and every
    credential query parameter (``?password=``, ``?sslpassword=``, ...) masked as ``***``. Every message
    that shows a database URL goes through this."""
    try:
        u = make_url(_whole_password(url) or url)
        query = {k: (_MASK if _secret_key(k) else _mask_inner(v)) for k, v in u.query.items()}
        return u.set(query=query).render_as_string(hide_password=True).replace("%2A%2A%2A", _MASK)
    except Exception:  # noqa: BLE001 - only for messages
        return "<unparseable url>"


def _secrets(url: Any) -> list[str]:
    """The credential values inside ``url`` (longest first), to be masked wherever they appear."""
    try:
        fixed = _whole_password(url)
        u = make_url(fixed or url)
    except Exception:  # noqa: BLE001
        return []
    values = [u.password] if u.password else []
    if fixed and (p := u.password):  # the driver got it cut at an '@' (or ':'), the rest shown as host
        cuts = [m.start() for m in re.finditer("[@:]", p)]  # or port: mask every piece, head and tail
        values += re.split("[@:]", p) + [p[:i] for i in cuts] + [p[i + 1 :] for i in cuts]
    for k, v in u.query.items():
        for one in [v] if isinstance(v, str) else list(v):
            values += [one, *_inner_secrets(one)] if _secret_key(k) else _inner_secrets(one)
    values = [str(v) for v in values if v]
    values += [quote_plus(v) for v in values]
    return sorted(set(values), key=len, reverse=True)


def _error_line(exc: BaseException, url: Any) -> str:
    """The first line of a driver's error, with any credential of ``url`` in it masked. SQLAlchemy's own
    first line may be a note about how the error arose ("(raised as a result of Query-invoked autoflush;
    ..."): the driver's error, which says what went wrong ("database is locked"), is taken from under it."""
    orig = getattr(exc, "orig", None)
    text = (
        f"({type(orig).__module__}.{type(orig).__name__}) {orig}" if orig is not None else str(exc)
    ).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    for secret in _secrets(url):
        line = line.replace(secret, _MASK)
    return line
