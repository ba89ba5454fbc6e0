"""The daemon as a process: its socket, its signals, and what it tells systemd.

:func:`run` binds (or takes the socket systemd passed), serves it with a
:class:`~primed.daemon.transport.Daemon` until SIGTERM or SIGINT, reloads on
SIGHUP, and speaks sd_notify (READY, STATUS, RELOADING, STOPPING, WATCHDOG).
The rules live in :mod:`primed.daemon.core`, the socket work in
:mod:`primed.daemon.transport`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable

import trio

from primed import fdpass
from primed.daemon import systemd
from primed.daemon.policy import Policy
from primed.daemon.transport import HELLO_TIMEOUT, SEND_TIMEOUT, Daemon
from primed.formats import Limits
from primed.kernel.allocation import Allocators, BufferSource

log = logging.getLogger("primed")


def bind(path: str, mode: int = 0o660) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at ``path``, with permissions ``mode``.

    A stale socket file left by a daemon that died is replaced; a live one
    (something accepts connections on it) is an error, so that two daemons
    never fight over one path.
    """
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)
            else:
                raise FileExistsError(errno.EADDRINUSE, f"a daemon already listens on {path}")
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        # Set before listen() so accepted sockets inherit it before any fd is queued.
        fdpass.refuse_rights(sock)
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def ignore_stray_reloads() -> None:
    """Ignore SIGHUP wherever no loop is there to reload.

    Its default action kills the process, and a reload can be asked for at any time:
    while the daemon starts, after it leaves the refusing mode, while it stops. trio
    gives a signal still pending when its receiver closes back to the handler that was
    there before; with this, that handler ignores it.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def run(
    backend: BufferSource,
    path: str,
    *,
    limits: Limits | None = None,
    mode: int = 0o660,
    ready: Callable[[Daemon], None] | None = None,
    policy: Policy | None = None,
    reload: Callable[[], tuple[Limits, Policy]] | None = None,
    activated: socket.socket | None = None,
    send_timeout: float = SEND_TIMEOUT,
    raise_fd_limit: bool = True,
    hello_timeout: float = HELLO_TIMEOUT,
) -> None:
    """Serve on ``path`` until SIGTERM or SIGINT; free everything and remove the socket.

    ``activated`` is a socket systemd passed, already listening at ``path``: it is
    served and left in place. SIGHUP reloads (:meth:`Daemon.reload`). With
    $NOTIFY_SOCKET set, systemd hears READY=1, RELOADING=1, STOPPING=1, STATUS=
    and, with $WATCHDOG_USEC, WATCHDOG=1. With ``raise_fd_limit`` the soft
    RLIMIT_NOFILE is raised to the hard one; pass False where the service manager
    sets the limit (LimitNOFILE=) and it is to be kept. A connection that sends no
    HELLO within ``hello_timeout`` seconds is dropped. ``backend`` is one allocator or
    several (an :class:`Allocators`, whose first is the default); it is closed at the end.
    """
    daemon = Daemon(backend, limits, policy, reload, send_timeout, hello_timeout)
    reload_note = ""
    if raise_fd_limit:
        fdpass.raise_fd_limit()

    names = ", ".join(s.name for s in Allocators.of(backend).served)
    several = f" ({names})" if "," in names else ""

    def status() -> str:
        kind = backend.kind.name.lower()
        return f"serving {kind} buffers on {path}{several}: {daemon.summary()}{reload_note}"

    ignore_stray_reloads()
    with (
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
        systemd.Notifier.from_environment() as notifier,
    ):
        if activated is not None:
            fdpass.refuse_rights(activated)
        listener = trio.socket.from_stdlib_socket(activated or bind(path, mode))
        try:
            with listener:
                async with trio.open_nursery() as nursery:
                    await nursery.start(daemon.serve, listener)
                    log.info(
                        "serving %s buffers from %s (%s %d.%d.%d) on %s; allocators: %s",
                        backend.kind.name.lower(),
                        backend.node or "memfd",
                        backend.driver.name,
                        backend.driver.major,
                        backend.driver.minor,
                        backend.driver.patch,
                        path,
                        names,
                    )
                    notifier.ready(status())
                    nursery.start_soon(notifier.heartbeat, status, systemd.watchdog_interval())
                    if ready is not None:
                        ready(daemon)
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            notifier.reloading()
                            ok = daemon.reload()
                            reload_note = "" if ok else "; last reload refused, see the log"
                            notifier.ready(status())
                            continue
                        log.info("%s: stopping", signal.Signals(signum).name)
                        notifier.stopping()
                        nursery.cancel_scope.cancel()
                        break
        finally:
            try:
                if activated is None:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            backend.close()
    log.info("stopped")
