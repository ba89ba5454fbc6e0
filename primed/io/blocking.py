"""The blocking client: one socket, one request at a time, no event loop."""

from __future__ import annotations

import os
import socket
import sys
from types import TracebackType
from typing import cast, overload

from primed import fdpass
from primed.buffer import Buffer
from primed.connection import (
    ClientConnection,
    Result,
    ServerInfo,
    buffer_ids,
    socket_path,
    unwrap,
)
from primed.errors import ConnectionLost


def _default_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


class Client:
    """A connection to the daemon. Use :func:`primed.connect` to make one."""

    def __init__(self, sock: socket.socket, name: str | None = None):
        self._sock = sock
        self._conn = ClientConnection(_default_name() if name is None else name)
        self.info: ServerInfo = cast(ServerInfo, self._call(*self._conn.hello()))

    def _call(self, serial: int, data: bytes) -> Result:
        try:
            try:
                fdpass.send(self._sock, data, [])
            except (BrokenPipeError, ConnectionResetError):
                pass  # a daemon that refused us said why before closing: read on
            while True:
                received, fds = fdpass.recv(self._sock)
                if not received and not fds:
                    raise ConnectionLost("the daemon closed the connection")
                done = self._conn.receive(received, fds)
                if done is not None:
                    got, result = done
                    if got in (serial, 0):
                        return unwrap(result)
                    if isinstance(result, list):  # a reply to a request we gave up on
                        for buffer in result:
                            buffer.close()
        except (BrokenPipeError, ConnectionResetError) as e:
            self._conn.abandon()
            raise ConnectionLost(f"the daemon closed the connection: {e}") from None

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
        buffers = cast(
            list[Buffer],
            self._call(*self._conn.allocate(width, height, format, 1 if count is None else count)),
        )
        return buffers if count is not None else buffers[0]

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

    def close(self) -> None:
        """Disconnect; the daemon frees every buffer this client still owned."""
        self._conn.abandon()
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
