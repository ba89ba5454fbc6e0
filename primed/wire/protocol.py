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
from typing import Literal

from primed.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from primed.wire import schema
from primed.wire.codec import Malformed
from primed.wire.messages import (
    LIST_BUFFERS,
    LIST_CLIENTS,
    PEER,
    REPLIES,
    REQUESTS,
    SHARE_ONCE,
    Allocate,
    Allocated,
    BufferEntry,
    BufferInfo,
    ClientEntry,
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
from primed.wire.schema import MAX_MESSAGE

__all__ = [
    "HEADER_SIZE",
    "LIST_BUFFERS",
    "LIST_CLIENTS",
    "PEER",
    "REPLIES",
    "REQUESTS",
    "SHARE_ONCE",
    "Allocate",
    "Allocated",
    "BufferEntry",
    "BufferInfo",
    "ClientEntry",
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
    "decode",
    "encode",
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
