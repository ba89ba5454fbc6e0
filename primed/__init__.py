"""primed: DRM dumb buffers allocated by a daemon and shared as PRIME (dma-buf) fds.

The public API::

    import primed
    with primed.connect() as client:
        buf = client.allocate(1920, 1080, "NV12")
        more = client.allocate_many(64, 64, "XR24", 4)
        with primed.Device("/dev/dri/renderD128") as dev:
            handle = dev.import_buffer(buf)
        with buf.map() as pixels:
            ...
        client.release(buf)

    async with primed.connect_async() as client:
        buf = await client.allocate(1920, 1080, "XR24")
"""

from __future__ import annotations

from primed.client.blocking import Client, Pending, connect
from primed.client.buffer import Buffer, Mapping
from primed.client.core import DEFAULT_SOCKET, Offer, ServerInfo
from primed.client.device import BufferLayout, Device, Framebuffer, Import
from primed.client.direct import recv_buffer, recv_buffer_async, send_buffer, send_buffer_async
from primed.client.trio import AsyncClient, AsyncPending, connect_async
from primed.errors import (
    ConnectionLost,
    ErrorCode,
    KernelError,
    LayoutError,
    LocalProtocolError,
    NoDevice,
    NotImportable,
    PrimedError,
    ProtocolError,
    RemoteProtocolError,
    ServerError,
    Timeout,
    UnknownFormat,
)
from primed.fdpass import Truncated
from primed.formats import FORMATS, MOD_INVALID, MOD_LINEAR, Format, Limits, Plane
from primed.wire.messages import USAGE_CPU, USAGE_SCANOUT, AllocatorInfo, DeviceImports
from primed.wire.schema import Backend, Kind

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SOCKET",
    "FORMATS",
    "MOD_INVALID",
    "MOD_LINEAR",
    "USAGE_CPU",
    "USAGE_SCANOUT",
    "AllocatorInfo",
    "AsyncClient",
    "AsyncPending",
    "Backend",
    "Buffer",
    "BufferLayout",
    "Client",
    "ConnectionLost",
    "Device",
    "DeviceImports",
    "ErrorCode",
    "Format",
    "Framebuffer",
    "Import",
    "KernelError",
    "Kind",
    "LayoutError",
    "Limits",
    "LocalProtocolError",
    "Mapping",
    "NoDevice",
    "NotImportable",
    "Offer",
    "Pending",
    "Plane",
    "PrimedError",
    "ProtocolError",
    "RemoteProtocolError",
    "ServerError",
    "ServerInfo",
    "Timeout",
    "Truncated",
    "UnknownFormat",
    "connect",
    "connect_async",
    "recv_buffer",
    "recv_buffer_async",
    "send_buffer",
    "send_buffer_async",
]
