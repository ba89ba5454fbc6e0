"""The blocking client: one socket, no event loop; requests may be pipelined."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterable
from types import TracebackType
from typing import Generic, TypeVar, cast, overload

from primed import fdpass
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
from primed.errors import ConnectionLost
from primed.wire.protocol import (
    LIST_BUFFERS,
    LIST_CLIENTS,
    BufferEntry,
    ClientEntry,
    Listed,
    Statistics,
)


def _default_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


T = TypeVar("T")


class Pending(Generic[T]):
    """A request sent but not yet answered (see :meth:`Client.start_allocate`)."""

    __slots__ = ("_client", "_many", "serial")

    def __init__(self, client: Client, serial: int, many: bool = True):
        self._client = client
        self._many = many
        self.serial = serial

    def wait(self) -> T:
        """Read replies until this one has come; return its result or raise its error.

        Replies to other pending requests that arrive first are kept for them.
        """
        result = self._client._wait(self.serial)
        if isinstance(result, list) and not self._many:
            return cast(T, result[0])
        return cast(T, result)


class Client:
    """A connection to the daemon. Use :func:`primed.connect` to make one.

    Each method sends one request and waits for its answer. To have many
    requests in flight, use ``start_allocate`` / ``start_release`` and wait on
    the returned :class:`Pending` objects later, in any order.
    """

    def __init__(self, sock: socket.socket, name: str | None = None):
        self._sock = sock
        self._conn = ClientConnection(_default_name() if name is None else name)
        self._ready: dict[int, Result] = {}  # answers that came before they were waited on
        self.info: ServerInfo = cast(ServerInfo, self._call(*self._conn.hello()))

    def _send(self, serial: int, data: bytes) -> int:
        try:
            fdpass.send(self._sock, data, [])
        except (BrokenPipeError, ConnectionResetError):
            pass  # a daemon that refused us said why before closing: read on
        return serial

    def _wait(self, serial: int) -> Result:
        if serial in self._ready:
            return unwrap(self._ready.pop(serial))
        try:
            while True:
                received, fds = fdpass.recv(self._sock)
                if not received and not fds:
                    raise ConnectionLost("the daemon closed the connection")
                done = self._conn.receive(received, fds)
                if done is not None:
                    got, result = done
                    if got in (serial, 0):
                        return unwrap(result)
                    self._ready[got] = result
        except (BrokenPipeError, ConnectionResetError) as e:
            self._conn.abandon()
            raise ConnectionLost(f"the daemon closed the connection: {e}") from None

    def _call(self, serial: int, data: bytes) -> Result:
        return self._wait(self._send(serial, data))

    @overload
    def start_allocate(
        self, width: int, height: int, format: str | int = ...
    ) -> Pending[Buffer]: ...
    @overload
    def start_allocate(
        self, width: int, height: int, format: str | int = ..., *, count: int
    ) -> Pending[list[Buffer]]: ...

    def start_allocate(
        self, width: int, height: int, format: str | int = "XR24", *, count: int | None = None
    ) -> Pending[Buffer] | Pending[list[Buffer]]:
        """Send an Allocate and return at once; ``wait()`` gives what allocate() would."""
        request = self._conn.allocate(width, height, format, 1 if count is None else count)
        if count is None:
            # Not Pending[Buffer](...): that form costs microseconds (typing tries to
            # set __orig_class__ on a slotted object) on every request.
            one: Pending[Buffer] = Pending(self, self._send(*request), many=False)
            return one
        many: Pending[list[Buffer]] = Pending(self, self._send(*request))
        return many

    def start_release(self, *buffers: Buffer | int) -> Pending[int]:
        """Send a Release and return at once; ``wait()`` gives the count released.

        Buffers' fds are not closed: close them yourself.
        """
        pending: Pending[int] = Pending(self, self._send(*self._conn.release(buffer_ids(buffers))))
        return pending

    @overload
    def allocate(self, width: int, height: int, format: str | int = ...) -> Buffer: ...
    @overload
    def allocate(
        self, width: int, height: int, format: str | int = ..., *, count: int
    ) -> list[Buffer]: ...

    def allocate(
        self, width: int, height: int, format: str | int = "XR24", *, count: int | None = None
    ) -> Buffer | list[Buffer]:
        """Allocate one buffer, or a list of ``count`` buffers.

        ``format`` is a fourcc ("NV12"), a DRM name ("XRGB8888") or a fourcc
        integer. Raises ServerError (e.g. LIMIT_EXCEEDED, or KERNEL with the
        kernel's errno), ConnectionLost, ValueError for an unknown format.
        """
        if count is None:
            return self.start_allocate(width, height, format).wait()
        return self.start_allocate(width, height, format, count=count).wait()

    def release(self, *buffers: Buffer | int, close: bool = True) -> int:
        """Drop the daemon's reference to ``buffers`` (Buffers or ids); returns how many.

        With ``close`` (the default) each Buffer's own fd is closed too. Memory
        stays alive while a mapping, a GEM handle or an fd elsewhere refers to it.
        """
        count = cast(int, self._call(*self._conn.release(buffer_ids(buffers))))
        if close:
            for b in buffers:
                if isinstance(b, Buffer):
                    b.close()
        return count

    def share(
        self, buffer: Buffer | int, uids: Iterable[int] | None = None, once: bool = False
    ) -> str:
        """A token (hex text) with which another client can open ``buffer``.

        ``uids`` limits who may open it (by their uid); ``once`` makes it work
        once. It stops working on :meth:`revoke`, or when the buffer is released
        or this client disconnects. Raises ServerError UNKNOWN_BUFFER.
        """
        ident = buffer.id if isinstance(buffer, Buffer) else buffer
        return cast(str, self._call(*self._conn.share(ident, once, uids or ())))

    def open_shared(self, token: str | bytes) -> Buffer:
        """The buffer another client shared as ``token`` (its id is 0: it stays theirs).

        Raises ServerError UNKNOWN_TOKEN, the same for every token that can't be
        opened (wrong, revoked, used, dead, or not for this uid).
        """
        return cast(list[Buffer], self._call(*self._conn.open_shared(token)))[0]

    def revoke(self, token: str | bytes) -> None:
        """Make one of this client's tokens stop working. Raises ServerError UNKNOWN_TOKEN."""
        self._call(*self._conn.revoke(token))

    def query(self) -> Offer:
        """What the daemon offers: formats, modifiers, limits, and this client's quota use."""
        return cast(Offer, self._call(*self._conn.query()))

    def clients(self) -> list[ClientEntry]:
        """The connected clients this client may see (all for root and the admin group,
        else itself)."""
        return cast(list[ClientEntry], self._pages(LIST_CLIENTS))

    def buffers(self) -> list[BufferEntry]:
        """The live buffers this client may see (all for root and the admin group, else
        its own)."""
        return cast(list[BufferEntry], self._pages(LIST_BUFFERS))

    def _pages(self, what: int) -> list[ClientEntry | BufferEntry]:
        entries: list[ClientEntry | BufferEntry] = []
        start = 0
        while True:
            page = cast(Listed, self._call(*self._conn.list_page(what, start)))
            entries += page.entries
            if not page.next:
                return entries
            start = page.next

    def stats(self) -> Statistics:
        """The daemon's counters and totals."""
        return cast(Statistics, self._call(*self._conn.stats()))

    def open_buffer(self, client: int, ident: int) -> Buffer:
        """Buffer ``ident`` of client number ``client`` (as :meth:`buffers` shows them).

        Only root and the daemon's admin group may; others get ServerError
        PERMISSION_DENIED. The returned Buffer has id 0: it stays its owner's.
        """
        return cast(list[Buffer], self._call(*self._conn.open_buffer(client, ident)))[0]

    def close(self) -> None:
        """Disconnect; the daemon frees every buffer this client still owned."""
        self._conn.abandon()
        for result in self._ready.values():
            if isinstance(result, list):
                for buffer in result:
                    buffer.close()
        self._ready.clear()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect(path: str | None = None, *, name: str | None = None) -> Client:
    """Connect to the daemon at ``path`` (default: $PRIMED_SOCKET, else
    /run/primed/primed.sock) and shake hands. Raises OSError if nothing listens.
    """
    where = socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(where)
        except OSError as e:  # connect() names no path: say which socket was tried
            raise OSError(e.errno, e.strerror, where) from None
        return Client(sock, name)
    except BaseException:
        sock.close()
        raise
