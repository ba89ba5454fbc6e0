"""The client's fast paths decide exactly what the general paths decide.

Each fast path (fdpass's common receive, the Buffer's backstop) is checked against
the rule it stands in for, with real fds and sockets and no daemon.
"""

from __future__ import annotations

import array
import gc
import os
import socket
from collections.abc import Iterator

import pytest

from primed import fdpass
from primed.client.buffer import Buffer
from primed.formats import Plane
from primed.wire.schema import Backend


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


def memfd_buffer() -> Buffer:
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    return Buffer._adopt(fd, 1, 16, 16, 0, 0, 4096, (Plane(0, 64),), Backend.MEMFD)


# --- the Buffer's backstop ------------------------------------------------------------------


def test_an_unclosed_buffer_closes_its_fd_when_dropped() -> None:
    buffer = memfd_buffer()
    fd = buffer.fd
    del buffer
    assert not fd_open(fd)


def test_an_unclosed_buffer_in_a_cycle_closes_its_fd_when_collected() -> None:
    buffer = memfd_buffer()
    fd = buffer.fd
    cycle: list[object] = [buffer]
    cycle.append(cycle)
    del buffer, cycle
    gc.collect()
    assert not fd_open(fd)


def test_a_closed_or_detached_buffer_leaves_the_fd_alone_when_dropped() -> None:
    closed, detached = memfd_buffer(), memfd_buffer()
    closed.close()
    fd = detached.detach()
    spare = os.dup(fd)  # the backstop must not close the number a second time
    try:
        del closed, detached
        gc.collect()
        assert fd_open(fd)
    finally:
        os.close(fd)
        os.close(spare)


def test_the_fast_constructor_makes_what_the_constructor_makes() -> None:
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    planes = (Plane(0, 64),)
    fast = Buffer._adopt(fd, 7, 16, 8, 0x34325258, 5, 4096, planes, Backend.MEMFD)
    slow = Buffer(
        -1, id=7, width=16, height=8, fourcc=0x34325258, modifier=5, size=4096, planes=planes,
        backend=Backend.MEMFD,
    )  # fmt: skip
    with fast:
        assert fast.describe() == slow.describe()
        assert (fast.fd, fast.backend, fast.closed) == (fd, Backend.MEMFD, False)
    assert fast.closed and not fd_open(fd)


def test_a_buffer_made_with_bad_arguments_is_dropped_quietly() -> None:
    with pytest.raises(TypeError):
        Buffer(3)  # type: ignore[call-arg]
    gc.collect()  # __del__ of the half-made object must not complain (filterwarnings=error)


# --- fdpass's common receive ----------------------------------------------------------------


def send_fds(sock: socket.socket, fds: list[int]) -> None:
    sock.sendmsg([b"datagram"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


@pytest.mark.parametrize("count", [0, 1, 2, 5])
def test_recv_gives_every_fd_in_order(
    pair: tuple[socket.socket, socket.socket], count: int
) -> None:
    a, b = pair
    sent = [os.memfd_create(f"m{i}", os.MFD_CLOEXEC) for i in range(count)]
    try:
        send_fds(a, sent) if sent else fdpass.send(a, b"datagram", [])
        data, got = fdpass.recv(b)
        try:
            assert data == b"datagram" and len(got) == count
            for mine, theirs in zip(sent, got, strict=True):
                assert os.fstat(mine).st_ino == os.fstat(theirs).st_ino
        finally:
            fdpass.close_fds(got)
    finally:
        fdpass.close_fds(sent)


def test_recv_of_a_datagram_cut_short_closes_its_one_fd(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    fd = os.memfd_create("m", os.MFD_CLOEXEC)
    try:
        send_fds(a, [fd])
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(fdpass.Truncated) as cut:
            fdpass.recv(b, 4)  # MSG_TRUNC: the fast path must not take it
        assert cut.value.datagram is None
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(fd)


def test_send_without_fds_sends_one_datagram(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    fdpass.send(a, b"one", [])
    fdpass.send(a, b"", [])
    fdpass.send(a, b"two", [])
    assert [b.recv(16), b.recv(16), b.recv(16)] == [b"one", b"", b"two"]
