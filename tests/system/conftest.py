"""The system tier: primed installed as the README says, under a real systemd as PID 1.

It runs as root inside the VM that scripts/systemd-vm boots, with Debian's
python3 and pytest and nothing of the host's: the README's install section,
taken from README.md, builds /opt/primed from a copy of the repository. The
user-side checks run as unprivileged users (setpriv, with their groups) and
use that installed primed. Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
#: Where the README's commands run: a writable copy ("a clone of this repository").
CLONE = Path("/root/primed")
HEADING = "## Install as a system service"
PYTHON = "/opt/primed/bin/python"
CONFIG = Path("/etc/primed/primed.toml")
SOCKET = "/run/primed/primed.sock"
#: The users: their supplementary groups.
USERS = {"alice": ["primed"], "bob": ["video"], "carol": ["primed", "render"]}


def install_commands(readme: str) -> list[str]:
    """The first indented block of the README's install section, one command a line."""
    section = readme.split(f"\n{HEADING}\n", 1)[1].split("\n## ", 1)[0]
    commands: list[str] = []
    for line in section.splitlines():
        if line.startswith("    "):
            commands.append(line[4:])
        elif commands and line.strip():
            break
    return commands


def run(
    *command: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{command}: exit {done.returncode}\n{done.stdout}{done.stderr}")
    return done


def as_user(user: str, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``command`` as ``user`` with the groups /etc/group gives them, as at a login."""
    return run(
        "setpriv",
        f"--reuid={user}",
        f"--regid={user}",
        "--init-groups",
        "--reset-env",
        *command,
        check=False,
        timeout=timeout,
    )


def python_as(user: str, code: str, *args: str) -> object:
    """Run ``code`` as ``user`` with the installed primed; it prints one JSON value."""
    done = as_user(user, PYTHON, "-c", code, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def show(unit: str, prop: str) -> str:
    return run("systemctl", "show", "-P", prop, unit).stdout.strip()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.1)


class Journal:
    """primed.service's journal entries from the moment this was made."""

    def __init__(self) -> None:
        shown = run("journalctl", "-n", "1", "-o", "cat", "--show-cursor", "-q").stdout
        found = re.search(r"-- cursor: (\S+)", shown)
        self.cursor = found[1] if found else None

    def entries(self) -> list[dict[str, str]]:
        args = ["journalctl", "-u", "primed.service", "-o", "json", "--no-pager"]
        if self.cursor:
            args.append(f"--after-cursor={self.cursor}")
        return [json.loads(line) for line in run(*args).stdout.splitlines() if line]

    def messages(self) -> list[str]:
        return [str(entry.get("MESSAGE", "")) for entry in self.entries()]

    def wait(self, text: str, timeout: float = 30.0) -> dict[str, str]:
        """The first entry whose message holds ``text``, waited for."""
        found: list[dict[str, str]] = []

        def seen() -> bool:
            found[:] = [e for e in self.entries() if text in str(e.get("MESSAGE", ""))]
            return bool(found)

        wait_for(seen, f"{text!r} in primed's journal", timeout)
        return found[0]


@pytest.fixture(scope="session")
def installed() -> Iterator[dict[str, float]]:
    """The README's install commands, run as written in a copy of the repository."""
    commands = install_commands((REPO / "README.md").read_text())
    assert commands, f"no commands under {HEADING!r}"
    shutil.rmtree(CLONE, ignore_errors=True)
    shutil.copytree(REPO, CLONE, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__"))
    start = time.monotonic()
    done = subprocess.run(
        ["bash", "-euxo", "pipefail", "-c", "\n".join(commands)],
        cwd=CLONE,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    took = time.monotonic() - start
    print(f"the README's install section took {took:.0f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    for user, groups in USERS.items():
        run("useradd", "--create-home", "--groups", ",".join(groups), user)
    yield {"seconds": took, "commands": len(commands)}


def restart_with(text: str | bytes | None = None) -> None:
    """Stop primed.service (the socket stays), with ``text`` as its configuration file."""
    run("systemctl", "stop", "primed.service")
    if isinstance(text, bytes):
        CONFIG.write_bytes(text)
    elif text is not None:
        CONFIG.write_text(text)


@pytest.fixture
def example_config() -> Iterator[None]:
    """Puts the shipped configuration file back after the test."""
    yield
    shutil.copy(CLONE / "systemd" / "primed.toml", CONFIG)
    os.chmod(CONFIG, 0o644)
