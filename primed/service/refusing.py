"""Serving a socket systemd passed while primed can't start: every client is told why.

A socket-activated daemon that exits at start (a bad configuration file, a
card node that won't open) does not stop systemd: the client still waiting in
the socket's queue makes systemd start it again at once, until the start limit
fails the socket unit and removes its file. So ``primed serve``, when it was
socket-activated and can't start, serves the socket in this refusing mode
instead: each client that connects gets, at once and unasked, one ERROR
(serial 0, code INTERNAL) whose text says what is wrong and where, and is hung
up on; systemd hears READY=1 with a STATUS= saying the same, and the watchdog
is fed. SIGHUP (``systemctl reload primed``) ends the mode so that the caller
can try again; SIGTERM ends it for good.
"""

from __future__ import annotations

import functools
import logging
import signal
import socket

import trio

from primed import fdpass
from primed.daemon import process, systemd, transport
from primed.daemon.ratelimit import LogLimiter, held_note
from primed.errors import ErrorCode
from primed.wire import protocol

log = logging.getLogger("primed")

#: Seconds one refused client may take to be told and hung up on.
TELL_TIMEOUT = 1.0


def message(problem: str) -> str:
    """What a refused client reads: the problem, and what mends it."""
    return f"primed can't serve: {problem}; mend that, then run: systemctl reload primed"


async def _tell(sock: trio.socket.SocketType, *, text: bytes, limiter: LogLimiter) -> None:
    held = limiter.allow(-1, "refusing")  # a client reconnecting in a loop: a few lines
    if held is not None:
        log.info("telling a client that primed can't serve, then hanging up%s", held_note(held))
    with sock, trio.move_on_after(TELL_TIMEOUT):
        try:
            await sock.send(text)
            await fdpass.hang_up(sock)  # so that the client reads our ERROR first
        except OSError:
            pass  # the client went first: nothing to tell


async def refuse(listener: socket.socket, problem: str) -> bool:
    """Refuse every client on ``listener`` (a listening socket systemd passed) with
    ``problem``, until SIGHUP (returns True: try to start again) or SIGTERM or SIGINT
    (returns False). ``listener`` stays open and listening for the caller."""
    status = f"refusing clients: {problem}; mend that, then run: systemctl reload primed"
    text = protocol.encode(protocol.Error(ErrorCode.INTERNAL, 0, message(problem)), 0)
    fdpass.refuse_rights(listener)
    process.ignore_stray_reloads()
    with (
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
        systemd.Notifier.from_environment() as notifier,
        # A duplicate, closed on the way out; the caller serves on the original.
        trio.socket.from_stdlib_socket(listener.dup()) as sock,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                transport.accept_loop,
                sock,
                functools.partial(_tell, text=text, limiter=LogLimiter()),
            )
            log.warning("refusing clients until a reload (SIGHUP) mends this: %s", problem)
            notifier.ready(status)
            nursery.start_soon(notifier.heartbeat, lambda: status, systemd.watchdog_interval())
            async for signum in signals:
                nursery.cancel_scope.cancel()
                if signum == signal.SIGHUP:
                    # The READY=1 that ends this reload comes from whoever serves next.
                    notifier.reloading()
                    log.info("SIGHUP: trying to start again")
                    return True
                log.info("%s: stopping", signal.Signals(signum).name)
                notifier.stopping()
                return False
    raise AssertionError("the signal receiver ended")  # pragma: no cover
