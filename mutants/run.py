"""Run the mutant check: every named broken variant must make a test fail.

    python mutants/run.py [--jobs 2] [NAME ...]

Each mutants/<name>.toml describes one broken variant of the code: a short
description, one or more textual edits (each `find` must occur exactly once
in its file, so a mutant whose code moved is reported as stale rather than
silently testing nothing) and the tests expected to catch it. The check
copies the tree (the files git knows, tracked or not ignored), runs all the
listed tests once on the unmutated copy (they must pass, or a "kill" would
prove nothing), then applies each mutant to a fresh copy and runs its tests.
A mutant is killed when a test fails; it survives when they pass. A test run
that errors out (collection error, test not found, crash) is reported as an
error, not as a kill. The command prints one line per mutant and exits 1
unless every mutant was killed.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "mutants"
#: pytest's exit status when tests ran and at least one failed.
TESTS_FAILED = 1
#: A mutant that hangs a test is killed by pytest-timeout well before this.
RUN_TIMEOUT_SECONDS = 600


@dataclass(frozen=True)
class Edit:
    file: str
    find: str
    replace: str


@dataclass(frozen=True)
class Mutant:
    name: str
    description: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    verdict: str  # killed, survived, stale, error
    detail: str
    seconds: float


class StaleMutantError(Exception):
    """The mutant's edit no longer matches the code exactly once."""


def load(path: Path) -> Mutant:
    """Read one mutant description, refusing an incomplete one."""
    with path.open("rb") as file:
        data = tomllib.load(file)
    edits = tuple(
        Edit(file=edit["file"], find=edit["find"], replace=edit["replace"])
        for edit in data.get("edits", [])
    )
    tests = tuple(data.get("tests", []))
    if not data.get("description") or not edits or not tests:
        raise SystemExit(f"{path}: needs a description, [[edits]] and tests")
    return Mutant(path.stem, data["description"], edits, tests)


def copy_tree(destination: Path) -> None:
    """Copy the files git knows about (tracked, or untracked and not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def apply(mutant: Mutant, tree: Path) -> None:
    for edit in mutant.edits:
        path = tree / edit.file
        text = path.read_text()
        found = text.count(edit.find)
        if found != 1:
            raise StaleMutantError(
                f"{edit.file}: the text to replace occurs {found} times, not once"
            )
        path.write_text(text.replace(edit.find, edit.replace))


def pytest(tree: Path, tests: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run the tests in the copy, importing the copy's code, not the original's."""
    environment = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    environment.pop("COVERAGE_PROCESS_START", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "--no-header", *tests],
        cwd=tree,
        env=environment,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )


def summary(run: subprocess.CompletedProcess[str]) -> str:
    """Return pytest's last line ("1 failed, 2 passed in 3.1s")."""
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else run.stderr.strip()[-200:]


def check_imports_the_copy(tree: Path) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", "import outbox; print(outbox.__file__)"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    )
    if not Path(probe.stdout.strip()).is_relative_to(tree):
        raise SystemExit(f"the copy imports outbox from {probe.stdout.strip()}")


def run_mutant(mutant: Mutant, base: Path, scratch: Path) -> Outcome:
    started = time.monotonic()
    tree = scratch / mutant.name
    shutil.copytree(base, tree, symlinks=True)
    try:
        apply(mutant, tree)
    except StaleMutantError as error:
        return Outcome(mutant, "stale", str(error), time.monotonic() - started)
    try:
        run = pytest(tree, mutant.tests)
    except subprocess.TimeoutExpired:
        return Outcome(mutant, "error", "timed out", time.monotonic() - started)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    verdict = {0: "survived", TESTS_FAILED: "killed"}.get(run.returncode, "error")
    return Outcome(mutant, verdict, summary(run), time.monotonic() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once")
    options = parser.parse_args(argv)
    mutants = [load(path) for path in sorted(CATALOGUE.glob("*.toml"))]
    if options.names:
        unknown = set(options.names) - {mutant.name for mutant in mutants}
        if unknown:
            parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
        mutants = [mutant for mutant in mutants if mutant.name in options.names]
    if not mutants:
        print(f"no mutants in {CATALOGUE}")
        return 1
    with tempfile.TemporaryDirectory(prefix="outbox-mutants-") as directory:
        scratch = Path(directory)
        base = scratch / "base"
        copy_tree(base)
        check_imports_the_copy(base)
        tests = sorted({test for mutant in mutants for test in mutant.tests})
        started = time.monotonic()
        baseline = pytest(base, tests)
        print(
            f"baseline   {len(tests)} tests on the unmutated code: "
            f"{summary(baseline)} ({time.monotonic() - started:.0f}s)",
            flush=True,
        )
        if baseline.returncode != 0:
            print(baseline.stdout[-5000:], baseline.stderr[-2000:])
            return 1
        width = max(len(mutant.name) for mutant in mutants)
        outcomes = []
        with ThreadPoolExecutor(max_workers=options.jobs) as pool:
            for outcome in pool.map(
                lambda mutant: run_mutant(mutant, base, scratch), mutants
            ):
                outcomes.append(outcome)
                print(
                    f"{outcome.verdict:<9}  {outcome.mutant.name:<{width}}  "
                    f"{outcome.seconds:5.1f}s  {outcome.detail}",
                    flush=True,
                )
    alive = [outcome for outcome in outcomes if outcome.verdict != "killed"]
    print(
        f"{len(outcomes) - len(alive)} of {len(outcomes)} mutants killed"
        + (f"; not killed: {', '.join(o.mutant.name for o in alive)}" if alive else "")
    )
    return 1 if alive else 0


if __name__ == "__main__":
    sys.exit(main())
