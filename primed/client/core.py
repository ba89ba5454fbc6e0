"""The client's side of the protocol, with no I/O: requests out, typed results in.

Both clients (:mod:`primed.client.blocking`, :mod:`primed.client.trio`) drive one
:class:`ClientConnection` and only move bytes, fds and wake-ups around it. The
connection numbers requests (1, 2, ..., 2**32 - 1, then 1 again: serial 0 is
the daemon's "about no request"), keeps a table of the requests in flight keyed
by serial, and turns each received datagram into the outcome of one of them.

Each request is a :class:`Call`: it knows the reply type it expects and how to
turn that reply into its typed result (``Call[Buffer]`` for an ALLOCATE of one,
``Call[Offer]`` for a QUERY, ...). A reply for a serial that is not in flight,
or of a type its request does not expect, breaks the connection with
RemoteProtocolError, as does a malformed datagram; so does a serial-0 ERROR,
with the daemon's own error (it is refusing or dropping us).

Fd ownership: fds become :class:`Buffer` objects the moment a datagram is
parsed, and from then on exactly one object owns each. A multi-part ALLOCATED
is held by its Call until the last part; a completed Call holds its buffers
until they are taken with :meth:`ClientConnection.take`; a Call whose waiter
went away (:meth:`ClientConnection.abandon`) gives its buffers back: they are
closed and a RELEASE of their ids is queued (:meth:`ClientConnection.data_to_send`).
On every error path every fd that arrived is closed, and :meth:`ClientConnection.close`
closes whatever the connection still holds.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from primed import formats
from primed.client import _allocated
from primed.client.buffer import Buffer
from primed.errors import (
    ConnectionLost,
    LocalProtocolError,
    PrimedError,
    RemoteProtocolError,
    Timeout,
    server_error,
)
from primed.fdpass import Truncated, close_fds
from primed.formats import Limits, Plane, fourcc_str
from primed.wire import protocol, schema
from primed.wire.protocol import (
    LIST_BUFFERS,
    LIST_CLIENTS,
    USAGE_CPU,
    USAGE_SCANOUT,
    Allocated,
    AllocatorInfo,
    BufferEntry,
    BufferInfo,
    ClientEntry,
    DeviceImports,
    Error,
    FormatInfo,
    Listed,
    Queried,
    Released,
    Reply,
    Revoked,
    Shared,
    Statistics,
    Welcome,
)
from primed.wire.schema import MAX_RELEASE, MIN_VERSION, TOKEN_SIZE, VERSION, Backend

#: Where clients look for the daemon when no path is given and $PRIMED_SOCKET is unset.
DEFAULT_SOCKET = "/run/primed/primed.sock"

T = TypeVar("T")
R = TypeVar("R", bound=Reply)
E = TypeVar("E", ClientEntry, BufferEntry)

_HEADER = schema.fixed(schema.HEADER)
_LAST_SERIAL = 0xFFFFFFFF
_one_buffer = protocol.one_buffer
_released_count = protocol.released_count
_many = _allocated.many
#: Buffers' plane tuples by the (offset, pitch) pairs received: a few layouts recur
#: (one per size and format in use), and Planes are immutable, so Buffers share them.
_LAYOUTS: dict[tuple[tuple[int, int], ...], tuple[Plane, ...]] = {}
_MAX_LAYOUTS = 256
#: fourccs by the text a caller gave (formats.lookup, once per spelling).
_FOURCCS: dict[str, int] = {}


def socket_path(path: str | None = None) -> str:
    """``path``, else $PRIMED_SOCKET, else DEFAULT_SOCKET."""
    return path or os.environ.get("PRIMED_SOCKET") or DEFAULT_SOCKET


def _allocator(a: AllocatorInfo) -> dict[str, object]:
    return {
        "name": a.name,
        "kind": a.kind.name.lower(),
        "usage": [
            u for bit, u in ((USAGE_SCANOUT, "scanout"), (USAGE_CPU, "cpu")) if a.usage & bit
        ],
        "driver": a.driver,
        "driver_version": ".".join(map(str, a.driver_version)),
        "node": a.node,
    }


@dataclasses.dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the daemon said of itself in its WELCOME: the protocol version it chose,
    its backend, its device (driver, version, node; empty for memfd) and its limits:
    those of its default allocator. In version 2, ``allocators`` lists every
    allocator it serves, the default first (a version-1 daemon lists none)."""

    version: int
    backend: Backend
    driver: str
    driver_version: tuple[int, int, int]
    node: str
    limits: Limits
    allocators: tuple[AllocatorInfo, ...]

    def describe(self) -> dict[str, object]:
        """The info as plain data (what ``primed info --json`` prints)."""
        return {
            "version": self.version,
            "backend": self.backend.name.lower(),
            "driver": self.driver,
            "driver_version": ".".join(map(str, self.driver_version)),
            "node": self.node,
            "limits": dataclasses.asdict(self.limits),
            "allocators": [_allocator(a) for a in self.allocators],
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Offer(ServerInfo):
    """The answer to a query: the server as in :class:`ServerInfo` (``version`` is the
    one in use on this connection), what it offers, and what this client holds."""

    formats: tuple[FormatInfo, ...]
    modifiers: tuple[int, ...]
    quota_buffers: int  #: the tightest quota on this client's buffers; 0: none
    quota_bytes: int  #: likewise on its bytes
    used_buffers: int  #: what this client holds now
    used_bytes: int
    #: The import matrix (version 2): per render node, per allocator 0 or the errno.
    devices: tuple[DeviceImports, ...]

    def describe(self) -> dict[str, object]:
        """The offer as plain data."""
        # ServerInfo.describe(self), not super(): slotted dataclasses are new classes,
        # and zero-argument super() does not find them.
        return {
            **ServerInfo.describe(self),
            "formats": [
                {"format": fourcc_str(f.fourcc), "cpp": list(f.cpp), "hsub": f.hsub, "vsub": f.vsub}
                for f in self.formats
            ],
            "modifiers": list(self.modifiers),
            "quota": {"buffers": self.quota_buffers, "bytes": self.quota_bytes},
            "used": {"buffers": self.used_buffers, "bytes": self.used_bytes},
            "imports": [
                {
                    "node": d.node,
                    "driver": d.driver,
                    "imports": {
                        a.name: _import_result(e)
                        for a, e in zip(self.allocators, d.imports, strict=False)
                    },
                }
                for d in self.devices
            ],
        }


def _import_result(err: int) -> str:
    """An import matrix cell as text: "ok", or the errno's name."""
    return "ok" if not err else errno.errorcode.get(err, str(err))


@dataclasses.dataclass(frozen=True, slots=True)
class Page(Generic[E]):
    """One page of a LIST: its entries, and where the next page starts (0: none)."""

    entries: tuple[E, ...]
    next: int


def token_bytes(token: str | bytes) -> bytes:
    """A share token as the wire carries it, from its text form (hex) or its bytes.

    Raises ValueError for anything that is not a token's length.
    """
    raw = bytes.fromhex(token) if isinstance(token, str) else bytes(token)
    if len(raw) != TOKEN_SIZE:
        raise ValueError(f"a share token is {2 * TOKEN_SIZE} hex digits")
    return raw


_make_buffer = Buffer._adopt
_make_buffers = Buffer._adopt_many


def buffer_from(info: BufferInfo, fd: int, backend: Backend, allocator: str = "") -> Buffer:
    """A Buffer owning ``fd``, described by ``info``, from the allocator so named."""
    return _make_buffer(
        fd,
        info.id,
        info.width,
        info.height,
        info.fourcc,
        info.modifier,
        info.size,
        tuple([Plane(o, p) for o, p in info.planes]),
        backend,
        allocator,
    )


#: Where a reply's buffers come from: what their fds are, and the allocator's name.
Source = tuple[Backend, str]


def _adopt(infos: tuple[BufferInfo, ...], fds: list[int], source: Source) -> list[Buffer]:
    """Buffers owning ``fds``; if that fails part-way, every fd is closed all the same."""
    buffers: list[Buffer] = []
    try:
        for info, fd in zip(infos, fds, strict=True):
            buffers.append(buffer_from(info, fd, *source))
    except BaseException:
        for buffer in buffers:
            buffer.close()
        close_fds(fds[len(buffers) :])
        raise
    return buffers


def buffer_ids(buffers: Iterable[Buffer | int]) -> list[int]:
    """The ids of Buffers (or ids given as they are)."""
    return [b.id if isinstance(b, Buffer) else b for b in buffers]


def _unexpected(reply: Reply, serial: int, wanted: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"{type(reply).__name__} answers request {serial}, which expects {wanted}", serial=serial
    )


class Call(Generic[T]):
    """One request: its ``serial``, its datagram (``data``, to be sent as it is), the
    reply it expects, and once answered its outcome (:meth:`ClientConnection.take`).

    Subclasses say which reply they accept and how it becomes a result.
    """

    __slots__ = ("_error", "_value", "abandoned", "data", "done", "serial")

    _value: T

    def __init__(self, serial: int, data: bytes):
        self.serial = serial
        self.data = data
        self.done = False  #: answered, failed, or given up on
        self.abandoned = False  #: nobody waits for it: what it gets is given back
        self._error: PrimedError | None = None

    def _accept(self, reply: Reply, fds: list[int], source: Source) -> bool:
        """Take in ``reply`` (owning ``fds`` from here on, on every path), whose buffers
        (if any) come from ``source``; True once the answer is whole. Raises
        RemoteProtocolError, having closed the fds."""
        raise NotImplementedError

    def _cut(self, reply: Reply, error: Truncated) -> bool:
        """A reply to this call lost its fds on the way (they were closed); fail with
        ``error``. True if nothing more is to come for this serial."""
        self._fail(error)
        return True

    def _finish(self, value: T) -> None:
        self._value = value
        self.done = True

    def _fail(self, error: PrimedError) -> None:
        if not self.done:
            self._error = error
            self.done = True
        self._give_up()

    def _give_up(self) -> list[Buffer]:
        """Close every buffer this call holds (parts, or an answer not taken) and
        return them (for their ids)."""
        return []


class _Simple(Call[T], Generic[R, T]):
    """A call answered by one reply of type ``expects``, converted by ``convert``."""

    __slots__ = ("_convert", "_expects")

    def __init__(self, serial: int, data: bytes, expects: type[R], convert: Callable[[R], T]):
        super().__init__(serial, data)
        self._expects = expects
        self._convert = convert

    def _accept(self, reply: Reply, fds: list[int], source: Source) -> bool:
        if not isinstance(reply, self._expects) or self.done:
            close_fds(fds)
            raise _unexpected(reply, self.serial, self._expects.__name__)
        self._finish(self._convert(reply))
        return True


class _Buffers(Call[T]):
    """A call answered by ``count`` buffers in one or more ALLOCATED parts."""

    __slots__ = ("_convert", "_count", "_parts", "_received")

    def __init__(self, serial: int, data: bytes, count: int, convert: Callable[[list[Buffer]], T]):
        # Call.__init__'s fields set here rather than through super(): one frame fewer
        # on every ALLOCATE.
        self.serial = serial
        self.data = data
        self.done = False
        self.abandoned = False
        self._error = None
        self._count = count
        self._convert = convert
        self._parts: list[Buffer] = []
        self._received = 0

    def _check(self, reply: Reply) -> Allocated:
        if not isinstance(reply, Allocated):
            raise _unexpected(reply, self.serial, "ALLOCATED")
        if reply.total != self._count or reply.index != self._received:
            raise RemoteProtocolError(
                f"ALLOCATED part at {reply.index} of {reply.total}, expected one at "
                f"{self._received} of {self._count}",
                serial=self.serial,
            )
        return reply

    def _accept(self, reply: Reply, fds: list[int], source: Source) -> bool:
        try:
            part = self._check(reply)
        except BaseException:
            close_fds(fds)
            raise
        buffers = _adopt(part.buffers, fds, source)
        self._received += len(buffers)
        if self.done:  # failed on an earlier part: what follows is only drained
            for buffer in buffers:
                buffer.close()
        else:
            self._parts += buffers
            if self._received == self._count:
                self._finish(self._convert(self._parts))
        return self._received == self._count

    def _cut(self, reply: Reply, error: Truncated) -> bool:
        part = self._check(reply)
        self._fail(error)
        self._received += len(part.buffers)
        return self._received == self._count

    def _give_up(self) -> list[Buffer]:
        held, self._parts = self._parts, []
        for buffer in held:
            buffer.close()
        return held


class _Count(Call[int]):
    """A RELEASE: answered by one RELEASED, whose count is the result."""

    __slots__ = ()

    def __init__(self, serial: int, data: bytes):
        # As Call.__init__ (the same fields), with no call to it: every RELEASE makes one.
        self.serial = serial
        self.data = data
        self.done = False
        self.abandoned = False
        self._error = None

    def _accept(self, reply: Reply, fds: list[int], source: Source) -> bool:
        if not isinstance(reply, Released) or self.done:
            close_fds(fds)
            raise _unexpected(reply, self.serial, "Released")
        self._finish(reply.count)
        return True


#: What ALLOCATE_FROM asks: an allocator's name, usage bits, a render node; or nothing.
Choice = tuple[str, int, str]
_NO_CHOICE: Choice = ("", 0, "")


def _first(buffers: list[Buffer]) -> Buffer:
    return buffers[0]


def _every(buffers: list[Buffer]) -> list[Buffer]:
    return buffers


def _token(reply: Shared) -> str:
    return reply.token.hex()


def _nothing(reply: Revoked) -> None:
    return None


def _statistics(reply: Statistics) -> Statistics:
    return reply


def _page(reply: Listed, what: int, kind: type[E]) -> Page[E]:
    entries = tuple(e for e in reply.entries if isinstance(e, kind))
    if reply.what != what or len(entries) != len(reply.entries):
        raise RemoteProtocolError(f"LISTED of kind {reply.what}, expected {what}")
    return Page(entries, reply.next)


def _client_page(reply: Listed) -> Page[ClientEntry]:
    return _page(reply, LIST_CLIENTS, ClientEntry)


def _buffer_page(reply: Listed) -> Page[BufferEntry]:
    return _page(reply, LIST_BUFFERS, BufferEntry)


class ClientConnection:
    """Protocol state of one client connection, driven by datagrams in and out.

    Each request method returns a :class:`Call` whose ``data`` the caller sends;
    :meth:`receive` digests what arrives and returns the calls it completed;
    :meth:`take` gives a completed call's result (or raises its error).
    """

    def __init__(self, name: str = "", min_version: int = MIN_VERSION, max_version: int = VERSION):
        self.name = name
        self.min_version = min_version
        self.max_version = max_version
        self.info: ServerInfo | None = None
        # By an ALLOCATED's allocator position: what its buffers are (from WELCOME).
        self._sources: tuple[Source, ...] = ((Backend.DRM, ""),)
        #: Why the connection can't go on, once it can't: every later request
        #: raises ConnectionLost.
        self.broken: PrimedError | None = None
        self._serial = 0
        self._pending: dict[int, Call[Any]] = {}
        self._answered: dict[int, Call[Any]] = {}  # done, with buffers not yet taken
        self._outbox: list[bytes] = []

    # --- requests ---------------------------------------------------------------------------

    def _next_serial(self) -> int:
        """As :meth:`_serial_for`; the common case (the next serial is free) with no loop."""
        serial = self._serial % _LAST_SERIAL + 1
        if self.broken is None and serial not in self._pending and serial not in self._answered:
            self._serial = serial
            return serial
        return self._serial_for()

    def _serial_for(self) -> int:
        if self.broken is not None:
            if isinstance(self.broken, ConnectionLost):
                raise ConnectionLost(str(self.broken)) from self.broken
            raise ConnectionLost(f"the connection failed: {self.broken}") from self.broken
        serial = self._serial
        while True:  # 1 .. 2**32-1, skipping 0 and any serial still in flight
            serial = serial % _LAST_SERIAL + 1
            if serial not in self._pending and serial not in self._answered:
                self._serial = serial
                return serial

    def _simple(
        self, request: protocol.Request, expects: type[R], convert: Callable[[R], T]
    ) -> Call[T]:
        serial = self._serial_for()
        call = _Simple(serial, protocol.encode(request, serial), expects, convert)
        self._pending[serial] = call
        return call

    def _buffers(
        self, request: protocol.Request, count: int, convert: Callable[[list[Buffer]], T]
    ) -> Call[T]:
        serial = self._serial_for()
        call = _Buffers(serial, protocol.encode(request, serial), count, convert)
        self._pending[serial] = call
        return call

    def hello(self) -> Call[ServerInfo]:
        """The HELLO that opens the connection; its result is the daemon's ServerInfo
        (also kept as ``info``). A WELCOME with a version outside the range offered
        breaks the connection with RemoteProtocolError."""
        request = protocol.Hello(self.min_version, self.max_version, self.name)
        return self._simple(request, Welcome, self._welcome)

    def _welcome(self, reply: Welcome) -> ServerInfo:
        if not self.min_version <= reply.version <= self.max_version:
            raise RemoteProtocolError(
                f"WELCOME chose version {reply.version}, outside the offered "
                f"{self.min_version}..{self.max_version}"
            )
        limits = Limits(reply.max_width, reply.max_height, reply.max_size, reply.max_count)
        self.info = ServerInfo(
            reply.version,
            reply.backend,
            reply.driver,
            reply.driver_version,
            reply.node,
            limits,
            reply.allocators,
        )
        listed = tuple((a.backend, a.name) for a in reply.allocators)
        self._sources = listed or ((reply.backend, ""),)
        return self.info

    def _source(self, allocator: int) -> Source:
        """What the buffers of an ALLOCATED naming ``allocator`` are. Raises
        RemoteProtocolError for a position WELCOME did not list."""
        try:
            return self._sources[allocator]
        except IndexError:
            raise RemoteProtocolError(
                f"ALLOCATED names allocator {allocator}; WELCOME listed {len(self._sources)}"
            ) from None

    def _allocate(
        self,
        width: int,
        height: int,
        fmt: str | int,
        count: int,
        flags: int,
        convert: Callable[[list[Buffer]], T],
        choice: Choice | None = None,
    ) -> Call[T]:
        if isinstance(fmt, str):
            code = _FOURCCS.get(fmt)
            if code is None:
                code = _FOURCCS[fmt] = formats.lookup(fmt).fourcc
        else:
            code = fmt
        if choice is not None and choice != _NO_CHOICE:
            version = self.info.version if self.info is not None else 0
            if version < 2:
                raise LocalProtocolError(
                    "choosing an allocator takes protocol version 2; "
                    + (f"this daemon speaks {version}" if version else "no WELCOME yet")
                )
            if flags:
                raise LocalProtocolError(f"unknown flags {flags:#x}")
            name, usage, device = choice
            request = protocol.AllocateFrom(width, height, code, count, usage, name, device)
            serial = self._serial_for()
            data = protocol.encode(request, serial)
        else:
            serial = self._serial_for()
            data = protocol.allocate_datagram(serial, width, height, code, count, flags)
        call = _Buffers(serial, data, count, convert)
        self._pending[serial] = call
        return call

    def allocate(
        self,
        width: int,
        height: int,
        fmt: str | int,
        flags: int = 0,
        *,
        allocator: str = "",
        usage: int = 0,
        device: str = "",
    ) -> Call[Buffer]:
        """An ALLOCATE of one buffer; ``fmt`` is a fourcc text, DRM name or fourcc integer.

        With ``allocator`` (a name WELCOME listed), ``usage`` (USAGE_ bits) or
        ``device`` (a render node the buffer must import on, as the import matrix
        names it) it is an ALLOCATE_FROM, which takes protocol version 2: the daemon
        allocates from the allocator named, else from the first that serves the
        usage and imports on the device (ServerError NO_ALLOCATOR if none does).

        Raises UnknownFormat for a format name not in primed's table (an integer
        goes to the daemon as it is), LocalProtocolError for a field that does not fit
        or a choice of allocator on a version-1 connection.
        """
        if allocator or usage or device:
            return self._allocate(width, height, fmt, 1, flags, _first, (allocator, usage, device))
        # The common request, framed with no detour: _allocate's default branch.
        code = _FOURCCS.get(fmt) if type(fmt) is str else None
        if code is None:
            return self._allocate(width, height, fmt, 1, flags, _first)
        serial = self._next_serial()
        call = _Buffers(
            serial, protocol.allocate_datagram(serial, width, height, code, 1, flags), 1, _first
        )
        self._pending[serial] = call
        return call

    def allocate_many(
        self,
        width: int,
        height: int,
        fmt: str | int,
        count: int,
        flags: int = 0,
        *,
        allocator: str = "",
        usage: int = 0,
        device: str = "",
    ) -> Call[list[Buffer]]:
        """An ALLOCATE of ``count`` buffers, as :meth:`allocate`."""
        choice = (allocator, usage, device)
        return self._allocate(width, height, fmt, count, flags, _every, choice)

    def release(self, ids: Iterable[int]) -> Call[int]:
        """A RELEASE of the buffers with these ids; the result is how many were released."""
        serial = self._next_serial()
        # A tuple of types, not list | tuple: isinstance checks a union more slowly.
        wanted = ids if isinstance(ids, (list, tuple)) else tuple(ids)
        call = _Count(serial, protocol.release_datagram(serial, wanted))
        self._pending[serial] = call
        return call

    def share(self, ident: int, once: bool, uids: Iterable[int]) -> Call[str]:
        """A SHARE of buffer ``ident``; the result is the token as hex text."""
        return self._simple(protocol.Share(ident, once, tuple(uids)), Shared, _token)

    def open_shared(self, token: str | bytes) -> Call[Buffer]:
        """An OPEN_SHARED of ``token``. Raises ValueError for a token of the wrong length."""
        return self._buffers(protocol.OpenShared(token_bytes(token)), 1, _first)

    def revoke(self, token: str | bytes) -> Call[None]:
        """A REVOKE of ``token``. Raises ValueError for a token of the wrong length."""
        return self._simple(protocol.Revoke(token_bytes(token)), Revoked, _nothing)

    def query(self) -> Call[Offer]:
        """A QUERY; the result is an Offer."""
        return self._simple(protocol.Query(), Queried, self._offer)

    def _offer(self, reply: Queried) -> Offer:
        limits = Limits(reply.max_width, reply.max_height, reply.max_size, reply.max_count)
        version = self.info.version if self.info is not None else self.max_version
        allocators = self.info.allocators if self.info is not None else ()
        return Offer(
            version,
            reply.backend,
            reply.driver,
            reply.driver_version,
            reply.node,
            limits,
            allocators,
            reply.formats,
            reply.modifiers,
            reply.quota_buffers,
            reply.quota_bytes,
            reply.used_buffers,
            reply.used_bytes,
            reply.devices,
        )

    def list_clients(self, start: int = 0) -> Call[Page[ClientEntry]]:
        """A LIST of the clients from number ``start`` on; the result is one Page."""
        return self._simple(protocol.List(LIST_CLIENTS, start), Listed, _client_page)

    def list_buffers(self, start: int = 0) -> Call[Page[BufferEntry]]:
        """A LIST of the buffers from ``start`` on; the result is one Page."""
        return self._simple(protocol.List(LIST_BUFFERS, start), Listed, _buffer_page)

    def stats(self) -> Call[Statistics]:
        """A STATS; the result is the daemon's Statistics."""
        return self._simple(protocol.Stats(), Statistics, _statistics)

    def open_buffer(self, client: int, ident: int) -> Call[Buffer]:
        """An OPEN_BUFFER of buffer ``ident`` of client number ``client``."""
        return self._buffers(protocol.OpenBuffer(client, ident), 1, _first)

    # --- results ----------------------------------------------------------------------------

    def take(self, call: Call[T]) -> T:
        """The result of completed ``call``, whose buffers are the caller's from now on.

        Raises the call's error: ServerError (the daemon's answer),
        RemoteProtocolError (the connection broke on a bad datagram; Truncated if
        its fds were cut off), ConnectionLost; LocalProtocolError if it is not done.
        """
        if not call.done:
            raise LocalProtocolError(f"request {call.serial} has no answer yet")
        self._answered.pop(call.serial, None)
        if call._error is not None:
            raise call._error
        if isinstance(call, _Buffers):
            call._parts = []  # the buffers in the result are the caller's now
        return call._value

    def abandon(self, call: Call[Any]) -> None:
        """Nobody will take ``call``'s result: give back whatever buffers it gets.

        If it is still in flight, its buffers are closed and released when its
        answer comes; if it has its answer, at once. Either way the RELEASE is
        queued for :meth:`data_to_send`, and its own reply is nobody's.
        """
        call.abandoned = True
        if call.serial in self._pending and self._pending[call.serial] is call:
            return
        if self._answered.pop(call.serial, None) is call:
            self._give_back(call._give_up())

    def withdraw(self, call: Call[Any]) -> None:
        """``call``'s datagram was never sent: forget it (no answer will come)."""
        if self._pending.get(call.serial) is call:
            del self._pending[call.serial]
            call._fail(LocalProtocolError(f"request {call.serial} was never sent"))

    def data_to_send(self) -> list[bytes]:
        """Datagrams the connection itself wants sent (RELEASEs of given-back buffers);
        each is returned once."""
        out, self._outbox = self._outbox, []
        return out

    def _give_back(self, buffers: list[Buffer]) -> None:
        ids = [b.id for b in buffers if b.id]  # id 0: opened, not ours to release
        if self.broken is not None:
            return  # the daemon frees them when the connection ends
        for start in range(0, len(ids), MAX_RELEASE):
            call = self.release(ids[start : start + MAX_RELEASE])
            call.abandoned = True
            self._outbox.append(call.data)

    # --- datagrams in -----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """How many requests are in flight."""
        return len(self._pending)

    def receive(self, data: bytes, fds: list[int]) -> list[Call[Any]]:
        """Digest one received datagram and the fds that came with it (which the
        connection owns from here on); ``(b"", [])`` is the end of the stream.

        Returns the calls this completed: none while a multi-part ALLOCATED is
        incomplete, one for an answer, every call in flight when the connection
        breaks (each then fails with the error, and ``broken`` says why).
        """
        # The common answers first, decoded straight into their results: the one
        # buffer of an ALLOCATE of one, or a RELEASE's count. Anything not exactly as
        # expected goes on to the general path (nothing done, the fds untouched),
        # which decides and says what is wrong.
        if self.broken is None:
            if not fds:
                released = _released_count(data, 0)
                if released is not None:
                    serial, count = released
                    call = self._pending.get(serial)
                    if type(call) is _Count and not call.done:
                        call._value = count
                        call.done = True
                        del self._pending[serial]
                        if call.abandoned:
                            return []
                        return [call]
            else:
                got = _one_buffer(data, 1) if len(fds) == 1 else None
                if got is not None:
                    quick = self._one(got, fds[0])
                    if quick is not None:
                        return quick
                else:  # many buffers, or one part of a larger whole
                    many = _many(data, len(fds))
                    if many is not None:
                        quick = self._many(many, fds)
                        if quick is not None:
                            return quick
        if self.broken is not None:
            close_fds(fds)
            return []
        if not data and not fds:
            return self.fail(ConnectionLost("the daemon closed the connection"))
        try:
            serial, reply = protocol.decode(data, len(fds), "reply")
        except RemoteProtocolError as e:
            close_fds(fds)
            return self.fail(e)
        except BaseException:
            close_fds(fds)
            raise
        if not isinstance(reply, Reply):  # decode(..., "reply") gives only replies
            close_fds(fds)
            return self.fail(RemoteProtocolError(f"{type(reply).__name__} is no reply"))
        call = self._pending.get(serial)
        if call is None:
            if serial == 0 and isinstance(reply, Error):  # the daemon refuses or drops us
                return self.fail(server_error(reply.code, reply.errno, reply.text))
            close_fds(fds)
            return self.fail(
                RemoteProtocolError(
                    f"{type(reply).__name__} answers request {serial}, which is not in flight",
                    serial=serial,
                )
            )
        was_done = call.done
        if isinstance(reply, Error):
            call._fail(server_error(reply.code, reply.errno, reply.text))
        else:
            try:
                source = self._source(reply.allocator if isinstance(reply, Allocated) else 0)
            except RemoteProtocolError as e:
                close_fds(fds)
                return self.fail(e)
            try:
                if not call._accept(reply, fds, source):
                    return []
            except RemoteProtocolError as e:
                return self.fail(e)
        return self._completed(call, was_done)

    def _one(
        self,
        got: tuple[int, int, int, int, int, int, int, tuple[tuple[int, int], ...], int],
        fd: int,
    ) -> list[Call[Any]] | None:
        """The whole answer to an ALLOCATE of one, with its one fd; None (nothing done,
        the fd still the caller's) unless it answers such a call in flight."""
        serial, ident, width, height, fourcc, modifier, size, planes, allocator = got
        call = self._pending.get(serial)
        if type(call) is not _Buffers or call._count != 1 or call._received or call.done:
            return None
        if allocator >= len(self._sources):
            return None  # the general path says what is wrong
        try:
            layout = _LAYOUTS.get(planes)
            if layout is None:
                layout = tuple([Plane(o, p) for o, p in planes])
                if len(_LAYOUTS) >= _MAX_LAYOUTS:
                    _LAYOUTS.clear()
                _LAYOUTS[planes] = layout
            backend, name = self._sources[allocator]
            buffer = _make_buffer(
                fd, ident, width, height, fourcc, modifier, size, layout, backend, name
            )
        except BaseException:
            close_fds((fd,))
            raise
        call._received = 1
        call._parts.append(buffer)
        call._value = buffer if call._convert is _first else call._convert(call._parts)
        call.done = True
        del self._pending[serial]
        if call.abandoned:
            self._give_back(call._give_up())
            return []
        self._answered[serial] = call
        return [call]

    def _many(self, got: _allocated.Many, fds: list[int]) -> list[Call[Any]] | None:
        """One ALLOCATED part of buffers, with their fds, as :meth:`receive`'s general
        path would take it; None (nothing done, the fds still the caller's) unless it is
        the next part a call in flight expects, from an allocator WELCOME listed."""
        serial, total, index, allocator, ids, layouts = got
        call = self._pending.get(serial)
        if (
            type(call) is not _Buffers
            or call.done  # failed on an earlier part: the general path drains the rest
            or total != call._count
            or index != call._received
            or allocator >= len(self._sources)
        ):
            return None
        backend, name = self._sources[allocator]
        buffers = _make_buffers(fds, ids, layouts, backend, name)
        call._received += len(buffers)
        call._parts += buffers
        if call._received != call._count:
            return []
        call._finish(call._convert(call._parts))
        return self._completed(call, False)

    def truncated(self, error: Truncated) -> list[Call[Any]]:
        """A datagram arrived cut short (its fds were closed already; see
        :func:`primed.fdpass.recv`). If only its fds were cut and it answers a call in
        flight, that call fails with ``error`` and the connection goes on; else the
        connection breaks. Returns the calls this completed, as :meth:`receive`."""
        if self.broken is not None:
            return []
        data = error.datagram
        if data is None or len(data) < _HEADER.size:
            return self.fail(error)
        _, nfds, _, serial = _HEADER.packer.unpack_from(data)
        call = self._pending.get(serial)
        if call is None:
            return self.fail(error)
        try:
            _, reply = protocol.decode(data, nfds, "reply")
            was_done = call.done
            if not isinstance(reply, Reply) or not call._cut(reply, error):
                return [] if was_done else [call]
        except RemoteProtocolError:
            return self.fail(error)
        return self._completed(call, was_done)

    def _completed(self, call: Call[Any], was_done: bool) -> list[Call[Any]]:
        del self._pending[call.serial]
        if call.abandoned:
            self._give_back(call._give_up())
            return []
        if call._error is None and isinstance(call, _Buffers):
            self._answered[call.serial] = call
        return [] if was_done else [call]

    def fail(self, error: PrimedError) -> list[Call[Any]]:
        """The connection can't go on (``error`` says why): every call in flight fails
        with it, and their buffers are closed. Returns those calls."""
        if self.broken is None:
            self.broken = error
        failed = [call for call in self._pending.values() if not call.done]
        for call in self._pending.values():
            call._fail(error)
        self._pending.clear()
        self._outbox.clear()
        return failed

    def close(self) -> None:
        """The connection is going away: fail what is in flight and close every buffer
        it still holds, answers not taken included."""
        self.fail(ConnectionLost("the connection was closed"))
        for call in self._answered.values():
            call._give_up()
            call._error = ConnectionLost("the connection was closed before the answer was taken")
        self._answered.clear()


__all__ = [
    "DEFAULT_SOCKET",
    "Call",
    "ClientConnection",
    "Offer",
    "Page",
    "ServerInfo",
    "Timeout",
    "buffer_from",
    "buffer_ids",
    "socket_path",
    "token_bytes",
]
