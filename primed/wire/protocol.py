"""primed's messages and their encoding: bytes in, messages out. No I/O.

:func:`encode` turns a message and a serial into one datagram; :func:`decode`
turns a received datagram (and the number of fds that came with it) into
``(serial, message)`` or raises :class:`RemoteProtocolError`, having checked
every length, count, reserved field and string.

This module frames datagrams and re-exports the rest: the layouts are declared
in :mod:`primed.wire.schema`, the message classes live in
:mod:`primed.wire.messages`, and the codec that packs and unpacks their bodies is
derived from both by :mod:`primed.wire.codec`.
"""

from __future__ import annotations

import struct
from typing import Any, Literal

from construct import Array, Int64ul, Struct, Terminated

from primed.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from primed.wire import schema
from primed.wire.codec import Malformed, Slots, path_field
from primed.wire.messages import (
    LIST_BUFFERS,
    LIST_CLIENTS,
    PEER,
    REPLIES,
    REQUESTS,
    SHARE_ONCE,
    USAGE_CPU,
    USAGE_SCANOUT,
    USAGES,
    Allocate,
    Allocated,
    AllocateFrom,
    AllocatorInfo,
    BufferEntry,
    BufferInfo,
    ClientEntry,
    DeviceImports,
    Error,
    FormatInfo,
    Hello,
    List,
    Listed,
    Message,
    OpenBuffer,
    OpenShared,
    Passed,
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
from primed.wire.schema import MAX_MESSAGE, Opcode

__all__ = [
    "HEADER_SIZE",
    "LIST_BUFFERS",
    "LIST_CLIENTS",
    "PEER",
    "REPLIES",
    "REQUESTS",
    "SHARE_ONCE",
    "USAGES",
    "USAGE_CPU",
    "USAGE_SCANOUT",
    "Allocate",
    "AllocateFrom",
    "Allocated",
    "AllocatorInfo",
    "BufferEntry",
    "BufferInfo",
    "ClientEntry",
    "DeviceImports",
    "Error",
    "FormatInfo",
    "Hello",
    "List",
    "Listed",
    "Message",
    "OpenBuffer",
    "OpenShared",
    "Passed",
    "Queried",
    "Query",
    "Release",
    "Released",
    "Reply",
    "Request",
    "Revoke",
    "Revoked",
    "Share",
    "Shared",
    "Statistics",
    "Stats",
    "UnknownOpcode",
    "Welcome",
    "allocate_datagram",
    "allocate_request",
    "allocated_datagram",
    "decode",
    "encode",
    "one_buffer",
    "one_buffer_datagram",
    "release_datagram",
    "release_one",
    "released_count",
    "released_datagram",
]

_HEADER = schema.fixed(schema.HEADER).packer
HEADER_SIZE = _HEADER.size
_TABLES: dict[str, dict[int, type[Message]]] = {
    "request": dict(REQUESTS),
    "reply": dict(REPLIES),
    "peer": dict(PEER),
}


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
        body = message.CODEC.build(message)
        header = _HEADER.pack(message.OPCODE, message.nfds, len(body), serial)
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
    opcode, header_fds, size, serial = _HEADER.unpack_from(data)
    if size != len(data) - HEADER_SIZE:
        raise RemoteProtocolError(
            f"header says {size} body bytes, {len(data) - HEADER_SIZE} arrived", serial=serial
        )
    if header_fds != nfds:
        raise RemoteProtocolError(f"header says {header_fds} fds, {nfds} arrived", serial=serial)
    cls = _TABLES[kind].get(opcode)
    if cls is None:
        raise UnknownOpcode(opcode, serial)
    try:
        message, end = cls.CODEC.take(data, HEADER_SIZE)
    except Malformed as e:
        raise RemoteProtocolError(f"{cls.OPCODE.name}: {e}", serial=serial) from None
    if end != len(data):
        raise RemoteProtocolError(
            f"{cls.OPCODE.name}: body is {size} bytes, expected {end - HEADER_SIZE}", serial=serial
        )
    if message.nfds != nfds:
        raise RemoteProtocolError(
            f"{cls.OPCODE.name} carries {message.nfds} fds, {nfds} arrived", serial=serial
        )
    return serial, message


# The client's fast paths. Each stands for one case of encode() or decode() and gives
# the very bytes, or accepts only datagrams, that those would: the structs are the
# schema's own declarations joined to the header, and import fails (TypeError) if a
# declaration no longer has the shape written below. Whatever a decoder here does
# not accept (None), decode() takes in full and says what is wrong with it.


def _joined(opcode: Opcode, head: Any, element: Any = None) -> tuple[struct.Struct, int]:
    """The header, ``head`` and (if given) one ``element`` of the body's one array, as
    one struct; and the body's size.

    Raises TypeError unless the body is ``head``, then (with ``element``) an array of
    ``element`` counted by the head's ``count``, then Terminated.
    """
    body = list(schema.BODIES[opcode].subcons)
    tail = [] if element is None else body[len(head.subcons) : -1]
    shaped = body[: len(head.subcons)] == list(head.subcons) and body[-1] is Terminated
    if element is None:
        shaped = shaped and len(body) == len(head.subcons) + 1
    else:
        array = getattr(tail[0], "subcon", None) if len(tail) == 1 else None
        shaped = (
            shaped
            and isinstance(array, Array)
            and array.subcon is element
            and path_field(array.count) == "count"
        )
    if not shaped:
        raise TypeError(f"{opcode.name}'s body no longer has the shape its fast path reads")
    parts = [head] if element is None else [head, element]
    codes = "".join(
        schema.fixed(p).packer.format[1:] if isinstance(p, Struct) else p.fmtstr[1:] for p in parts
    )
    joined = struct.Struct(_HEADER.format + codes)
    return joined, joined.size - HEADER_SIZE


def _check_names(what: str, declaration: Any, names: tuple[str, ...]) -> None:
    if schema.fixed(declaration).names != names:
        raise TypeError(f"{what} is no longer {names}")


_PLANE_FIELDS = tuple(f"{name}{i}" for i in range(4) for name in ("offset", "pitch"))
_check_names("HEADER", schema.HEADER, ("opcode", "nfds", "size", "serial"))
_check_names("ALLOCATE_HEAD", schema.ALLOCATE_HEAD, ("width", "height", "fourcc", "count", "flags"))
_check_names(
    "ALLOCATED_HEAD", schema.ALLOCATED_HEAD, ("total", "index", "count", "allocator", "reserved")
)
_check_names("RELEASE_HEAD", schema.RELEASE_HEAD, ("count", "reserved"))
_check_names("RELEASED_HEAD", schema.RELEASED_HEAD, ("count", "reserved"))
_check_names(
    "BUFFER",
    schema.BUFFER,
    ("id", "width", "height", "fourcc", "nplanes", "modifier", "size", *_PLANE_FIELDS),
)
if BufferInfo.WIRE["planes"] != Slots("nplanes", ("offset", "pitch"), 1, 4):
    raise TypeError("BufferInfo.planes is no longer 1 to 4 (offset, pitch) slots")
_CONSTS = {
    "ALLOCATE_HEAD": (schema.ALLOCATE_HEAD, ()),
    "RELEASE_HEAD": (schema.RELEASE_HEAD, ((1, 0),)),
    "ALLOCATED_HEAD": (schema.ALLOCATED_HEAD, ((4, 0),)),
    "RELEASED_HEAD": (schema.RELEASED_HEAD, ((1, 0),)),
    "BUFFER": (schema.BUFFER, ()),
}
for _name, (_declaration, _consts) in _CONSTS.items():
    if schema.fixed(_declaration).consts != _consts:
        raise TypeError(f"{_name}'s Consts are no longer {_consts}")

_ALLOCATE, _ALLOCATE_BODY = _joined(Opcode.ALLOCATE, schema.ALLOCATE_HEAD)
_RELEASE_ONE, _RELEASE_ONE_BODY = _joined(Opcode.RELEASE, schema.RELEASE_HEAD, Int64ul)
_ONE_BUFFER, _ONE_BUFFER_BODY = _joined(Opcode.ALLOCATED, schema.ALLOCATED_HEAD, schema.BUFFER)
_RELEASED, _RELEASED_BODY = _joined(Opcode.RELEASED, schema.RELEASED_HEAD)
_OP_ALLOCATE, _OP_RELEASE = int(Opcode.ALLOCATE), int(Opcode.RELEASE)
_OP_ALLOCATED, _OP_RELEASED = int(Opcode.ALLOCATED), int(Opcode.RELEASED)
_ONE_BUFFER_SIZE, _RELEASED_SIZE = _ONE_BUFFER.size, _RELEASED.size


def allocate_datagram(
    serial: int, width: int, height: int, fourcc: int, count: int, flags: int
) -> bytes:
    """``encode(Allocate(width, height, fourcc, count, flags), serial)``, without the
    message object. Raises LocalProtocolError if a field does not fit."""
    try:
        return _ALLOCATE.pack(
            _OP_ALLOCATE, 0, _ALLOCATE_BODY, serial, width, height, fourcc, count, flags
        )
    except struct.error as e:
        raise LocalProtocolError(f"Allocate: {e}") from None


def release_datagram(serial: int, ids: tuple[int, ...] | list[int]) -> bytes:
    """``encode(Release(tuple(ids)), serial)``; one id without the message object.
    Raises LocalProtocolError if an id does not fit, or for too many."""
    if len(ids) != 1:
        return encode(Release(tuple(ids)), serial)
    try:
        return _RELEASE_ONE.pack(_OP_RELEASE, 0, _RELEASE_ONE_BODY, serial, 1, 0, ids[0])
    except struct.error as e:
        raise LocalProtocolError(f"Release: {e}") from None


def one_buffer(
    data: bytes, nfds: int
) -> tuple[int, int, int, int, int, int, int, tuple[tuple[int, int], ...], int] | None:
    """An ALLOCATED that is the whole answer (total 1, index 0) of one buffer, with its
    one fd: ``(serial, id, width, height, fourcc, modifier, size, planes, allocator)``,
    each plane an ``(offset, pitch)``, when decode() would accept ``data``; else None."""
    if nfds != 1 or len(data) != _ONE_BUFFER_SIZE:
        return None
    (
        opcode, header_fds, size, serial, total, index, count, allocator, reserved,
        ident, width, height, fourcc, nplanes, modifier, bytes_,
        o0, p0, o1, p1, o2, p2, o3, p3,
    ) = _ONE_BUFFER.unpack(data)  # fmt: skip
    if (
        opcode != _OP_ALLOCATED
        or header_fds != 1
        or size != _ONE_BUFFER_BODY
        or total != 1
        or index
        or count != 1
        or reserved
    ):
        return None
    if nplanes == 1:
        if o1 or p1 or o2 or p2 or o3 or p3:
            return None
        planes: tuple[tuple[int, int], ...] = ((o0, p0),)
    else:
        slots = ((o0, p0), (o1, p1), (o2, p2), (o3, p3))
        if not 1 <= nplanes <= 4 or any(o or p for o, p in slots[nplanes:]):
            return None
        planes = slots[:nplanes]
    return serial, ident, width, height, fourcc, modifier, bytes_, planes, allocator


def released_count(data: bytes, nfds: int) -> tuple[int, int] | None:
    """A RELEASED: ``(serial, count)`` when decode() would accept ``data``; else None."""
    if nfds or len(data) != _RELEASED_SIZE:
        return None
    opcode, header_fds, size, serial, count, reserved = _RELEASED.unpack(data)
    if opcode != _OP_RELEASED or header_fds or size != _RELEASED_BODY or reserved:
        return None
    return serial, count


# The daemon's fast paths: the two requests a client repeats most, read straight into
# the values the handler needs, and the replies to them packed straight from values.
# Same rule as the client's: each accepts only what decode() accepts (None: let
# decode() say what is wrong) and gives the very bytes encode() would.


def allocate_request(data: bytes, nfds: int) -> tuple[int, int, int, int, int, int] | None:
    """An ALLOCATE: ``(serial, width, height, fourcc, count, flags)`` when decode()
    would accept ``data`` as a request; else None."""
    if nfds or len(data) != _ALLOCATE.size:
        return None
    opcode, header_fds, size, serial, width, height, fourcc, count, flags = _ALLOCATE.unpack(data)
    if opcode != _OP_ALLOCATE or header_fds or size != _ALLOCATE_BODY:
        return None
    return serial, width, height, fourcc, count, flags


def release_one(data: bytes, nfds: int) -> tuple[int, int] | None:
    """A RELEASE of one id: ``(serial, id)`` when decode() would accept ``data`` as a
    request; else None (RELEASEs of other counts included)."""
    if nfds or len(data) != _RELEASE_ONE.size:
        return None
    opcode, header_fds, size, serial, count, reserved, ident = _RELEASE_ONE.unpack(data)
    if opcode != _OP_RELEASE or header_fds or size != _RELEASE_ONE_BODY or count != 1 or reserved:
        return None
    return serial, ident


_NO_PLANE = (0, 0)


def one_buffer_datagram(
    serial: int,
    total: int,
    index: int,
    allocator: int,
    ident: int,
    width: int,
    height: int,
    fourcc: int,
    modifier: int,
    size: int,
    planes: tuple[tuple[int, int], ...],
) -> bytes:
    """``encode(Allocated(total, index, (BufferInfo(ident, width, height, fourcc,
    modifier, size, planes),), allocator), serial)``: a part of one buffer (with its one
    fd), without the message objects. Raises LocalProtocolError where encode() would."""
    nplanes = len(planes)
    if not 1 <= nplanes <= 4 or index + 1 > total:
        info = BufferInfo(ident, width, height, fourcc, modifier, size, planes)
        return encode(Allocated(total, index, (info,), allocator), serial)  # says why
    (o0, p0), (o1, p1), (o2, p2), (o3, p3) = (*planes, *(_NO_PLANE,) * (4 - nplanes))
    try:
        return _ONE_BUFFER.pack(
            _OP_ALLOCATED, 1, _ONE_BUFFER_BODY, serial, total, index, 1, allocator, 0,
            ident, width, height, fourcc, nplanes, modifier, size,
            o0, p0, o1, p1, o2, p2, o3, p3,
        )  # fmt: skip
    except struct.error:
        info = BufferInfo(ident, width, height, fourcc, modifier, size, planes)
        return encode(Allocated(total, index, (info,), allocator), serial)  # says why


def released_datagram(serial: int, count: int) -> bytes:
    """``encode(Released(count), serial)``, without the message object. Raises
    LocalProtocolError where encode() would."""
    try:
        return _RELEASED.pack(_OP_RELEASED, 0, _RELEASED_BODY, serial, count, 0)
    except struct.error:
        return encode(Released(count), serial)  # says why


_ALLOCATED_HEAD = struct.Struct(
    _HEADER.format + schema.fixed(schema.ALLOCATED_HEAD).packer.format[1:]
)
_BUFFER_RECORD = schema.fixed(schema.BUFFER).packer
_PAD = (0,) * 8


def allocated_datagram(
    serial: int,
    total: int,
    index: int,
    allocator: int,
    rows: list[tuple[int, int, int, int, int, int, tuple[tuple[int, int], ...]]],
) -> bytes:
    """``encode(Allocated(total, index, tuple(BufferInfo(*row) for row in rows),
    allocator), serial)``: a part of ``len(rows)`` buffers, each row ``(id, width,
    height, fourcc, modifier, size, planes)``, packed into one buffer without the
    message objects. Raises LocalProtocolError where encode() would."""
    count, record = len(rows), _BUFFER_RECORD
    size = _ALLOCATED_HEAD.size - HEADER_SIZE + count * record.size
    if 1 <= count <= schema.MAX_FDS and index + count <= total:
        out = bytearray(HEADER_SIZE + size)
        at = _ALLOCATED_HEAD.size
        try:
            _ALLOCATED_HEAD.pack_into(
                out, 0, _OP_ALLOCATED, count, size, serial, total, index, count, allocator, 0
            )
            for ident, width, height, fourcc, modifier, nbytes, planes in rows:
                nplanes = len(planes)
                if nplanes == 1:  # most formats
                    ((o0, p0),) = planes
                    record.pack_into(
                        out, at, ident, width, height, fourcc, 1, modifier, nbytes,
                        o0, p0, 0, 0, 0, 0, 0, 0,
                    )  # fmt: skip
                elif 2 <= nplanes <= 4:
                    flat = (*(v for plane in planes for v in plane), *_PAD)[:8]
                    record.pack_into(
                        out, at, ident, width, height, fourcc, nplanes, modifier, nbytes, *flat
                    )
                else:
                    break
                at += record.size
            else:
                if len(out) <= MAX_MESSAGE:
                    return bytes(out)
        except (struct.error, TypeError, ValueError):
            pass
    infos = tuple(BufferInfo(*row) for row in rows)
    return encode(Allocated(total, index, infos, allocator), serial)  # says why
