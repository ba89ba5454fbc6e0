"""The client's decoder of many-buffer ALLOCATED replies decides exactly what decode() does.

primed.client._allocated.many() stands in for decode() on the replies that carry
buffers; each test checks it against decode() itself (valid replies of 1 to 253
buffers, one to four planes, one layout or several, and mutations of them), or
checks the client core that uses it against the general path, with real fds.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from primed import fdpass, formats
from primed.client import _allocated
from primed.client.core import ClientConnection, buffer_from
from primed.errors import RemoteProtocolError
from primed.formats import Plane
from primed.wire import protocol, schema
from primed.wire.protocol import Allocated, AllocatorInfo, BufferInfo, Released, Welcome
from primed.wire.schema import MAX_FDS, VERSION, Backend, Kind

XR24, NV12, YU12 = formats.fourcc("XR24"), formats.fourcc("NV12"), formats.fourcc("YU12")
FRONT = 28  # header and ALLOCATED's head, in bytes
RECORD = 72  # one BUFFER record


def held_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fds_balance() -> Iterator[None]:
    """Fail the test if it leaves an fd open."""
    before = held_fds()
    yield
    assert held_fds() == before, "an fd leaked"


def what_decode_says(data: bytes, nfds: int) -> _allocated.Many | None:
    """What many() must give for ``data``, from decode(): None unless it is an ALLOCATED."""
    try:
        serial, reply = protocol.decode(data, nfds, "reply")
    except RemoteProtocolError:
        return None
    if not isinstance(reply, Allocated):
        return None
    layouts = tuple(
        (b.width, b.height, b.fourcc, b.modifier, b.size, tuple(Plane(o, p) for o, p in b.planes))
        for b in reply.buffers
    )
    ids = tuple(b.id for b in reply.buffers)
    return serial, reply.total, reply.index, reply.allocator, ids, layouts


def infos(count: int, fourcc: int = XR24, first: int = 1) -> tuple[BufferInfo, ...]:
    planes = {
        XR24: ((0, 256),),
        NV12: ((0, 64), (4096, 64)),
        YU12: ((0, 64), (4096, 32), (5120, 32)),
    }[fourcc]
    return tuple(BufferInfo(first + i, 64, 64, fourcc, 0, 16384, planes) for i in range(count))


def reply(buffers: tuple[BufferInfo, ...], serial: int = 9, **kw: int) -> bytes:
    total, index = kw.get("total", len(buffers)), kw.get("index", 0)
    return protocol.encode(Allocated(total, index, buffers, kw.get("allocator", 0)), serial)


# --- the decoder against decode() -----------------------------------------------------------


def test_the_layout_is_the_wires() -> None:
    """The sizes the mutations below aim at are the declaration's, not retyped by it."""
    assert _allocated._FRONT_SIZE == FRONT and _allocated._RECORD == RECORD
    assert len(reply(infos(3))) == FRONT + 3 * RECORD


@pytest.mark.parametrize("count", [1, 2, 3, 17, 128, 252, MAX_FDS])
@pytest.mark.parametrize("fourcc", [XR24, NV12, YU12], ids=["XR24", "NV12", "YU12"])
def test_valid_replies_give_what_decode_gives(count: int, fourcc: int) -> None:
    data = reply(infos(count, fourcc))
    got = _allocated.many(data, count)
    assert got is not None and got == what_decode_says(data, count)
    assert got[4] == tuple(range(1, count + 1))
    for nfds in (0, count - 1, count + 1):
        assert _allocated.many(data, nfds) is None  # as decode(): the fds must match


def test_parts_and_allocators_give_what_decode_gives() -> None:
    for total, index, count, allocator in [(300, 0, 253, 0), (300, 253, 47, 2), (5, 4, 1, 65535)]:
        data = reply(infos(count), total=total, index=index, allocator=allocator)
        got = _allocated.many(data, count)
        assert got is not None and got[:4] == (9, total, index, allocator)
        assert got == what_decode_says(data, count)


def test_mixed_layouts_give_what_decode_gives() -> None:
    """Buffers that differ in more than their id: each gets its own layout."""
    four = ((0, 64), (4096, 32), (5120, 32), (6144, 16))
    mixed = (
        BufferInfo(1, 64, 64, XR24, 0, 16384, ((0, 256),)),
        BufferInfo(2, 64, 64, NV12, 7, 16384, ((0, 64), (4096, 64))),
        BufferInfo(3, 64, 64, XR24, 0, 16384, ((0, 256),)),
        BufferInfo(2**64 - 1, 2**32 - 1, 1, YU12, 2**64 - 1, 2**64 - 1, four),
        BufferInfo(0, 64, 64, XR24, 0, 16384, ((0, 256),)),
    )
    data = reply(mixed)
    got = _allocated.many(data, 5)
    assert got is not None and got == what_decode_says(data, 5)
    assert got[5][0] is got[5][2]  # one decoded layout for the records that share it


def field_mutations(data: bytes, count: int) -> Iterator[bytes]:
    """``data`` with each head field, and each field of its first, a middle and its last
    record, set to edge values; cut at each record's edges; lengthened."""
    head = struct.Struct(_allocated._FRONT.format)
    record = struct.Struct(schema.fixed(schema.BUFFER).packer.format)
    targets = [(0, head)] + [(FRONT + i * RECORD, record) for i in {0, count // 2, count - 1}]
    for offset, layout in targets:
        values = layout.unpack_from(data, offset)
        for at, code in enumerate(layout.format[1:]):
            top = (1 << (8 * struct.calcsize("<" + code))) - 1
            for value in {0, 1, 2, 3, 4, 5, count - 1, count + 1, 0x8002, 0x8003, top}:
                if value != values[at] and 0 <= value <= top:
                    changed = list(values)
                    changed[at] = value
                    yield data[:offset] + layout.pack(*changed) + data[offset + layout.size :]
    for cut in {0, 11, 12, FRONT - 1, FRONT, FRONT + RECORD - 1, len(data) - 1}:
        yield data[:cut]
    yield data + b"\0"
    yield data + bytes(RECORD)


@pytest.mark.parametrize("count", [1, 2, 253])
@pytest.mark.parametrize("fourcc", [XR24, YU12], ids=["XR24", "YU12"])
def test_field_mutations_are_refused_or_taken_as_decode_does(count: int, fourcc: int) -> None:
    good = reply(infos(count, fourcc), total=count + 2, index=1)
    taken = refused = 0
    for data in field_mutations(good, count):
        for nfds in {count - 1, count, count + 1}:
            expected = what_decode_says(data, nfds)
            assert _allocated.many(data, nfds) == expected, (data[:FRONT].hex(), nfds)
            taken += expected is not None
            refused += expected is None
    assert taken > 20 and refused > 50  # both sides of the rule were exercised


plane = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
buffer_info = st.builds(
    BufferInfo,
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.sampled_from([XR24, NV12, YU12, 0]),
    st.sampled_from([0, 1, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
    st.lists(plane, min_size=1, max_size=4).map(tuple),
)


@st.composite
def replies(draw: st.DrawFn) -> tuple[bytes, int]:
    """A sound ALLOCATED: buffers of one drawn layout, or several, in a drawn part."""
    count = draw(st.integers(1, 40) | st.just(MAX_FDS))
    if draw(st.booleans()):
        one = draw(buffer_info)
        ids = draw(st.lists(st.integers(0, 2**64 - 1), min_size=count, max_size=count))
        buffers = tuple(BufferInfo(i, *(getattr(one, f) for f in FIELDS)) for i in ids)
    else:
        buffers = tuple(draw(st.lists(buffer_info, min_size=count, max_size=count)))
    index = draw(st.integers(0, 2**16))
    total = draw(st.integers(index + count, 2**32 - 1))
    allocator = draw(st.integers(0, 2**16 - 1))
    serial = draw(st.integers(0, 2**32 - 1))
    return reply(buffers, serial, total=total, index=index, allocator=allocator), count


FIELDS = ("width", "height", "fourcc", "modifier", "size", "planes")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies())
def test_any_sound_reply_gives_what_decode_gives(drawn: tuple[bytes, int]) -> None:
    data, count = drawn
    got = _allocated.many(data, count)
    assert got is not None and got == what_decode_says(data, count)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies(), st.data())
def test_any_mutation_is_refused_or_taken_as_decode_does(
    drawn: tuple[bytes, int], data: st.DataObject
) -> None:
    good, count = drawn
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([None, 0, 1, RECORD]))
    mutated = bytes(raw) if cut is None else bytes(raw[: len(raw) - cut])
    nfds = count + data.draw(st.sampled_from([0, 0, 0, -1, 1]))
    assert _allocated.many(mutated, nfds) == what_decode_says(mutated, nfds)


def test_other_replies_are_left_to_decode() -> None:
    for message in (Released(3), Welcome(VERSION, Backend.MEMFD, 1, 1, 1, 1)):
        assert _allocated.many(protocol.encode(message, 4), 0) is None
    assert _allocated.many(b"", 0) is None


# --- the client core on many buffers ---------------------------------------------------------


def greeted() -> ClientConnection:
    conn = ClientConnection("test")
    call = conn.hello()
    allocators = (
        AllocatorInfo("memfd", Kind.MEMFD, 2, "", (0, 0, 0), ""),
        AllocatorInfo("heap:system", Kind.HEAP, 2, "", (0, 0, 0), "/dev/dma_heap/system"),
    )
    welcome = Welcome(VERSION, Backend.MEMFD, 4096, 4096, 1 << 24, 16, allocators=allocators)
    assert conn.receive(protocol.encode(welcome, call.serial), []) == [call]
    conn.take(call)
    return conn


def memfds(n: int) -> list[int]:
    return [os.memfd_create(f"many{i}", os.MFD_CLOEXEC) for i in range(n)]


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def no_general_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, decode() fails the test: what follows must take the fast path."""

    def refuse(*args: object) -> None:
        raise AssertionError("decode() was called for a many-buffer ALLOCATED")

    monkeypatch.setattr(protocol, "decode", refuse)


def test_many_buffers_are_what_the_general_path_makes(
    fds_balance: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = greeted()
    no_general_decoder(monkeypatch)
    call = conn.allocate_many(64, 64, "YU12", MAX_FDS)
    sent = infos(MAX_FDS, YU12)
    fds = memfds(MAX_FDS)
    assert conn.receive(reply(sent, call.serial, allocator=1), fds) == [call]
    buffers = conn.take(call)
    assert [b.fd for b in buffers] == fds
    for buffer, info in zip(buffers, sent, strict=True):
        general = buffer_from(info, -1, Backend.DRM, "heap:system")
        assert buffer.describe() == general.describe()
        assert (buffer.planes, buffer.backend, buffer.allocator) == (
            general.planes,
            Backend.DRM,
            "heap:system",
        )
    for buffer in buffers:
        buffer.close()
    assert not any(fd_open(fd) for fd in fds)


def test_parts_of_many_are_assembled_in_order(
    fds_balance: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = greeted()
    no_general_decoder(monkeypatch)
    call = conn.allocate_many(64, 64, "XR24", 300)
    first, second = memfds(253), memfds(47)
    assert conn.receive(reply(infos(253), call.serial, total=300), first) == []
    assert not call.done
    data = reply(infos(47, first=254), call.serial, total=300, index=253)
    assert conn.receive(data, second) == [call]
    buffers = conn.take(call)
    assert [b.id for b in buffers] == list(range(1, 301))
    assert [b.fd for b in buffers] == first + second
    assert all(b.backend == Backend.MEMFD and b.allocator == "memfd" for b in buffers)
    for b in buffers:
        b.close()
    assert conn.pending == 0 and conn.broken is None


def test_an_abandoned_many_is_given_back(
    fds_balance: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = greeted()
    no_general_decoder(monkeypatch)
    call = conn.allocate_many(64, 64, "XR24", 5)
    conn.abandon(call)
    fds = memfds(5)
    assert conn.receive(reply(infos(5), call.serial), fds) == []
    assert not any(fd_open(fd) for fd in fds)
    (release,) = conn.data_to_send()
    assert release == protocol.release_datagram(call.serial + 1, [1, 2, 3, 4, 5])


@pytest.mark.parametrize(
    ("total", "index", "allocator", "why"),
    [
        (4, 0, 0, "expected one at 0 of 5"),
        (5, 1, 0, "part at 1 of 5, expected one at 0 of 5"),
        (5, 0, 2, "names allocator 2; WELCOME listed 2"),
    ],
)
def test_a_sound_reply_the_call_does_not_expect_gets_the_general_rules(
    fds_balance: None, total: int, index: int, allocator: int, why: str
) -> None:
    conn = greeted()
    call = conn.allocate_many(64, 64, "XR24", 5)
    fds = memfds(4)
    data = reply(infos(4), call.serial, total=total, index=index, allocator=allocator)
    failed = conn.receive(data, fds)
    assert failed == [call] and isinstance(conn.broken, RemoteProtocolError)
    assert why in str(conn.broken)
    assert not any(fd_open(fd) for fd in fds)


def test_an_unsound_reply_breaks_the_connection_and_closes_its_fds(fds_balance: None) -> None:
    conn = greeted()
    call = conn.allocate_many(64, 64, "XR24", 3)
    data = bytearray(reply(infos(3), call.serial))
    nplanes = FRONT + RECORD + 20  # the second record's plane count
    data[nplanes : nplanes + 4] = (5).to_bytes(4, "little")
    fds = memfds(3)
    assert _allocated.many(bytes(data), 3) is None
    assert conn.receive(bytes(data), fds) == [call]
    assert isinstance(conn.broken, RemoteProtocolError) and "slots" in str(conn.broken)
    assert not any(fd_open(fd) for fd in fds)


def cut(data: bytes) -> fdpass.Truncated:
    """A Truncated as fdpass.recv raises it when only the fds were cut (MSG_CTRUNC)."""
    error = fdpass.Truncated("message truncated: its fds were cut off (MSG_CTRUNC)")
    error.datagram = data
    return error


def test_fds_cut_from_the_first_part_fail_only_that_request(fds_balance: None) -> None:
    conn = greeted()
    call, later = conn.allocate_many(64, 64, "XR24", 300), conn.allocate_many(64, 64, "XR24", 2)
    assert conn.truncated(cut(reply(infos(253), call.serial, total=300))) == [call]
    second = memfds(47)
    data = reply(infos(47, first=254), call.serial, total=300, index=253)
    assert conn.receive(data, second) == []  # drained: closed, not taken for a stray reply
    assert not any(fd_open(fd) for fd in second)
    with pytest.raises(fdpass.Truncated):
        conn.take(call)
    fds = memfds(2)
    assert conn.receive(reply(infos(2, first=301), later.serial), fds) == [later]
    for buffer in conn.take(later):
        buffer.close()
    assert conn.broken is None and conn.pending == 0


def test_fds_cut_from_a_later_part_close_the_parts_before(fds_balance: None) -> None:
    conn = greeted()
    call = conn.allocate_many(64, 64, "XR24", 300)
    first = memfds(253)
    assert conn.receive(reply(infos(253), call.serial, total=300), first) == []
    data = reply(infos(47, first=254), call.serial, total=300, index=253)
    assert conn.truncated(cut(data)) == [call]
    assert not any(fd_open(fd) for fd in first)
    with pytest.raises(fdpass.Truncated):
        conn.take(call)
    assert conn.broken is None and conn.pending == 0
