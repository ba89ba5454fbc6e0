"""primed's messages as Python objects, and their encoding: bytes in, messages out.

No I/O here. :func:`encode` turns a message and a serial into one datagram;
:func:`decode` turns a received datagram (and the number of fds that came with
it) into ``(serial, message)`` or raises :class:`RemoteProtocolError`, having
checked every length, count, reserved field and string. The schema lives in
:mod:`primed.wire.schema`; the fixed heads are packed with ``struct`` formats derived
from it.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import ClassVar, Literal, Self

from primed.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from primed.wire import schema
from primed.wire.schema import (
    MAX_FDS,
    MAX_MESSAGE,
    MAX_NAME,
    MAX_RELEASE,
    MAX_TEXT,
    MAX_UIDS,
    TOKEN_SIZE,
    Backend,
    Opcode,
)

#: SHARE flag: the token works for one OPEN_SHARED only.
SHARE_ONCE = 1

_HEADER = schema.fixed(schema.HEADER)
HEADER_SIZE = _HEADER.size


def _text(raw: bytes, what: str, serial: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} is not UTF-8", serial=serial) from None


def _raw(text: str, what: str, limit: int) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > limit:
        raise LocalProtocolError(f"{what} is {len(raw)} bytes, over the limit of {limit}")
    return raw


class _Body:
    """Unpacks a body's fixed head and tracks what follows it."""

    __slots__ = ("body", "end", "serial", "values")

    def __init__(self, head: schema.Fixed, body: bytes, serial: int, name: str):
        if len(body) < head.size:
            raise RemoteProtocolError(
                f"{name}: body of {len(body)} bytes is shorter than its {head.size}-byte head",
                serial=serial,
            )
        self.values = head.packer.unpack_from(body)
        for position, required in head.consts:
            if self.values[position] != required:
                raise RemoteProtocolError(
                    f"{name}: field {head.names[position]} must be {required}", serial=serial
                )
        self.body, self.end, self.serial = body, head.size, serial

    def take(self, length: int) -> bytes:
        part = self.body[self.end : self.end + length]
        self.end += length
        return part

    def finish(self, name: str) -> None:
        if self.end != len(self.body):
            raise RemoteProtocolError(
                f"{name}: body is {len(self.body)} bytes, expected {self.end}", serial=self.serial
            )


def _fixed(head: schema.Fixed, body: bytes, serial: int, name: str) -> tuple[int, ...]:
    """The values of a body that is one fixed head and nothing more, checked as _Body does."""
    if len(body) != head.size:
        _Body(head, body, serial, name).finish(name)  # raises, saying what is wrong
    values = head.packer.unpack(body)
    for position, required in head.consts:
        if values[position] != required:
            raise RemoteProtocolError(
                f"{name}: field {head.names[position]} must be {required}", serial=serial
            )
    return values


class Message:
    """Base of every message. ``nfds`` is how many fds travel with it."""

    __slots__ = ()
    OPCODE: ClassVar[Opcode]

    @property
    def nfds(self) -> int:
        return 0

    def _body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        raise NotImplementedError


class Request(Message):
    __slots__ = ()


class Reply(Message):
    __slots__ = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Hello(Request):
    """The client's first message: the range of versions it speaks and its name."""

    OPCODE: ClassVar[Opcode] = Opcode.HELLO
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.HELLO_HEAD)
    min_version: int = schema.VERSION
    max_version: int = schema.VERSION
    name: str = ""

    def _body(self) -> bytes:
        name = _raw(self.name, "client name", MAX_NAME)
        return self._HEAD.packer.pack(self.min_version, self.max_version, 0, len(name), 0) + name

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        parts = _Body(cls._HEAD, body, serial, "HELLO")
        low, high, _, name_len, _ = parts.values
        if name_len > MAX_NAME:
            raise RemoteProtocolError(f"HELLO: name of {name_len} bytes", serial=serial)
        name = _text(parts.take(name_len), "HELLO name", serial)
        parts.finish("HELLO")
        return cls(low, high, name)


@dataclasses.dataclass(frozen=True, slots=True)
class Allocate(Request):
    """Allocate ``count`` buffers of ``width`` x ``height`` in format ``fourcc``."""

    OPCODE: ClassVar[Opcode] = Opcode.ALLOCATE
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.ALLOCATE_HEAD)
    width: int
    height: int
    fourcc: int
    count: int = 1
    flags: int = 0

    def _body(self) -> bytes:
        return self._HEAD.packer.pack(self.width, self.height, self.fourcc, self.count, self.flags)

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        return cls(*_fixed(cls._HEAD, body, serial, "ALLOCATE"))


@dataclasses.dataclass(frozen=True, slots=True)
class Release(Request):
    """Drop the daemon's reference to the buffers with these ids."""

    OPCODE: ClassVar[Opcode] = Opcode.RELEASE
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.RELEASE_HEAD)
    ids: tuple[int, ...]

    def _body(self) -> bytes:
        if len(self.ids) > MAX_RELEASE:
            raise LocalProtocolError(f"RELEASE of {len(self.ids)} ids, over {MAX_RELEASE}")
        return self._HEAD.packer.pack(len(self.ids), 0) + struct.pack(
            f"<{len(self.ids)}Q", *self.ids
        )

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        parts = _Body(cls._HEAD, body, serial, "RELEASE")
        count = parts.values[0]
        if count > MAX_RELEASE:
            raise RemoteProtocolError(f"RELEASE of {count} ids, over {MAX_RELEASE}", serial=serial)
        raw = parts.take(8 * count)
        parts.finish("RELEASE")
        return cls(struct.unpack(f"<{count}Q", raw))


@dataclasses.dataclass(frozen=True, slots=True)
class Error(Reply):
    """A request failed. ``errno`` is the kernel's, or 0."""

    OPCODE: ClassVar[Opcode] = Opcode.ERROR
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.ERROR_HEAD)
    code: int
    errno: int
    text: str

    def _body(self) -> bytes:
        text = self.text.encode("utf-8")[:MAX_TEXT].decode("utf-8", "ignore").encode("utf-8")
        return self._HEAD.packer.pack(self.code, self.errno, len(text), 0) + text

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        parts = _Body(cls._HEAD, body, serial, "ERROR")
        code, errno, text_len, _ = parts.values
        if text_len > MAX_TEXT:
            raise RemoteProtocolError(f"ERROR: text of {text_len} bytes", serial=serial)
        text = _text(parts.take(text_len), "ERROR text", serial)
        parts.finish("ERROR")
        return cls(code, errno, text)


@dataclasses.dataclass(frozen=True, slots=True)
class Welcome(Reply):
    """The server's answer to Hello: the version it chose, its backend, device and limits."""

    OPCODE: ClassVar[Opcode] = Opcode.WELCOME
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.WELCOME_HEAD)
    version: int
    backend: Backend
    max_width: int
    max_height: int
    max_size: int
    max_count: int
    driver: str = ""
    driver_version: tuple[int, int, int] = (0, 0, 0)
    node: str = ""

    def _body(self) -> bytes:
        driver = _raw(self.driver, "driver name", MAX_NAME)
        node = _raw(self.node, "node path", MAX_NAME)
        head = self._HEAD.packer.pack(
            self.version,
            self.backend,
            0,
            self.max_width,
            self.max_height,
            self.max_size,
            self.max_count,
            *self.driver_version,
            len(driver),
            len(node),
        )
        return head + driver + node

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        parts = _Body(cls._HEAD, body, serial, "WELCOME")
        (version, backend, _, width, height, size, count, major, minor, patch, dlen, nlen) = (
            parts.values
        )
        try:
            known = Backend(backend)
        except ValueError:
            raise RemoteProtocolError(
                f"WELCOME: unknown backend {backend}", serial=serial
            ) from None
        if dlen > MAX_NAME or nlen > MAX_NAME:
            raise RemoteProtocolError("WELCOME: driver or node name too long", serial=serial)
        driver = _text(parts.take(dlen), "WELCOME driver", serial)
        node = _text(parts.take(nlen), "WELCOME node", serial)
        parts.finish("WELCOME")
        return cls(version, known, width, height, size, count, driver, (major, minor, patch), node)


@dataclasses.dataclass(frozen=True, slots=True)
class BufferInfo:
    """One buffer's identity and layout, as an ALLOCATED reply describes it."""

    id: int
    width: int
    height: int
    fourcc: int
    modifier: int
    size: int
    planes: tuple[tuple[int, int], ...]  #: (offset, pitch) of each plane

    _RECORD: ClassVar[schema.Fixed] = schema.fixed(schema.BUFFER)

    def _pack(self) -> bytes:
        nplanes = len(self.planes)
        if not 1 <= nplanes <= 4:
            raise LocalProtocolError(f"a buffer has 1 to 4 planes, not {nplanes}")
        return self._RECORD.packer.pack(
            self.id,
            self.width,
            self.height,
            self.fourcc,
            nplanes,
            self.modifier,
            self.size,
            *[value for plane in self.planes for value in plane],
            *_UNUSED_PLANES[nplanes],
        )

    @classmethod
    def _unpack(cls, values: tuple[int, ...], serial: int) -> BufferInfo:
        ident, width, height, fourcc, nplanes, modifier, size = values[:7]
        used = 7 + 2 * nplanes
        if not 1 <= nplanes <= 4 or any(values[used:]):
            raise RemoteProtocolError(f"ALLOCATED: bad plane count {nplanes}", serial=serial)
        if nplanes == 1:
            planes: tuple[tuple[int, int], ...] = ((values[7], values[8]),)
        else:
            planes = tuple(zip(values[7:used:2], values[8:used:2], strict=True))
        return cls(ident, width, height, fourcc, modifier, size, planes)


#: The zero (offset, pitch) pairs after a record's last plane, by plane count.
_UNUSED_PLANES = [(0,) * (8 - 2 * n) for n in range(5)]


@dataclasses.dataclass(frozen=True, slots=True)
class Allocated(Reply):
    """Part of the answer to Allocate: buffers ``index`` .. ``index + len(buffers)`` of
    ``total``, each with its fd attached in the same order."""

    OPCODE: ClassVar[Opcode] = Opcode.ALLOCATED
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.ALLOCATED_HEAD)
    total: int
    index: int
    buffers: tuple[BufferInfo, ...]

    @property
    def nfds(self) -> int:
        return len(self.buffers)

    def _body(self) -> bytes:
        count = len(self.buffers)
        if not 1 <= count <= MAX_FDS or self.index + count > self.total:
            raise LocalProtocolError(f"ALLOCATED part of {count} at {self.index} of {self.total}")
        head = self._HEAD.packer.pack(self.total, self.index, count, 0)
        return head + b"".join(b._pack() for b in self.buffers)

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        parts = _Body(cls._HEAD, body, serial, "ALLOCATED")
        total, index, count, _ = parts.values
        if count > MAX_FDS or count == 0 or index + count > total:
            raise RemoteProtocolError(
                f"ALLOCATED: part of {count} at {index} of {total}", serial=serial
            )
        record = BufferInfo._RECORD
        raw = parts.take(record.size * count)
        parts.finish("ALLOCATED")
        unpack = BufferInfo._unpack
        buffers = tuple([unpack(values, serial) for values in record.packer.iter_unpack(raw)])
        return cls(total, index, buffers)


@dataclasses.dataclass(frozen=True, slots=True)
class Released(Reply):
    """The answer to Release: how many buffers the daemon let go of."""

    OPCODE: ClassVar[Opcode] = Opcode.RELEASED
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.RELEASED_HEAD)
    count: int

    def _body(self) -> bytes:
        return self._HEAD.packer.pack(self.count, 0)

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        return cls(_fixed(cls._HEAD, body, serial, "RELEASED")[0])


@dataclasses.dataclass(frozen=True, slots=True)
class Share(Request):
    """Make a token for buffer ``id``; ``uids`` (if any) limits who may open it."""

    OPCODE: ClassVar[Opcode] = Opcode.SHARE
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.SHARE_HEAD)
    id: int
    once: bool = False
    uids: tuple[int, ...] = ()

    def _body(self) -> bytes:
        if len(self.uids) > MAX_UIDS:
            raise LocalProtocolError(f"SHARE with {len(self.uids)} uids, over {MAX_UIDS}")
        head = self._HEAD.packer.pack(self.id, SHARE_ONCE if self.once else 0, len(self.uids))
        return head + struct.pack(f"<{len(self.uids)}I", *self.uids)

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        parts = _Body(cls._HEAD, body, serial, "SHARE")
        ident, flags, nuids = parts.values
        if flags & ~SHARE_ONCE:
            raise RemoteProtocolError(f"SHARE: unknown flags {flags:#x}", serial=serial)
        if nuids > MAX_UIDS:
            raise RemoteProtocolError(f"SHARE with {nuids} uids, over {MAX_UIDS}", serial=serial)
        raw = parts.take(4 * nuids)
        parts.finish("SHARE")
        return cls(ident, bool(flags & SHARE_ONCE), struct.unpack(f"<{nuids}I", raw))


class _TokenMessage(Message):
    __slots__ = ()
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.TOKEN_HEAD)
    token: bytes

    def _body(self) -> bytes:
        if len(self.token) != TOKEN_SIZE:
            raise LocalProtocolError(f"a token has {TOKEN_SIZE} bytes, not {len(self.token)}")
        return self.token

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        parts = _Body(cls._HEAD, body, serial, cls.OPCODE.name)
        parts.finish(cls.OPCODE.name)
        return cls(parts.values[0])  # type: ignore[call-arg]


@dataclasses.dataclass(frozen=True, slots=True)
class OpenShared(_TokenMessage, Request):
    """Receive the buffer ``token`` names: an Allocated of one buffer, with id 0."""

    OPCODE: ClassVar[Opcode] = Opcode.OPEN_SHARED
    token: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Revoke(_TokenMessage, Request):
    """Make ``token`` (one of this client's) stop working."""

    OPCODE: ClassVar[Opcode] = Opcode.REVOKE
    token: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Shared(_TokenMessage, Reply):
    """The answer to Share."""

    OPCODE: ClassVar[Opcode] = Opcode.SHARED
    token: bytes


class _EmptyMessage(Message):
    __slots__ = ()

    def _body(self) -> bytes:
        return b""

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        if body:
            raise RemoteProtocolError(f"{cls.OPCODE.name}: body must be empty", serial=serial)
        return cls()


@dataclasses.dataclass(frozen=True, slots=True)
class Query(_EmptyMessage, Request):
    """Ask what the server offers."""

    OPCODE: ClassVar[Opcode] = Opcode.QUERY


@dataclasses.dataclass(frozen=True, slots=True)
class Revoked(_EmptyMessage, Reply):
    """The answer to Revoke."""

    OPCODE: ClassVar[Opcode] = Opcode.REVOKED


@dataclasses.dataclass(frozen=True, slots=True)
class FormatInfo:
    """A format as QUERIED describes it: bytes per pixel of each plane, chroma subsampling."""

    fourcc: int
    cpp: tuple[int, ...]
    hsub: int = 1
    vsub: int = 1

    _RECORD: ClassVar[schema.Fixed] = schema.fixed(schema.FORMAT)


@dataclasses.dataclass(frozen=True, slots=True)
class Queried(Reply):
    """The answer to Query: backend, device, formats, modifiers, limits, quota and use."""

    OPCODE: ClassVar[Opcode] = Opcode.QUERIED
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.QUERIED_HEAD)
    backend: Backend
    driver: str
    driver_version: tuple[int, int, int]
    node: str
    max_width: int
    max_height: int
    max_count: int
    max_size: int
    formats: tuple[FormatInfo, ...]
    modifiers: tuple[int, ...]
    quota_buffers: int  #: 0: no quota
    quota_bytes: int  #: 0: no quota
    used_buffers: int
    used_bytes: int

    def _body(self) -> bytes:
        driver = _raw(self.driver, "driver name", MAX_NAME)
        node = _raw(self.node, "node path", MAX_NAME)
        head = self._HEAD.packer.pack(
            self.backend,
            len(self.formats),
            len(self.modifiers),
            0,
            *self.driver_version,
            self.max_width,
            self.max_height,
            self.max_count,
            self.max_size,
            self.quota_buffers,
            self.quota_bytes,
            self.used_buffers,
            self.used_bytes,
            len(driver),
            len(node),
        )
        record = FormatInfo._RECORD.packer
        formats = []
        for f in self.formats:
            if not 1 <= len(f.cpp) <= 4:
                raise LocalProtocolError(f"a format has 1 to 4 planes, not {len(f.cpp)}")
            cpp = (*f.cpp, 0, 0, 0)[:4]
            formats.append(record.pack(f.fourcc, len(f.cpp), f.hsub, f.vsub, 0, *cpp))
        modifiers = struct.pack(f"<{len(self.modifiers)}Q", *self.modifiers)
        return head + b"".join(formats) + modifiers + driver + node

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        parts = _Body(cls._HEAD, body, serial, "QUERIED")
        (backend, nformats, nmodifiers, _, major, minor, patch, width, height, count, size,
         quota_buffers, quota_bytes, used_buffers, used_bytes, dlen, nlen,
         ) = parts.values  # fmt: skip
        try:
            known = Backend(backend)
        except ValueError:
            raise RemoteProtocolError(
                f"QUERIED: unknown backend {backend}", serial=serial
            ) from None
        if dlen > MAX_NAME or nlen > MAX_NAME:
            raise RemoteProtocolError("QUERIED: driver or node name too long", serial=serial)
        record = FormatInfo._RECORD
        raw_formats = parts.take(record.size * nformats)
        if len(raw_formats) != record.size * nformats:
            raise RemoteProtocolError("QUERIED: formats cut short", serial=serial)
        formats = []
        for values in record.packer.iter_unpack(raw_formats):
            fourcc, nplanes, hsub, vsub, _, *cpp = values
            if not 1 <= nplanes <= 4 or any(cpp[nplanes:]) or values[4]:
                raise RemoteProtocolError(f"QUERIED: bad format record {values}", serial=serial)
            formats.append(FormatInfo(fourcc, tuple(cpp[:nplanes]), hsub, vsub))
        raw_modifiers = parts.take(8 * nmodifiers)
        if len(raw_modifiers) != 8 * nmodifiers:
            raise RemoteProtocolError("QUERIED: modifiers cut short", serial=serial)
        modifiers = struct.unpack(f"<{nmodifiers}Q", raw_modifiers)
        driver = _text(parts.take(dlen), "QUERIED driver", serial)
        node = _text(parts.take(nlen), "QUERIED node", serial)
        parts.finish("QUERIED")
        return cls(
            known, driver, (major, minor, patch), node, width, height, count, size,
            tuple(formats), modifiers, quota_buffers, quota_bytes, used_buffers, used_bytes,
        )  # fmt: skip


#: LIST's ``what``.
LIST_CLIENTS = 1
LIST_BUFFERS = 2


@dataclasses.dataclass(frozen=True, slots=True)
class List(Request):
    """One page of the clients (``what`` 1) or buffers (2) this client may see."""

    OPCODE: ClassVar[Opcode] = Opcode.LIST
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.LIST_HEAD)
    what: int
    start: int = 0

    def _body(self) -> bytes:
        return self._HEAD.packer.pack(self.what, 0, self.start)

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        parts = _Body(cls._HEAD, body, serial, "LIST")
        what, _, start = parts.values
        parts.finish("LIST")
        return cls(what, start)


@dataclasses.dataclass(frozen=True, slots=True)
class Stats(_EmptyMessage, Request):
    """Ask for the daemon's counters."""

    OPCODE: ClassVar[Opcode] = Opcode.STATS


@dataclasses.dataclass(frozen=True, slots=True)
class OpenBuffer(Request):
    """Receive buffer ``id`` of client ``client`` (root or the admin group only)."""

    OPCODE: ClassVar[Opcode] = Opcode.OPEN_BUFFER
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.OPEN_BUFFER_HEAD)
    client: int
    id: int

    def _body(self) -> bytes:
        return self._HEAD.packer.pack(self.client, 0, self.id)

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        parts = _Body(cls._HEAD, body, serial, "OPEN_BUFFER")
        client, _, ident = parts.values
        parts.finish("OPEN_BUFFER")
        return cls(client, ident)


@dataclasses.dataclass(frozen=True, slots=True)
class ClientEntry:
    """A connected client, as LIST shows it."""

    number: int
    pid: int
    uid: int
    gid: int
    since_ms: int
    buffers: int
    held_bytes: int
    name: str

    _RECORD: ClassVar[schema.Fixed] = schema.fixed(schema.CLIENT_ENTRY)


@dataclasses.dataclass(frozen=True, slots=True)
class BufferEntry:
    """A live buffer, as LIST shows it."""

    client: int
    id: int
    width: int
    height: int
    fourcc: int
    size: int
    age_ms: int
    tokens: int

    _RECORD: ClassVar[schema.Fixed] = schema.fixed(schema.BUFFER_ENTRY)


@dataclasses.dataclass(frozen=True, slots=True)
class Listed(Reply):
    """One page of a LIST: ``entries``, and where the next page starts (0: none)."""

    OPCODE: ClassVar[Opcode] = Opcode.LISTED
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.LISTED_HEAD)
    what: int
    next: int
    entries: tuple[ClientEntry, ...] | tuple[BufferEntry, ...]

    def _body(self) -> bytes:
        if self.what not in (LIST_CLIENTS, LIST_BUFFERS):  # even with no entries
            raise LocalProtocolError(f"LISTED of unknown kind {self.what}")
        out = [self._HEAD.packer.pack(self.what, len(self.entries), self.next)]
        for entry in self.entries:
            if isinstance(entry, ClientEntry) and self.what == LIST_CLIENTS:
                name = _raw(entry.name, "client name", MAX_NAME)
                out.append(
                    entry._RECORD.packer.pack(
                        entry.number, entry.pid, entry.uid, entry.gid, entry.since_ms,
                        entry.buffers, len(name), 0, entry.held_bytes,
                    )
                    + name
                )  # fmt: skip
            elif isinstance(entry, BufferEntry) and self.what == LIST_BUFFERS:
                out.append(
                    entry._RECORD.packer.pack(
                        entry.client, entry.tokens, entry.id, entry.width, entry.height,
                        entry.fourcc, 0, entry.size, entry.age_ms,
                    )
                )  # fmt: skip
            else:
                raise LocalProtocolError(f"LISTED of kind {self.what} holds {entry!r}")
        return b"".join(out)

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        parts = _Body(cls._HEAD, body, serial, "LISTED")
        what, count, following = parts.values
        if what == LIST_CLIENTS:
            clients = []
            record = ClientEntry._RECORD
            for _ in range(count):
                raw = parts.take(record.size)
                if len(raw) != record.size:
                    raise RemoteProtocolError("LISTED: entry cut short", serial=serial)
                number, pid, uid, gid, since, buffers, name_len, reserved, nbytes = (
                    record.packer.unpack(raw)
                )
                if reserved or name_len > MAX_NAME:
                    raise RemoteProtocolError("LISTED: bad client entry", serial=serial)
                name = _text(parts.take(name_len), "LISTED name", serial)
                clients.append(ClientEntry(number, pid, uid, gid, since, buffers, nbytes, name))
            parts.finish("LISTED")
            return cls(what, following, tuple(clients))
        if what == LIST_BUFFERS:
            record = BufferEntry._RECORD
            raw = parts.take(record.size * count)
            parts.finish("LISTED")
            buffers = []
            for values in record.packer.iter_unpack(raw):
                client, tokens, ident, width, height, fourcc, reserved, size, age = values
                if reserved:
                    raise RemoteProtocolError("LISTED: bad buffer entry", serial=serial)
                buffers.append(BufferEntry(client, ident, width, height, fourcc, size, age, tokens))
            return cls(what, following, tuple(buffers))
        raise RemoteProtocolError(f"LISTED: unknown kind {what}", serial=serial)


@dataclasses.dataclass(frozen=True, slots=True)
class Statistics(Reply):
    """The answer to Stats. ``counters`` maps (kind, key) to a count: kind 1 requests
    by opcode, 2 errors by code, 3 events (1 bad messages, 2 refused connections)."""

    OPCODE: ClassVar[Opcode] = Opcode.STATISTICS
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.STATISTICS_HEAD)
    _COUNTER: ClassVar[schema.Fixed] = schema.fixed(schema.COUNTER)
    uptime_ms: int
    clients: int
    buffers: int
    held_bytes: int
    tokens: int
    counters: tuple[tuple[int, int, int], ...]  #: (kind, key, count)

    def _body(self) -> bytes:
        head = self._HEAD.packer.pack(
            self.uptime_ms,
            self.clients,
            self.buffers,
            self.held_bytes,
            self.tokens,
            len(self.counters),
        )
        return head + b"".join(
            self._COUNTER.packer.pack(kind, key, 0, count) for kind, key, count in self.counters
        )

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        parts = _Body(cls._HEAD, body, serial, "STATISTICS")
        uptime, clients, buffers, nbytes, tokens, ncounters = parts.values
        record = cls._COUNTER
        raw = parts.take(record.size * ncounters)
        parts.finish("STATISTICS")
        counters = []
        for kind, key, reserved, count in record.packer.iter_unpack(raw):
            if reserved:
                raise RemoteProtocolError("STATISTICS: bad counter", serial=serial)
            counters.append((kind, key, count))
        return cls(uptime, clients, buffers, nbytes, tokens, tuple(counters))


@dataclasses.dataclass(frozen=True, slots=True)
class Passed(Message):
    """One buffer sent from peer to peer (primed.send_buffer), its fd attached."""

    OPCODE: ClassVar[Opcode] = Opcode.BUFFER
    _HEAD: ClassVar[schema.Fixed] = schema.fixed(schema.PASSED_HEAD)
    backend: Backend
    buffer: BufferInfo

    @property
    def nfds(self) -> int:
        return 1

    def _body(self) -> bytes:
        return self._HEAD.packer.pack(self.backend, 0) + self.buffer._pack()

    @classmethod
    def _parse(cls, body: bytes, serial: int) -> Self:
        parts = _Body(cls._HEAD, body, serial, "BUFFER")
        try:
            backend = Backend(parts.values[0])
        except ValueError:
            raise RemoteProtocolError(
                f"BUFFER: unknown backend {parts.values[0]}", serial=serial
            ) from None
        record = BufferInfo._RECORD
        raw = parts.take(record.size)
        parts.finish("BUFFER")
        return cls(backend, BufferInfo._unpack(record.packer.unpack(raw), serial))


REQUESTS: dict[int, type[Request]] = {
    c.OPCODE: c
    for c in (Hello, Allocate, Release, Share, OpenShared, Revoke, Query, List, Stats, OpenBuffer)
}
REPLIES: dict[int, type[Reply]] = {
    c.OPCODE: c
    for c in (
        Error, Welcome, Allocated, Released, Shared, Revoked, Queried, Listed, Statistics,
    )
}  # fmt: skip
PEER: dict[int, type[Message]] = {Passed.OPCODE: Passed}


class UnknownOpcode(RemoteProtocolError):
    """The header was sound but its opcode is not one this side knows.

    The datagram can be skipped and the connection kept: answer with an Error.
    """

    def __init__(self, opcode: int, serial: int):
        super().__init__(f"unknown opcode 0x{opcode:04x}", ErrorCode.UNKNOWN_OPCODE, serial)
        self.opcode = opcode


def encode(message: Message, serial: int) -> bytes:
    """One datagram carrying ``message`` with request id ``serial``.

    Raises LocalProtocolError if a field does not fit the wire format.
    """
    try:
        body = message._body()
        header = _HEADER.packer.pack(message.OPCODE, message.nfds, len(body), serial)
    except (struct.error, UnicodeEncodeError) as e:
        raise LocalProtocolError(f"{type(message).__name__}: {e}") from None
    if len(body) + HEADER_SIZE > MAX_MESSAGE:
        raise LocalProtocolError(f"{type(message).__name__} of {len(body)} bytes is too large")
    return header + body


def decode(
    data: bytes, nfds: int, kind: Literal["request", "reply", "peer"]
) -> tuple[int, Message]:
    """Parse one received datagram that came with ``nfds`` fds.

    Returns ``(serial, message)``. Raises :class:`UnknownOpcode` for a sound
    header with an opcode of the wrong kind or none known, and
    :class:`RemoteProtocolError` for anything else malformed, with ``serial``
    set once the header could be read.
    """
    if len(data) < HEADER_SIZE:
        raise RemoteProtocolError(f"datagram of {len(data)} bytes is shorter than a header")
    opcode, header_fds, size, serial = _HEADER.packer.unpack_from(data)
    if size != len(data) - HEADER_SIZE:
        raise RemoteProtocolError(
            f"header says {size} body bytes, {len(data) - HEADER_SIZE} arrived", serial=serial
        )
    if header_fds != nfds:
        raise RemoteProtocolError(f"header says {header_fds} fds, {nfds} arrived", serial=serial)
    table: dict[int, type[Request]] | dict[int, type[Reply]] | dict[int, type[Message]] = (
        REQUESTS if kind == "request" else REPLIES if kind == "reply" else PEER
    )
    cls = table.get(opcode)
    if cls is None:
        raise UnknownOpcode(opcode, serial)
    message = cls._parse(data[HEADER_SIZE:], serial)
    if message.nfds != nfds:
        raise RemoteProtocolError(
            f"{cls.OPCODE.name} carries {message.nfds} fds, {nfds} arrived", serial=serial
        )
    return serial, message
