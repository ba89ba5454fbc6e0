"""The blocking client: one socket, no event loop; requests may be pipelined.

Every protocol rule lives in :class:`primed.client.core.ClientConnection`; this
module only sends its datagrams and feeds it what the socket receives.

Time: :func:`connect` bounds the wait for the WELCOME (:data:`HANDSHAKE_TIMEOUT`
unless told otherwise), and ``timeout=`` there becomes the bound of every later
wait. A wait that runs out raises :class:`Timeout` and breaks the connection:
the answer may still come, and a reply to a request nobody tracks any more would
be taken for another's, so later calls raise ConnectionLost.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Generic, TypeVar

from primed import fdpass
from primed.client.buffer import Buffer
from primed.client.core import (
    Call,
    ClientConnection,
    Offer,
    Page,
    ServerInfo,
    Timeout,
    buffer_ids,
    socket_path,
)
from primed.errors import ConnectionLost
from primed.wire.protocol import AllocatorInfo, BufferEntry, ClientEntry, Statistics
from primed.wire.schema import VERSION

T = TypeVar("T")
E = TypeVar("E", ClientEntry, BufferEntry)

#: How long :func:`connect` waits for the daemon's WELCOME unless given a timeout:
#: a daemon that accepts and then says nothing is stuck, or not primed.
HANDSHAKE_TIMEOUT = 5.0

_recv = fdpass.recv


class _Unset:
    """The type of connect()'s default timeout (None means "no bound")."""


_UNSET = _Unset()


def _default_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


class Pending(Generic[T]):
    """A request sent but not yet answered (see :meth:`Client.start_allocate`)."""

    __slots__ = ("_call", "_client")

    def __init__(self, client: Client, call: Call[T]):
        self._client = client
        self._call = call

    @property
    def serial(self) -> int:
        """The request's serial."""
        return self._call.serial

    def wait(self, timeout: float | _Unset | None = _UNSET) -> T:
        """Read replies until this one has come; return its result or raise its error.

        Replies to other pending requests that arrive first are kept for them.
        ``timeout`` (seconds; None: none) bounds the wait, by default as the
        connection's does; past it, raises :class:`primed.Timeout` and the
        connection is unusable. Waiting again returns the same result (the same
        Buffer objects, already the caller's) or raises the same error.
        """
        return self._client._wait(
            self._call, self._client._timeout if isinstance(timeout, _Unset) else timeout
        )


class Client:
    """A connection to the daemon. Use :func:`primed.connect` to make one.

    Each method sends one request and waits for its answer. To have many
    requests in flight, use the ``start_*`` methods and wait on the returned
    :class:`Pending` objects later, in any order.
    """

    def __init__(
        self,
        sock: socket.socket,
        name: str | None = None,
        timeout: float | _Unset | None = _UNSET,
        max_version: int = VERSION,
    ):
        self._sock = sock
        self._core = ClientConnection(
            _default_name() if name is None else name, max_version=max_version
        )
        handshake = HANDSHAKE_TIMEOUT if isinstance(timeout, _Unset) else timeout
        #: The bound of every call's wait, in seconds; None: none.
        self._timeout = None if isinstance(timeout, _Unset) else timeout
        call = self._core.hello()
        self._send(call.data)
        self.info: ServerInfo = self._wait(call, handshake)

    def _send(self, data: bytes) -> None:
        try:
            # What fdpass.send does with no fds, one call fewer on every request.
            self._sock.send(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a daemon that refused us said why before closing: read on

    def _start(self, call: Call[T]) -> Pending[T]:
        self._send(call.data)
        # Not Pending[T](...): that form costs microseconds (typing tries to set
        # __orig_class__ on a slotted object) on every request.
        return Pending(self, call)

    def _wait(self, call: Call[T], timeout: float | None) -> T:
        core, sock = self._core, self._sock
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not call.done:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        core.fail(Timeout(f"no answer to request {call.serial} in {timeout} s"))
                        break
                    sock.settimeout(left)
                try:
                    data, fds = _recv(sock)
                except fdpass.Truncated as e:
                    core.truncated(e)
                except TimeoutError:
                    core.fail(Timeout(f"no answer to request {call.serial} in {timeout} s"))
                except OSError as e:
                    core.fail(ConnectionLost(f"the daemon closed the connection: {e}"))
                else:
                    core.receive(data, fds)
                if core._outbox:  # give-back RELEASEs, rare: no call for an empty list
                    for datagram in core.data_to_send():
                        self._send(datagram)
        finally:
            if deadline is not None:
                sock.settimeout(None)
        return core.take(call)

    def _call(self, call: Call[T]) -> T:
        core, sock = self._core, self._sock
        try:
            sock.send(call.data)  # as _send, inline: this is every request's path
        except (BrokenPipeError, ConnectionResetError):
            pass
        if self._timeout is not None:
            return self._wait(call, self._timeout)
        # _wait's loop with no deadline (the socket has no timeout then), inline: the
        # common request's whole wait is one receive.
        while not call.done:
            try:
                data, fds = _recv(sock)
            except fdpass.Truncated as e:
                core.truncated(e)
            except OSError as e:
                core.fail(ConnectionLost(f"the daemon closed the connection: {e}"))
            else:
                core.receive(data, fds)
            if core._outbox:
                for datagram in core.data_to_send():
                    self._send(datagram)
        return core.take(call)

    def start_allocate(
        self,
        width: int,
        height: int,
        format: str | int = "XR24",
        *,
        allocator: str = "",
        usage: int = 0,
        device: str = "",
    ) -> Pending[Buffer]:
        """Send an ALLOCATE and return at once; ``wait()`` gives what allocate() would."""
        return self._start(
            self._core.allocate(
                width, height, format, allocator=allocator, usage=usage, device=device
            )
        )

    def start_allocate_many(
        self,
        width: int,
        height: int,
        format: str | int,
        count: int,
        *,
        allocator: str = "",
        usage: int = 0,
        device: str = "",
    ) -> Pending[list[Buffer]]:
        """Send an ALLOCATE and return at once; ``wait()`` gives what allocate_many() would."""
        return self._start(
            self._core.allocate_many(
                width, height, format, count, allocator=allocator, usage=usage, device=device
            )
        )

    def start_release(self, *buffers: Buffer | int) -> Pending[int]:
        """Send a RELEASE and return at once; ``wait()`` gives the count released.

        Buffers' fds are not closed: close them yourself.
        """
        return self._start(self._core.release(buffer_ids(buffers)))

    def allocate(
        self,
        width: int,
        height: int,
        format: str | int = "XR24",
        *,
        allocator: str = "",
        usage: int = 0,
        device: str = "",
    ) -> Buffer:
        """Allocate one buffer.

        ``format`` is a fourcc ("NV12"), a DRM name ("XRGB8888") or a fourcc
        integer. By default the buffer comes from the daemon's default allocator;
        on a version-2 daemon ``allocator`` names one of :attr:`allocators`, or
        ``usage`` (``primed.USAGE_SCANOUT``, ``USAGE_CPU``) and ``device`` (a render
        node it must import on, as :meth:`query`'s import matrix names it) let the
        daemon choose. Raises ServerError (e.g. LIMIT_EXCEEDED, KERNEL with the
        kernel's errno, NO_ALLOCATOR for a name or usage no allocator fits),
        ConnectionLost, UnknownFormat (a ValueError) for a format name primed does
        not know, LocalProtocolError for a choice of allocator on a version-1 daemon.
        """
        if allocator or usage or device:
            call = self._core.allocate(
                width, height, format, allocator=allocator, usage=usage, device=device
            )
        else:
            call = self._core.allocate(width, height, format)
        return self._call(call)

    def allocate_many(
        self,
        width: int,
        height: int,
        format: str | int,
        count: int,
        *,
        allocator: str = "",
        usage: int = 0,
        device: str = "",
    ) -> list[Buffer]:
        """Allocate ``count`` buffers, all or none, as :meth:`allocate`; returns them in
        the order of their ids."""
        return self._call(
            self._core.allocate_many(
                width, height, format, count, allocator=allocator, usage=usage, device=device
            )
        )

    def release(self, *buffers: Buffer | int, close: bool = True) -> int:
        """Drop the daemon's reference to ``buffers`` (Buffers or ids); returns how many.

        With ``close`` (the default) each Buffer's own fd is closed too. Memory
        stays alive while a mapping, a GEM handle or an fd elsewhere refers to it.
        Raises ServerError UNKNOWN_BUFFER (and releases none) if any id is not live.
        """
        if len(buffers) == 1 and type(buffers[0]) is Buffer:  # the common case, no list made
            ids: list[int] = [buffers[0].id]
        else:
            ids = buffer_ids(buffers)
        count = self._call(self._core.release(ids))
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
        return self._call(self._core.share(ident, once, uids or ()))

    def open_shared(self, token: str | bytes) -> Buffer:
        """The buffer another client shared as ``token`` (its id is 0: it stays theirs).

        Raises ServerError UNKNOWN_TOKEN, the same for every token that can't be
        opened (wrong, revoked, used, dead, or not for this uid); ValueError for a
        token of the wrong length.
        """
        return self._call(self._core.open_shared(token))

    def revoke(self, token: str | bytes) -> None:
        """Make one of this client's tokens stop working. Raises ServerError UNKNOWN_TOKEN."""
        self._call(self._core.revoke(token))

    @property
    def allocators(self) -> tuple[AllocatorInfo, ...]:
        """The allocators the daemon serves, its default first (WELCOME, version 2;
        empty from a version-1 daemon, which serves one: :attr:`info`'s)."""
        return self.info.allocators

    def query(self) -> Offer:
        """What the daemon offers: formats, modifiers, limits, and this client's quota use."""
        return self._call(self._core.query())

    def clients(self) -> list[ClientEntry]:
        """The connected clients this client may see (all for root and the admin group,
        else itself)."""
        return self._pages(self._core.list_clients)

    def buffers(self) -> list[BufferEntry]:
        """The live buffers this client may see (all for root and the admin group, else
        its own)."""
        return self._pages(self._core.list_buffers)

    def _pages(self, ask: Callable[[int], Call[Page[E]]]) -> list[E]:
        entries: list[E] = []
        page = self._call(ask(0))
        entries += page.entries
        while page.next:
            page = self._call(ask(page.next))
            entries += page.entries
        return entries

    def stats(self) -> Statistics:
        """The daemon's counters and totals."""
        return self._call(self._core.stats())

    def open_buffer(self, client: int, ident: int) -> Buffer:
        """Buffer ``ident`` of client number ``client`` (as :meth:`buffers` shows them).

        Only root and the daemon's admin group may; others get ServerError
        PERMISSION_DENIED. The returned Buffer has id 0: it stays its owner's.
        """
        return self._call(self._core.open_buffer(client, ident))

    def close(self) -> None:
        """Disconnect; the daemon frees every buffer this client still owned, and so
        are the buffers of answers never waited for closed."""
        try:
            self._core.close()
        finally:
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


def connect(
    path: str | None = None,
    *,
    name: str | None = None,
    timeout: float | _Unset | None = _UNSET,
    max_version: int = VERSION,
) -> Client:
    """Connect to the daemon at ``path`` (default: $PRIMED_SOCKET, else
    /run/primed/primed.sock) and shake hands.

    ``timeout`` (seconds) bounds the wait for the WELCOME and, from then on, every
    call's wait; None waits for ever. Left out, the WELCOME gets
    :data:`HANDSHAKE_TIMEOUT` and calls no bound. Raises OSError if nothing
    listens, ServerError if the daemon refuses this client, :class:`Timeout` if it
    does not answer in time. The client offers protocol versions 1 to ``max_version``
    (the newest by default); ``info.version`` is the one the daemon chose.
    """
    where = socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(where)
        except OSError as e:  # connect() names no path: say which socket was tried
            raise OSError(e.errno, e.strerror, where) from None
        return Client(sock, name, timeout, max_version)
    except BaseException:
        sock.close()
        raise
