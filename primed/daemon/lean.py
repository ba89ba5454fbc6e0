"""A trio socket for request-reply traffic that costs what the syscalls cost.

trio's own socket methods wrap every call in two trips through the scheduler:
a cancellation check before the syscall, and a yield after it even when it
succeeded at once. For a daemon answering small requests, those trips cost more
than the kernel's work (benchmarks/ measures it). :class:`LeanSocket` calls the
syscall first and waits for readiness only when it would block, as trio does,
but skips the yield after a call that succeeded. So that one client that keeps
its socket full can't starve the others, or hold off a cancellation, it yields
after :data:`FAIRNESS` calls in a row that did not wait, or once :data:`SLICE`
seconds have passed since it last let others run: a client whose requests are
costly (LIST pages) gets its turn and then waits for everyone else's.

Only what primed uses is implemented: the rest of the trio socket API raises
NotImplementedError.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Self, TypeVar, overload

import trio

#: Calls that succeed without waiting before the socket yields to other tasks.
FAIRNESS = 16
#: Seconds of the loop one socket's task may hold, counted from its last yield or wait,
#: before its next call yields first.
SLICE = 0.0005

_T = TypeVar("_T")


class LeanSocket(trio.socket.SocketType):
    """Takes over a connected trio socket (which is detached and no longer usable)."""

    def __init__(self, sock: trio.socket.SocketType):
        super().__init__()
        self._sock = socket.socket(fileno=sock.detach())
        self._sock.setblocking(False)
        self._streak = 0
        self._since = time.perf_counter()  # when this task last let others run

    async def _call(
        self, wait: Callable[[socket.socket], Any], call: Callable[..., _T], *args: Any
    ) -> _T:
        if self._streak >= FAIRNESS or time.perf_counter() - self._since > SLICE:
            self._streak = 0
            await trio.lowlevel.checkpoint()
            self._since = time.perf_counter()
        while True:
            try:
                result = call(*args)
            except BlockingIOError:
                self._streak = 0
                await wait(self._sock)
                self._since = time.perf_counter()
            else:
                self._streak += 1
                return result

    async def recvmsg(
        self, bufsize: int, ancbufsize: int = 0, flags: int = 0, /
    ) -> tuple[bytes, list[tuple[int, int, bytes]], int, Any]:
        # _call's loop, written out: the daemon reads every request here.
        if self._streak >= FAIRNESS or time.perf_counter() - self._since > SLICE:
            self._streak = 0
            await trio.lowlevel.checkpoint()
            self._since = time.perf_counter()
        while True:
            try:
                result = self._sock.recvmsg(bufsize, ancbufsize, flags)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(self._sock)
                self._since = time.perf_counter()
            else:
                self._streak += 1
                return result

    async def sendmsg(
        self,
        buffers: Iterable[Any],
        ancdata: Iterable[tuple[int, int, Any]] = (),
        flags: int = 0,
        address: Any = None,
        /,
    ) -> int:
        if address is not None:
            raise NotImplementedError("a LeanSocket is connected: no address")
        return await self._call(
            trio.lowlevel.wait_writable, self._sock.sendmsg, list(buffers), list(ancdata), flags
        )

    def try_sendmsg(self, buffers: list[Any], ancdata: list[tuple[int, int, Any]]) -> int | None:
        """sendmsg() if the socket has room now, else None (nothing sent); no scheduling."""
        try:
            return self._sock.sendmsg(buffers, ancdata)
        except BlockingIOError:
            return None

    def try_send(self, data: bytes) -> bool:
        """send() of one datagram with no fds if the socket has room now (True), else
        False (nothing sent); no scheduling. send() skips sendmsg's argument parsing."""
        try:
            self._sock.send(data)
        except BlockingIOError:
            return False
        return True

    async def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        return await self._call(trio.lowlevel.wait_readable, self._sock.recv, bufsize, flags)

    async def send(self, data: Any, flags: int = 0, /) -> int:
        return await self._call(trio.lowlevel.wait_writable, self._sock.send, data, flags)

    def fileno(self) -> int:
        return self._sock.fileno()

    @overload
    def getsockopt(self, level: int, optname: int) -> int: ...
    @overload
    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...

    def getsockopt(self, level: int, optname: int, buflen: int | None = None) -> int | bytes:
        if buflen is None:
            return self._sock.getsockopt(level, optname)
        return self._sock.getsockopt(level, optname, buflen)

    def setsockopt(self, level: int, optname: int, value: int | bytes, /) -> None:  # type: ignore[override]
        self._sock.setsockopt(level, optname, value)

    def shutdown(self, flag: int) -> None:
        self._sock.shutdown(flag)

    def close(self) -> None:
        if self._sock.fileno() != -1:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def family(self) -> socket.AddressFamily:
        return self._sock.family

    @property
    def type(self) -> socket.SocketKind:
        return self._sock.type

    def __repr__(self) -> str:
        return f"<LeanSocket fd={self._sock.fileno()}>"
