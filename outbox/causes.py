"""A failure's cause: what a thousand failures of one bug have in common.

cause_of() turns an event's last_error ("smtplib.SMTPServerDisconnected:
Connection unexpectedly closed after 30.5 s") into the text that failures of
the same cause share ("smtplib.SMTPServerDisconnected: Connection unexpectedly
closed after <n> s"): its first line, with quoted values, UUIDs, long hex ids
and numbers replaced by placeholders. The worker stores it with every failed
attempt (OutboxEvent.error_cause), so the admin's dead letters group failed
events by event type and cause with one GROUP BY, on PostgreSQL and SQLite
alike, instead of reading every error text.

The error class stays as it is (it names the cause); only the message is
stripped. last_error is redacted already (outbox.redaction), so a cause holds
no address and no value PostgreSQL quoted.
"""

import re

#: The longest cause kept: OutboxEvent.error_cause's column.
CAUSE_LIMIT = 300

_PLACEHOLDERS = (
    # Quoted first: a quoted value may hold digits, ids or spaces.
    (re.compile(r"'[^'\n]*'"), "'…'"),
    (re.compile(r'"[^"\n]*"'), '"…"'),
    (re.compile(r"`[^`\n]*`"), "`…`"),
    (
        re.compile(
            r"\b[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\b",
            re.IGNORECASE,
        ),
        "<id>",
    ),
    # Hex ids, tokens and hashes: 8 or more hex digits with at least one digit.
    (re.compile(r"\b(?=[0-9a-f]*[0-9])(?:0x)?[0-9a-f]{8,}\b", re.IGNORECASE), "<id>"),
    # Numbers, with their sign, decimals and unit-less exponents.
    (re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*(?:e[-+]?\d+)?", re.IGNORECASE), "<n>"),
    (re.compile(r"\d+"), "<n>"),  # digits inside words: host42, v2
)
_SPACE = re.compile(r"\s+")


def cause_of(last_error: str) -> str:
    """Return the cause of an error stored as "ErrorClass: message"."""
    first_line = last_error.strip().split("\n", 1)[0]
    error_class, separator, message = first_line.partition(": ")
    if not separator:
        return _fit(error_class)
    for pattern, placeholder in _PLACEHOLDERS:
        message = pattern.sub(placeholder, message)
    message = _SPACE.sub(" ", message).strip()
    return _fit(f"{error_class}: {message}" if message else error_class)


def split_cause(cause: str) -> tuple[str, str]:
    """Return a cause's error class and its stripped message."""
    error_class, _, message = cause.partition(": ")
    return error_class, message


def _fit(text: str) -> str:
    return text if len(text) <= CAUSE_LIMIT else text[: CAUSE_LIMIT - 1] + "…"
