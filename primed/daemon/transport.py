"""The daemon's transport: it moves datagrams and fds between clients and the core, and keeps time.

Theory of operation. One task per client connection. The task reads one
datagram, closes any fds it carried (no request carries any), hands the bytes
to the core (:mod:`primed.daemon.core`) and carries out the outcome, then
reads the next: a client's requests are answered in order, one at a time. A
connection that sends no HELLO within the HELLO timeout is told so and dropped.

Flow control, at no cost while it waits. Each client's socket gets a send
buffer of :data:`SEND_BUFFER` bytes, so that the kernel reports it writable
exactly while the client has at most :data:`QUEUED_BYTES` unread (an AF_UNIX
socket polls writable while sk_wmem_alloc * 4 <= sk_sndbuf, unix_writable in
net/unix/af_unix.c, and SIOCOUTQ reads sk_wmem_alloc less the 1 it starts at).
A reply that carries fds waits, on writability (an event, not a poll), until
the client has read all but that; a client whose reply can't be sent within
the send timeout is dropped. Every fd the core exports is sent with SCM_RIGHTS
and closed here at once, whatever happened to the send.

Fds in flight. The kernel charges every fd queued in a socket to the sender's
user (the daemon's), up to its RLIMIT_NOFILE: past that, every sendmsg with
fds fails with ETOOMANYREFS, for every client. So the transport counts the fds
each connection was sent and has not read, per uid and in all, and lets a part
through only while its uid stays within its share and the daemon within its
bound, or, once uids that don't read have filled the bound, while its uid has
no more than a small floor in flight (:meth:`Daemon._fds_refusal`); otherwise
the part waits, then is refused.
Counting: after each send with fds, (fds, bytes it added to SIOCOUTQ) joins a
FIFO; when SIOCOUTQ later reads X, the messages still unread are the newest
whose sizes add up to at least X (the socket is a FIFO too). A client reading
between the two reads makes a size smaller, which only overcounts. A
connection that ends with fds unread keeps them counted until the client
reads them or closes (the kernel charges them until then): its socket is held
open, shut down both ways, and looked at after growing pauses (no event comes
from a socket in that state); it holds no more than its uid's share allows.

Reload. Each connection's task runs in a cancel scope of its own; a session
the new access rules refuse is cancelled, then told PERMISSION_DENIED (serial
0) and hung up on, and its buffers go through Core.disconnect as always.
"""

from __future__ import annotations

import array
import collections
import errno
import fcntl
import logging
import math
import socket
import struct
import termios
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from primed import fdpass
from primed.daemon.core import Answer, Core, Delivery, Received
from primed.daemon.fairness import LoopShares
from primed.daemon.lean import SLICE, LeanSocket
from primed.daemon.policy import Peer, Policy, over_bound
from primed.daemon.ratelimit import LogLimiter, held_note
from primed.daemon.sessions import Session
from primed.errors import ErrorCode, KernelError, PrimedError, RemoteProtocolError
from primed.formats import Limits
from primed.kernel.allocation import BufferSource
from primed.wire import protocol
from primed.wire.protocol import Error, Reply
from primed.wire.schema import MAX_MESSAGE

log = logging.getLogger("primed")

_BACKOFF_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_PEERCRED = struct.Struct("3i")
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Seconds a reply may wait for a client that does not read before it is dropped.
SEND_TIMEOUT = 10.0
#: Seconds a new connection has to send HELLO.
HELLO_TIMEOUT = 5.0
#: Each client socket's send buffer, as the kernel reports it (setsockopt asks for
#: half: the kernel doubles it). The largest datagram fits: a SEQPACKET datagram
#: larger than the send buffer less 32 bytes fails with EMSGSIZE.
SEND_BUFFER = MAX_MESSAGE + 32
#: Unread bytes (the kernel's accounting: about 768 per small reply, 21 KiB per
#: reply of 253 fds) past which a reply that carries fds waits for the client to
#: read: the kernel's writability threshold for SEND_BUFFER.
QUEUED_BYTES = SEND_BUFFER // 4 - 1
#: Seconds between two SIOCOUTQ sweeps of one uid's connections, at the most.
_SWEEP_INTERVAL = 0.01
#: Longest pause between two sweeps of a part waiting for fds in flight to drain.
_LONGEST_PAUSE = 0.5
#: Pauses between two looks at a connection that ended with fds unread.
_FIRST_LINGER_PAUSE = 0.05
_LONGEST_LINGER_PAUSE = 2.0


class _Drop(Exception):
    """End this client's connection (after the reply already queued)."""


_OUTQ = array.array("i", [0])  # filled in place: a third of the cost of a bytes result


def _unread(sock: socket.socket | trio.socket.SocketType) -> int:
    """Bytes this end sent that the peer has not read yet (SIOCOUTQ)."""
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, _OUTQ, True)
    return _OUTQ[0]


def size_send_buffer(sock: socket.socket | trio.socket.SocketType) -> int:
    """Give ``sock`` a send buffer of SEND_BUFFER bytes; return the most unread bytes at
    which the kernel reports it writable (QUEUED_BYTES, unless the kernel capped the
    buffer: net.core.wmem_max)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER // 2)
    except OSError:
        pass  # the default buffer stays: the threshold below follows whatever it is
    size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    # Writable while (SIOCOUTQ + 1) * 4 <= sk_sndbuf.
    return size // 4 - 1


class _Link:
    """One served connection: its socket, its session, and the fds it has in flight."""

    __slots__ = (
        "in_flight", "lean", "queued", "queued_bytes", "room", "scope", "session", "sock", "told",
    )  # fmt: skip

    def __init__(self, sock: trio.socket.SocketType, session: Session, room: int):
        self.sock, self.session, self.room = sock, session, room
        #: the socket if it is a LeanSocket: then sends that find room skip the scheduler
        self.lean = sock if isinstance(sock, LeanSocket) else None
        self.scope = trio.CancelScope()
        #: (fds, bytes) of each message sent with fds and maybe unread, oldest first
        self.queued: collections.deque[tuple[int, int]] = collections.deque()
        self.queued_bytes = 0
        self.in_flight = 0  # the fds in ``queued``
        self.told: str | None = None  # set: cancelled, to be told this and dropped

    def __repr__(self) -> str:
        return f"<link of {self.session}: {self.in_flight} fd(s) in flight>"


class Daemon:
    """The core (buffers, sessions and every rule) served over a listening socket."""

    def __init__(
        self,
        backend: BufferSource,
        limits: Limits | None = None,
        policy: Policy | None = None,
        reload: Callable[[], tuple[Limits, Policy]] | None = None,
        send_timeout: float = SEND_TIMEOUT,
        hello_timeout: float = HELLO_TIMEOUT,
    ):
        """``policy`` says who may connect and what each may hold; ``reload`` (called on
        SIGHUP) returns new limits and policy, or raises PrimedError to keep the old ones.
        A client whose reply can't be sent within ``send_timeout`` seconds is dropped,
        and so is one that sends no HELLO within ``hello_timeout`` seconds."""
        self.core = Core(backend, limits, policy)
        self.backend = backend
        self.send_timeout = send_timeout
        self.hello_timeout = hello_timeout
        self._reload = reload
        self._links: dict[Session, _Link] = {}
        #: fds sent and not read yet: in all, and per uid
        self.fds_in_flight = 0
        self._in_flight: dict[int, int] = {}
        self._holding: dict[int, set[_Link]] = {}  # uid -> its links with fds in flight
        self._swept: dict[int | None, float] = {}  # uid (None: all) -> when last swept
        self._drained = trio.lowlevel.ParkingLot()  # parts waiting for fds in flight to drain
        #: (datagram bytes, fds) -> what such a message adds to SIOCOUTQ (its skb's truesize:
        #: the kernel's rule, the same for every socket), learnt from an exact reading
        self._sizes: dict[tuple[int, int], int] = {}
        self._log = LogLimiter()
        #: each uid's share of the loop (primed.daemon.fairness)
        self.shares = LoopShares()

    def summary(self) -> str:
        """One line on what the daemon holds now."""
        return self.core.summary()

    def reload(self) -> bool:
        """Take new limits and policy from the reload hook; on failure keep the old ones.

        Connected clients the new access rules refuse are told so (PERMISSION_DENIED)
        and disconnected; the others stay, and the new rules apply from their next
        request (and to who may connect from the next connection).
        """
        if self._reload is None:
            log.info("reload: nothing to reload")
            return False
        try:
            limits, policy = self._reload()
        except PrimedError as e:
            log.error("reload refused, the running configuration stays: %s", e)
            return False
        refused = self.core.configure(limits, policy)
        for session in refused:
            why = policy.refusal(session.account.peer) or f"uid {session.uid} is not allowed"
            log.warning("reload: %s: %s; disconnecting it", session, why)
            link = self._links.get(session)
            if link is not None:
                link.told = why
                link.scope.cancel()
        log.info(
            "reloaded; %d client(s) stay connected, %d disconnected",
            len(self.core.sessions) - len(refused),
            len(refused),
        )
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
                await self._tell(sock, peer.uid, refusal.reply)
                return
            session = self.core.connect(peer)
            link = _Link(sock, session, size_send_buffer(sock))
            self._links[session] = link
            try:
                try:
                    with link.scope:
                        await self._converse(link)
                except _Drop:
                    pass
                except OSError as e:
                    log.info("%s: connection failed: %s", session, e)
                except Exception:  # a bug must cost one connection, never the daemon
                    log.exception("%s: internal error; disconnecting it", session)
                finally:
                    del self._links[session]
                    self.core.disconnect(session)
                if link.told is not None:
                    denied = Error(ErrorCode.PERMISSION_DENIED, 0, link.told)
                    self.core.errors_by_code[ErrorCode.PERMISSION_DENIED] += 1
                    await self._tell(sock, session.uid, denied)
                await self._linger(link)
            finally:
                self._forget(link)

    async def _tell(self, sock: trio.socket.SocketType, uid: int, reply: Reply) -> None:
        """Send ``reply`` (serial 0), then hang up; within the send timeout, whatever
        the client does."""
        with trio.move_on_after(self.send_timeout):
            try:
                await self._send(sock, uid, reply, 0)
                await fdpass.hang_up(sock)
            except (OSError, _Drop):
                pass

    async def _converse(self, link: _Link) -> None:
        core, sock, session, shares = self.core, link.sock, link.session, self.shares
        hello_by = trio.current_time() + self.hello_timeout
        while True:
            outcome: Received
            try:
                if session.version:
                    data, fds = await fdpass.recv_async(sock)
                else:
                    data, fds = await self._before_hello(link, hello_by)
            except RemoteProtocolError as e:  # truncated: what arrived was closed
                outcome = core.bad_message(session, e)
            else:
                if not data and not fds:
                    return  # end of stream
                if fds:  # no request carries any; the header's count is checked, then they go
                    fdpass.close_fds(fds)
                pause = shares.wait(session.uid)
                if pause:  # its uid has had its share of the loop: the others go first
                    await trio.sleep(pause)
                began = time.perf_counter()
                outcome = core.receive(session, data, len(fds))
                shares.charge(session.uid, time.perf_counter() - began)
            if isinstance(outcome, bytes):  # a fast path's reply, encoded: no fds, no drop
                if link.lean is None or not link.lean.try_send(outcome):
                    await self._transmit(sock, session.uid, outcome, [])
            elif not isinstance(outcome, Answer):
                await self._deliver(link, outcome)
            elif outcome.drop:
                try:
                    await self._send(sock, session.uid, outcome.reply, outcome.serial)
                except OSError:
                    pass  # it goes either way
                raise _Drop
            else:
                await self._send(sock, session.uid, outcome.reply, outcome.serial)

    async def _before_hello(self, link: _Link, deadline: float) -> tuple[bytes, list[int]]:
        """The next datagram of a client that has not said HELLO yet; past ``deadline``,
        it is told so and dropped (a connection must not hold an fd for nothing)."""
        with trio.move_on_at(deadline):
            return await fdpass.recv_async(link.sock)
        text = f"no HELLO within {self.hello_timeout:g} s"
        self._note(link.session.uid, "hello", "%s: %s; dropping it", link.session, text)
        self.core.errors_by_code[ErrorCode.BAD_STATE] += 1
        try:
            await self._send(link.sock, link.session.uid, Error(ErrorCode.BAD_STATE, 0, text), 0)
        except OSError:
            pass  # it goes either way
        raise _Drop

    async def _deliver(self, link: _Link, delivery: Delivery) -> None:
        """Send a reply that carries fds, part by part, as Delivery's contract says."""
        sock, session = link.sock, link.session
        uid = session.uid
        finished = False
        try:
            while delivery.pending:
                if not delivery.ready:
                    await self._prepare(uid, delivery)
                    continue
                unread = _unread(sock)
                if unread > link.room:
                    unread = await self._room(link)
                if link.in_flight:
                    self._settle(link, unread)
                wanted = delivery.part_fds
                # (none in flight anywhere, the common case: _fds_refusal lets it go)
                if self.fds_in_flight and self._fds_refusal(link, wanted) is not None:
                    why = await self._fds_drained(link, wanted)
                    if why is not None:
                        answer = delivery.refused(why)
                        finished = True
                        self._note(
                            uid, "fds", "%s: request %d refused: %s", session, answer.serial, why
                        )
                        await self._send(sock, uid, answer.reply, answer.serial)
                        return
                    continue  # it waited: look at the room again
                # No await between the room and budget checks above and export(): it
                # looks up the buffer (or token) and exports it in one step, so nothing
                # can revoke, use up or free it in between. Its fds are ours from the
                # moment they exist.
                fds: list[int] = []
                try:
                    try:
                        began = time.perf_counter()
                        data = delivery.datagram(fds)
                        self.shares.charge(uid, time.perf_counter() - began)
                        ancdata = fdpass.rights(fds)
                        lean = link.lean
                        if lean is None or lean.try_sendmsg([data], ancdata) is None:
                            await self._transmit(sock, uid, data, ancdata)
                        delivery.sent()
                    finally:
                        fdpass.close_fds(fds)
                except OSError as e:
                    # KernelError: the export failed (EMFILE, ENFILE among others).
                    # ETOOMANYREFS: our user has too many fds in flight, unread by
                    # clients. Either fails the request, not the client.
                    if not isinstance(e, KernelError) and e.errno != errno.ETOOMANYREFS:
                        raise
                    failure = delivery.failed(e)
                    finished = True
                    self._note(
                        uid,
                        "kernel",
                        "%s: request %d failed: %s (%d fd(s) in flight, %d of them uid %d's)",
                        session,
                        failure.serial,
                        e,
                        self.fds_in_flight,
                        self._in_flight.get(uid, 0),
                        uid,
                    )
                    await self._send(sock, uid, failure.reply, failure.serial)
                    return
                if fds:
                    self._charge(link, len(fds), self._added(sock, unread, len(data), len(fds)))
            finished = True
        finally:
            if not finished:  # the connection ends (dropped, cancelled): undo the rest
                delivery.refused("the connection ended")

    async def _prepare(self, uid: int, delivery: Delivery) -> None:
        """Do the delivery's work before its next part, SLICE seconds of the loop at a
        time: then the others run (first, if ``uid`` has had its share)."""
        began = time.perf_counter()
        try:
            while not delivery.ready and time.perf_counter() - began < SLICE:
                delivery.prepare()
        finally:
            self.shares.charge(uid, time.perf_counter() - began)
        if delivery.ready:
            return
        pause = self.shares.wait(uid)
        if pause:
            await trio.sleep(pause)
        else:
            await trio.lowlevel.checkpoint()

    def _added(self, sock: trio.socket.SocketType, before: int, size: int, nfds: int) -> int:
        """What a message of ``size`` bytes and ``nfds`` fds just sent on ``sock`` added to
        its SIOCOUTQ, which read ``before`` just before the send (no await between).

        Read from SIOCOUTQ once per kind of message: with nothing queued before, what it
        reads after is that message's size exactly (the client read it, or nothing;
        no other send can come between), and every message of that kind adds as much.
        Until then the difference stands, which a client reading meanwhile only makes
        smaller (an overcount)."""
        known = self._sizes.get((size, nfds))
        if known is not None:
            return known
        after = _unread(sock)
        if not before and after > 0:
            self._sizes[size, nfds] = after
        return after - before

    async def _send(
        self,
        sock: trio.socket.SocketType,
        uid: int,
        reply: Reply,
        serial: int,
    ) -> None:
        """Send a reply with no fds (a delivery's parts go by _deliver)."""
        data = protocol.encode(reply, serial)
        # Arm the send timeout only for a send that has to wait: a deadline costs
        # more than the send itself, and most replies find room at once.
        if isinstance(sock, LeanSocket) and sock.try_send(data):
            return
        await self._transmit(sock, uid, data, [])

    async def _transmit(
        self,
        sock: trio.socket.SocketType,
        uid: int,
        data: bytes,
        ancdata: list[tuple[int, int, Any]],
    ) -> None:
        """Send ``data``, waiting for room within the send timeout, else drop the client."""
        try:
            with trio.fail_after(self.send_timeout):
                await sock.sendmsg([data], ancdata)
        except trio.TooSlowError:
            self._stalled(sock, uid)
            raise _Drop from None

    async def _room(self, link: _Link) -> int:
        """Wait (before exporting fds) until the client has read all but ``link.room``
        bytes; returns how many are unread."""
        unread = _unread(link.sock)
        if unread <= link.room:
            return unread
        try:
            with trio.fail_after(self.send_timeout):
                while True:
                    # The kernel reports the socket writable exactly when there is room.
                    await trio.lowlevel.wait_writable(link.sock)
                    unread = _unread(link.sock)
                    if unread <= link.room:
                        return unread
                    # Writable yet no room: a kernel whose rule differs. Don't spin.
                    await trio.sleep(_SWEEP_INTERVAL)
        except trio.TooSlowError:
            self._stalled(link.sock, link.session.uid)
            raise _Drop from None

    def _stalled(self, sock: trio.socket.SocketType, uid: int) -> None:
        self._note(
            uid,
            "stalled",
            "a client (uid %d, socket %d) read no reply for %g s; dropping it",
            uid,
            sock.fileno(),
            self.send_timeout,
        )

    def _note(self, uid: int, kind: str, message: str, *args: object) -> None:
        """Log a warning, at most a few per uid and kind per interval."""
        held = self._log.allow(uid, kind)
        if held is not None:
            log.warning(message + "%s", *args, held_note(held))

    # --- fds in flight ----------------------------------------------------------------------

    def fds_share(self) -> int:
        """How many fds in flight one uid may have: its quota, else a quarter of the bound."""
        policy = self.core.policy
        return policy.quotas.fds_in_flight_per_uid or max(1, policy.bounds.fds_in_flight // 4)

    def _fds_refusal(self, link: _Link, wanted: int) -> tuple[str, int | None] | None:
        """Why a part of ``wanted`` fds may not go to ``link`` now, by the counts as
        they stand, and whose connections a sweep would look at (a uid; None: all);
        None if it may go. A uid with none in flight may always take one part (a part
        may carry more than a small share), unless the daemon is full."""
        if not self.fds_in_flight:
            return None
        uid, bound = link.session.uid, self.core.policy.bounds.fds_in_flight
        mine = self._in_flight.get(uid, 0)
        if mine and not self.core.policy.is_admin(link.session.account.peer):
            share = self.fds_share()
            if mine + wanted > share:
                return f"fds in flight per uid ({uid}): {mine} unread, share {share}", uid
        # Past a full bound (uids that don't read can fill it) a uid with few in flight
        # still gets a floor's worth: a uid that reads is not held up by those that don't.
        if over_bound(bound, self.fds_in_flight, wanted, mine):
            return f"fds in flight: {self.fds_in_flight} unread, daemon bound {bound}", None
        return None

    async def _fds_drained(self, link: _Link, wanted: int) -> str | None:
        """Wait, within the send timeout, until a part of ``wanted`` fds may go to
        ``link``: None then, else why not. Counts drop when a connection ends or a
        sweep (one SIOCOUTQ per connection that holds fds, at most one sweep per uid
        per _SWEEP_INTERVAL) finds fds read; the pauses between sweeps grow."""
        deadline = trio.current_time() + self.send_timeout
        pause = _SWEEP_INTERVAL
        while True:
            over = self._fds_refusal(link, wanted)
            if over is not None:
                self._sweep(over[1])
                over = self._fds_refusal(link, wanted)
            now = trio.current_time()
            if over is None or now >= deadline:
                return None if over is None else over[0]
            with trio.move_on_at(min(deadline, now + pause)):
                await self._drained.park()
            pause = min(2 * pause, _LONGEST_PAUSE)

    def _sweep(self, uid: int | None) -> None:
        """Read SIOCOUTQ of each connection of ``uid`` (None: of every uid) that holds
        fds in flight, and count what was read; at most once per _SWEEP_INTERVAL."""
        now = trio.current_time()
        if now - self._swept.get(uid, -math.inf) < _SWEEP_INTERVAL:
            return
        self._swept[uid] = now
        if uid is None:
            links = [link for held in self._holding.values() for link in held]
        else:
            links = list(self._holding.get(uid, ()))
        for link in links:
            self._settle(link, _unread(link.sock))

    def _charge(self, link: _Link, nfds: int, size: int) -> None:
        """``link`` was sent a message with ``nfds`` fds that added ``size`` to SIOCOUTQ."""
        size = max(size, 1)  # the client read meanwhile: any size overcounts, never under
        link.queued.append((nfds, size))
        link.queued_bytes += size
        link.in_flight += nfds
        uid = link.session.uid
        self._in_flight[uid] = self._in_flight.get(uid, 0) + nfds
        self.fds_in_flight += nfds
        holding = self._holding.get(uid)
        if holding is None:
            holding = self._holding[uid] = set()
        holding.add(link)

    def _settle(self, link: _Link, unread: int) -> None:
        """SIOCOUTQ of ``link`` reads ``unread``: the messages still queued are the
        newest whose sizes add up to at least that; the older ones were read."""
        if not link.in_flight:
            return
        if unread <= 0:  # all read: the common case
            self._uncount(link, link.in_flight)
            return
        queued, read = link.queued, 0
        while queued and link.queued_bytes - queued[0][1] >= unread:
            nfds, size = queued.popleft()
            link.queued_bytes -= size
            read += nfds
        if read:
            self._uncount(link, read)

    def _uncount(self, link: _Link, nfds: int) -> None:
        link.in_flight -= nfds
        uid = link.session.uid
        left = self._in_flight[uid] - nfds
        if left:
            self._in_flight[uid] = left
        else:
            del self._in_flight[uid]
        self.fds_in_flight -= nfds
        if not link.in_flight:
            link.queued.clear()
            link.queued_bytes = 0
            holding = self._holding[uid]
            holding.discard(link)
            if not holding:
                del self._holding[uid]
                self._swept.pop(uid, None)
        if self._drained:
            self._drained.unpark_all()

    def _forget(self, link: _Link) -> None:
        """``link``'s socket is about to close: its fds in flight are no longer ours to count."""
        if link.in_flight:
            self._uncount(link, link.in_flight)

    async def _linger(self, link: _Link) -> None:
        """Hold the socket of an ended connection while the client has fds of ours
        unread: the kernel charges them to us until it reads them or closes, so they
        stay counted (against its uid's share) until then.

        The client is hung up on at once (it reads what is queued, then the end of
        the stream; its sends fail with EPIPE). A socket shut down both ways polls
        as hung up, so no event says when the client reads or closes: it is looked
        at (one SIOCOUTQ) after pauses that grow to _LONGEST_LINGER_PAUSE.
        """
        sock = link.sock
        if not link.in_flight:
            return
        try:
            self._settle(link, _unread(sock))
            if not link.in_flight:
                return
            with trio.move_on_after(self.send_timeout):
                await fdpass.hang_up(sock)  # what it sent is dropped: the close resets nothing
            pause = _FIRST_LINGER_PAUSE
            while True:
                await trio.sleep(pause)
                self._settle(link, _unread(sock))
                if not link.in_flight:
                    return
                pause = min(2 * pause, _LONGEST_LINGER_PAUSE)
        except OSError:
            return  # the socket is gone: nothing of ours is left queued in it


async def accept_loop(
    listener: trio.socket.SocketType,
    serve: Callable[[trio.socket.SocketType], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``listener`` until cancelled, each served by ``serve`` in a
    task of its own (which closes it). Out of fds or memory (EMFILE, ENFILE, ENOBUFS,
    ENOMEM), it pauses 0.1 s and goes on rather than dying (or spinning): the clients
    being served free some."""
    limiter = LogLimiter()
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as e:
                if e.errno in _BACKOFF_ERRNOS:
                    held = limiter.allow(-1, "accept")
                    if held is not None:
                        log.warning(
                            "accept: %s; pausing before accepting more%s", e, held_note(held)
                        )
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
