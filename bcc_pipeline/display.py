"""How a path, or a message holding one, is shown: one reversible line of valid UTF-8 for databases,
JSON, logs and the UI (:func:`display_path`, inverted by :func:`path_from_display`; :func:`one_line` for
messages). Re-exported by :mod:`bcc_pipeline.files`."""

from __future__ import annotations

import os
import re

__all__ = ["INVISIBLE", "display_path", "one_line", "path_from_display"]

# Characters nobody can see, or that read as a plain space: the format characters (Unicode category Cf,
# through Unicode 15: bidirectional overrides and isolates, zero-width spaces and joiners, the byte-order
# mark, soft hyphen, tag characters), the rest of Unicode's default-ignorable code points (combining
# grapheme joiner, Hangul fillers, variation selectors), the spaces other than U+0020 (category Zs) and
# the blank braille pattern. Shown raw they make one name look like another (``scan\u202egnp.tiff``
# reads as ``scanffit.png``; ``a\u00a0b.png`` as ``a b.png``), so a pathologist reading the prediction
# table could take one patient's file for another's; displayed as their UTF-8 bytes.
_FORMAT_CHARS = (
    "\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)
_IGNORABLE_CHARS = (
    "\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u3164\ufe00-\ufe0f\uffa0\ufff0-\ufff8"
    "\U00016fe4\U000e0000-\U000e0fff"
)
_BLANK_CHARS = "\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\u2800"
_INVISIBLE = _FORMAT_CHARS + _IGNORABLE_CHARS + _BLANK_CHARS
# What display_path escapes: the backslash itself, bytes that are not UTF-8 (lone surrogates after
# surrogateescape), C0/C1 control characters, the Unicode line/paragraph separators and format characters.
#: One character nobody can see or that reads as a plain space (what :func:`display_path` escapes so).
INVISIBLE = re.compile("[" + _INVISIBLE + "]")
_NEEDS_ESCAPE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff" + _INVISIBLE + "]")
_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPE = re.compile(r"\\(?:(\\)|([nrt])|x([0-9a-fA-F]{2}))")


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[ch]
    # a byte that was not UTF-8 (surrogateescape); any other lone surrogate (text that is no file name)
    # shows its surrogatepass bytes
    raw = bytes([ord(ch) - 0xDC00]) if "\udc80" <= ch <= "\udcff" else ch.encode("utf-8", "surrogatepass")
    return "".join(f"\\x{b:02x}" for b in raw)


def display_path(path: str | bytes | os.PathLike[str]) -> str:
    """``path`` (or any text) as one line of valid UTF-8 for databases, JSON and logs; reversible by
    :func:`path_from_display`, so two different names never display the same.

    File names on Linux are bytes. A valid UTF-8 name without backslashes or control characters is shown
    unchanged. Otherwise the backslash is shown as ``\\\\``, newline, carriage return and tab as ``\\n``,
    ``\\r``, ``\\t``, and every byte that is not UTF-8 as ``\\xNN``, as are the bytes of any other
    control character (C0, DEL, C1), of the line and paragraph separators U+2028/U+2029 and of the
    characters nobody can see or that read as a plain space (bidirectional overrides, zero-width spaces
    and joiners, variation selectors, Hangul fillers, no-break and other spaces), so that no name is shown
    looking like another by characters that cannot be told apart. Lookalike letters
    (Cyrillic ``а`` for Latin ``a``) and composed against decomposed accents are shown as they are: such
    names differ in their bytes and are stored apart, but read alike.
    """
    text = os.fsdecode(os.fspath(path))  # bytes that are not UTF-8 become lone surrogates here
    if not _NEEDS_ESCAPE.search(text):
        return text
    return _NEEDS_ESCAPE.sub(_escape, text)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff" + _INVISIBLE + "]")


def one_line(text: str) -> str:
    """``text`` (a reason, an error) for one log line or a database field: control characters, line
    separators and bytes that are not UTF-8 are escaped as :func:`display_path` does; backslashes are
    kept, so paths inside it stay as they were shown. For messages only; paths use :func:`display_path`."""
    return _CONTROL.sub(_escape, str(text))


def path_from_display(text: str) -> str:
    """The exact path that :func:`display_path` showed as ``text`` (bytes that are not UTF-8 come back as
    Python's surrogate escapes; ``os.fsencode`` gives the original bytes). ``ValueError`` when ``text``
    is not a display form (a lone backslash, an unknown escape)."""
    out = bytearray()
    pos = 0
    for m in _UNESCAPE.finditer(text):
        out += _literal(text[pos : m.start()])
        if m.group(1):
            out += b"\\"
        elif m.group(2):
            out += {"n": b"\n", "r": b"\r", "t": b"\t"}[m.group(2)]
        else:
            out.append(int(m.group(3), 16))
        pos = m.end()
    out += _literal(text[pos:])
    return os.fsdecode(bytes(out))


def _literal(part: str) -> bytes:
    if "\\" in part:
        raise ValueError(f"not a displayed path: a backslash that starts no escape in {part!r}")
    try:
        return part.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not a displayed path: {exc}") from exc
