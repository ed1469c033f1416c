"""Draw docs/performance.png from the JSON that benchmarks/run.py writes.

    .venv/bin/python benchmarks/chart.py results.json docs/performance.png

Needs matplotlib (`pip install -e '.[bench]'`).
"""

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def best_rate(runs: dict[str, Any], key: str) -> float:
    return max(run[0]["rate"] for run in runs[key])


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    report = json.loads(source.read_text())
    runs = report["runs"]
    latency = min(
        (run[0] for run in runs["latency"]), key=lambda m: m["notes"]["p50_ms"]
    )
    figure, (drain, delay) = plt.subplots(1, 2, figsize=(10, 4))

    names = ["ceiling (raw SQL)", "1 worker", "4 workers"]
    rates = [best_rate(runs, key) for key in ("ceiling", "drain-1", "drain-4")]
    bars = drain.bar(names, rates, color=["#9aa5b1", "#3e7bfa", "#1f4fbf"])
    drain.bar_label(bars, labels=[f"{rate:,.0f}" for rate in rates])
    drain.set_title(
        f"Drain rate, no-op events, batch {report['machine']['batch_size']}"
    )
    drain.set_ylabel("events per second")

    cuts = ["p50_ms", "p95_ms", "p99_ms"]
    values = [latency["notes"][cut] for cut in cuts]
    bars = delay.bar(["p50", "p95", "p99"], values, color="#3e7bfa")
    delay.bar_label(bars, labels=[f"{value:.2f} ms" for value in values])
    delay.set_title("Commit to handler start, one idle worker")
    delay.set_ylabel("milliseconds")

    machine = report["machine"]
    figure.suptitle(
        f"{machine['cpus']} CPUs, PostgreSQL {machine['postgresql']}, "
        f"synchronous_commit={machine['synchronous_commit']}"
    )
    figure.tight_layout()
    figure.savefig(target, dpi=120)


if __name__ == "__main__":
    main()
