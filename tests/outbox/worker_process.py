"""Start real `run_outbox_worker` processes against the test database."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
#: Short timings so the tests take seconds: retries after 10-20 ms.
FAST_ENVIRONMENT = {"OUTBOX_BACKOFF_BASE_MS": "20", "OUTBOX_BACKOFF_CAP_MS": "200"}


def test_database_url() -> str:
    settings = connection.settings_dict
    password = f":{settings['PASSWORD']}" if settings["PASSWORD"] else ""
    return (
        f"postgres://{settings['USER']}{password}@{settings['HOST'] or '127.0.0.1'}"
        f":{settings['PORT'] or 5432}/{settings['NAME']}"
    )


def worker_environment(database_url: str, **overrides: str) -> dict[str, str]:
    return {
        **os.environ,
        **FAST_ENVIRONMENT,
        **overrides,
        "DATABASE_URL": database_url,
        # The tests' own settings: the outbox-only ones under the Django 5.2
        # run, so its workers, too, load nothing of the project.
        "DJANGO_SETTINGS_MODULE": settings.SETTINGS_MODULE,
        "PYTHONUNBUFFERED": "1",
    }


def manage(database_url: str, *arguments: str) -> str:
    """Run a manage.py command to its end against that database; return its output."""
    done = subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=ROOT,
        env=worker_environment(database_url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


class WorkerProcess:
    """A worker subprocess whose output is collected line by line."""

    def __init__(
        self,
        *arguments: str,
        environment: dict[str, str] | None = None,
        database_url: str | None = None,
    ):
        env = worker_environment(
            database_url or test_database_url(), **(environment or {})
        )
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "run_outbox_worker", *arguments],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for_output(self, text: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.process.poll() is not None and text not in self.output:
                self._reader.join(1)
                if text in self.output:
                    return
                raise AssertionError(f"worker exited before {text!r}:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output}")
            time.sleep(0.01)

    def send(self, number: signal.Signals) -> None:
        os.kill(self.pid, number)

    def wait(self, timeout: float = 15) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(
                f"worker still running after {timeout}s:\n{self.output}"
            ) from None
        self._reader.join(2)
        return code

    def stop(self) -> int:
        if self.process.poll() is None:
            self.send(signal.SIGTERM)
        return self.wait()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def wait_until(
    condition: Callable[[], bool],
    timeout: float = 15,
    context: Callable[[], str] = str,
) -> float:
    """Poll condition until true; return the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s\n{context()}")
        time.sleep(0.005)
    return time.monotonic() - started


def nothing_unfinished() -> bool:
    """Whether every event is done with: none pending or processing."""
    from outbox.models import UNFINISHED, OutboxEvent

    return not OutboxEvent.objects.filter(status__in=UNFINISHED).exists()
