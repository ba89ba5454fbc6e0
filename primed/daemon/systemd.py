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

    Sending never waits: the socket is non-blocking, because a send that waited
    for room in systemd's queue would stall every task of the event loop. A
    message that can't go at once is dropped and counted in :attr:`dropped`; the
    first of a run of failures is logged, and so is the send that ends the run.
    sd_notify(3) lets a service lose these, with one exception kept here:
    READY=1, whose loss would make systemd kill a Type=notify service at
    TimeoutStartSec=. A READY=1 that can't go is kept, and :meth:`heartbeat`
    tries it again (10 ms, then backing off to 1 s) until it goes or a newer one
    replaces it; messages sent meanwhile are dropped, so none overtakes it.
    STOPPING=1 is dropped like any other: systemd learns of the stop when the
    process exits.
    """

    #: The first wait before a kept READY=1 is tried again, and the longest.
    RETRY_FIRST = 0.01
    RETRY_MAX = 1.0

    def __init__(self, address: str | None):
        self.address: str | None = None
        self._sock: socket.socket | None = None
        #: Messages dropped so far.
        self.dropped = 0
        self._failing = False  # within a run of failed sends, logged at its start
        self._kept: bytes | None = None  # a READY=1 message not yet sent
        self._woken = trio.Event()  # set when a READY=1 is kept, for heartbeat
        if not address:
            return
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        else:
            log.warning("NOTIFY_SOCKET=%r: not a path or an abstract address; ignored", address)
            return
        self._sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def pending(self) -> bool:
        """Whether a READY=1 waits to be sent again."""
        return self._kept is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` ("READY=1", "STATUS=...") as one message at once; True if it
        was sent. Never waits; see the class for what happens to one that can't go."""
        if self._sock is None:
            return False
        message = "\n".join(fields).encode()
        ready = "READY=1" in fields
        if self._kept is not None and not ready and not self._retry():
            self.dropped += 1  # behind a READY=1 that still waits
            return False
        if self._send(message, fields[0].partition("=")[0]):
            if ready:
                self._kept = None
            return True
        if ready:
            self._kept = message
            self._woken.set()
        else:
            self.dropped += 1
        return False

    def _retry(self) -> bool:
        """Try the kept READY=1 once more; True once it is sent."""
        assert self._kept is not None
        if not self._send(self._kept, "READY"):
            return False
        self._kept = None
        return True

    def _send(self, message: bytes, what: str) -> bool:
        assert self._sock is not None and self.address is not None
        try:
            self._sock.sendto(message, self.address)
        except OSError as e:
            if not self._failing:
                self._failing = True
                log.warning(
                    "sd_notify %s: %s; notifications are dropped until systemd takes them "
                    "again (READY=1 is kept and retried)",
                    what,
                    e,
                )
            return False
        if self._failing:
            self._failing = False
            log.info(
                "sd_notify: systemd takes notifications again; %d dropped so far", self.dropped
            )
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
        advises), STATUS= whenever ``status()`` has changed since it was last sent, and a
        kept READY=1 again until it goes."""
        if self._sock is None:
            return
        period = watchdog / 2 if watchdog else 5.0
        last = status()
        beat = trio.current_time() + period
        backoff = self.RETRY_FIRST
        while True:
            wake = beat
            if self._kept is not None:
                wake = min(beat, trio.current_time() + backoff)
            with trio.move_on_at(wake):
                await self._woken.wait()
            if self._woken.is_set():  # a READY=1 was kept just now: try it at once
                self._woken = trio.Event()
                backoff = self.RETRY_FIRST
            elif self._kept is not None:
                backoff = min(backoff * 2, self.RETRY_MAX)
            if self._kept is not None and self._retry():
                backoff = self.RETRY_FIRST
            if trio.current_time() < beat:
                continue
            beat += period
            fields = ["WATCHDOG=1"] if watchdog else []
            now = status()
            if now != last:
                fields.append(f"STATUS={now}")
            # A STATUS= dropped is sent again at the next beat.
            if fields and self.notify(*fields):
                last = now

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
