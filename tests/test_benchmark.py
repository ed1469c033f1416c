"""The benchmark itself keeps working (its figures are checked by people)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(290)
def test_benchmark__quick_run_measures_every_workload(tmp_path) -> None:
    output = tmp_path / "results.json"

    result = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--json", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert set(report["runs"]) == {
        "ceiling",
        "publish",
        "drain-1",
        "drain-1-metrics",
        "drain-1-traced",
        "fanout",
        "relay-jetstream",
        "relay-rabbitmq",
        "drain-4",
        "latency",
        "latency-metrics",
        "latency-raw",
        "io-1",
        "io-16",
        "io-64",
        "io-16-async",
        "procrastinate-16",
        "pgqueuer-16",
        "tasks",
        "scale-0",
        "scale-1m",
        "memory",
        "memory-16",
        "backlog-10k",
        "backlog-100k",
        "backlog-1m",
        "backlog-1m-4",
        "backlog-1m-c16",
    }
    assert all(len(runs) == 1 for runs in report["runs"].values())
    assert len(report["targets"]) == 26
    assert "drain-1 >= 60 % of the ceiling" in result.stdout
