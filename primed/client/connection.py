"""The client's sans-I/O core under its former name: see :mod:`primed.client.core`."""

from __future__ import annotations

from primed.client.core import (
    DEFAULT_SOCKET,
    Call,
    ClientConnection,
    Offer,
    Page,
    ServerInfo,
    buffer_from,
    buffer_ids,
    socket_path,
    token_bytes,
)
from primed.errors import ErrorCode

__all__ = [
    "DEFAULT_SOCKET",
    "Call",
    "ClientConnection",
    "ErrorCode",
    "Offer",
    "Page",
    "ServerInfo",
    "buffer_from",
    "buffer_ids",
    "socket_path",
    "token_bytes",
]
