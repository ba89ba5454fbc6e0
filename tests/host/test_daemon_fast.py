"""The daemon's fast paths give what the general ones give: the same bytes, counts and errors.

The wire's daemon-side fast functions are checked against decode() and encode() on
sound datagrams and on every field set to edge values, cut short and lengthened; the
core's fast handlers (ALLOCATE, RELEASE of one id, by the raw opcode) against the
general handlers of a twin core that is sent the decoded message instead; and the
transport's one-reading size of a message with fds against SIOCOUTQ itself.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from primed import fdpass, formats
from primed.daemon import transport
from primed.daemon.core import Answer, Core, Delivery
from primed.daemon.lean import LeanSocket
from primed.daemon.policy import Peer, Policy, Quotas
from primed.daemon.sessions import Session
from primed.daemon.transport import Daemon
from primed.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from primed.kernel.backends import MemfdBackend
from primed.wire import protocol
from primed.wire.protocol import (
    Allocate,
    Allocated,
    BufferInfo,
    Error,
    Hello,
    Release,
    Released,
    Welcome,
)

XR24 = formats.fourcc("XR24")
YU12 = formats.fourcc("YU12")


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    before = open_fds()
    yield
    assert open_fds() == before, "the daemon's fast paths or the test leaked fds"


# --- the wire ------------------------------------------------------------------------------


def mutations(data: bytes, layout: struct.Struct) -> Iterator[bytes]:
    """``data`` with each field of ``layout`` set to edge values, cut short, and lengthened."""
    values = layout.unpack(data)
    for at, code in enumerate(layout.format[1:]):
        top = (1 << (8 * struct.calcsize("<" + code))) - 1
        for value in {0, 1, 2, 3, 4, 20, 28, 0x8002, top}:
            if value != values[at]:
                changed = list(values)
                changed[at] = value
                yield layout.pack(*changed)
    for cut in range(len(data)):
        yield data[:cut]
    yield data + b"\0"
    yield data + b"\0" * 8


def decoded_request(data: bytes, nfds: int, kind: type) -> tuple[int, object] | None:
    try:
        serial, message = protocol.decode(data, nfds, "request")
    except RemoteProtocolError:
        return None
    return (serial, message) if isinstance(message, kind) else None


ALLOCATE = protocol.encode(Allocate(64, 48, XR24, 3, 0), 21)
RELEASE_ONE = protocol.encode(Release((5,)), 22)


def test_allocate_request_accepts_exactly_what_decode_accepts() -> None:
    assert protocol.allocate_request(ALLOCATE, 0) == (21, 64, 48, XR24, 3, 0)
    seen = 0
    for data in [*mutations(ALLOCATE, protocol._ALLOCATE), RELEASE_ONE]:
        for nfds in (0, 1):
            found = decoded_request(data, nfds, Allocate)
            expected = None
            if found is not None:
                serial, m = found
                assert isinstance(m, Allocate)
                expected = (serial, m.width, m.height, m.fourcc, m.count, m.flags)
            got = protocol.allocate_request(data, nfds)
            assert got == expected, (data.hex(), nfds)
            seen += got is not None
    assert seen > 20  # serial, sizes, count, flags...: many mutations are still sound


def test_release_one_accepts_exactly_what_decode_accepts_of_one_id() -> None:
    assert protocol.release_one(RELEASE_ONE, 0) == (22, 5)
    two = protocol.encode(Release((5, 6)), 23)
    assert protocol.release_one(two, 0) is None  # sound, but not one id: the general way
    seen = 0
    for data in [*mutations(RELEASE_ONE, protocol._RELEASE_ONE), two, ALLOCATE]:
        for nfds in (0, 1):
            found = decoded_request(data, nfds, Release)
            expected = None
            if found is not None:
                serial, m = found
                assert isinstance(m, Release)
                expected = (serial, m.ids[0]) if len(m.ids) == 1 else None
            got = protocol.release_one(data, nfds)
            assert got == expected, (data.hex(), nfds)
            seen += got is not None
    assert seen > 5


TOP = 2**64 - 1
PLANES = [((0, 256),), ((0, 64), (4096, 32), (6144, 32)), ((0, 64), (4096, 64)), ((1, 2),) * 4]
PARTS = [
    (9, 1, 0, 0, BufferInfo(5, 64, 48, XR24, 0, 16384, ((0, 256),))),
    (10, 3, 2, 1, BufferInfo(6, 64, 48, YU12, 7, 8192, ((0, 64), (4096, 32), (6144, 32)))),
    (2**32 - 1, 253, 0, 2**16 - 1, BufferInfo(TOP, 1, 1, 1, TOP, TOP, ((1, 2),) * 4)),
]  # fmt: skip


@pytest.mark.parametrize("part", PARTS, ids=["one plane", "three planes", "edges"])
def test_one_buffer_datagram_is_encode(part: tuple[int, int, int, int, BufferInfo]) -> None:
    serial, total, index, allocator, b = part
    got = protocol.one_buffer_datagram(
        serial, total, index, allocator,
        b.id, b.width, b.height, b.fourcc, b.modifier, b.size, b.planes,
    )  # fmt: skip
    assert got == protocol.encode(Allocated(total, index, (b,), allocator), serial)


@pytest.mark.parametrize(
    "bad",
    [
        (1, 1, 0, 0, BufferInfo(-1, 1, 1, 1, 0, 1, ((0, 1),))),  # an id below 0
        (1, 1, 0, 2**16, BufferInfo(1, 1, 1, 1, 0, 1, ((0, 1),))),  # the allocator too big
        (1, 1, 0, 0, BufferInfo(1, 1, 1, 1, 0, 2**64, ((0, 1),))),  # the size too big
        (1, 1, 0, 0, BufferInfo(1, 1, 1, 1, 0, 1, ())),  # no plane
        (1, 1, 0, 0, BufferInfo(1, 1, 1, 1, 0, 1, ((0, 1),) * 5)),  # five planes
        (1, 2, 2, 0, BufferInfo(1, 1, 1, 1, 0, 1, ((0, 1),))),  # past the total
    ],
)
def test_one_buffer_datagram_refuses_what_encode_refuses(
    bad: tuple[int, int, int, int, BufferInfo],
) -> None:
    serial, total, index, allocator, b = bad
    with pytest.raises(LocalProtocolError) as encoded:
        protocol.encode(Allocated(total, index, (b,), allocator), serial)
    with pytest.raises(LocalProtocolError) as packed:
        protocol.one_buffer_datagram(
            serial, total, index, allocator,
            b.id, b.width, b.height, b.fourcc, b.modifier, b.size, b.planes,
        )  # fmt: skip
    assert str(packed.value) == str(encoded.value)


def rows_of(infos: tuple[BufferInfo, ...]) -> list[tuple[int, int, int, int, int, int, Any]]:
    return [(b.id, b.width, b.height, b.fourcc, b.modifier, b.size, b.planes) for b in infos]


MANY = tuple(
    BufferInfo(i + 1, 64, 48, YU12 if i % 3 else XR24, i, 8192 + i, PLANES[i % 4])
    for i in range(253)
)
MIXED_PARTS = [
    (7, 1, 0, 0, (PARTS[0][4],)),
    (8, 5, 2, 1, (PARTS[0][4], PARTS[1][4], PARTS[2][4])),
    (9, 253, 0, 3, MANY),
    (10, 600, 253, 0, MANY[:100]),
]


@pytest.mark.parametrize("part", MIXED_PARTS, ids=["one", "three", "253", "a later part"])
def test_allocated_datagram_is_encode(part: tuple[int, int, int, int, Any]) -> None:
    serial, total, index, allocator, infos = part
    got = protocol.allocated_datagram(serial, total, index, allocator, rows_of(infos))
    assert got == protocol.encode(Allocated(total, index, infos, allocator), serial)


@pytest.mark.parametrize(
    "bad",
    [
        (1, 1, 0, 0, ()),  # no buffer
        (1, 300, 0, 0, MANY + MANY[:1]),  # 254 buffers
        (1, 3, 2, 0, MANY[:2]),  # past the total
        (1, 2, 0, 2**16, MANY[:2]),  # the allocator too big
        (1, 2, 0, 0, (MANY[0], BufferInfo(2, 1, 1, 1, 0, 1, ()))),  # no plane
        (1, 2, 0, 0, (MANY[0], BufferInfo(2, 1, 1, 1, 0, 1, ((0, 1),) * 5))),  # five
        (1, 2, 0, 0, (MANY[0], BufferInfo(-2, 1, 1, 1, 0, 1, ((0, 1),)))),  # an id below 0
        (1, 2, 0, 0, (MANY[0], BufferInfo(2, 1, 1, 1, 0, 1, ((0, 2**32),)))),  # a pitch too big
    ],
)
def test_allocated_datagram_refuses_what_encode_refuses(
    bad: tuple[int, int, int, int, Any],
) -> None:
    serial, total, index, allocator, infos = bad
    with pytest.raises(LocalProtocolError) as encoded:
        protocol.encode(Allocated(total, index, infos, allocator), serial)
    with pytest.raises(LocalProtocolError) as packed:
        protocol.allocated_datagram(serial, total, index, allocator, rows_of(infos))
    assert str(packed.value) == str(encoded.value)


@pytest.mark.parametrize("count", [0, 1, 4096, 2**32 - 1])
def test_released_datagram_is_encode(count: int) -> None:
    for serial in (0, 1, 2**32 - 1):
        assert protocol.released_datagram(serial, count) == protocol.encode(Released(count), serial)


@pytest.mark.parametrize("count", [-1, 2**32])
def test_released_datagram_refuses_what_encode_refuses(count: int) -> None:
    with pytest.raises(LocalProtocolError) as encoded:
        protocol.encode(Released(count), 1)
    with pytest.raises(LocalProtocolError) as packed:
        protocol.released_datagram(1, count)
    assert str(packed.value) == str(encoded.value)


# --- the core ------------------------------------------------------------------------------


class Twins:
    """Two cores alike: ``fast`` is sent datagrams (receive) and its deliveries give
    their datagram(); ``plain`` is sent the decoded messages (handle) and its replies
    are encode()d from the objects (export()). Every reply of the two must be the same
    bytes."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.cores = [Core(MemfdBackend(), policy=policy) for _ in range(2)]
        self.sessions: list[Session] = []
        for core in self.cores:
            session = core.connect(Peer(os.getpid(), os.getuid(), os.getgid()))
            self.sessions.append(session)
        self.received: list[int] = []

    def both(self, message: protocol.Request, serial: int) -> list[list[tuple[bytes, int]]]:
        """Each core's datagrams (with how many fds each carried) for ``message``."""
        data = protocol.encode(message, serial)
        fast, plain = self.cores
        outcomes = [
            fast.receive(self.sessions[0], data, 0),
            plain.handle(self.sessions[1], serial, message),
        ]
        return [self.carry(outcomes[0]), self.carry(outcomes[1], packed=False)]

    def carry(self, outcome: object, packed: bool = True) -> list[tuple[bytes, int]]:
        if isinstance(outcome, bytes):
            return [(outcome, 0)]
        if isinstance(outcome, Answer):
            return [(protocol.encode(outcome.reply, outcome.serial), 0)]
        assert isinstance(outcome, Delivery), outcome
        sent = []
        while outcome.pending:
            while not outcome.ready:
                outcome.prepare()
            fds: list[int] = []
            try:
                if packed:
                    data = outcome.datagram(fds)
                else:
                    data = protocol.encode(outcome.export(fds), outcome.serial)
            finally:
                self.received += fds
            sent.append((data, len(fds)))
            outcome.sent()
        return sent

    def same(self, message: protocol.Request, serial: int) -> list[tuple[bytes, int]]:
        fast, plain = self.both(message, serial)
        assert fast == plain, message
        return fast

    def close(self) -> None:
        for core in self.cores:
            for session in list(core.sessions):
                core.disconnect(session)
        fdpass.close_fds(self.received)


@pytest.fixture
def twins() -> Iterator[Twins]:
    made = Twins(Policy(quotas=Quotas(buffers_per_client=6)))
    try:
        yield made
    finally:
        made.close()


def test_the_fast_handlers_answer_as_the_general_ones(twins: Twins) -> None:
    fast = twins.cores[0]
    # Before HELLO: the general way drops the client, fast path or not.
    (refused,) = twins.same(Allocate(64, 64, XR24), 1)
    assert protocol.decode(refused[0], 0, "reply")[1] == Error(
        ErrorCode.BAD_STATE, 0, "HELLO must come first"
    )
    assert isinstance(
        protocol.decode(twins.same(Hello(name="twins"), 2)[0][0], 0, "reply")[1], Welcome
    )
    (one,) = twins.same(Allocate(64, 64, XR24), 3)
    assert one[1] == 1 and protocol.one_buffer(*one) is not None
    parts = twins.same(Allocate(64, 48, YU12, count=3), 4)  # three planes, three buffers
    assert [nfds for _, nfds in parts] == [3]
    for message, serial in [
        (Release((1,)), 5),
        (Release((1,)), 6),  # released already: UNKNOWN_BUFFER, by the general way
        (Release((2, 3)), 7),  # two ids: the general way
        (Release(()), 8),
        (Allocate(64, 64, formats.fourcc("ZZZZ")), 9),
        (Allocate(64, 64, XR24, flags=1), 10),
        (Allocate(64, 64, XR24, count=0), 11),
        (Allocate(0, 64, XR24), 12),
        (Allocate(1 << 20, 64, XR24), 13),
        (Allocate(64, 64, XR24, count=5), 14),  # 1 held + 5: the quota of 6 exactly
        (Allocate(64, 64, XR24, count=4), 15),  # past the quota
        (Release((4,)), 16),
    ]:
        twins.same(message, serial)
    assert fast.stats == twins.cores[1].stats
    assert fast.requests_by_opcode == twins.cores[1].requests_by_opcode
    assert fast.errors_by_code == twins.cores[1].errors_by_code
    assert fast.live_buffers == twins.cores[1].live_buffers == 5
    assert sorted(twins.sessions[0].buffers) == sorted(twins.sessions[1].buffers)


def test_a_batch_is_packed_as_encode_gives_it() -> None:
    twins = Twins()
    try:
        twins.same(Hello(), 1)
        batch = twins.same(Allocate(16, 16, XR24, count=300), 2)  # two parts: 253 and 47
        assert [nfds for _, nfds in batch] == [253, 47]
        (released,) = twins.same(Release(tuple(range(1, 301))), 3)
        assert released == (protocol.encode(Released(300), 3), 0)
        assert twins.cores[0].live_buffers == twins.cores[1].live_buffers == 0
    finally:
        twins.close()


def test_a_fast_release_frees_the_buffer(twins: Twins) -> None:
    core, session = twins.cores[0], twins.sessions[0]
    core.receive(session, protocol.encode(Hello(), 1), 0)
    (part,) = twins.carry(
        core.receive(session, protocol.allocate_datagram(2, 64, 64, XR24, 1, 0), 0)
    )
    got = protocol.one_buffer(*part)
    assert got is not None and core.live_buffers == 1
    ident, size = got[1], got[6]
    assert core.held_bytes == size and session.account.own.bytes == size
    reply = core.receive(session, protocol.release_datagram(3, [ident]), 0)
    assert reply == protocol.encode(Released(1), 3)
    assert (core.live_buffers, core.held_bytes, session.account.own.buffers) == (0, 0, 0)
    assert not session.buffers and not session.keys and not len(session.listed)


# --- the transport -------------------------------------------------------------------------


async def test_the_size_learnt_is_what_siocoutq_says(nursery: trio.Nursery) -> None:
    daemon = Daemon(MemfdBackend())
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    served = LeanSocket(theirs)
    nursery.start_soon(daemon.serve_client, served)
    with ours:

        async def ask_unread(serial: int) -> None:
            await ours.send(protocol.allocate_datagram(serial, 64, 64, XR24, 1, 0))
            await trio.testing.wait_all_tasks_blocked()

        async def read() -> bytes:
            data, fds = await fdpass.recv_async(ours)
            fdpass.close_fds(fds)
            return data

        await ours.send(protocol.encode(Hello(), 1))
        await read()
        await ask_unread(2)
        # Nothing was queued before it: what SIOCOUTQ reads now is its size, learnt.
        first = transport._unread(served)
        assert first > 0 and len(daemon._sizes) == 1
        (((size, nfds), learnt),) = daemon._sizes.items()
        assert (nfds, learnt) == (1, first)
        await ask_unread(3)  # counted with the size learnt, not read from SIOCOUTQ
        assert transport._unread(served) == 2 * first  # the kernel: each adds as much
        (link,) = daemon._links.values()
        assert list(link.queued) == [(1, first), (1, first)]
        assert daemon.fds_in_flight == 2
        assert len(await read()) == size
        await ask_unread(4)  # reads 3 queued: 2 was read, 3 and 4 are in flight
        assert list(link.queued) == [(1, first), (1, first)]
        assert daemon.fds_in_flight == 2
        await read()
        await read()
        await ask_unread(5)
        assert daemon.fds_in_flight == 1
        await read()
