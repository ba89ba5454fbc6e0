"""Protocol versions 1 and 2 against a memfd daemon process: negotiation, the allocator
list, choosing an allocator, and a version-1 client going on as it always did."""

from __future__ import annotations

import os
import socket

import pytest
import trio

import primed
from primed.errors import ErrorCode, LocalProtocolError, ServerError
from primed.wire import protocol
from primed.wire.protocol import USAGE_CPU, USAGE_SCANOUT, AllocatorInfo, Hello, Welcome
from primed.wire.schema import Backend, Kind
from tests.support import Daemon, run_client

MEMFD = AllocatorInfo("memfd", Kind.MEMFD, USAGE_CPU, "memfd", (0, 0, 0), "")


def test_a_version_1_client_gets_version_1(shared: Daemon) -> None:
    with primed.connect(shared.socket, name="old", max_version=1) as old:
        assert (old.info.version, old.info.backend, old.allocators) == (1, Backend.MEMFD, ())
        buffer = old.allocate(64, 32, "XR24")
        with buffer:
            assert (buffer.backend, buffer.allocator, buffer.id) == (Backend.MEMFD, "", 1)
        # A choice of allocator is version 2's: refused before anything is sent.
        with pytest.raises(LocalProtocolError, match="version 2; this daemon speaks 1"):
            old.allocate(64, 32, "XR24", allocator="memfd")
        offer = old.query()
        assert (offer.version, offer.allocators, offer.devices) == (1, (), ())
        assert old.release(1) == 1


def test_the_daemon_chooses_the_newest_common_version(shared: Daemon) -> None:
    # Raw HELLOs, as another implementation would send them.
    for low, high, chosen in ((1, 1, 1), (1, 2, 2), (2, 9, 2), (1, 9, 2)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(shared.socket)
            sock.send(protocol.encode(Hello(low, high, "raw"), 1))
            _, welcome = protocol.decode(sock.recv(65536), 0, "reply")
            assert isinstance(welcome, Welcome) and welcome.version == chosen
            assert welcome.allocators == (() if chosen == 1 else (MEMFD,))
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(shared.socket)
        sock.send(protocol.encode(Hello(3, 4, "future"), 1))
        _, refused = protocol.decode(sock.recv(65536), 0, "reply")
        assert refused == protocol.Error(
            ErrorCode.UNSUPPORTED_VERSION, 0, "client speaks 3..4, server 1..2"
        )


def test_a_version_2_client_names_or_lets_the_daemon_choose(client: primed.Client) -> None:
    assert (client.info.version, client.allocators) == (2, (MEMFD,))
    named = client.allocate(64, 32, "NV12", allocator="memfd")
    chosen = client.allocate_many(16, 16, "XR24", 3, usage=USAGE_CPU)
    try:
        assert (named.allocator, named.backend) == ("memfd", Backend.MEMFD)
        assert [b.allocator for b in chosen] == ["memfd"] * 3
        with named.map() as pixels:  # a memfd maps as one
            pixels[:4] = b"\x01\x02\x03\x04"
        assert client.query().devices == ()  # the host has no render node
    finally:
        client.release(named, *chosen)


@pytest.mark.parametrize(
    ("choice", "text"),
    [
        ({"allocator": "heap:system"}, "no allocator named 'heap:system' (served: memfd)"),
        ({"usage": USAGE_SCANOUT}, "no allocator serves scanout (served: memfd)"),
        (
            {"device": "/dev/dri/renderD128"},
            "/dev/dri/renderD128 is not in the import matrix (render nodes: none)",
        ),
    ],
    ids=["unknown name", "no scanout", "unknown device"],
)
def test_a_choice_nothing_fits_is_no_allocator(
    client: primed.Client, choice: dict[str, str | int], text: str
) -> None:
    with pytest.raises(ServerError) as refused:
        client.allocate(16, 16, "XR24", **choice)  # type: ignore[arg-type]
    assert (refused.value.code, refused.value.text) == (ErrorCode.NO_ALLOCATOR, text)
    assert client.query().used_buffers == 0  # nothing was allocated; the connection goes on


def test_a_token_passes_from_a_version_2_client_to_a_version_1_process(
    client: primed.Client,
) -> None:
    buffer = client.allocate(32, 8, "XR24", allocator="memfd")
    with buffer, buffer.map() as pixels:
        pixels[: buffer.size] = bytes(range(256)) * (buffer.size // 256)
    token = client.share(buffer)
    try:
        read = run_client(
            "import sys, primed\n"
            "with primed.connect(sys.argv[1], max_version=1) as old:\n"
            "    assert old.info.version == 1\n"
            "    got = old.open_shared(sys.argv[2])\n"
            "    with got, got.map(write=False) as pixels:\n"
            "        print(got.backend.name, repr(got.allocator), bytes(pixels[:4]).hex())\n",
            client._sock.getpeername(),
            token,
        )
    finally:
        client.release(buffer)
    assert read.split() == ["MEMFD", "''", "00010203"]


async def test_the_trio_client_offers_version_2(shared: Daemon) -> None:
    async with primed.connect_async(shared.socket, name="trio") as newer:
        assert newer.allocators == (MEMFD,)
        buffers = await newer.allocate_many(16, 16, "XR24", 2, allocator="memfd")
        assert [b.allocator for b in buffers] == ["memfd", "memfd"]
        assert await newer.release(*buffers) == 2
    async with primed.connect_async(shared.socket, max_version=1) as older:
        assert (older.info.version, older.allocators) == (1, ())
        with pytest.raises(LocalProtocolError):
            await older.allocate(16, 16, "XR24", usage=USAGE_CPU)
        with await older.allocate(16, 16, "XR24") as buffer:
            assert buffer.backend == Backend.MEMFD
        await trio.lowlevel.checkpoint()
    assert os.path.exists(shared.socket)
