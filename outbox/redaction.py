"""Keep personal data out of the error texts the outbox stores and logs.

A handler's exception says what went wrong, and often whose data it was
about: smtplib's SMTPRecipientsRefused is a dict of the refused addresses,
and a PostgreSQL error carries the offending values in its DETAIL line
("Key (email)=(alice@example.com) already exists"), its CONTEXT and the
query text it quotes. Those texts live on in last_error and the history,
which operators read and backups keep. redact() takes the values out and
keeps what an operator needs: the error class (stored apart) and the
message's own words.
"""

import logging
import re

EMAIL_PLACEHOLDER = "<email>"
REDACTED = "<redacted>"

# A local part of at most 64 characters (RFC 5321) keeps the scan linear
# on a long run of word characters with no @ in it. Quotes and angle
# brackets are not part of the match: SMTP texts wrap addresses in them.
_EMAIL = re.compile(r"[\w.+%-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63})*")
# The fields PostgreSQL adds after the primary message that quote values:
# DETAIL (keys and failing rows), CONTEXT (the JSON or the statement around
# the error, bound parameters), QUERY, LINE n (the statement's text) with
# their continuation lines, up to a blank line (where a traceback goes on) or
# the next field. HINT is kept: it is the server's advice, not data.
_SERVER_FIELD = re.compile(
    r"^(DETAIL|CONTEXT|QUERY|LINE \d+):[^\n]*"
    r"(?:\n(?!(?:HINT|DETAIL|CONTEXT|QUERY|LINE \d+):)[^\n]+)*",
    re.MULTILINE,
)


def redact(text: str) -> str:
    """Return text with email addresses and PostgreSQL's quoted values replaced."""
    text = _SERVER_FIELD.sub(rf"\1: {REDACTED}", text)
    if "@" in text:
        text = _EMAIL.sub(EMAIL_PLACEHOLDER, text)
    return text


class RedactTracebacks(logging.Filter):
    """Redact the traceback a log record carries, before a handler formats it.

    The formatted traceback is kept on the record as exc_text, which
    logging's formatters print instead of formatting exc_info again.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self._formatter.formatException(record.exc_info))
        return True
