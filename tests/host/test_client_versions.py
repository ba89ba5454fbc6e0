"""The client's sans-I/O core and protocol version 2, with byte strings and real fds: the
allocator list, ALLOCATE_FROM, where each buffer comes from, and a version-1 daemon."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest

from primed import formats
from primed.client.core import ClientConnection
from primed.errors import LocalProtocolError, RemoteProtocolError
from primed.wire import protocol
from primed.wire.protocol import (
    USAGE_CPU,
    USAGE_SCANOUT,
    Allocated,
    AllocateFrom,
    AllocatorInfo,
    BufferInfo,
    DeviceImports,
    Hello,
    Queried,
    Welcome,
)
from primed.wire.schema import Backend, Kind

XR24 = formats.fourcc("XR24")
LISTED = (
    AllocatorInfo(
        "card0", Kind.DUMB, USAGE_SCANOUT | USAGE_CPU, "vgem", (1, 0, 0), "/dev/dri/card0"
    ),
    AllocatorInfo("memfd", Kind.MEMFD, USAGE_CPU, "memfd", (0, 0, 0), ""),
)


@pytest.fixture(autouse=True)
def fds_balance() -> Iterator[None]:
    before = len(os.listdir("/proc/self/fd"))
    yield
    assert len(os.listdir("/proc/self/fd")) == before, "the core leaked fds"


def greeted(version: int, allocators: tuple[AllocatorInfo, ...] = LISTED) -> ClientConnection:
    conn = ClientConnection("test")
    call = conn.hello()
    assert protocol.decode(call.data, 0, "request")[1] == Hello(1, 2, "test")
    welcome = Welcome(version, Backend.DRM, 4096, 4096, 1 << 24, 16, "vgem", (1, 0, 0), "x")
    if version > 1:
        welcome = dataclasses.replace(welcome, allocators=allocators)
    assert conn.receive(protocol.encode(welcome, call.serial), []) == [call]
    assert conn.take(call).allocators == (allocators if version > 1 else ())
    return conn


def one(serial: int, allocator: int) -> tuple[bytes, list[int]]:
    info = BufferInfo(5, 16, 16, XR24, 0, 4096, ((0, 64),))
    reply = Allocated(1, 0, (info,), allocator)
    return protocol.encode(reply, serial), [os.memfd_create("buffer", os.MFD_CLOEXEC)]


def test_a_choice_is_sent_as_allocate_from_and_the_reply_says_where_from() -> None:
    conn = greeted(2)
    call = conn.allocate(16, 16, "XR24", allocator="memfd")
    assert protocol.decode(call.data, 0, "request")[1] == AllocateFrom(16, 16, XR24, 1, 0, "memfd")
    data, fds = one(call.serial, 1)
    conn.receive(data, fds)  # one buffer: the quick path
    with conn.take(call) as buffer:
        assert (buffer.allocator, buffer.backend) == ("memfd", Backend.MEMFD)
    many = conn.allocate_many(16, 16, "XR24", 2, usage=USAGE_CPU, device="/dev/dri/r")
    assert protocol.decode(many.data, 0, "request")[1] == AllocateFrom(
        16, 16, XR24, 2, USAGE_CPU, "", "/dev/dri/r"
    )
    infos = tuple(BufferInfo(i, 16, 16, XR24, 0, 4096, ((0, 64),)) for i in (6, 7))
    fds = [os.memfd_create("buffer", os.MFD_CLOEXEC) for _ in infos]
    conn.receive(protocol.encode(Allocated(2, 0, infos, 1), many.serial), fds)  # the general path
    got = conn.take(many)
    assert [(b.allocator, b.backend) for b in got] == [("memfd", Backend.MEMFD)] * 2
    for buffer in got:
        buffer.close()
    # Plain ALLOCATE is as in version 1; its buffers come from the default allocator here.
    call = conn.allocate(16, 16, "XR24")
    data, fds = one(call.serial, 0)
    conn.receive(data, fds)
    with conn.take(call) as buffer:
        assert (buffer.allocator, buffer.backend) == ("card0", Backend.DRM)
    conn.close()


def test_an_allocator_welcome_did_not_list_breaks_the_connection() -> None:
    conn = greeted(2)
    call = conn.allocate(16, 16, "XR24")
    data, fds = one(call.serial, 2)
    assert conn.receive(data, fds) == [call]
    with pytest.raises(RemoteProtocolError, match="names allocator 2; WELCOME listed 2"):
        conn.take(call)
    conn.close()


def test_a_version_1_daemon_takes_no_choice_and_its_buffers_are_welcomes_kind() -> None:
    conn = greeted(1)
    with pytest.raises(LocalProtocolError, match="this daemon speaks 1"):
        conn.allocate(16, 16, "XR24", usage=USAGE_SCANOUT)
    call = conn.allocate(16, 16, "XR24")
    data, fds = one(call.serial, 0)
    conn.receive(data, fds)
    with conn.take(call) as buffer:
        assert (buffer.allocator, buffer.backend) == ("", Backend.DRM)
    conn.close()


def test_the_matrix_comes_with_query() -> None:
    conn = greeted(2)
    call = conn.query()
    rows = (DeviceImports("/dev/dri/renderD128", "virtio_gpu", (0, 22)),)
    reply = Queried(Backend.DRM, "vgem", (1, 0, 0), "x", 1, 1, 1, 1, (), (0,), 0, 0, 0, 0, rows)
    conn.receive(protocol.encode(reply, call.serial), [])
    offer = conn.take(call)
    assert offer.devices == rows and offer.allocators == LISTED
    assert offer.describe()["imports"] == [
        {
            "node": "/dev/dri/renderD128",
            "driver": "virtio_gpu",
            "imports": {"card0": "ok", "memfd": "EINVAL"},
        }
    ]
    conn.close()
