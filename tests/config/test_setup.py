"""`make test` sets up what the suite needs, or says at once what to run.

scripts/install-chromium runs with fake `id` and `apt-get` first on PATH, so
both branches are exercised without root and without touching the machine.
"""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium"


def fake_command(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


class FakeMachine:
    """A PATH whose `id` answers a chosen uid and whose `apt-get` logs its calls.

    The fake `apt-get install` creates the Chromium file, unless APT_BREAKS is set.
    """

    def __init__(self, directory: Path) -> None:
        self.bin = directory / "bin"
        self.bin.mkdir()
        self.chromium = directory / "chromium"
        self.log = directory / "apt.log"
        fake_command(
            self.bin,
            "apt-get",
            f'echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND apt-get $*" >> {self.log}\n'
            f'if [ "$1" = install ] && [ -z "$APT_BREAKS" ]; then\n'
            f"    touch {self.chromium} && chmod +x {self.chromium}\n"
            "fi",
        )

    def install_chromium(
        self, *, uid: int, **variables: str
    ) -> subprocess.CompletedProcess[str]:
        fake_command(self.bin, "id", f"echo {uid}")
        return subprocess.run(
            [ROOT / "scripts" / "install-chromium", self.chromium],
            env={"PATH": f"{self.bin}:/usr/bin:/bin", **variables},
            capture_output=True,
            text=True,
            timeout=30,
        )

    def apt_calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def machine(tmp_path) -> FakeMachine:
    return FakeMachine(tmp_path)


def test_install_chromium__does_nothing_when_it_is_there(machine) -> None:
    machine.chromium.touch(mode=0o755)

    result = machine.install_chromium(uid=0)

    assert result.returncode == 0, result.stderr
    assert machine.apt_calls() == []


def test_install_chromium__as_a_user_stops_with_the_command_to_run(machine) -> None:
    result = machine.install_chromium(uid=1000)

    assert result.returncode == 1
    assert f"sudo sh -c '{INSTALL}'" in result.stderr
    assert machine.apt_calls() == []


def test_install_chromium__as_root_installs_it_with_apt(machine) -> None:
    result = machine.install_chromium(uid=0)

    assert result.returncode == 0, result.stderr
    assert machine.apt_calls() == [
        "DEBIAN_FRONTEND= apt-get update",
        "DEBIAN_FRONTEND=noninteractive apt-get install -y chromium",
    ]
    assert os.access(machine.chromium, os.X_OK)


def test_install_chromium__fails_if_apt_leaves_it_missing(machine) -> None:
    result = machine.install_chromium(uid=0, APT_BREAKS="1")

    assert result.returncode == 1
    assert "still missing" in result.stderr


def make_dry_run(*targets: str, tmp_path: Path) -> list[str]:
    make = shutil.which("make")
    assert make is not None, "make is missing"
    # Run from make test itself, the child would inherit its flags and level.
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    }
    result = subprocess.run(
        [make, "--dry-run", "--no-print-directory", *targets, f"VENV={tmp_path}"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.strip()]


def test_make_test__installs_chromium_before_anything_else(tmp_path) -> None:
    commands = make_dry_run("test", tmp_path=tmp_path)

    assert commands[0] == 'scripts/install-chromium "/usr/bin/chromium"'


def test_make_test__runs_the_deploy_check_at_warning_level(tmp_path) -> None:
    commands = "\n".join(make_dry_run("test", tmp_path=tmp_path))

    assert "manage.py check --deploy --fail-level WARNING" in commands
    assert "secrets.token_urlsafe(50)" in commands
