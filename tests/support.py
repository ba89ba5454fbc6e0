"""Helpers shared by the host tier and the kernel tier: the daemon and its clients
as real processes, and the fds a process holds as /proc shows them.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

#: sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107


def short_dir(directory: Path, room: int = 24) -> tuple[Path, bool]:
    """``directory`` if a socket name of ``room`` bytes fits in it, else a new directory
    under /tmp; the flag says whether it is new (and the caller's to remove)."""
    if len(os.fsencode(directory)) + 1 + room <= MAX_SOCKET_PATH:
        return directory, False
    return Path(tempfile.mkdtemp(prefix="primed-", dir="/tmp")), True


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def can_connect(path: str) -> bool:
    """Whether something accepts SOCK_SEQPACKET connections on ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


class Daemon:
    """A ``primed serve`` process. Its output goes to an unnamed file, not a pipe that
    nobody reads, so it can never block on logging."""

    def __init__(self, process: subprocess.Popen[bytes], socket_path: str, log: IO[bytes]):
        self.process = process
        self.socket = socket_path
        self._log = log
        self._stopped: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        if self._stopped is not None:
            return self._stopped
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, signum: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> str:
        """Send ``signum``; assert the daemon exits 0 and removes its socket. Returns its log.

        Calling it again returns the same log.
        """
        if self._stopped is not None:
            return self._stopped
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"daemon ignored {signum.name} for {timeout} s:\n{self.log()}"
            ) from None
        log = self._finish()
        assert code == 0, f"daemon exited with {code}:\n{log}"
        assert not os.path.lexists(self.socket), f"daemon left {self.socket} behind:\n{log}"
        return log

    def kill(self) -> str:
        """SIGKILL (no cleanup happens); returns the log."""
        if self._stopped is None:
            self.process.kill()
            self.process.wait()
            self._finish()
        return self.log()

    def _finish(self) -> str:
        text = self.log()
        self._stopped = text
        self._log.close()
        return text


#: A fixture's way to start daemons: ``start(*serve_args, name=..., via_env=...)``.
StartDaemon = Callable[..., Daemon]


def start_daemon(
    path: str | os.PathLike[str],
    *args: str,
    nofile: int | None = None,
    env: Mapping[str, str] | None = None,
    via_env: bool = False,
    timeout: float = 15.0,
) -> Daemon:
    """Run ``python -m primed serve ARGS --socket PATH`` and wait until it accepts clients.

    ``nofile`` sets the daemon's RLIMIT_NOFILE; ``via_env`` passes PATH in
    $PRIMED_SOCKET instead of --socket. Fails with the daemon's output if it
    exits before it listens, or if something already listens on ``path``.
    """
    socket_path = os.fspath(path)
    assert len(os.fsencode(socket_path)) <= MAX_SOCKET_PATH, f"socket path too long: {path}"
    assert not can_connect(socket_path), f"something already listens on {socket_path}"

    def limit() -> None:
        assert nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    environ = dict(os.environ if env is None else env)
    where = ["--socket", socket_path]
    if via_env:
        environ["PRIMED_SOCKET"], where = socket_path, []
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the Daemon closes it)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "primed", "serve", *args, *where],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
            preexec_fn=limit if nofile is not None else None,  # noqa: PLW1509 (no threads here)
        )
    except BaseException:
        log.close()
        raise
    daemon = Daemon(process, socket_path, log)
    deadline = time.monotonic() + timeout
    while not can_connect(socket_path):
        if process.poll() is not None:
            raise AssertionError(
                f"daemon exited with {process.returncode} before listening:\n{daemon.kill()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"daemon not listening after {timeout} s:\n{daemon.kill()}")
        time.sleep(0.01)
    return daemon


def open_fds(pid: int) -> dict[int, str]:
    """The fds process ``pid`` holds, each with what it refers to (``socket:[123]``, a path)."""
    found = {}
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        try:
            found[int(name)] = os.readlink(os.path.join(directory, name))
        except FileNotFoundError:  # closed while we looked
            continue
    return found


def count_fds(pid: int) -> int:
    """How many fds process ``pid`` holds."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` so far (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settled_fds(pid: int, quiet: float = 0.2, timeout: float = 10.0) -> int:
    """The fd count of ``pid`` once it has not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = count_fds(pid), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise AssertionError(f"fd count of {pid} never settled: {open_fds(pid)}")
        time.sleep(0.01)
        now = count_fds(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last


def wait_for_fds(pid: int, expected: int, timeout: float = 10.0) -> None:
    """Wait until ``pid`` holds exactly ``expected`` fds; fail listing them if it never does."""
    deadline = time.monotonic() + timeout
    while count_fds(pid) != expected:
        if time.monotonic() > deadline:
            held = open_fds(pid)
            raise AssertionError(f"pid {pid} holds {len(held)} fds, expected {expected}: {held}")
        time.sleep(0.01)


def client_command(code: str, *args: str) -> list[str]:
    """The argv that runs Python ``code`` in a new interpreter, with ``args`` in sys.argv[1:]."""
    return [sys.executable, "-c", code, *args]


def run_client(
    code: str,
    *args: str,
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> str:
    """Run Python ``code`` as a separate client process; assert it exits 0; return its stdout."""
    done = subprocess.run(
        client_command(code, *args),
        check=False,
        pass_fds=pass_fds,
        env=None if env is None else dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"client exited with {done.returncode}:\n{done.stderr}"
    return done.stdout


def spawn_client(code: str, *args: str, pass_fds: Sequence[int] = ()) -> subprocess.Popen[str]:
    """Start Python ``code`` as a client process with pipes for stdin and stdout; the
    caller waits for it."""
    return subprocess.Popen(
        client_command(code, *args),
        pass_fds=pass_fds,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
