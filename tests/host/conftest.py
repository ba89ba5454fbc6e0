"""Fixtures of the host tier: memfd daemons as real processes, on short socket paths."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import primed
from tests.support import Daemon, StartDaemon, short_dir, start_daemon

__all__ = ["StartDaemon"]  # for test modules that import it from here


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose socket paths fit in sun_path."""
    directory, made = short_dir(tmp_path)
    try:
        yield directory
    finally:
        if made:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def spawn(sock_dir: Path) -> Iterator[StartDaemon]:
    """Start memfd daemons (``spawn(*serve_args, name=...)``); each must stop cleanly."""
    started: list[Daemon] = []

    def start(
        *args: str, name: str = "primed.sock", via_env: bool = False, nofile: int | None = None
    ) -> Daemon:
        path = sock_dir / name
        daemon = start_daemon(path, "--backend", "memfd", *args, via_env=via_env, nofile=nofile)
        started.append(daemon)
        return daemon

    yield start
    failures = []
    for daemon in started:
        try:
            daemon.stop()
        except AssertionError as e:
            failures.append(e)
    if failures:
        raise failures[0]


@pytest.fixture(scope="session")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One memfd daemon for the tests that don't stop it or count its fds.

    Every test may abuse it; it must still exit 0 on SIGTERM at the end.
    """
    directory, made = short_dir(tmp_path_factory.mktemp("shared"))
    daemon = start_daemon(directory / "primed.sock", "--backend", "memfd")
    try:
        yield daemon
    finally:
        try:
            daemon.stop()
        finally:
            if made:
                shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def client(shared: Daemon) -> Iterator[primed.Client]:
    """A blocking client of the shared daemon."""
    with primed.connect(shared.socket, name="host tests") as connected:
        yield connected
