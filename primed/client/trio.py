"""The trio client: many tasks may share one connection, with requests in flight at once.

Every protocol rule lives in :class:`primed.client.core.ClientConnection`. Here the
tasks waiting for answers read the socket themselves, one at a time: the first
waiter reads, feeds the core what arrives and wakes the waiters of the other calls
it completes; the rest sleep. When the reader's own call is done (or it is
cancelled) it wakes a sleeping waiter, which reads on. So the common case, one
task and one request at a time, costs one trip through the scheduler per request,
not two (a reader task's, then the waiter's). Requesting tasks send in turn
under one lock when the socket is full. A task cancelled while its request is in
flight abandons it: when the answer comes, its buffers are closed and released
(the core says so, and a task of its own sends the RELEASE, so that no reader
ever waits on the socket's send side). Answers that come while nobody waits stay
in the socket until a waiter reads them, as with the blocking client.

The socket is a plain non-blocking one, not a trio socket: trio's socket methods
pass through the scheduler twice per call (a cancellation check before the
syscall, a yield after it even when it did not block), and for a request that
costs what the kernel's work costs, those trips are most of the time. Here each
call is tried first and waits for readiness (trio.lowlevel.wait_readable or
wait_writable) only when it would block. A request still checks for cancellation
before it is sent and before its wait, as trio's own calls do, and a reader
yields after :data:`FAIRNESS` datagrams in a row, so that a daemon that keeps it
busy can't starve the client's other tasks.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import trio

from primed import fdpass
from primed.client.blocking import _default_name
from primed.client.buffer import Buffer
from primed.client.core import (
    Call,
    ClientConnection,
    Offer,
    Page,
    ServerInfo,
    buffer_ids,
    socket_path,
)
from primed.errors import ConnectionLost
from primed.wire.protocol import AllocatorInfo, BufferEntry, ClientEntry, Statistics
from primed.wire.schema import VERSION

T = TypeVar("T")
E = TypeVar("E", ClientEntry, BufferEntry)

#: Datagrams the reader takes in a row, without waiting, before it yields to other tasks.
FAIRNESS = 16
#: Fresh requests that wait for readiness first once receives right after sending
#: found nothing MISSES times in a row (see :meth:`AsyncClient._read_for`). A wait
#: costs a pass through trio's scheduler, a receive that finds nothing a system
#: call and an exception, several times less: so only a run of misses switches.
WAIT_FIRST = 7
MISSES = 4

_recv = fdpass.recv
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_wait_readable = trio.lowlevel.wait_readable


class AsyncPending(Generic[T]):
    """A request sent but not yet answered (see :meth:`AsyncClient.start_allocate`)."""

    __slots__ = ("_call", "_client")

    def __init__(self, client: AsyncClient, call: Call[T]):
        self._client = client
        self._call = call

    @property
    def serial(self) -> int:
        """The request's serial."""
        return self._call.serial

    async def wait(self) -> T:
        """Wait for the answer; return its result or raise its error.

        If the waiting task is cancelled, the request is abandoned: buffers it
        brings are closed and released when they come.
        """
        return await self._client._wait(self._call)


class AsyncClient:
    """A connection to the daemon. Use ``async with primed.connect_async() as client``.

    Each method sends one request and waits for its answer; tasks may call them
    at once. The ``start_*`` methods send a request and return an
    :class:`AsyncPending` to wait on later.
    """

    def __init__(self, sock: socket.socket, name: str, max_version: int = VERSION):
        self._sock = sock  # non-blocking
        self._core = ClientConnection(name, max_version=max_version)
        self._send_lock = trio.Lock()  # held only by a sender that waits for room
        #: Waiters asleep while another waiter reads, by serial; each is woken when its
        #: call is done, or to take over the reading.
        self._parked: dict[int, trio.Event] = {}
        self._reading = False  # a waiter is reading the socket
        self._wait_first = 0  # fresh requests to come that wait before they receive
        self._misses = 0  # fresh requests in a row whose answer was not there at once
        self._nursery: trio.Nursery | None = None  # where give-backs are sent from
        self.info: ServerInfo

    def _try_send(self, data: bytes) -> bool:
        """Send ``data`` if the socket has room now; False (nothing sent) if not."""
        try:
            self._sock.send(data)
        except BlockingIOError:
            return False
        except (BrokenPipeError, ConnectionResetError):
            pass  # the next read hears why the daemon closed, and fails every call
        return True

    async def _send(self, data: bytes) -> None:
        while not self._try_send(data):
            await trio.lowlevel.wait_writable(self._sock)

    async def _send_call(self, call: Call[Any]) -> None:
        sent = False
        try:
            await _checkpoint_if_cancelled()
            # Straight out if nobody waits for room (they would go first), else in turn.
            sent = not self._send_lock.locked() and self._try_send(call.data)
            if not sent:
                async with self._send_lock:
                    await self._send(call.data)
                    sent = True
        finally:
            if not sent:  # cancelled before it went out: no answer will come
                self._core.withdraw(call)

    async def _start(self, call: Call[T]) -> AsyncPending[T]:
        await self._send_call(call)
        # Nobody may wait for a while: take in the answers that have come to requests
        # started before, so that they (and their fds) don't pile up in the socket
        # and hold up the daemon. A reader, if any, takes them in itself.
        core = self._core
        if not self._reading:
            while core.broken is None and core.pending > 1 and self._receive_one():
                pass
        # Not AsyncPending[T](...): that form costs microseconds on every request.
        return AsyncPending(self, call)

    async def _wait(self, call: Call[T], checked: bool = False) -> T:
        """Until ``call`` is done: read the socket if no other waiter does, else sleep
        until the reader wakes this one (done, or its turn to read). ``checked``: the
        caller checked for cancellation and has not yielded since (no need again)."""
        try:
            if not checked:
                await _checkpoint_if_cancelled()
            while not call.done:
                if not self._reading:
                    await self._read_for(call, checked)  # checked: sent just now
                    checked = False
                    continue
                parked = self._parked[call.serial] = trio.Event()
                try:
                    await parked.wait()
                finally:
                    if self._parked.get(call.serial) is parked:
                        del self._parked[call.serial]
        except BaseException:
            self._core.abandon(call)
            # If the answer had come already, its RELEASE is queued now: send it.
            self._hand_off(self._core.data_to_send())
            raise
        finally:
            if not self._reading and self._parked:  # leaving: another waiter reads on
                next(iter(self._parked.values())).set()
        return self._core.take(call)

    async def _call(self, call: Call[T]) -> T:
        await self._send_call(call)
        # _send_call checked for cancellation; if it then had to wait for room, that
        # wait was a checkpoint too. The wait for the answer is one again when it
        # blocks; so no second check between the two.
        return await self._wait(call, checked=True)

    def _wake(self, calls: list[Call[Any]]) -> None:
        for call in calls:
            parked = self._parked.get(call.serial)
            if parked is not None:
                parked.set()

    def _receive_one(self) -> bool:
        """Take in one datagram if one has come (False if none has), waking the
        waiters of the calls it completes."""
        core = self._core
        try:
            data, fds = _recv(self._sock)
        except BlockingIOError:
            return False
        except fdpass.Truncated as e:
            self._wake(core.truncated(e))
        except OSError as e:
            self._wake(core.fail(ConnectionLost(f"the daemon closed the connection: {e}")))
        else:
            done = core.receive(data, fds)
            if self._parked:  # else nobody sleeps: the reader's own call needs no wake-up
                self._wake(done)
        if core._outbox:  # give-back RELEASEs, rare: no call for an empty list
            self._hand_off(core.data_to_send())
        return True

    async def _read_for(self, call: Call[Any], fresh: bool = False) -> None:
        """Be the reader until ``call`` is done. ``fresh``: its request went out just now.

        A fresh request's answer is seldom there at once (the daemon has yet to
        run), and a receive that finds nothing costs a system call and an exception:
        once :data:`MISSES` in a row have found nothing, the next :data:`WAIT_FIRST` fresh
        requests wait for readiness before they receive, and the one after that tries
        at once again, so that a daemon that answers before we look is noticed (and
        one that mostly does never makes us wait first for one miss).
        """
        # The fd number, not the socket: trio would call fileno() on every wait.
        core, fileno, streak = self._core, self._sock.fileno(), 0
        self._reading = True
        try:
            if fresh:
                if self._wait_first:
                    self._wait_first -= 1
                    wait = True
                else:
                    wait = not self._receive_one()
                    self._misses = self._misses + 1 if wait else 0
                    if self._misses >= MISSES:  # not a fluke: the daemon is slower than us
                        self._wait_first = WAIT_FIRST
                if wait:
                    try:
                        await _wait_readable(fileno)
                    except trio.ClosedResourceError:  # the block is exiting
                        self._wake(core.fail(ConnectionLost("the connection was closed")))
            while not call.done and core.broken is None:
                if not self._receive_one():
                    streak = 0
                    try:
                        await _wait_readable(fileno)
                    except trio.ClosedResourceError:  # the block is exiting
                        self._wake(core.fail(ConnectionLost("the connection was closed")))
                    continue
                streak += 1
                if streak >= FAIRNESS:
                    streak = 0
                    await trio.lowlevel.checkpoint()
        finally:
            self._reading = False

    def _wake_all(self) -> None:
        for parked in self._parked.values():
            parked.set()

    def _close(self) -> None:
        self._nursery = None
        self._core.close()
        self._wake_all()

    def _hand_off(self, outgoing: list[bytes]) -> None:
        """Send the core's own datagrams (give-back RELEASEs): at once if the socket has
        room and no sender waits for it, so that they go before any later request;
        else from a task of their own.

        Never waiting from the reader: sending may block on a full socket, under the
        send lock, and a task waiting for an answer that only the reader can read
        would then wait for ever while the daemon waits for us to read.
        """
        if not outgoing or self._nursery is None:
            return  # with no nursery the connection is closing: the daemon frees them
        if not self._send_lock.locked():
            while outgoing and self._try_send(outgoing[0]):
                del outgoing[0]
        if outgoing:
            self._nursery.start_soon(self._send_all, outgoing)

    async def _send_all(self, outgoing: list[bytes]) -> None:
        async with self._send_lock:
            for datagram in outgoing:
                await self._send(datagram)

    # --- requests ---------------------------------------------------------------------------

    async def start_allocate(
        self,
        width: int,
        height: int,
        format: str | int = "XR24",
        *,
        allocator: str = "",
        usage: int = 0,
        device: str = "",
    ) -> AsyncPending[Buffer]:
        """Send an ALLOCATE; ``await pending.wait()`` later gives what allocate() would."""
        return await self._start(
            self._core.allocate(
                width, height, format, allocator=allocator, usage=usage, device=device
            )
        )

    async def start_allocate_many(
        self,
        width: int,
        height: int,
        format: str | int,
        count: int,
        *,
        allocator: str = "",
        usage: int = 0,
        device: str = "",
    ) -> AsyncPending[list[Buffer]]:
        """Send an ALLOCATE of ``count``; ``await pending.wait()`` later gives the list."""
        return await self._start(
            self._core.allocate_many(
                width, height, format, count, allocator=allocator, usage=usage, device=device
            )
        )

    async def start_release(self, *buffers: Buffer | int) -> AsyncPending[int]:
        """Send a RELEASE; ``await pending.wait()`` later gives the count released.

        Buffers' fds are not closed: close them yourself.
        """
        return await self._start(self._core.release(buffer_ids(buffers)))

    async def allocate(
        self,
        width: int,
        height: int,
        format: str | int = "XR24",
        *,
        allocator: str = "",
        usage: int = 0,
        device: str = "",
    ) -> Buffer:
        """As :meth:`primed.Client.allocate`."""
        if allocator or usage or device:
            call = self._core.allocate(
                width, height, format, allocator=allocator, usage=usage, device=device
            )
        else:
            call = self._core.allocate(width, height, format)
        return await self._call(call)

    async def allocate_many(
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
        """As :meth:`primed.Client.allocate_many`."""
        return await self._call(
            self._core.allocate_many(
                width, height, format, count, allocator=allocator, usage=usage, device=device
            )
        )

    async def release(self, *buffers: Buffer | int, close: bool = True) -> int:
        """As :meth:`primed.Client.release`."""
        if len(buffers) == 1 and type(buffers[0]) is Buffer:  # the common case, no list made
            ids: list[int] = [buffers[0].id]
        else:
            ids = buffer_ids(buffers)
        count = await self._call(self._core.release(ids))
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
        return await self._call(self._core.share(ident, once, uids or ()))

    async def open_shared(self, token: str | bytes) -> Buffer:
        """As :meth:`primed.Client.open_shared`."""
        return await self._call(self._core.open_shared(token))

    async def revoke(self, token: str | bytes) -> None:
        """As :meth:`primed.Client.revoke`."""
        await self._call(self._core.revoke(token))

    @property
    def allocators(self) -> tuple[AllocatorInfo, ...]:
        """As :attr:`primed.Client.allocators`."""
        return self.info.allocators

    async def query(self) -> Offer:
        """As :meth:`primed.Client.query`."""
        return await self._call(self._core.query())

    async def clients(self) -> list[ClientEntry]:
        """As :meth:`primed.Client.clients`."""
        return await self._pages(self._core.list_clients)

    async def buffers(self) -> list[BufferEntry]:
        """As :meth:`primed.Client.buffers`."""
        return await self._pages(self._core.list_buffers)

    async def _pages(self, ask: Callable[[int], Call[Page[E]]]) -> list[E]:
        entries: list[E] = []
        page = await self._call(ask(0))
        entries += page.entries
        while page.next:
            page = await self._call(ask(page.next))
            entries += page.entries
        return entries

    async def stats(self) -> Statistics:
        """As :meth:`primed.Client.stats`."""
        return await self._call(self._core.stats())

    async def open_buffer(self, client: int, ident: int) -> Buffer:
        """As :meth:`primed.Client.open_buffer`."""
        return await self._call(self._core.open_buffer(client, ident))


@asynccontextmanager
async def connect_async(
    path: str | None = None, *, name: str | None = None, max_version: int = VERSION
) -> AsyncIterator[AsyncClient]:
    """Connect to the daemon (as :func:`primed.connect`) for the length of an ``async with``.

    On leaving the block the connection closes: the daemon frees every buffer
    the client still owned, and buffers of answers never waited for are closed.
    """
    connecting = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with connecting:
        where = socket_path(path)
        try:
            await connecting.connect(where)
        except OSError as e:  # connect() names no path: say which socket was tried
            raise OSError(e.errno, e.strerror, where) from None
        sock = socket.socket(fileno=connecting.detach())
    try:
        sock.setblocking(False)
        client = AsyncClient(sock, _default_name() if name is None else name, max_version)
        try:
            async with trio.open_nursery() as nursery:
                client._nursery = nursery
                try:
                    client.info = await client._call(client._core.hello())
                    yield client
                finally:
                    client._nursery = None
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The give-back tasks never raise, so a lone exception is the caller's own
            # (or the handshake's): give it back as it was, not wrapped in a group.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            client._close()
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()
