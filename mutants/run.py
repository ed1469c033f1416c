"""Run the mutant check: every named broken variant must make a test fail.

    python mutants/run.py [--jobs 2] [NAME ...]

Each mutants/<name>.toml describes one broken variant of the code: a short
description, one or more textual edits (each `find` must occur exactly once
in its file, so a mutant whose code moved is reported as stale rather than
silently testing nothing) and the tests expected to catch it. The check
copies the tree (the files git knows, tracked or not ignored), runs all the
listed tests on the unmutated copy (they must pass, or a "kill" would prove
nothing), and applies each mutant to a fresh copy and runs its tests. A
mutant is killed when a test fails; it survives when they pass. A run that
errors out (collection error, test not found, crash) is reported as an
error, not as a kill. The command prints one line per mutant and exits 1
unless every mutant was killed and the unmutated run passed.

Two things keep a run short. The check imports the third-party modules the
tests need once and forks every test run from there. And on PostgreSQL it
migrates one test database from the unmutated code and gives each run a copy
(CREATE DATABASE ... TEMPLATE), so a mutant may change code but not models
or migrations.
"""

import argparse
import importlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "mutants"
#: pytest's exit status when tests ran and at least one failed.
TESTS_FAILED = 1
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

    def _execute(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(statement)

    def copy(self, name: str) -> str | None:
        """Create a copy of the template; return its name (None: no copies)."""
        if not self.enabled:
            return None
        database = f"{self.template}_{name.replace('-', '_')}"[:63]
        self._execute(f'CREATE DATABASE "{database}" TEMPLATE "{self.template}"')
        self.created.add(database)
        return database

    def drop(self, database: str | None) -> None:
        if database is not None:
            self._execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            self.created.discard(database)

    def drop_all(self) -> None:
        for database in [*self.created, self.template]:
            self.drop(database)


@dataclass
class TestRun:
    """A pytest run forked into a copy of the tree; its output goes to a file."""

    name: str
    tree: Path
    tests: Sequence[str]
    database: str | None = None
    started: float = 0.0
    pid: int = 0

    @property
    def output_file(self) -> Path:
        return self.tree.with_name(self.tree.name + ".out")

    def start(self) -> None:
        self.started = time.monotonic()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            code = 3
            try:
                code = self._run_in_child()
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def _run_in_child(self) -> int:
        output = os.open(self.output_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.chdir(self.tree)
        # The copy's code, here and in the worker processes the tests start.
        sys.path.insert(0, str(self.tree))
        os.environ["PYTHONPATH"] = str(self.tree)
        os.environ.pop("COVERAGE_PROCESS_START", None)
        sys.dont_write_bytecode = True
        arguments = ["-x", "-q", "--no-header"]
        # Preloaded plugins were imported before pytest could rewrite their
        # asserts, which matters only to tests of those plugins.
        arguments += ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
        if self.database is not None:
            os.environ["OUTBOX_TEST_DATABASE"] = self.database  # tests/conftest.py
            arguments.append("--reuse-db")
        import pytest

        return int(pytest.main([*arguments, *self.tests]))

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)

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


class Check:
    """Run the baseline and the mutants, jobs at a time, in one process.

    The parent stays single-threaded, so forking it is safe.
    """

    def __init__(
        self, scratch: Path, databases: Databases, jobs: int, show_failures: bool
    ) -> None:
        self.show_failures = show_failures
        self.scratch = scratch
        self.base = scratch / "base"
        self.databases = databases
        self.jobs = jobs

    def run(self, mutants: Sequence[Mutant]) -> Iterator[Outcome]:
        """Yield the baseline's outcome and each mutant's, as they end."""
        tests = sorted({test for mutant in mutants for test in mutant.tests})
        waiting: list[Mutant | None] = [None, *mutants]  # None: the baseline
        running: dict[int, TestRun] = {}
        while waiting or running:
            while waiting and len(running) < self.jobs:
                prepared = self._prepare(waiting.pop(0), tests)
                if isinstance(prepared, Outcome):
                    yield prepared
                    continue
                prepared.start()
                running[prepared.pid] = prepared
            if running:
                yield self._collect(running)

    def _prepare(self, mutant: Mutant | None, tests: list[str]) -> TestRun | Outcome:
        """Return the test run of a mutant (or the baseline), or why there is none."""
        if mutant is None:
            name, tree = "baseline", self.scratch / "baseline"
            shutil.copytree(self.base, tree, symlinks=True)
            return TestRun(name, tree, tests, self.databases.copy(name))
        tree = self.scratch / mutant.name
        shutil.copytree(self.base, tree, symlinks=True)
        try:
            apply(mutant, tree)
        except StaleMutantError as error:
            return Outcome(mutant.name, "stale", str(error), 0.0)
        return TestRun(
            mutant.name, tree, mutant.tests, self.databases.copy(mutant.name)
        )

    def _collect(self, running: dict[int, TestRun]) -> Outcome:
        pid, status = os.wait()
        run = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        self.databases.drop(run.database)
        shutil.rmtree(run.tree, ignore_errors=True)
        if run.name == "baseline":
            if code == 0:
                detail = f"{run.summary()} on the unmutated code"
            else:
                detail = run.output()[-5000:]
            verdict = "passed" if code == 0 else "failed"
            return Outcome(run.name, verdict, detail, run.seconds())
        verdict = {0: "survived", TESTS_FAILED: "killed"}.get(code, "error")
        detail = run.summary()
        if self.show_failures or verdict == "error":
            detail += "\n" + _failure_report(run.output())
        return Outcome(run.name, verdict, detail, run.seconds())


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
    databases = Databases(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
    width = max(len(mutant.name) for mutant in mutants)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="outbox-mutants-") as directory:
        check = Check(Path(directory), databases, options.jobs, options.show_failures)
        copy_tree(check.base)
        check_imports_the_copy(check.base)
        try:
            migrate_template(check.base, databases)
            preload()
            for outcome in check.run(mutants):
                outcomes.append(outcome)
                print(
                    f"{outcome.verdict:<9}  {outcome.name:<{width}}  "
                    f"{outcome.seconds:5.1f}s  {outcome.detail}",
                    flush=True,
                )
        finally:
            databases.drop_all()
    failures = [o for o in outcomes if o.verdict not in ("killed", "passed")]
    killed = sum(outcome.verdict == "killed" for outcome in outcomes)
    print(
        f"{killed} of {len(mutants)} mutants killed"
        + (f"; not killed: {', '.join(o.name for o in failures)}" if failures else "")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
