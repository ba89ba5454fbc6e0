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
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import cast

import trio

from primed import fdpass, formats, protocol
from primed.backends import Allocation, BufferSource
from primed.errors import ErrorCode, KernelError, ProtocolError, RemoteProtocolError
from primed.formats import LayoutError, Limits
from primed.protocol import (
    Allocate,
    Allocated,
    BufferInfo,
    Error,
    Hello,
    Release,
    Released,
    Reply,
    Request,
    Welcome,
)
from primed.schema import MAX_FDS, MAX_MESSAGE, VERSION

log = logging.getLogger("primed")

_BACKOFF_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_PEERCRED = struct.Struct("3i")


@dataclasses.dataclass(eq=False)
class Session:
    """One connected client and the buffers it owns."""

    number: int
    pid: int
    uid: int
    gid: int
    since: float = dataclasses.field(default_factory=time.time)
    name: str = ""
    version: int = 0  # 0 until Hello was answered
    buffers: dict[int, Allocation] = dataclasses.field(default_factory=dict)
    next_id: int = 1

    def __str__(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return f"client {self.number}{name} (pid {self.pid}, uid {self.uid})"


class _Drop(Exception):
    """End this client's connection (after the reply already queued)."""


class Daemon:
    """The buffer registry and request handling, over any listening socket."""

    def __init__(self, backend: BufferSource, limits: Limits | None = None):
        self.backend = backend
        self.limits = limits or Limits()
        self.sessions: set[Session] = set()
        self._numbers = itertools.count(1)
        self.stats = {"requests": 0, "errors": 0, "bad_messages": 0}

    @property
    def live_buffers(self) -> int:
        return sum(len(s.buffers) for s in self.sessions)

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
                nursery.start_soon(self._serve_client, sock)

    async def _serve_client(self, sock: trio.socket.SocketType) -> None:
        with sock:
            try:
                pid, uid, gid = _PEERCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
                )
            except OSError:
                return
            session = Session(next(self._numbers), pid, uid, gid)
            self.sessions.add(session)
            log.info("%s connected", session)
            try:
                await self._converse(sock, session)
            except _Drop:
                pass
            except OSError as e:
                log.info("%s: connection failed: %s", session, e)
            finally:
                self.sessions.discard(session)
                freed = self._free_all(session)
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
            await self._dispatch(sock, session, serial, cast(Request, request))

    async def _refuse(
        self, sock: trio.socket.SocketType, session: Session, e: ProtocolError
    ) -> None:
        self.stats["bad_messages"] += 1
        log.warning("%s sent a bad message, disconnecting: %s", session, e)
        try:
            await self._send(sock, Error(ErrorCode.BAD_MESSAGE, 0, str(e)), e.serial)
        except OSError:
            pass
        raise _Drop

    async def _send(
        self, sock: trio.socket.SocketType, reply: Reply, serial: int, fds: list[int] | None = None
    ) -> None:
        await sock.sendmsg([protocol.encode(reply, serial)], fdpass.rights(fds or []))

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
        made: list[Allocation] = []
        try:
            for _ in range(request.count):
                made.append(self.backend.allocate(fmt, request.width, request.height, self.limits))
        except (LayoutError, KernelError) as e:
            for allocation in made:
                self._free(session, allocation)
            if isinstance(e, LayoutError):
                code = ErrorCode.LIMIT_EXCEEDED if e.limit else ErrorCode.INVALID_ARGUMENT
                await self._fail(sock, session, serial, code, str(e))
            else:
                await self._fail(
                    sock, session, serial, ErrorCode.KERNEL, e.strerror or "", e.errno or 0
                )
            return
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
            try:
                for info in part:
                    fds.append(self.backend.export(session.buffers[info.id]))
                await self._send(sock, Allocated(total, index, tuple(part)), serial, fds)
            except KernelError as e:
                # Export failed part-way: the client can't get the whole reply.
                for info in infos[index:]:
                    self._free(session, session.buffers.pop(info.id))
                if index == 0:
                    await self._fail(
                        sock, session, serial, ErrorCode.KERNEL, e.strerror or "", e.errno or 0
                    )
                    return
                log.error("%s: export failed mid-reply: %s", session, e)
                raise _Drop from e
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
            self._free(session, session.buffers.pop(ident))
        await self._send(sock, Released(len(request.ids)), serial)

    def _free(self, session: Session, allocation: Allocation) -> None:
        try:
            self.backend.free(allocation)
        except KernelError as e:  # never seen; log it rather than lose the session's others
            log.error("%s: freeing a buffer failed: %s", session, e)

    def _free_all(self, session: Session) -> int:
        count = len(session.buffers)
        for allocation in session.buffers.values():
            self._free(session, allocation)
        session.buffers.clear()
        return count


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
) -> None:
    """Serve on ``path`` until SIGTERM or SIGINT; free everything and remove the socket."""
    daemon = Daemon(backend, limits)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        listener = trio.socket.from_stdlib_socket(bind(path, mode))
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
                    if ready is not None:
                        ready(daemon)
                    async for signum in signals:
                        log.info("%s: stopping", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        break
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            backend.close()
    log.info("stopped")
