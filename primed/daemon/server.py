"""The daemon: a trio server that allocates buffers and passes them to clients.

Theory of operation. One task per client connection. A client's buffers are
kept in its :class:`Session` (id -> Allocation: the daemon's GEM handle or
memfd); ids count up from 1 per client, so no client can name another's
buffers. For each delivery the backend exports a fresh fd, which is sent with
SCM_RIGHTS and closed here at once, whatever happened to the send. On Release,
or when the client goes away for any reason, the session's allocations are
freed. Fds and handles already delivered stay valid: the kernel keeps the
memory while any of them exists.

A malformed message ends only its own connection (after an Error reply
saying why); an unknown opcode gets an Error and the connection goes on.

A client can't hold up the others, nor use up the daemon's allowance of fds in
flight (charged to the daemon's user): its task reads the next request only
after answering the last, a reply carrying fds waits while the client has more
than :data:`QUEUED_BYTES` unread, and a client whose reply can't be sent
within the send timeout is dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import fcntl
import itertools
import logging
import os
import secrets
import signal
import socket
import stat
import struct
import termios
import time
from collections.abc import Callable
from typing import cast

import trio

from primed import fdpass, formats
from primed.daemon import systemd
from primed.daemon.lean import LeanSocket
from primed.daemon.policy import Account, Ledger, Peer, Policy, QuotaExceeded
from primed.errors import ErrorCode, KernelError, PrimedError, ProtocolError, RemoteProtocolError
from primed.formats import LayoutError, Limits
from primed.kernel.backends import Allocation, BufferSource
from primed.wire import protocol
from primed.wire.protocol import (
    Allocate,
    Allocated,
    BufferEntry,
    BufferInfo,
    ClientEntry,
    Error,
    FormatInfo,
    Hello,
    List,
    Listed,
    OpenBuffer,
    OpenShared,
    Queried,
    Query,
    Release,
    Released,
    Reply,
    Request,
    Revoke,
    Revoked,
    Share,
    Shared,
    Statistics,
    Stats,
    Welcome,
)
from primed.wire.schema import MAX_FDS, MAX_MESSAGE, TOKEN_SIZE, VERSION

log = logging.getLogger("primed")

_BACKOFF_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_PEERCRED = struct.Struct("3i")
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Most live share tokens one client may hold.
MAX_TOKENS = 1024
#: Entries in one LISTED page: each fits in one datagram with room to spare.
LIST_PAGE_CLIENTS = 200
LIST_PAGE_BUFFERS = 1000
#: The one answer to every token that can't be opened or revoked, whatever the reason.
_NO_TOKEN = "no such token"
#: Seconds a reply may wait for a client that does not read before it is dropped.
SEND_TIMEOUT = 10.0
#: Unread bytes (the kernel's accounting: about 768 per small reply, 21 KiB per
#: reply of 253 fds) past which a reply that carries fds waits for the client to read.
QUEUED_BYTES = 16384
#: What QUERY reports of the format table: it never changes while the daemon runs.
_FORMATS = tuple(FormatInfo(f.fourcc, f.cpp, f.hsub, f.vsub) for f in formats.FORMATS.values())


@dataclasses.dataclass(eq=False)
class Session:
    """One connected client and the buffers it owns."""

    number: int
    pid: int
    uid: int
    gid: int
    account: Account
    since: float = dataclasses.field(default_factory=time.time)
    name: str = ""
    version: int = 0  # 0 until Hello was answered
    buffers: dict[int, Allocation] = dataclasses.field(default_factory=dict)
    next_id: int = 1
    shares: dict[int, set[bytes]] = dataclasses.field(default_factory=dict)  # id -> tokens
    tokens: int = 0  # live tokens in ``shares``

    def __str__(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return f"client {self.number}{name} (pid {self.pid}, uid {self.uid})"


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _Token:
    owner: Session
    id: int
    once: bool
    uids: frozenset[int]  # empty: anyone


class _Drop(Exception):
    """End this client's connection (after the reply already queued)."""


def _unread(sock: trio.socket.SocketType) -> int:
    """Bytes this end sent that the peer has not read yet (SIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int.from_bytes(raw, "little", signed=True)


class Daemon:
    """The buffer registry and request handling, over any listening socket."""

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
        self.backend = backend
        self.send_timeout = send_timeout
        self.limits = limits or Limits()
        self.policy = policy or Policy()
        self.ledger = Ledger()
        self._reload = reload
        self.sessions: set[Session] = set()
        self.tokens: dict[bytes, _Token] = {}
        self._numbers = itertools.count(1)
        self.stats = {"requests": 0, "errors": 0, "bad_messages": 0, "refused": 0}
        self.requests_by_opcode: collections.Counter[int] = collections.Counter()
        self.errors_by_code: collections.Counter[int] = collections.Counter()
        self.started = time.monotonic()

    @property
    def live_buffers(self) -> int:
        return sum(len(s.buffers) for s in self.sessions)

    def summary(self) -> str:
        """One line on what the daemon holds now."""
        held = sum(s.account.own.bytes for s in self.sessions)
        return (
            f"{len(self.sessions)} client(s), {self.live_buffers} buffer(s), "
            f"{held / (1 << 20):.1f} MiB"
        )

    def reload(self) -> bool:
        """Take new limits and policy from the reload hook; on failure keep the old ones.

        Connected clients stay; the new rules apply from their next request (and
        to who may connect from the next connection).
        """
        if self._reload is None:
            log.info("reload: nothing to reload")
            return False
        try:
            self.limits, self.policy = self._reload()
        except PrimedError as e:
            log.error("reload refused, the running configuration stays: %s", e)
            return False
        log.info("reloaded; %d client(s) stay connected", len(self.sessions))
        return True

    async def serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept clients on ``listener`` until cancelled."""
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
                nursery.start_soon(self._serve_client, LeanSocket(sock))

    async def _serve_client(self, sock: trio.socket.SocketType) -> None:
        with sock:
            try:
                peer = credentials(sock)
            except OSError:
                return
            refusal = self.policy.refusal(peer)
            if refusal is not None:
                self.stats["refused"] += 1
                log.warning(
                    "refused a client (pid %d, uid %d, gid %d): %s",
                    peer.pid,
                    peer.uid,
                    peer.gid,
                    refusal,
                )
                with trio.move_on_after(self.send_timeout):
                    try:
                        await self._send(sock, Error(ErrorCode.PERMISSION_DENIED, 0, refusal), 0)
                        await _hang_up(sock)
                    except (OSError, _Drop):
                        pass
                return
            account = self.ledger.open(peer)
            session = Session(next(self._numbers), peer.pid, peer.uid, peer.gid, account)
            self.sessions.add(session)
            log.info("%s connected", session)
            try:
                await self._converse(sock, session)
            except _Drop:
                pass
            except OSError as e:
                log.info("%s: connection failed: %s", session, e)
            except Exception:  # a bug must cost one connection, never the daemon
                log.exception("%s: internal error; disconnecting it", session)
            finally:
                self.sessions.discard(session)
                freed = self._free_all(session)
                self.ledger.close(session.account)
                log.info("%s disconnected; freed %d buffer(s)", session, freed)

    async def _converse(self, sock: trio.socket.SocketType, session: Session) -> None:
        while True:
            data, ancdata, msg_flags, _ = await sock.recvmsg(
                MAX_MESSAGE, fdpass.ANCILLARY_SPACE, fdpass.RECV_FLAGS
            )
            try:
                fds = fdpass.take_fds(ancdata, msg_flags)
            except RemoteProtocolError as e:
                await self._refuse(sock, session, e)
            if not data and not fds:
                return  # end of stream
            # No request carries fds; the header's count is checked, then they go.
            fdpass.close_fds(fds)
            try:
                serial, request = protocol.decode(data, len(fds), "request")
            except protocol.UnknownOpcode as e:
                self.stats["errors"] += 1
                log.info("%s: %s", session, e)
                await self._send(sock, Error(e.code, 0, str(e)), e.serial)
                continue
            except RemoteProtocolError as e:
                await self._refuse(sock, session, e)
            self.stats["requests"] += 1
            self.requests_by_opcode[request.OPCODE] += 1
            await self._dispatch(sock, session, serial, cast(Request, request))

    async def _refuse(
        self, sock: trio.socket.SocketType, session: Session, e: ProtocolError
    ) -> None:
        self.stats["bad_messages"] += 1
        log.warning("%s sent a bad message, disconnecting: %s", session, e)
        try:
            await self._send(sock, Error(ErrorCode.BAD_MESSAGE, 0, str(e)), e.serial)
        except (OSError, _Drop):
            pass
        raise _Drop

    async def _send(
        self, sock: trio.socket.SocketType, reply: Reply, serial: int, fds: list[int] | None = None
    ) -> None:
        if isinstance(reply, Error):
            self.errors_by_code[reply.code] += 1
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

    async def _fail(
        self,
        sock: trio.socket.SocketType,
        session: Session,
        serial: int,
        code: ErrorCode,
        text: str,
        err: int = 0,
    ) -> None:
        self.stats["errors"] += 1
        log.debug("%s: request %d failed: %s: %s", session, serial, code.name, text)
        await self._send(sock, Error(code, err, text), serial)

    async def _fail_kernel(
        self, sock: trio.socket.SocketType, session: Session, serial: int, e: OSError
    ) -> None:
        """Answer a request the kernel refused with ERROR KERNEL and its errno."""
        await self._fail(sock, session, serial, ErrorCode.KERNEL, e.strerror or "", e.errno or 0)

    async def _dispatch(
        self, sock: trio.socket.SocketType, session: Session, serial: int, request: Request
    ) -> None:
        if isinstance(request, Hello):
            await self._hello(sock, session, serial, request)
        elif not session.version:
            await self._fail(sock, session, serial, ErrorCode.BAD_STATE, "HELLO must come first")
            raise _Drop
        elif isinstance(request, Allocate):
            await self._allocate(sock, session, serial, request)
        elif isinstance(request, Release):
            await self._release(sock, session, serial, request)
        elif isinstance(request, Share):
            await self._share(sock, session, serial, request)
        elif isinstance(request, OpenShared):
            await self._open_shared(sock, session, serial, request)
        elif isinstance(request, Revoke):
            await self._revoke(sock, session, serial, request)
        elif isinstance(request, Query):
            await self._query(sock, session, serial)
        elif isinstance(request, List):
            await self._list(sock, session, serial, request)
        elif isinstance(request, Stats):
            await self._stats(sock, serial)
        elif isinstance(request, OpenBuffer):
            await self._open_buffer(sock, session, serial, request)
        else:  # a request type decode() knows but this server does not handle
            await self._fail(sock, session, serial, ErrorCode.UNKNOWN_OPCODE, repr(request))

    async def _hello(
        self, sock: trio.socket.SocketType, session: Session, serial: int, hello: Hello
    ) -> None:
        if session.version:
            await self._fail(sock, session, serial, ErrorCode.BAD_STATE, "HELLO was already sent")
            return
        version = min(hello.max_version, VERSION)
        if version < max(hello.min_version, 1):
            await self._fail(
                sock,
                session,
                serial,
                ErrorCode.UNSUPPORTED_VERSION,
                f"client speaks {hello.min_version}..{hello.max_version}, server 1..{VERSION}",
            )
            return
        session.version = version
        session.name = hello.name
        if hello.name:
            log.info("client %d is %r", session.number, hello.name)
        driver = self.backend.driver
        limits = self.limits
        welcome = Welcome(
            version,
            self.backend.kind,
            limits.max_width,
            limits.max_height,
            limits.max_size,
            limits.max_count,
            driver.name,
            (driver.major, driver.minor, driver.patch),
            self.backend.node,
        )
        await self._send(sock, welcome, serial)

    async def _allocate(
        self, sock: trio.socket.SocketType, session: Session, serial: int, request: Allocate
    ) -> None:
        fmt = formats.FORMATS.get(request.fourcc)
        if fmt is None:
            shown = formats.fourcc_str(request.fourcc)
            await self._fail(
                sock, session, serial, ErrorCode.UNSUPPORTED_FORMAT, f"unknown fourcc {shown!r}"
            )
            return
        if request.flags:
            await self._fail(
                sock,
                session,
                serial,
                ErrorCode.INVALID_ARGUMENT,
                f"unknown flags {request.flags:#x}",
            )
            return
        if not 1 <= request.count <= self.limits.max_count:
            await self._fail(
                sock,
                session,
                serial,
                ErrorCode.INVALID_ARGUMENT if request.count == 0 else ErrorCode.LIMIT_EXCEEDED,
                f"count {request.count} is not within 1..{self.limits.max_count}",
            )
            return
        planned: int | None = None
        try:
            planned = formats.plan(fmt, request.width, request.height, self.limits).size
        except LayoutError:
            pass  # the backend refuses it below, saying why: limits come before quotas
        made: list[Allocation] = []
        try:
            if planned is not None:
                asked = planned * request.count
                self.ledger.check(session.account, self.policy, request.count, asked)
            for _ in range(request.count):
                made.append(self.backend.allocate(fmt, request.width, request.height, self.limits))
            # The quota holds the sizes made (page-rounded, the kernel's pitch), not the plan.
            self.ledger.check(session.account, self.policy, len(made), sum(a.size for a in made))
        except (LayoutError, KernelError, QuotaExceeded) as e:
            for allocation in made:
                self._free(session, allocation)
            if isinstance(e, QuotaExceeded):
                await self._fail(sock, session, serial, ErrorCode.QUOTA_EXCEEDED, str(e))
            elif isinstance(e, LayoutError):
                code = ErrorCode.LIMIT_EXCEEDED if e.limit else ErrorCode.INVALID_ARGUMENT
                await self._fail(sock, session, serial, code, str(e))
            else:
                await self._fail_kernel(sock, session, serial, e)
            return
        self.ledger.charge(session.account, len(made), sum(a.size for a in made))
        infos = []
        for allocation in made:
            ident = session.next_id
            session.next_id += 1
            session.buffers[ident] = allocation
            infos.append(
                BufferInfo(
                    ident,
                    allocation.width,
                    allocation.height,
                    allocation.fourcc,
                    allocation.modifier,
                    allocation.size,
                    allocation.planes,
                )
            )
        # The buffers are the session's now: if delivery fails, disconnect frees them.
        total = len(infos)
        for index in range(0, total, MAX_FDS):
            part = infos[index : index + MAX_FDS]
            fds: list[int] = []
            await self._room(sock)
            try:
                for info in part:
                    fds.append(self.backend.export(session.buffers[info.id]))
                await self._send(sock, Allocated(total, index, tuple(part)), serial, fds)
            except OSError as e:
                # ETOOMANYREFS: our user has too many fds in flight, unread by clients.
                if not isinstance(e, KernelError) and e.errno != errno.ETOOMANYREFS:
                    raise
                # The whole request fails, parts already sent included: on the
                # Error the client closes what it got, and so do we.
                for info in infos:
                    self._drop(session, info.id)
                await self._fail_kernel(sock, session, serial, e)
                return
            finally:
                fdpass.close_fds(fds)

    async def _release(
        self, sock: trio.socket.SocketType, session: Session, serial: int, request: Release
    ) -> None:
        unknown = [i for i in request.ids if i not in session.buffers]
        if unknown or len(set(request.ids)) != len(request.ids):
            what = f"unknown buffer id {unknown[0]}" if unknown else "an id appears twice"
            await self._fail(sock, session, serial, ErrorCode.UNKNOWN_BUFFER, what)
            return
        for ident in request.ids:
            self._drop(session, ident)
        await self._send(sock, Released(len(request.ids)), serial)

    async def _share(
        self, sock: trio.socket.SocketType, session: Session, serial: int, request: Share
    ) -> None:
        if request.id not in session.buffers:
            await self._fail(
                sock, session, serial, ErrorCode.UNKNOWN_BUFFER, f"unknown buffer id {request.id}"
            )
            return
        if session.tokens >= MAX_TOKENS:
            await self._fail(
                sock, session, serial, ErrorCode.LIMIT_EXCEEDED, f"{MAX_TOKENS} tokens per client"
            )
            return
        token = secrets.token_bytes(TOKEN_SIZE)
        self.tokens[token] = _Token(session, request.id, request.once, frozenset(request.uids))
        session.shares.setdefault(request.id, set()).add(token)
        session.tokens += 1
        await self._send(sock, Shared(token), serial)

    async def _open_shared(
        self, sock: trio.socket.SocketType, session: Session, serial: int, request: OpenShared
    ) -> None:
        # Wait first: a token looked up before an await may be revoked, used up or
        # released (its buffer freed, its GEM handle or fd number reused) by then.
        await self._room(sock)
        entry = self.tokens.get(request.token)
        if entry is None or (entry.uids and session.uid not in entry.uids):
            await self._fail(sock, session, serial, ErrorCode.UNKNOWN_TOKEN, _NO_TOKEN)
            return
        once = request.token if entry.once else None
        if await self._hand_over(sock, session, serial, entry.owner.buffers[entry.id], once):
            log.debug("%s opened a buffer of %s", session, entry.owner)

    async def _hand_over(
        self,
        sock: trio.socket.SocketType,
        session: Session,
        serial: int,
        allocation: Allocation,
        once: bytes | None = None,
    ) -> bool:
        """Send a fresh fd of someone else's buffer (as an ALLOCATED of one, id 0: it stays
        its owner's). False if the export failed (the Error was sent).

        The caller looked ``allocation`` up after its last await: it is exported before
        anything else can run, and the single-use token ``once`` is spent at once."""
        try:
            fd = self.backend.export(allocation)
        except KernelError as e:
            await self._fail_kernel(sock, session, serial, e)
            return False
        if once is not None:
            self._forget(once)
        try:
            info = BufferInfo(
                0,
                allocation.width,
                allocation.height,
                allocation.fourcc,
                allocation.modifier,
                allocation.size,
                allocation.planes,
            )
            await self._send(sock, Allocated(1, 0, (info,)), serial, [fd])
        except OSError as e:
            if e.errno != errno.ETOOMANYREFS:
                raise
            await self._fail_kernel(sock, session, serial, e)
            return False
        finally:
            os.close(fd)
        return True

    async def _revoke(
        self, sock: trio.socket.SocketType, session: Session, serial: int, request: Revoke
    ) -> None:
        entry = self.tokens.get(request.token)
        if entry is None or entry.owner is not session:
            await self._fail(sock, session, serial, ErrorCode.UNKNOWN_TOKEN, _NO_TOKEN)
            return
        self._forget(request.token)
        await self._send(sock, Revoked(), serial)

    def _forget(self, token: bytes) -> None:
        entry = self.tokens.pop(token)
        tokens = entry.owner.shares[entry.id]
        tokens.discard(token)
        if not tokens:
            del entry.owner.shares[entry.id]
        entry.owner.tokens -= 1

    async def _query(self, sock: trio.socket.SocketType, session: Session, serial: int) -> None:
        driver, limits = self.backend.driver, self.limits
        quotas = self.policy.quotas
        if self.policy.is_admin(session.account.peer):
            quota_buffers = quota_bytes = 0
        else:
            quota_buffers = _tightest(quotas.buffers_per_client, quotas.buffers_per_uid)
            quota_bytes = _tightest(quotas.bytes_per_client, quotas.bytes_per_uid)
        used = session.account.own
        reply = Queried(
            self.backend.kind,
            driver.name,
            (driver.major, driver.minor, driver.patch),
            self.backend.node,
            limits.max_width,
            limits.max_height,
            limits.max_count,
            limits.max_size,
            _FORMATS,
            (formats.MOD_LINEAR,),
            quota_buffers,
            quota_bytes,
            used.buffers,
            used.bytes,
        )
        await self._send(sock, reply, serial)

    def _sees_all(self, session: Session) -> bool:
        """Root and the admin group see (and may open) every client's buffers."""
        return session.uid == 0 or self.policy.is_admin(session.account.peer)

    async def _list(
        self, sock: trio.socket.SocketType, session: Session, serial: int, request: List
    ) -> None:
        visible = (
            sorted(self.sessions, key=lambda s: s.number) if self._sees_all(session) else [session]
        )
        rows: list[ClientEntry] | list[BufferEntry]
        if request.what == protocol.LIST_CLIENTS:
            page = LIST_PAGE_CLIENTS
            rows = [
                ClientEntry(
                    s.number, s.pid, s.uid, s.gid, int(s.since * 1000),
                    s.account.own.buffers, s.account.own.bytes, s.name,
                )
                for s in visible
            ]  # fmt: skip
        elif request.what == protocol.LIST_BUFFERS:
            page = LIST_PAGE_BUFFERS
            now = time.monotonic()
            rows = [
                BufferEntry(
                    s.number, ident, a.width, a.height, a.fourcc, a.size,
                    int((now - a.born) * 1000), len(s.shares.get(ident, ())),
                )
                for s in visible
                for ident, a in s.buffers.items()
            ]  # fmt: skip
        else:
            await self._fail(
                sock, session, serial, ErrorCode.INVALID_ARGUMENT, f"LIST of kind {request.what}"
            )
            return
        end = request.start + page
        following = end if end < len(rows) else 0
        chunk = tuple(rows[request.start : end])
        await self._send(sock, Listed(request.what, following, chunk), serial)  # type: ignore[arg-type]

    async def _stats(self, sock: trio.socket.SocketType, serial: int) -> None:
        counters = [
            *((1, op, n) for op, n in sorted(self.requests_by_opcode.items())),
            *((2, code, n) for code, n in sorted(self.errors_by_code.items())),
            (3, 1, self.stats["bad_messages"]),
            (3, 2, self.stats["refused"]),
        ]
        reply = Statistics(
            int((time.monotonic() - self.started) * 1000),
            len(self.sessions),
            self.live_buffers,
            sum(s.account.own.bytes for s in self.sessions),
            len(self.tokens),
            tuple(counters),
        )
        await self._send(sock, reply, serial)

    async def _open_buffer(
        self, sock: trio.socket.SocketType, session: Session, serial: int, request: OpenBuffer
    ) -> None:
        if not self._sees_all(session):
            await self._fail(
                sock,
                session,
                serial,
                ErrorCode.PERMISSION_DENIED,
                "only root and the admin group open other clients' buffers",
            )
            return
        await self._room(sock)  # before the lookup, as in _open_shared
        owner = next((s for s in self.sessions if s.number == request.client), None)
        allocation = owner.buffers.get(request.id) if owner else None
        if allocation is None:
            await self._fail(
                sock,
                session,
                serial,
                ErrorCode.UNKNOWN_BUFFER,
                f"no buffer {request.client}:{request.id}",
            )
            return
        if await self._hand_over(sock, session, serial, allocation):
            log.info("%s opened buffer %d of %s", session, request.id, owner)

    def _free(self, session: Session, allocation: Allocation) -> None:
        try:
            self.backend.free(allocation)
        except KernelError as e:  # never seen; log it rather than lose the session's others
            log.error("%s: freeing a buffer failed: %s", session, e)

    def _drop(self, session: Session, ident: int) -> None:
        for token in list(session.shares.get(ident, ())):  # tokens die with their buffer
            self._forget(token)
        allocation = session.buffers.pop(ident)
        self.ledger.refund(session.account, 1, allocation.size)
        self._free(session, allocation)

    def _free_all(self, session: Session) -> int:
        count = len(session.buffers)
        for ident in list(session.buffers):
            self._drop(session, ident)
        return count


def _tightest(*quotas: int) -> int:
    """The smallest quota that is set (0 where none is)."""
    return min((q for q in quotas if q), default=0)


async def _hang_up(sock: trio.socket.SocketType) -> None:
    """Let the peer read what was sent before the close.

    A socket closed with unread messages makes the peer's next recv fail with
    ECONNRESET before it reads ours; so stop the peer sending, then drop what it sent.
    """
    sock.shutdown(socket.SHUT_RDWR)
    while True:
        data, ancdata, msg_flags, _ = await sock.recvmsg(
            MAX_MESSAGE, fdpass.ANCILLARY_SPACE, fdpass.RECV_FLAGS
        )
        try:
            fdpass.close_fds(fdpass.take_fds(ancdata, msg_flags))
        except RemoteProtocolError:
            pass
        if not data and not ancdata:
            return


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
) -> None:
    """Serve on ``path`` until SIGTERM or SIGINT; free everything and remove the socket.

    ``raise_fd_limit``: raise the soft RLIMIT_NOFILE to the hard one (False where the
    caller set it, as systemd's LimitNOFILE= does).

    ``activated`` is a socket systemd passed, already listening at ``path``: it is
    served and left in place. SIGHUP reloads (:meth:`Daemon.reload`). With
    $NOTIFY_SOCKET set, systemd hears READY=1, RELOADING=1, STOPPING=1, STATUS=
    and, with $WATCHDOG_USEC, WATCHDOG=1.
    """
    daemon = Daemon(backend, limits, policy, reload, send_timeout)
    reload_note = ""
    if raise_fd_limit:
        fdpass.raise_fd_limit()

    def status() -> str:
        kind = backend.kind.name.lower()
        return f"serving {kind} buffers on {path}: {daemon.summary()}{reload_note}"

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
                        "serving %s buffers from %s (%s %d.%d.%d) on %s",
                        backend.kind.name.lower(),
                        backend.node or "memfd",
                        backend.driver.name,
                        backend.driver.major,
                        backend.driver.minor,
                        backend.driver.patch,
                        path,
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
