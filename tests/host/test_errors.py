"""One error root: what primed raises, caught as PrimedError and as the builtin it also is."""

from __future__ import annotations

import os
import socket

import pytest

import primed
from primed import fdpass, formats
from primed.wire.schema import MAX_MESSAGE
from tests.host.conftest import StartDaemon
from tests.support import Daemon


def test_layout_error_is_primed_and_value_error() -> None:
    with pytest.raises(primed.LayoutError) as refused:
        formats.plan(formats.lookup("NV12"), 63, 64, formats.Limits())
    assert isinstance(refused.value, primed.PrimedError)
    assert isinstance(refused.value, ValueError)
    assert formats.LayoutError is primed.LayoutError


@pytest.mark.parametrize("spec", ["ZZZZ", "XRGB9999", formats.fourcc("ZZZZ")])
def test_unknown_format_from_lookup(spec: str | int) -> None:
    with pytest.raises(primed.UnknownFormat, match="unsupported format") as refused:
        formats.lookup(spec)
    assert isinstance(refused.value, primed.PrimedError)
    assert isinstance(refused.value, ValueError)


def test_unknown_format_from_both_clients(client: primed.Client, shared: Daemon) -> None:
    with pytest.raises(primed.UnknownFormat):
        client.allocate(16, 16, "ZZZZ")
    with pytest.raises(primed.UnknownFormat):
        client.start_allocate_many(16, 16, "ZZZZ", 2)
    assert client.allocate(16, 16, "XR24").width == 16  # nothing was sent


async def test_unknown_format_from_the_trio_client(shared: Daemon) -> None:
    async with primed.connect_async(shared.socket) as client:
        with pytest.raises(primed.UnknownFormat):
            await client.allocate_many(16, 16, "ZZZZ", 2)
        await client.release(await client.allocate(16, 16))


def test_truncated_is_exported_and_closes_what_arrived() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        before = len(os.listdir("/proc/self/fd"))
        extra = os.memfd_create("sent", os.MFD_CLOEXEC)
        try:
            fdpass.send(left, b"x" * (MAX_MESSAGE + 1), [extra])
        finally:
            os.close(extra)
        with pytest.raises(primed.Truncated, match="too long") as cut:
            fdpass.recv(right)
        assert len(os.listdir("/proc/self/fd")) == before
    assert primed.Truncated is fdpass.Truncated
    assert isinstance(cut.value, primed.RemoteProtocolError)
    assert isinstance(cut.value, primed.PrimedError)
    assert cut.value.datagram is None  # the bytes were cut too


def test_connection_lost_is_a_connection_error(spawn: StartDaemon) -> None:
    daemon = spawn()
    with primed.connect(daemon.socket) as client:
        daemon.stop()
        with pytest.raises(ConnectionError) as lost:
            client.query()
        assert isinstance(lost.value, primed.ConnectionLost)
        assert isinstance(lost.value, primed.PrimedError)
        with pytest.raises(primed.ConnectionLost, match="closed the connection"):
            client.query()  # and stays lost, without trying the socket again


async def test_trio_connection_lost_is_a_connection_error(spawn: StartDaemon) -> None:
    daemon = spawn()
    async with primed.connect_async(daemon.socket) as client:
        daemon.stop()
        with pytest.raises(ConnectionError) as lost:
            await client.query()
        assert isinstance(lost.value, primed.ConnectionLost)
