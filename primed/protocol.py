"""primed's messages as Python objects, and their encoding: bytes in, messages out.

No I/O here. :func:`encode` turns a message and a serial into one datagram;
:func:`decode` turns a received datagram (and the number of fds that came with
it) into ``(serial, message)`` or raises :class:`RemoteProtocolError`, having
checked every length, count, reserved field and string. The schema lives in
:mod:`primed.schema`; the fixed heads are packed with ``struct`` formats derived
from it.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import ClassVar, Literal, Self

from primed import schema
from primed.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from primed.schema import MAX_FDS, MAX_MESSAGE, MAX_NAME, MAX_RELEASE, MAX_TEXT, Backend, Opcode

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
        parts = _Body(cls._HEAD, body, serial, "ALLOCATE")
        parts.finish("ALLOCATE")
        return cls(*parts.values)


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
        if not 1 <= len(self.planes) <= 4:
            raise LocalProtocolError(f"a buffer has 1 to 4 planes, not {len(self.planes)}")
        flat = [value for plane in self.planes for value in plane]
        flat += [0] * (8 - len(flat))
        return self._RECORD.packer.pack(
            self.id,
            self.width,
            self.height,
            self.fourcc,
            len(self.planes),
            self.modifier,
            self.size,
            *flat,
        )

    @classmethod
    def _unpack(cls, values: tuple[int, ...], serial: int) -> BufferInfo:
        ident, width, height, fourcc, nplanes, modifier, size = values[:7]
        flat = values[7:]
        if not 1 <= nplanes <= 4 or any(flat[2 * nplanes :]):
            raise RemoteProtocolError(f"ALLOCATED: bad plane count {nplanes}", serial=serial)
        planes = tuple((flat[2 * i], flat[2 * i + 1]) for i in range(nplanes))
        return cls(ident, width, height, fourcc, modifier, size, planes)


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
        buffers = tuple(
            BufferInfo._unpack(values, serial) for values in record.packer.iter_unpack(raw)
        )
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
        parts = _Body(cls._HEAD, body, serial, "RELEASED")
        parts.finish("RELEASED")
        return cls(parts.values[0])


REQUESTS: dict[int, type[Request]] = {c.OPCODE: c for c in (Hello, Allocate, Release)}
REPLIES: dict[int, type[Reply]] = {c.OPCODE: c for c in (Error, Welcome, Allocated, Released)}


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


def decode(data: bytes, nfds: int, kind: Literal["request", "reply"]) -> tuple[int, Message]:
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
    table: dict[int, type[Request]] | dict[int, type[Reply]] = (
        REQUESTS if kind == "request" else REPLIES
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
