"""The daemon's transport: it moves datagrams and fds between clients and the core, and keeps time.

Theory of operation. One task per client connection. The task reads one
datagram, closes any fds it carried (no request carries any), hands the bytes
to the core (:mod:`primed.daemon.core`) and carries out the outcome, then
reads the next: a client's requests are answered in order, one at a time.

A client can't hold up the others, nor use up the daemon's allowance of fds in
flight (charged to the daemon's user): a reply carrying fds waits while the
client has more than :data:`QUEUED_BYTES` unread, and a client whose reply
can't be sent within the send timeout is dropped. Every fd the core exports is
sent with SCM_RIGHTS and closed here at once, whatever happened to the send.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import socket
import struct
import termios
from collections.abc import Awaitable, Callable

import trio

from primed import fdpass
from primed.daemon.core import Core, Delivery, Outcome
from primed.daemon.lean import LeanSocket
from primed.daemon.policy import Peer, Policy
from primed.daemon.sessions import Session
from primed.errors import KernelError, PrimedError, RemoteProtocolError
from primed.formats import Limits
from primed.kernel.allocation import BufferSource
from primed.wire import protocol
from primed.wire.protocol import Reply

log = logging.getLogger("primed")

_BACKOFF_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_PEERCRED = struct.Struct("3i")
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Seconds a reply may wait for a client that does not read before it is dropped.
SEND_TIMEOUT = 10.0
#: Unread bytes (the kernel's accounting: about 768 per small reply, 21 KiB per
#: reply of 253 fds) past which a reply that carries fds waits for the client to read.
QUEUED_BYTES = 16384


class _Drop(Exception):
    """End this client's connection (after the reply already queued)."""


def _unread(sock: trio.socket.SocketType) -> int:
    """Bytes this end sent that the peer has not read yet (SIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int.from_bytes(raw, "little", signed=True)


class Daemon:
    """The core (buffers, sessions and every rule) served over a listening socket."""

    def __init__(
        self,
        backend: BufferSource,
        limits: Limits | None = None,
        policy: Policy | None = None,
        reload: Callable[[], tuple[Limits, Policy]] | None = None,
        send_timeout: float = SEND_TIMEOUT,
    ):
        """``policy`` says who may connect and what each may hold; ``reload`` (called on
        SIGHUP) returns new limits and policy, or raises PrimedError to keep the old ones.
        A client whose reply can't be sent within ``send_timeout`` seconds is dropped."""
        self.core = Core(backend, limits, policy)
        self.backend = backend
        self.send_timeout = send_timeout
        self._reload = reload

    def summary(self) -> str:
        """One line on what the daemon holds now."""
        return self.core.summary()

    def reload(self) -> bool:
        """Take new limits and policy from the reload hook; on failure keep the old ones.

        Connected clients stay; the new rules apply from their next request (and
        to who may connect from the next connection).
        """
        if self._reload is None:
            log.info("reload: nothing to reload")
            return False
        try:
            limits, policy = self._reload()
        except PrimedError as e:
            log.error("reload refused, the running configuration stays: %s", e)
            return False
        self.core.configure(limits, policy)
        log.info("reloaded; %d client(s) stay connected", len(self.core.sessions))
        return True

    async def serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept clients on ``listener`` until cancelled."""
        await accept_loop(listener, self._serve_lean, task_status=task_status)

    async def _serve_lean(self, sock: trio.socket.SocketType) -> None:
        await self.serve_client(LeanSocket(sock))

    async def serve_client(self, sock: trio.socket.SocketType) -> None:
        """Serve one connected client until it goes, is dropped, or this is cancelled;
        ``sock`` is closed at the end."""
        with sock:
            try:
                peer = credentials(sock)
            except OSError:
                return
            refusal = self.core.refusal(peer)
            if refusal is not None:
                with trio.move_on_after(self.send_timeout):
                    try:
                        await self._send(sock, refusal.reply, refusal.serial)
                        await fdpass.hang_up(sock)
                    except (OSError, _Drop):
                        pass
                return
            session = self.core.connect(peer)
            try:
                await self._converse(sock, session)
            except _Drop:
                pass
            except OSError as e:
                log.info("%s: connection failed: %s", session, e)
            except Exception:  # a bug must cost one connection, never the daemon
                log.exception("%s: internal error; disconnecting it", session)
            finally:
                self.core.disconnect(session)

    async def _converse(self, sock: trio.socket.SocketType, session: Session) -> None:
        core = self.core
        while True:
            outcome: Outcome
            try:
                data, fds = await fdpass.recv_async(sock)
            except RemoteProtocolError as e:  # truncated: what arrived was closed
                outcome = core.bad_message(session, e)
            else:
                if not data and not fds:
                    return  # end of stream
                if fds:  # no request carries any; the header's count is checked, then they go
                    fdpass.close_fds(fds)
                outcome = core.receive(session, data, len(fds))
            if isinstance(outcome, Delivery):
                await self._deliver(sock, outcome)
            elif outcome.drop:
                try:
                    await self._send(sock, outcome.reply, outcome.serial)
                except OSError:
                    pass  # it goes either way
                raise _Drop
            else:
                await self._send(sock, outcome.reply, outcome.serial)

    async def _deliver(self, sock: trio.socket.SocketType, delivery: Delivery) -> None:
        """Send a reply that carries fds, part by part, as Delivery's contract says."""
        while delivery.pending:
            await self._room(sock)
            # No await between the wait above and export(): it looks up the buffer
            # (or token) and exports it in one step, so nothing can revoke, use up or
            # free it in between. Its fds are ours from the moment they exist.
            fds: list[int] = []
            try:
                try:
                    reply = delivery.export(fds)
                    await self._send(sock, reply, delivery.serial, fds)
                    delivery.sent()
                finally:
                    fdpass.close_fds(fds)
            except OSError as e:
                # KernelError: the export failed. ETOOMANYREFS: our user has too many fds
                # in flight, unread by clients. Either fails the request, not the client.
                if not isinstance(e, KernelError) and e.errno != errno.ETOOMANYREFS:
                    raise
                failure = delivery.failed(e)
                await self._send(sock, failure.reply, failure.serial)
                return

    async def _send(
        self, sock: trio.socket.SocketType, reply: Reply, serial: int, fds: list[int] | None = None
    ) -> None:
        data = protocol.encode(reply, serial)
        ancdata = fdpass.rights(fds or [])
        # Arm the send timeout only for a send that has to wait: a deadline costs
        # more than the send itself, and most replies find room at once.
        if isinstance(sock, LeanSocket) and sock.try_sendmsg([data], ancdata) is not None:
            return
        try:
            with trio.fail_after(self.send_timeout):
                await sock.sendmsg([data], ancdata)
        except trio.TooSlowError:
            self._stalled(sock)
            raise _Drop from None

    async def _room(self, sock: trio.socket.SocketType) -> None:
        """Wait (before exporting fds) until the client has read all but QUEUED_BYTES."""
        if _unread(sock) <= QUEUED_BYTES:
            return
        try:
            with trio.fail_after(self.send_timeout):
                while _unread(sock) > QUEUED_BYTES:
                    await trio.sleep(0.01)
        except trio.TooSlowError:
            self._stalled(sock)
            raise _Drop from None

    def _stalled(self, sock: trio.socket.SocketType) -> None:
        log.warning(
            "a client (socket %d) read no reply for %g s; dropping it",
            sock.fileno(),
            self.send_timeout,
        )


async def accept_loop(
    listener: trio.socket.SocketType,
    serve: Callable[[trio.socket.SocketType], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``listener`` until cancelled, each served by ``serve`` in a
    task of its own (which closes it). Out of fds or memory (EMFILE, ENFILE, ENOBUFS,
    ENOMEM), it pauses and goes on rather than dying: the clients being served free some."""
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as e:
                if e.errno in _BACKOFF_ERRNOS:
                    log.warning("accept: %s; pausing before accepting more", e)
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(serve, sock)


def credentials(sock: trio.socket.SocketType) -> Peer:
    """Who is at the other end, as the kernel recorded it at connect time."""
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    groups: frozenset[int] = frozenset()
    for room in (64, 65536):  # a few groups, else NGROUPS_MAX
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, room * 4)
        except OSError as e:
            if e.errno == errno.ERANGE:
                continue
            break  # before Linux 4.13: the primary group only
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
        break
    return Peer(pid, uid, gid, groups)
