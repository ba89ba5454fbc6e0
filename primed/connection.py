"""The client's side of the protocol, with no I/O: requests out, results in.

Both clients (:mod:`primed.io.blocking`, :mod:`primed.io.trio`) drive one
:class:`ClientConnection`: it numbers requests, builds their datagrams, and
turns each received datagram (with its fds) into a result for one serial. Fds
become :class:`Buffer` objects the moment they are parsed, so from then on
exactly one object owns each; on any error every fd that arrived is closed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from primed import formats, protocol
from primed.buffer import Buffer, Plane
from primed.errors import ErrorCode, PrimedError, RemoteProtocolError, ServerError, server_error
from primed.fdpass import close_fds
from primed.formats import Limits
from primed.protocol import Allocated, Error, Released, Welcome
from primed.schema import VERSION, Backend

#: Where clients look for the daemon when no path is given and $PRIMED_SOCKET is unset.
DEFAULT_SOCKET = "/run/primed/primed.sock"


def socket_path(path: str | None = None) -> str:
    """``path``, else $PRIMED_SOCKET, else DEFAULT_SOCKET."""
    return path or os.environ.get("PRIMED_SOCKET") or DEFAULT_SOCKET


@dataclasses.dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the daemon said of itself in its Welcome."""

    version: int
    backend: Backend
    driver: str
    driver_version: tuple[int, int, int]
    node: str
    limits: Limits

    def describe(self) -> dict[str, object]:
        return {
            "version": self.version,
            "backend": self.backend.name.lower(),
            "driver": self.driver,
            "driver_version": ".".join(map(str, self.driver_version)),
            "node": self.node,
            "limits": dataclasses.asdict(self.limits),
        }


Result = ServerInfo | list[Buffer] | int | ServerError


class ClientConnection:
    """Protocol state of one client connection."""

    def __init__(self, name: str = ""):
        self.name = name
        self.info: ServerInfo | None = None
        self._serial = 0
        self._hello_serial = -1
        self._parts: dict[int, list[Buffer]] = {}

    def _next(self) -> int:
        self._serial = self._serial % 0xFFFFFFFF + 1
        return self._serial

    def hello(self) -> tuple[int, bytes]:
        serial = self._hello_serial = self._next()
        return serial, protocol.encode(protocol.Hello(VERSION, VERSION, self.name), serial)

    def allocate(
        self, width: int, height: int, fmt: str | int, count: int = 1, flags: int = 0
    ) -> tuple[int, bytes]:
        """An Allocate request; ``fmt`` is a fourcc text, DRM name or fourcc integer.

        Raises ValueError for a format not in primed's table.
        """
        code = formats.lookup(fmt).fourcc if isinstance(fmt, str) else fmt
        serial = self._next()
        request = protocol.Allocate(width, height, code, count, flags)
        return serial, protocol.encode(request, serial)

    def release(self, ids: Iterable[int]) -> tuple[int, bytes]:
        serial = self._next()
        return serial, protocol.encode(protocol.Release(tuple(ids)), serial)

    def receive(self, data: bytes, fds: list[int]) -> tuple[int, Result] | None:
        """Digest one datagram; returns ``(serial, result)`` once a reply is complete.

        A result is a ServerInfo (Hello), a list of Buffers (Allocate), the count
        released (Release) or a ServerError. Returns None while a multi-part
        Allocated reply is still incomplete. Raises RemoteProtocolError (having
        closed ``fds``) if the datagram is malformed.
        """
        try:
            serial, reply = protocol.decode(data, len(fds), "reply")
        except BaseException:
            close_fds(fds)
            raise
        if isinstance(reply, Allocated):
            return self._allocated(serial, reply, fds)
        if isinstance(reply, Error):
            for buffer in self._parts.pop(serial, []):
                buffer.close()
            return serial, server_error(reply.code, reply.errno, reply.text)
        if isinstance(reply, Welcome):
            if serial != self._hello_serial:
                raise RemoteProtocolError("WELCOME answers no HELLO", serial=serial)
            self.info = ServerInfo(
                reply.version,
                reply.backend,
                reply.driver,
                reply.driver_version,
                reply.node,
                Limits(reply.max_width, reply.max_height, reply.max_size, reply.max_count),
            )
            return serial, self.info
        if isinstance(reply, Released):
            return serial, reply.count
        raise RemoteProtocolError(f"unexpected {type(reply).__name__}", serial=serial)

    def _allocated(
        self, serial: int, reply: Allocated, fds: list[int]
    ) -> tuple[int, Result] | None:
        backend = self.info.backend if self.info else Backend.DRM
        buffers = [
            Buffer(
                fd,
                id=info.id,
                width=info.width,
                height=info.height,
                fourcc=info.fourcc,
                modifier=info.modifier,
                size=info.size,
                planes=tuple(Plane(o, p) for o, p in info.planes),
                backend=backend,
            )
            for info, fd in zip(reply.buffers, fds, strict=True)
        ]
        held = self._parts.setdefault(serial, [])
        if reply.index != len(held):
            for buffer in held + buffers:
                buffer.close()
            del self._parts[serial]
            raise RemoteProtocolError(
                f"ALLOCATED part at {reply.index}, expected {len(held)}", serial=serial
            )
        held.extend(buffers)
        if len(held) < reply.total:
            return None
        del self._parts[serial]
        return serial, held

    def abandon(self) -> None:
        """Close every buffer of an incomplete reply (the connection is going away)."""
        for held in self._parts.values():
            for buffer in held:
                buffer.close()
        self._parts.clear()


def buffer_ids(buffers: Iterable[Buffer | int]) -> list[int]:
    """The ids of Buffers (or ids given as they are)."""
    return [b.id if isinstance(b, Buffer) else b for b in buffers]


def unwrap(result: Result) -> Result:
    """Raise ``result`` if it is an error, else return it."""
    if isinstance(result, PrimedError):
        raise result
    return result


__all__ = [
    "DEFAULT_SOCKET",
    "ClientConnection",
    "ErrorCode",
    "ServerInfo",
    "buffer_ids",
    "socket_path",
]
