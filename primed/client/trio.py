"""The trio client: many tasks may share one connection, with requests in flight at once.

A reader task owns the receiving side and hands each completed reply to the
task waiting on its serial. A task cancelled while its Allocate is in flight
does not leak: when the reply arrives, its buffers are closed and released.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import cast, overload

import trio

from primed import fdpass
from primed.client.blocking import _default_name
from primed.client.buffer import Buffer
from primed.client.connection import (
    ClientConnection,
    Offer,
    Result,
    ServerInfo,
    buffer_ids,
    socket_path,
    unwrap,
)
from primed.errors import ConnectionLost, PrimedError
from primed.wire.schema import MAX_MESSAGE


class _Waiter:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Result | BaseException | None = None


class AsyncClient:
    """A connection to the daemon. Use ``async with primed.connect_async() as client``."""

    def __init__(self, sock: trio.socket.SocketType, name: str):
        self._sock = sock
        self._conn = ClientConnection(name)
        self._send_lock = trio.Lock()
        self._waiting: dict[int, _Waiter] = {}
        self._abandoned: set[int] = set()
        self._broken: BaseException | None = None
        self.info: ServerInfo

    async def _call(self, serial: int, data: bytes) -> Result:
        if self._broken is not None:
            raise ConnectionLost(f"connection lost: {self._broken}")
        waiter = self._waiting[serial] = _Waiter()
        try:
            async with self._send_lock:
                try:
                    await self._sock.sendmsg([data])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the reader hears why the daemon closed, and wakes us
            await waiter.done.wait()
        except BaseException:
            if self._waiting.pop(serial, None) is not None:
                self._abandoned.add(serial)
            raise
        if isinstance(waiter.result, BaseException) and not isinstance(waiter.result, PrimedError):
            raise ConnectionLost(f"connection lost: {waiter.result}") from waiter.result
        return unwrap(cast(Result, waiter.result))

    async def _read(self) -> None:
        try:
            while True:
                data, ancdata, msg_flags, _ = await self._sock.recvmsg(
                    MAX_MESSAGE, fdpass.ANCILLARY_SPACE, fdpass.RECV_FLAGS
                )
                fds = fdpass.take_fds(ancdata, msg_flags)
                if not data and not fds:
                    raise ConnectionLost("the daemon closed the connection")
                done = self._conn.receive(data, fds)
                if done is None:
                    continue
                serial, result = done
                waiter = self._waiting.pop(serial, None)
                if waiter is not None:
                    waiter.result = result
                    waiter.done.set()
                elif serial in self._abandoned:
                    self._abandoned.discard(serial)
                    if isinstance(result, list):
                        await self._give_back(result)
                elif serial == 0 and isinstance(result, PrimedError):
                    raise result
        except (OSError, PrimedError) as e:
            self._fail_all(e)
        finally:
            self._conn.abandon()

    async def _give_back(self, buffers: list[Buffer]) -> None:
        for buffer in buffers:
            buffer.close()
        serial, data = self._conn.release(buffer_ids(buffers))
        self._abandoned.add(serial)  # its reply is nobody's
        async with self._send_lock:
            await self._sock.sendmsg([data])

    def _fail_all(self, error: BaseException) -> None:
        self._broken = error
        for waiter in self._waiting.values():
            waiter.result = error
            waiter.done.set()
        self._waiting.clear()

    @overload
    async def allocate(self, width: int, height: int, format: str | int = ...) -> Buffer: ...
    @overload
    async def allocate(
        self, width: int, height: int, format: str | int = ..., *, count: int
    ) -> list[Buffer]: ...

    async def allocate(
        self, width: int, height: int, format: str | int = "XR24", *, count: int | None = None
    ) -> Buffer | list[Buffer]:
        """As :meth:`primed.Client.allocate`."""
        buffers = cast(
            list[Buffer],
            await self._call(
                *self._conn.allocate(width, height, format, 1 if count is None else count)
            ),
        )
        return buffers if count is not None else buffers[0]

    async def release(self, *buffers: Buffer | int, close: bool = True) -> int:
        """As :meth:`primed.Client.release`."""
        count = cast(int, await self._call(*self._conn.release(buffer_ids(buffers))))
        if close:
            for b in buffers:
                if isinstance(b, Buffer):
                    b.close()
        return count

    async def share(
        self, buffer: Buffer | int, uids: Iterable[int] | None = None, once: bool = False
    ) -> str:
        """As :meth:`primed.Client.share`."""
        ident = buffer.id if isinstance(buffer, Buffer) else buffer
        return cast(str, await self._call(*self._conn.share(ident, once, uids or ())))

    async def open_shared(self, token: str | bytes) -> Buffer:
        """As :meth:`primed.Client.open_shared`."""
        return cast(list[Buffer], await self._call(*self._conn.open_shared(token)))[0]

    async def revoke(self, token: str | bytes) -> None:
        """As :meth:`primed.Client.revoke`."""
        await self._call(*self._conn.revoke(token))

    async def query(self) -> Offer:
        """As :meth:`primed.Client.query`."""
        return cast(Offer, await self._call(*self._conn.query()))


@asynccontextmanager
async def connect_async(
    path: str | None = None, *, name: str | None = None
) -> AsyncIterator[AsyncClient]:
    """Connect to the daemon (as :func:`primed.connect`) for the length of an ``async with``."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with sock:
        where = socket_path(path)
        try:
            await sock.connect(where)
        except OSError as e:  # connect() names no path: say which socket was tried
            raise OSError(e.errno, e.strerror, where) from None
        client = AsyncClient(sock, _default_name() if name is None else name)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._read)
                try:
                    client.info = cast(ServerInfo, await client._call(*client._conn.hello()))
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader task never raises, so a lone exception is the caller's own
            # (or the handshake's): give it back as it was, not wrapped in a group.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
