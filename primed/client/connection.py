"""The client's side of the protocol, with no I/O: requests out, results in.

Both clients (:mod:`primed.client.blocking`, :mod:`primed.client.trio`) drive one
:class:`ClientConnection`: it numbers requests, builds their datagrams, and
turns each received datagram (with its fds) into a result for one serial. Fds
become :class:`Buffer` objects the moment they are parsed, so from then on
exactly one object owns each; on any error every fd that arrived is closed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from primed import formats
from primed.client.buffer import Buffer, Plane
from primed.errors import ErrorCode, PrimedError, RemoteProtocolError, ServerError, server_error
from primed.fdpass import close_fds
from primed.formats import Limits, fourcc_str
from primed.wire import protocol
from primed.wire.protocol import (
    Allocated,
    BufferInfo,
    Error,
    FormatInfo,
    Listed,
    Queried,
    Released,
    Revoked,
    Shared,
    Statistics,
    Welcome,
)
from primed.wire.schema import TOKEN_SIZE, VERSION, Backend

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


@dataclasses.dataclass(frozen=True, slots=True)
class Offer:
    """What the daemon offers, and what this client holds (the answer to a query)."""

    backend: Backend
    driver: str
    driver_version: tuple[int, int, int]
    node: str
    limits: Limits
    formats: tuple[FormatInfo, ...]
    modifiers: tuple[int, ...]
    quota_buffers: int  #: the tightest quota on this client's buffers; 0: none
    quota_bytes: int  #: likewise on its bytes
    used_buffers: int  #: what this client holds now
    used_bytes: int

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.backend.name.lower(),
            "driver": self.driver,
            "driver_version": ".".join(map(str, self.driver_version)),
            "node": self.node,
            "limits": dataclasses.asdict(self.limits),
            "formats": [
                {"format": fourcc_str(f.fourcc), "cpp": list(f.cpp), "hsub": f.hsub, "vsub": f.vsub}
                for f in self.formats
            ],
            "modifiers": list(self.modifiers),
            "quota": {"buffers": self.quota_buffers, "bytes": self.quota_bytes},
            "used": {"buffers": self.used_buffers, "bytes": self.used_bytes},
        }


def token_bytes(token: str | bytes) -> bytes:
    """A share token as the wire carries it, from its text form (hex) or its bytes.

    Raises ValueError for anything that is not a token's length.
    """
    raw = bytes.fromhex(token) if isinstance(token, str) else bytes(token)
    if len(raw) != TOKEN_SIZE:
        raise ValueError(f"a share token is {2 * TOKEN_SIZE} hex digits")
    return raw


def buffer_from(info: BufferInfo, fd: int, backend: Backend) -> Buffer:
    """A Buffer owning ``fd``, described by ``info``."""
    return Buffer(
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


#: What a completed request gives: Hello a ServerInfo, Allocate and OpenShared a
#: list of Buffers, Release a count, Share a token (hex), Revoke None, Query an Offer,
#: List a page (Listed), Stats the counters (Statistics).
Result = ServerInfo | list[Buffer] | int | str | Offer | Listed | Statistics | ServerError | None


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

    def share(self, ident: int, once: bool, uids: Iterable[int]) -> tuple[int, bytes]:
        serial = self._next()
        return serial, protocol.encode(protocol.Share(ident, once, tuple(uids)), serial)

    def open_shared(self, token: str | bytes) -> tuple[int, bytes]:
        serial = self._next()
        return serial, protocol.encode(protocol.OpenShared(token_bytes(token)), serial)

    def revoke(self, token: str | bytes) -> tuple[int, bytes]:
        serial = self._next()
        return serial, protocol.encode(protocol.Revoke(token_bytes(token)), serial)

    def query(self) -> tuple[int, bytes]:
        serial = self._next()
        return serial, protocol.encode(protocol.Query(), serial)

    def list_page(self, what: int, start: int) -> tuple[int, bytes]:
        serial = self._next()
        return serial, protocol.encode(protocol.List(what, start), serial)

    def stats(self) -> tuple[int, bytes]:
        serial = self._next()
        return serial, protocol.encode(protocol.Stats(), serial)

    def open_buffer(self, client: int, ident: int) -> tuple[int, bytes]:
        serial = self._next()
        return serial, protocol.encode(protocol.OpenBuffer(client, ident), serial)

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
        if isinstance(reply, Shared):
            return serial, reply.token.hex()
        if isinstance(reply, Revoked):
            return serial, None
        if isinstance(reply, Listed | Statistics):
            return serial, reply
        if isinstance(reply, Queried):
            limits = Limits(reply.max_width, reply.max_height, reply.max_size, reply.max_count)
            return serial, Offer(
                reply.backend,
                reply.driver,
                reply.driver_version,
                reply.node,
                limits,
                reply.formats,
                reply.modifiers,
                reply.quota_buffers,
                reply.quota_bytes,
                reply.used_buffers,
                reply.used_bytes,
            )
        raise RemoteProtocolError(f"unexpected {type(reply).__name__}", serial=serial)

    def _allocated(
        self, serial: int, reply: Allocated, fds: list[int]
    ) -> tuple[int, Result] | None:
        backend = self.info.backend if self.info else Backend.DRM
        buffers = [
            buffer_from(info, fd, backend) for info, fd in zip(reply.buffers, fds, strict=True)
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
