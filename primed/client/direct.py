"""Passing a buffer straight from one process to another, with no daemon in between.

For processes that already share an AF_UNIX socket (a compositor and its
client, a pipeline's stages): :func:`send_buffer` sends a Buffer's layout and
its fd as one BUFFER message (protocol/PROTOCOL.md), framed as the daemon's
messages are; :func:`recv_buffer` receives it as a new Buffer that owns a new
fd. On SOCK_SEQPACKET and SOCK_DGRAM one datagram is one message; on
SOCK_STREAM the receiver reads the 12-byte header (the fd rides with its first
byte), then exactly the body, and never past the message. The same fd hygiene
holds as with the daemon: fds arrive close-on-exec, and on any error every fd
that arrived is closed.
"""

from __future__ import annotations

import socket
from typing import cast

import trio

from primed import fdpass
from primed.client.buffer import Buffer
from primed.client.core import buffer_from
from primed.errors import ConnectionLost, RemoteProtocolError
from primed.wire import protocol
from primed.wire.protocol import HEADER_SIZE, BufferInfo, Passed
from primed.wire.schema import MAX_MESSAGE

_SIZE_AT = slice(4, 8)  # the header's body size field


def _message(buffer: Buffer) -> bytes:
    planes = tuple((p.offset, p.pitch) for p in buffer.planes)
    info = BufferInfo(
        buffer.id, buffer.width, buffer.height, buffer.fourcc, buffer.modifier, buffer.size, planes
    )
    return protocol.encode(Passed(buffer.backend, info), 0)


def _buffer(data: bytes, fds: list[int]) -> Buffer:
    try:
        _, message = protocol.decode(data, len(fds), "peer")
    except BaseException:
        fdpass.close_fds(fds)
        raise
    passed = cast(Passed, message)
    return buffer_from(passed.buffer, fds[0], passed.backend)


class _StreamReader:
    """Collects one message: from a stream, how much to read next; from a datagram, at once.

    It owns the fds collected; whoever drives it calls :meth:`fail` if anything raises.
    """

    def __init__(self) -> None:
        self.data = b""
        self.fds: list[int] = []
        self.end = 0

    def wanted(self) -> int:
        """Bytes to read next; 0 once the message is whole."""
        if len(self.data) < HEADER_SIZE:
            return HEADER_SIZE - len(self.data)
        if not self.end:
            size = int.from_bytes(self.data[_SIZE_AT], "little")
            if size > MAX_MESSAGE - HEADER_SIZE:
                raise RemoteProtocolError(f"a message of {size} bytes is too long")
            self.end = HEADER_SIZE + size
        return self.end - len(self.data)

    def feed(self, chunk: bytes, fds: list[int]) -> None:
        """Add what one receive gave (``(b"", [])``: the end of the stream)."""
        self.fds += fds
        if not chunk:
            raise ConnectionLost("the peer closed the socket before a whole buffer arrived")
        self.data += chunk

    def fail(self) -> None:
        """A receive failed: close the fds collected so far."""
        fdpass.close_fds(self.fds)
        self.fds = []


def send_buffer(sock: socket.socket, buffer: Buffer) -> None:
    """Send ``buffer`` (its layout and a copy of its fd) over ``sock``; ``buffer`` stays ours."""
    data = _message(buffer)
    sent = sock.sendmsg([data], fdpass.rights([buffer.fd]))
    if sent < len(data):  # a stream socket may take part of it: the fd went with the first
        sock.sendall(data[sent:])


def recv_buffer(sock: socket.socket) -> Buffer:
    """Receive one buffer sent with :func:`send_buffer`; the caller owns the returned Buffer.

    Raises RemoteProtocolError for a malformed message, ConnectionLost on end of stream.
    """
    reader = _StreamReader()
    try:
        if sock.type == socket.SOCK_STREAM:
            while wanted := reader.wanted():
                reader.feed(*fdpass.recv(sock, wanted))
        else:
            reader.feed(*fdpass.recv(sock))
    except BaseException:
        reader.fail()
        raise
    return _buffer(reader.data, reader.fds)


async def send_buffer_async(sock: trio.socket.SocketType, buffer: Buffer) -> None:
    """As :func:`send_buffer`, on a trio socket."""
    data = _message(buffer)
    sent = await sock.sendmsg([data], fdpass.rights([buffer.fd]))
    while sent < len(data):
        sent += await sock.send(data[sent:])


async def recv_buffer_async(sock: trio.socket.SocketType) -> Buffer:
    """As :func:`recv_buffer`, on a trio socket."""
    reader = _StreamReader()
    try:
        if sock.type == socket.SOCK_STREAM:
            while wanted := reader.wanted():
                reader.feed(*await fdpass.recv_async(sock, wanted))
        else:
            reader.feed(*await fdpass.recv_async(sock))
    except BaseException:
        reader.fail()
        raise
    return _buffer(reader.data, reader.fds)
