"""The client's fast paths decide exactly what the general paths decide.

Each fast path (fdpass's common receive, the Buffer's backstop, the wire's framers
and decoders of the common requests and replies) is checked against the rule or
the general code it stands in for, with real fds and sockets and no daemon.
"""

from __future__ import annotations

import array
import gc
import os
import socket
import struct
import sys
from collections.abc import Iterator

import pytest

from primed import fdpass
from primed.client.buffer import Buffer
from primed.client.core import ClientConnection, buffer_from
from primed.errors import LocalProtocolError, RemoteProtocolError
from primed.formats import Plane
from primed.wire import protocol
from primed.wire.protocol import Allocate, Allocated, BufferInfo, Release, Released, Welcome
from primed.wire.schema import VERSION, Backend


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


# --- the wire's fast paths against encode() and decode() ---------------------------------------

ONE = protocol.encode(
    Allocated(1, 0, (BufferInfo(5, 64, 48, 0x34325258, 7, 16384, ((0, 256),)),)), 9
)
THREE_PLANES = protocol.encode(
    Allocated(
        1, 0, (BufferInfo(6, 64, 48, 0x32315659, 0, 8192, ((0, 64), (4096, 32), (6144, 32))),)
    ),
    10,
)
RELEASED = protocol.encode(Released(3), 11)


def what_decode_says(data: bytes, nfds: int, kind: type = Allocated) -> object:
    """What one_buffer() (``kind`` Allocated) or released_count() (Released) must give
    for ``data``, from decode()."""
    try:
        serial, reply = protocol.decode(data, nfds, "reply")
    except RemoteProtocolError:
        return None
    if not isinstance(reply, kind):
        return None
    if isinstance(reply, Allocated) and (reply.total, reply.index, len(reply.buffers)) == (1, 0, 1):
        b = reply.buffers[0]
        return (
            serial,
            b.id,
            b.width,
            b.height,
            b.fourcc,
            b.modifier,
            b.size,
            b.planes,
            reply.allocator,
        )
    if isinstance(reply, Released):
        return serial, reply.count
    return None


def mutations(data: bytes, layout: struct.Struct) -> Iterator[bytes]:
    """``data`` with each field of ``layout`` set to edge values, cut short, and lengthened."""
    values = layout.unpack(data)
    for at, code in enumerate(layout.format[1:]):
        top = (1 << (8 * struct.calcsize("<" + code))) - 1
        for value in {0, 1, 2, 3, 4, 5, 0x8002, 0x8003, top}:
            if value != values[at]:
                changed = list(values)
                changed[at] = value
                yield layout.pack(*changed)
    for cut in range(len(data)):
        yield data[:cut]
    yield data + b"\0"
    yield data + b"\0" * 8


@pytest.mark.parametrize("good", [ONE, THREE_PLANES], ids=["one plane", "three planes"])
def test_one_buffer_accepts_exactly_what_decode_accepts(good: bytes) -> None:
    layout = protocol._ONE_BUFFER
    assert protocol.one_buffer(good, 1) == what_decode_says(good, 1) is not None
    seen = 0
    for data in mutations(good, layout):
        for nfds in (0, 1, 2):
            expected = what_decode_says(data, nfds)
            got = protocol.one_buffer(data, nfds)
            assert got == expected, (data.hex(), nfds)
            seen += got is not None
    assert seen > 10  # serial, id, sizes...: many mutations are still sound


def test_released_count_accepts_exactly_what_decode_accepts() -> None:
    assert protocol.released_count(RELEASED, 0) == (11, 3)
    for data in [*mutations(RELEASED, protocol._RELEASED), ONE]:
        for nfds in (0, 1):
            expected = what_decode_says(data, nfds, Released)
            assert protocol.released_count(data, nfds) == expected, data.hex()


@pytest.mark.parametrize(
    "fields",
    [(64, 64, 0x34325258, 1, 0), (0, 0, 0, 0, 0), (2**32 - 1, 1, 2, 253, 2**32 - 1)],
)
def test_allocate_datagram_is_encode(fields: tuple[int, int, int, int, int]) -> None:
    for serial in (1, 2**32 - 1):
        assert protocol.allocate_datagram(serial, *fields) == protocol.encode(
            Allocate(*fields), serial
        )


@pytest.mark.parametrize("bad", [(-1, 1, 1, 1, 0), (2**32, 1, 1, 1, 0), (1, 1, 1, 1, 2**32)])
def test_allocate_datagram_refuses_what_encode_refuses(bad: tuple[int, int, int, int, int]) -> None:
    with pytest.raises(LocalProtocolError) as encoded:
        protocol.encode(Allocate(*bad), 1)
    with pytest.raises(LocalProtocolError) as framed:
        protocol.allocate_datagram(1, *bad)
    assert str(framed.value) == str(encoded.value)


@pytest.mark.parametrize("ids", [[1], [2**64 - 1], [], [1, 2, 3], list(range(1, 4097))])
def test_release_datagram_is_encode(ids: list[int]) -> None:
    assert protocol.release_datagram(7, ids) == protocol.encode(Release(tuple(ids)), 7)


@pytest.mark.parametrize("ids", [[-1], [2**64], list(range(1, 4098))])
def test_release_datagram_refuses_what_encode_refuses(ids: list[int]) -> None:
    with pytest.raises(LocalProtocolError) as encoded:
        protocol.encode(Release(tuple(ids)), 1)
    with pytest.raises(LocalProtocolError) as framed:
        protocol.release_datagram(1, ids)
    assert str(framed.value) == str(encoded.value)


# --- the client core's quick answers ---------------------------------------------------------


def greeted() -> ClientConnection:
    conn = ClientConnection("test")
    call = conn.hello()
    welcome = protocol.encode(Welcome(VERSION, Backend.MEMFD, 4096, 4096, 1 << 24, 16), call.serial)
    assert conn.receive(welcome, []) == [call]
    conn.take(call)
    return conn


def test_a_quick_answer_is_the_buffer_the_general_path_makes() -> None:
    conn = greeted()
    call = conn.allocate(64, 48, "YU12")
    reply = Allocated(1, 0, (BufferInfo(6, 64, 48, 0x32315659, 3, 8192, ((0, 64), (4096, 32))),))
    fd = os.memfd_create("quick", os.MFD_CLOEXEC)
    assert conn.receive(protocol.encode(reply, call.serial), [fd]) == [call]
    with conn.take(call) as quick:
        general = buffer_from(reply.buffers[0], -1, Backend.MEMFD)
        assert quick.describe() == general.describe()
        assert (quick.planes, quick.backend, quick.fd) == (general.planes, Backend.MEMFD, fd)
    assert not fd_open(fd)


def test_a_quick_answer_to_an_abandoned_call_is_given_back() -> None:
    conn = greeted()
    call = conn.allocate(16, 16, "XR24")
    conn.abandon(call)
    fd = os.memfd_create("quick", os.MFD_CLOEXEC)
    reply = Allocated(1, 0, (BufferInfo(9, 16, 16, 0x34325258, 0, 4096, ((0, 64),)),))
    assert conn.receive(protocol.encode(reply, call.serial), [fd]) == []
    assert not fd_open(fd)
    (release,) = conn.data_to_send()
    serial, message = protocol.decode(release, 0, "request")
    assert message == Release((9,))
    assert conn.receive(protocol.encode(Released(1), serial), []) == []
    assert conn.pending == 0 and conn.broken is None


def test_answers_the_quick_path_does_not_expect_still_get_the_general_rules() -> None:
    conn = greeted()
    release, many = conn.release([4]), conn.allocate_many(16, 16, "XR24", 2)
    one = Allocated(1, 0, (BufferInfo(9, 16, 16, 0x34325258, 0, 4096, ((0, 64),)),))
    fd = os.memfd_create("quick", os.MFD_CLOEXEC)
    failed = conn.receive(protocol.encode(one, many.serial), [fd])  # a total of 1, not 2
    assert not fd_open(fd)
    assert set(failed) == {release, many} and isinstance(conn.broken, RemoteProtocolError)
    assert "expected one at 0 of 2" in str(conn.broken)
    again = greeted()
    call = again.release([4])
    answer = protocol.encode(Released(1), call.serial)
    assert again.receive(answer, []) == [call] and again.take(call) == 1
    assert again.receive(answer, []) == []  # answered already: not in flight
    assert "not in flight" in str(again.broken)


def test_the_common_round_trip_never_needs_the_general_decoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn = greeted()

    def refuse(*args: object) -> None:
        raise AssertionError("decode() was called on the common path")

    monkeypatch.setattr(protocol, "decode", refuse)
    reply = Allocated(1, 0, (BufferInfo(9, 16, 16, 0x34325258, 0, 4096, ((0, 64),)),))
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    for _ in range(3):
        serial = conn._serial + 1  # the next request's: 1, 2, ... while none is in flight
        allocated = protocol.encode(reply, serial)
        released = protocol.encode(Released(1), serial + 1)
        fd = os.memfd_create("quick", os.MFD_CLOEXEC)
        sys.setprofile(count)
        try:
            allocate = conn.allocate(16, 16, "XR24")
            conn.receive(allocated, [fd])
            buffer = conn.take(allocate)
            release = conn.release([buffer.id])
            conn.receive(released, [])
            count_released = conn.take(release)
            buffer.close()
        finally:
            sys.setprofile(None)
        assert count_released == 1 and not fd_open(fd)
    # 56 calls, Python's and C's, per allocate + release of the core when this was
    # written (115 through the general path); the bound catches a path grown back.
    assert calls / 3 < 80, calls / 3
