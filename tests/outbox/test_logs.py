"""JSON log lines (outbox/logs.py)."""

import json
import logging
import sys

from outbox.logs import JsonFormatter


def record(**extra: object) -> logging.LogRecord:
    made = logging.makeLogRecord(
        {"name": "outbox.worker", "levelno": logging.WARNING, "levelname": "WARNING"}
    )
    made.msg, made.args = "outbox event %s id=%s", ("retried", 7)
    for name, value in extra.items():
        setattr(made, name, value)
    return made


def test_json__carries_the_message_and_every_extra_field() -> None:
    line = JsonFormatter().format(
        record(worker_id="w-1", event_id=7, attempt=2, when=object())
    )

    parsed = json.loads(line)
    assert parsed["message"] == "outbox event retried id=7"
    assert (parsed["level"], parsed["logger"]) == ("WARNING", "outbox.worker")
    assert (parsed["worker_id"], parsed["event_id"], parsed["attempt"]) == (
        "w-1",
        7,
        2,
    )
    assert parsed["when"].startswith("<object object")  # str() of the unknown
    assert parsed["time"].endswith("+00:00")
    assert "\n" not in line


def test_json__keeps_an_exceptions_traceback_redacted() -> None:
    try:
        raise ConnectionError("refused alice@example.com")
    except ConnectionError:
        made = record()
        made.exc_info = sys.exc_info()

    parsed = json.loads(JsonFormatter().format(made))

    assert "ConnectionError: refused <email>" in parsed["exception"]
    assert "alice@example.com" not in parsed["exception"]
