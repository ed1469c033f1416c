"""What the outbox's columns can store, checked before a statement is sent.

A value PostgreSQL refuses fails inside the database and aborts the caller's
whole transaction: a varchar(200) given 201 characters, text or JSON with a
NUL character, a string with a lone surrogate (no UTF-8 for it), NaN or
Infinity in jsonb. SQLite stores them all silently. publish() and the
worker's start check here first, so a bad value is a ValueError or TypeError
at the call that names it, and the caller's transaction stays usable.
"""

import re
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder

#: Characters PostgreSQL cannot store in text or jsonb: NUL, and surrogates
#: (in a Python str only a lone one, which has no UTF-8 encoding).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
#: One escape of a JSON string as Python's encoder writes it (lowercase hex).
#: Outside strings JSON has no backslash and inside one every backslash
#: starts an escape, so scanning escape by escape never starts mid-escape.
_ESCAPE = re.compile(r"\\(?:u([0-9a-f]{4})|.)")
#: The escapes worth a closer look: NUL and surrogates (U+D800 to U+DFFF),
#: not the Hangul syllables just below them.
_MAYBE_UNSTORABLE = re.compile(r"\\u(?:0000|d[89a-f])")


def check_text(value: object, *, name: str, limit: int) -> str:
    """Return value if a varchar(limit) column can store it; raise otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}.")
    if len(value) > limit:
        raise ValueError(
            f"{name} is {len(value)} characters long; the limit is {limit}."
        )
    found = _UNSTORABLE.search(value)
    if found is not None:
        raise ValueError(
            f"{name} contains {_describe(ord(found[0]))} at position "
            f"{found.start()}, which PostgreSQL cannot store."
        )
    return value


#: json.dumps(cls=DjangoJSONEncoder, allow_nan=False), without making an
#: encoder per call: its encode() keeps no state between calls.
_ENCODER = DjangoJSONEncoder(allow_nan=False)


def encode_json(payload: Any, *, name: str, max_bytes: int | None) -> str:
    """Return the payload as the JSON text Django will send; raise if unstorable.

    One encoding, with the encoder and ASCII escaping JSONField uses, so its
    length is the size in bytes of what is stored, and a NUL or a lone
    surrogate anywhere (a value or a key, however deep) shows as its escape.
    """
    try:
        text = _ENCODER.encode(payload)
    except ValueError as error:
        if "Out of range float" not in str(error):
            raise
        raise ValueError(
            f"{name} contains NaN or Infinity, which JSON cannot carry: send a "
            "string or None instead."
        ) from error
    if max_bytes is not None and len(text) > max_bytes:
        raise ValueError(
            f"{name} is {len(text):,} bytes as JSON; the limit is {max_bytes:,} "
            "(settings.OUTBOX['MAX_PAYLOAD_BYTES'], environment variable "
            "OUTBOX_MAX_PAYLOAD_BYTES)."
        )
    code = _unstorable_escape(text)
    if code is not None:
        raise ValueError(
            f"{name} contains {_describe(code)}, which PostgreSQL cannot store in JSON."
        )
    return text


def storable(text: str) -> str:
    """Return text with what PostgreSQL cannot store written as escapes.

    For texts the outbox writes itself and must keep, not refuse: an error
    message with a NUL or a lone surrogate in it (a handler's ValueError
    quoting a bad byte) would otherwise fail the statement that records the
    outcome, and with it every turn after.
    """
    if _UNSTORABLE.search(text) is None:
        return text
    escaped = text.replace("\x00", "\\x00")
    return escaped.encode("utf-8", "backslashreplace").decode("utf-8")


def _unstorable_escape(text: str) -> int | None:
    """Return the code point of the first escape jsonb refuses, or None.

    \\u0000, and a surrogate escape that is not half of a pair (a character
    beyond U+FFFF is written as a high and a low surrogate escape, adjacent).
    """
    if _MAYBE_UNSTORABLE.search(text) is None:
        return None  # the usual case, Hangul and emoji included
    high: tuple[int, int] | None = None  # (code point, end) awaiting its low half
    for match in _ESCAPE.finditer(text):
        code = int(match[1], 16) if match[1] else None
        is_low = code is not None and 0xDC00 <= code <= 0xDFFF
        if high is not None:
            if is_low and match.start() == high[1]:
                high = None
                continue
            return high[0]
        if code is None:
            continue
        if code == 0 or is_low:
            return code
        if 0xD800 <= code <= 0xDBFF:
            high = (code, match.end())
    return high[0] if high is not None else None


def _describe(code: int) -> str:
    if code == 0:
        return "a NUL character (U+0000)"
    return f"a lone surrogate (U+{code:04X})"
