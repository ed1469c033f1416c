"""JSON log lines: one object per record, with the fields the outbox logs.

    LOGGING = {..., "formatters": {"json": {"()": "outbox.logs.JsonFormatter"}}}

Each line holds time (ISO 8601, UTC), level, logger and message, then every
`extra` field the record carries (worker_id, event_id, event_type, attempt,
the counts of a turn, ...) and, for a record with an exception, its
traceback, redacted as the worker's other tracebacks are. The outbox never
puts a payload, an address or a token in `extra`.
"""

import json
import logging
from datetime import UTC, datetime
from typing import Any

from outbox.redaction import redact

#: The attributes every LogRecord has: what is left is the caller's extra.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format a record as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                line[name] = value
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str, ensure_ascii=False)
