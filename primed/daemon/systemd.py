"""systemd's service protocols, spoken directly (no libsystemd): sd_notify, socket
activation and the watchdog, as sd_notify(3), sd_listen_fds(3) and
sd_watchdog_enabled(3) describe them.

Each function reads the environment systemd set for this process and does
nothing when it is absent, so the daemon runs the same with or without systemd.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable
from types import TracebackType

import trio

from primed.errors import PrimedError

log = logging.getLogger("primed")

#: The first fd systemd passes (sd_listen_fds(3)).
LISTEN_FDS_START = 3


class ActivationError(PrimedError):
    """systemd passed fds this daemon cannot serve on."""


def _pid_matches(variable: str) -> bool | None:
    """Whether $variable names this process; None if it is unset."""
    value = os.environ.get(variable)
    if value is None:
        return None
    return value.isdigit() and int(value) == os.getpid()


def listen_fds(unset: bool = True) -> list[tuple[int, str]]:
    """The fds socket activation passed to this process, each with its name.

    Empty when LISTEN_FDS is unset or LISTEN_PID names another process (the
    variables were inherited, not meant for us). Each fd is made close-on-exec.
    With ``unset`` the variables are removed, so no child inherits them.
    Raises ActivationError if LISTEN_FDS is not a count.
    """
    count = os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES", "")
    ours = _pid_matches("LISTEN_PID")
    if unset:
        for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(variable, None)
    if count is None or not ours:
        return []
    if not count.isdigit():
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number of fds")
    given = names.split(":") if names else []
    found = []
    for index in range(int(count)):
        fd = LISTEN_FDS_START + index
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        found.append((fd, given[index] if index < len(given) else "unknown"))
    return found


def activated_listener() -> socket.socket | None:
    """The listening socket systemd passed, or None if this process was not socket-activated.

    primed serves one socket: exactly one fd must come, a listening AF_UNIX
    SOCK_SEQPACKET socket (``ListenSequentialPacket=``). Raises ActivationError
    otherwise, naming what came.
    """
    fds = listen_fds()
    if not fds:
        return None
    if len(fds) != 1:
        shown = ", ".join(f"fd {fd} ({name})" for fd, name in fds)
        raise ActivationError(f"systemd passed {len(fds)} fds, expected one socket: {shown}")
    fd, name = fds[0]
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise ActivationError(f"fd {fd} ({name}) is not a socket: {e.strerror}") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET or not listening:
            raise ActivationError(
                f"fd {fd} ({name}) is not a listening AF_UNIX SOCK_SEQPACKET socket "
                f"({sock.family.name}, {sock.type.name}, "
                f"{'listening' if listening else 'not listening'}): "
                "use ListenSequentialPacket= in the socket unit"
            )
    except BaseException:
        sock.close()
        raise
    log.info("socket activation: fd %d (%s) listens on %s", fd, name, sock.getsockname())
    return sock


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds (WatchdogSec=), or None if no watchdog is asked for
    (WATCHDOG_USEC unset or not positive, or WATCHDOG_PID names another process)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0 or _pid_matches("WATCHDOG_PID") is False:
        return None
    return int(usec) / 1_000_000


class Notifier:
    """Sends sd_notify messages to $NOTIFY_SOCKET; does nothing if it is unset.

    The address is a path, or an abstract socket written with a leading '@'.
    A message that can't be sent is logged, never raised: systemd's state is
    not worth the daemon's life.
    """

    #: How long a send may wait for room in systemd's queue.
    TIMEOUT = 1.0

    def __init__(self, address: str | None):
        self.address: str | None = None
        self._sock: socket.socket | None = None
        if not address:
            return
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        else:
            log.warning("NOTIFY_SOCKET=%r: not a path or an abstract address; ignored", address)
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(self.TIMEOUT)

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` ("READY=1", "STATUS=...") as one message; True if it was sent."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            log.warning("sd_notify %s: %s", fields[0].partition("=")[0], e)
            return False
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd match this reload to the one it asked for.
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    async def heartbeat(self, status: Callable[[], str], watchdog: float | None) -> None:
        """Until cancelled: WATCHDOG=1 every half ``watchdog`` seconds (as sd_watchdog_enabled(3)
        advises), and STATUS= whenever ``status()`` has changed since it was last sent."""
        if self._sock is None:
            return
        period = watchdog / 2 if watchdog else 5.0
        last = status()
        deadline = trio.current_time()
        while True:
            deadline += period
            await trio.sleep_until(deadline)
            fields = ["WATCHDOG=1"] if watchdog else []
            now = status()
            if now != last:
                fields.append(f"STATUS={now}")
                last = now
            if fields:
                self.notify(*fields)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
