"""Without OpenTelemetry, publish() and the worker work and store no context.

Not in test_tracing.py: make test-compat leaves that file out (OpenTelemetry
is not installed there) and runs this one.
"""

import json
import subprocess
import sys

import pytest

from tests.outbox import worker_process


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_without_opentelemetry__publish_and_drain_work_and_store_null() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.outbox.without_opentelemetry"],
        cwd=worker_process.ROOT,
        env=worker_process.worker_environment(worker_process.test_database_url()),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "tracing_available": False,
        "completed": 1,
        "status": "completed",
        "trace_context": None,
    }
