"""DJANGO_LOG_FORMAT=json: a real worker logs one JSON object per line."""

import json

import pytest

from outbox import publish
from tests.outbox.worker_process import WorkerProcess

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_worker__logs_json_lines_with_its_fields_and_no_payload() -> None:
    publish("outbox_testapp.record", {"secret": "s3cr3t-payload"})
    publish("nobody.handles.this", {"secret": "s3cr3t-payload"}, max_attempts=1)

    worker = WorkerProcess(
        "--drain", "--worker-id", "json-logs", environment={"DJANGO_LOG_FORMAT": "json"}
    )

    assert worker.wait() == 0, worker.output
    lines = [json.loads(line) for line in worker.output.splitlines() if line]
    assert {line["logger"] for line in lines} >= {"outbox.runner", "outbox.worker"}
    [failed] = [line for line in lines if line.get("outcome") == "failed"]
    assert failed["event_type"] == "nobody.handles.this"
    assert failed["worker_id"] == "json-logs"
    assert failed["error_class"] == "HandlerNotFound"
    assert "s3cr3t-payload" not in worker.output
