"""Run the mutant check: every named broken variant must make a test fail.

    python mutants/run.py [--jobs 2] [NAME ...]

Each mutants/<name>.toml describes one broken variant of the code: a short
description, one or more textual edits (each `find` must occur exactly once
in its file, so a mutant whose code moved is reported as stale rather than
silently testing nothing) and the tests expected to catch it. The check
copies the tree (the files git knows, tracked or not ignored), runs the
listed tests on the unmutated copy, one run per test file (they must pass,
or a "kill" would prove nothing), then applies each mutant to a fresh copy
and runs its tests. A mutant is killed when a test body fails; it survives
when they pass. A run in which no test body failed but something else did
(a collection error, a test not found, a failing fixture, a crash, an edited
module that no longer compiles or imports, a run past RUN_DEADLINE_SECONDS)
is an error, not a kill. The command prints one line per mutant, naming the
tests that failed, and exits 1 unless every mutant was killed.

Two things keep a run short. The check imports the third-party modules the
tests need once and forks every test run from there. And on PostgreSQL it
migrates one test database from the unmutated code and gives each run a copy
(CREATE DATABASE ... TEMPLATE), so a mutant of a model or a migration is seen
only by tests that run that code themselves. Stopping the check (SIGTERM,
Ctrl+C) kills the runs in flight with the workers they started and drops
their databases.
"""

import argparse
import importlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "mutants"
#: A test run still going after this long is killed and reported as an error.
RUN_DEADLINE_SECONDS = 300
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
#: Third-party modules every test run imports, imported once before forking.
PRELOADED = (
    "pytest",
    "_pytest.assertion.rewrite",
    "pytest_django.plugin",
    "pytest_timeout",
    "pytest_cov.plugin",
    "faker.contrib.pytest.plugin",
    "factory.django",
    "django.test",
    "django.db.backends.postgresql.base",
    "psycopg",
)
#: Nothing of these is imported before the fork: each run imports its copy.
PROJECT_PACKAGES = {"benchmarks", "config", "organizations", "outbox", "tests", "users"}


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
    name: str
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


def preload() -> None:
    for name in PRELOADED:
        importlib.import_module(name)
    imported = {name.partition(".")[0] for name in sys.modules} & PROJECT_PACKAGES
    if imported:
        raise SystemExit(f"preloading imported the project: {sorted(imported)}")


class Databases:
    """Test databases on the PostgreSQL server of DATABASE_URL, if it is one.

    Every connection is opened and closed around one statement, so the
    parent never holds one across a fork.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.enabled = url.startswith(("postgres://", "postgresql://"))
        self.template = f"test_mutants_{os.getpid()}_{secrets.token_hex(4)}"
        self.created: set[str] = set()
        self._copies = 0

    def _execute(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(statement)

    def name_copy(self) -> str | None:
        """Return a new copy's name (None: no copies); the run creates it.

        Creating a copy takes most of a second of the server's time: done by
        each run, the copies of runs side by side are made side by side.
        """
        if not self.enabled:
            return None
        self._copies += 1
        database = f"{self.template}_{self._copies}"
        self.created.add(database)
        return database

    def create_copy(self, database: str) -> None:
        self._execute(f'CREATE DATABASE "{database}" TEMPLATE "{self.template}"')

    def drop(self, database: str | None) -> None:
        if database is not None:
            self._execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            self.created.discard(database)

    def drop_all(self) -> None:
        for database in [*self.created, self.template]:
            self.drop(database)


class _ReportRecorder:
    """A pytest plugin that notes which tests failed, and in which phase."""

    def __init__(self) -> None:
        self.failed: list[str] = []  # the test body failed: a kill
        self.errors: list[str] = []  # set-up or tear-down failed: not a kill

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.failed:
            (self.failed if report.when == "call" else self.errors).append(
                report.nodeid
            )


@dataclass
class TestRun:
    """A pytest run forked into a copy of the tree; its output goes to a file."""

    name: str
    tree: Path
    tests: Sequence[str]
    databases: Databases
    database: str | None = None
    #: Modules the mutant edited: each must still import once the tests ran.
    modules: Sequence[str] = ()
    is_mutant: bool = False
    started: float = 0.0
    pid: int = 0

    @property
    def output_file(self) -> Path:
        return self.tree.with_name(self.tree.name + ".out")

    @property
    def reports_file(self) -> Path:
        return self.tree.with_name(self.tree.name + ".json")

    def start(self) -> None:
        self.started = time.monotonic()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            code = 3
            try:
                # Its own process group, with the workers its tests start, so
                # the parent can stop all of them at once.
                os.setsid()
                code = self._run_in_child()
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def _run_in_child(self) -> int:
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_DFL)
        output = os.open(self.output_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.chdir(self.tree)
        # The copy's code, here and in the worker processes the tests start.
        sys.path.insert(0, str(self.tree))
        os.environ["PYTHONPATH"] = str(self.tree)
        os.environ.pop("COVERAGE_PROCESS_START", None)
        sys.dont_write_bytecode = True
        arguments = ["-q", "--no-header"]
        if self.is_mutant:
            # The first failing test settles a kill (its name is reported): a
            # mutant lists its most telling test first.
            arguments.append("-x")
        # Preloaded plugins were imported before pytest could rewrite their
        # asserts, which matters only to tests of those plugins.
        arguments += ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
        if self.database is not None:
            self.databases.create_copy(self.database)
            os.environ["TEST_DATABASE_NAME"] = self.database  # tests/conftest.py
            arguments.append("--reuse-db")
        import pytest

        recorder = _ReportRecorder()
        code = int(pytest.main([*arguments, *self.tests], plugins=[recorder]))
        # A module only a worker subprocess imports would make its test fail
        # by crashing the worker: that proves nothing about the promise.
        for module in self.modules:
            try:
                importlib.import_module(module)
            except Exception as error:
                recorder.errors.append(f"import {module}: {error!r}")
        self.reports_file.write_text(
            json.dumps({"failed": recorder.failed, "errors": recorder.errors})
        )
        return code

    def stop(self) -> None:
        """Kill the run and every process its tests started."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> str:
        """Return pytest's last line ("1 failed, 2 passed in 3.1s")."""
        lines = [line for line in self.output().splitlines() if line.strip()]
        return lines[-1].strip("= ") if lines else "no output"

    def output(self) -> str:
        try:
            return self.output_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def reports(self) -> dict[str, list[str]]:
        try:
            return dict(json.loads(self.reports_file.read_text()))
        except (FileNotFoundError, ValueError):
            return {"failed": [], "errors": []}


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


def migrate_template(base: Path, databases: Databases) -> None:
    """Create and migrate the template database from the unmutated code."""
    if not databases.enabled:
        return
    # Django's test database setup, without a test: run Django in a child.
    script = (
        "import django; from django.conf import settings; "
        "django.setup(); "
        f"settings.DATABASES['default']['TEST']['NAME'] = {databases.template!r}; "
        "from django.test.utils import setup_databases; "
        "setup_databases(verbosity=0, interactive=False, keepdb=True)"
    )
    subprocess.run(
        [sys.executable, "-c", script],
        cwd=base,
        env={
            **os.environ,
            "PYTHONPATH": str(base),
            "DJANGO_SETTINGS_MODULE": "tests.settings",
        },
        check=True,
    )


def _failure_report(output: str) -> str:
    """Return the lines of pytest's report that say what failed, indented."""
    lines = [line for line in output.splitlines() if line.startswith(("E ", ">"))]
    return "\n".join(
        f"           {line}" for line in (lines or output.splitlines())[-12:]
    )


def _short(nodeid: str) -> str:
    return nodeid.rpartition("::")[2]


@dataclass(frozen=True)
class Job:
    """A test run to make: the baseline of one test file, or one mutant."""

    name: str
    tests: tuple[str, ...]
    mutant: Mutant | None = None


class Check:
    """Run the baseline, then the mutants, jobs at a time, in one process.

    The parent stays single-threaded, so forking it is safe. A run that
    outlives RUN_DEADLINE_SECONDS (a hang in a fixture, which pytest-timeout
    does not cover) is killed and reported as an error.
    """

    def __init__(
        self, scratch: Path, databases: Databases, jobs: int, show_failures: bool
    ) -> None:
        self.show_failures = show_failures
        self.scratch = scratch
        self.base = scratch / "base"
        self.databases = databases
        self.jobs = jobs
        self.running: dict[int, tuple[Job, TestRun]] = {}
        self._runs = 0

    def baseline(self, mutants: Sequence[Mutant]) -> list[Job]:
        """Return one job per test file the mutants name, on the unmutated code.

        Per file, so a test that passes only after another file's tests
        (an order dependence) shows up here rather than as a false kill.
        """
        by_file: dict[str, set[str]] = {}
        for test in {test for mutant in mutants for test in mutant.tests}:
            by_file.setdefault(test.partition("::")[0], set()).add(test)
        return [
            Job(f"baseline {file}", tuple(sorted(tests)))
            for file, tests in sorted(by_file.items())
        ]

    def run(self, jobs: Sequence[Job]) -> Iterator[Outcome]:
        """Yield each job's outcome as it ends."""
        waiting = list(jobs)
        while waiting or self.running:
            while waiting and len(self.running) < self.jobs:
                job = waiting.pop(0)
                prepared = self._prepare(job)
                if isinstance(prepared, Outcome):
                    yield prepared
                    continue
                prepared.start()
                self.running[prepared.pid] = (job, prepared)
            if self.running:
                yield self._collect()

    def stop_all(self) -> None:
        """Kill every run in flight and reap it; used when the check is stopped."""
        for _, run in self.running.values():
            run.stop()
        for pid, (_, run) in list(self.running.items()):
            os.waitpid(pid, 0)
            self.databases.drop(run.database)
        self.running.clear()

    def _prepare(self, job: Job) -> TestRun | Outcome:
        """Return the job's test run in its own copy of the tree, or why not."""
        self._runs += 1
        tree = self.scratch / f"run-{self._runs}"
        shutil.copytree(self.base, tree, symlinks=True)
        if job.mutant is not None:
            try:
                apply(job.mutant, tree)
                compile_edits(job.mutant, tree)
            except StaleMutantError as error:
                shutil.rmtree(tree)
                return Outcome(job.name, "stale", str(error), 0.0)
            except SyntaxError as error:
                shutil.rmtree(tree)
                return Outcome(job.name, "error", f"does not compile: {error}", 0.0)
        modules = [] if job.mutant is None else edited_modules(job.mutant)
        return TestRun(
            job.name,
            tree,
            job.tests,
            self.databases,
            self.databases.name_copy(),
            modules,
            is_mutant=job.mutant is not None,
        )

    def _collect(self) -> Outcome:
        while True:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                break
            for _, late in self.running.values():
                if late.seconds() > RUN_DEADLINE_SECONDS:
                    late.stop()  # reaped on a later round
            time.sleep(0.02)
        job, run = self.running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        self.databases.drop(run.database)
        outcome = self._judge(job, run, code)
        for leftover in (run.tree, run.output_file, run.reports_file):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        return outcome

    def _judge(self, job: Job, run: TestRun, code: int) -> Outcome:
        reports = run.reports()
        if job.mutant is None:
            verdict = "passed" if code == 0 else "failed"
            detail = run.summary() if code == 0 else run.output()[-5000:]
            return Outcome(job.name, verdict, detail, run.seconds())
        unimportable = [
            error for error in reports["errors"] if error.startswith("import ")
        ]
        if unimportable:
            verdict, detail = "error", "; ".join(unimportable)
        elif code == 0:
            verdict, detail = "survived", run.summary()
        elif reports["failed"]:
            verdict = "killed"
            detail = f"{run.summary()}: " + ", ".join(map(_short, reports["failed"]))
        elif code < 0:
            verdict, detail = "error", f"ended by signal {-code} (timed out?)"
        else:  # a crash, a collection error, a failing fixture: not a kill
            verdict, detail = "error", run.summary()
        if self.show_failures or verdict == "error":
            detail += "\n" + _failure_report(run.output())
        return Outcome(job.name, verdict, detail, run.seconds())


def edited_modules(mutant: Mutant) -> list[str]:
    """Return the dotted names of the Python modules the mutant edits."""
    return sorted(
        {
            edit.file.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            for edit in mutant.edits
            if edit.file.endswith(".py")
        }
    )


def compile_edits(mutant: Mutant, tree: Path) -> None:
    """Raise SyntaxError if an edited Python file no longer compiles.

    A mutant must break behaviour, not the build: a file that does not
    compile would fail whichever test imports it, which proves nothing.
    """
    for edit in mutant.edits:
        if edit.file.endswith(".py"):
            path = tree / edit.file
            compile(path.read_text(), str(path), "exec")


def _raise_keyboard_interrupt(number: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--jobs", type=int, default=2, help="test runs at once")
    parser.add_argument(
        "--show-failures",
        action="store_true",
        help="print the failing test's report under each killed mutant",
    )
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
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    databases = Databases(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
    with tempfile.TemporaryDirectory(prefix="outbox-mutants-") as directory:
        check = Check(Path(directory), databases, options.jobs, options.show_failures)
        try:
            copy_tree(check.base)
            check_imports_the_copy(check.base)
            migrate_template(check.base, databases)
            preload()
            return report(check, mutants)
        except KeyboardInterrupt:
            print("stopped: the runs in flight were killed and their databases dropped")
            return 130
        finally:
            check.stop_all()
            databases.drop_all()


def report(check: Check, mutants: Sequence[Mutant]) -> int:
    """Run the baseline, then the mutants; print a line for each; return 0 or 1."""
    width = max(len(mutant.name) for mutant in mutants)
    baseline_jobs = check.baseline(mutants)
    baseline = list(check.run(baseline_jobs))
    failed = [outcome for outcome in baseline if outcome.verdict != "passed"]
    tests = sum(len(job.tests) for job in baseline_jobs)
    print(
        f"{'baseline':<9}  {tests} tests in {len(baseline)} files on the unmutated "
        f"code: {len(baseline) - len(failed)} files passed "
        f"({max(outcome.seconds for outcome in baseline):.0f}s)",
        flush=True,
    )
    for outcome in failed:
        print(f"failed     {outcome.name}\n{outcome.detail}")
    if failed:
        print("the baseline failed: a kill would prove nothing")
        return 1
    jobs = [Job(mutant.name, mutant.tests, mutant) for mutant in mutants]
    outcomes = []
    for outcome in check.run(jobs):
        outcomes.append(outcome)
        print(
            f"{outcome.verdict:<9}  {outcome.name:<{width}}  "
            f"{outcome.seconds:5.1f}s  {outcome.detail}",
            flush=True,
        )
    alive = [outcome.name for outcome in outcomes if outcome.verdict != "killed"]
    print(
        f"{len(outcomes) - len(alive)} of {len(outcomes)} mutants killed"
        + (f"; not killed: {', '.join(alive)}" if alive else "")
    )
    return 1 if alive else 0


if __name__ == "__main__":
    sys.exit(main())
