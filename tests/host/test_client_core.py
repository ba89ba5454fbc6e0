"""The client's sans-I/O core, driven with byte strings (and real fds) alone: no daemon."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

import primed
from primed import fdpass, formats
from primed.client.core import Call, ClientConnection
from primed.errors import (
    ConnectionLost,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    ServerError,
)
from primed.wire import protocol
from primed.wire.protocol import (
    LIST_BUFFERS,
    LIST_CLIENTS,
    Allocated,
    BufferInfo,
    ClientEntry,
    Error,
    Listed,
    Queried,
    Released,
    Welcome,
)
from primed.wire.schema import VERSION, Backend

XR24 = formats.fourcc("XR24")


def held_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fds_balance() -> Iterator[None]:
    """Fail the test if it leaves an fd open."""
    before = held_fds()
    yield
    assert held_fds() == before, "the core leaked fds"


def welcome(version: int = VERSION) -> Welcome:
    return Welcome(version, Backend.MEMFD, 4096, 4096, 1 << 24, 16)


def greeted() -> ClientConnection:
    conn = ClientConnection("test")
    call = conn.hello()
    assert conn.receive(protocol.encode(welcome(), call.serial), []) == [call]
    assert conn.take(call).backend == Backend.MEMFD
    return conn


def info(ident: int) -> BufferInfo:
    return BufferInfo(ident, 16, 16, XR24, 0, 1024, ((0, 64),))


def memfds(n: int) -> list[int]:
    return [os.memfd_create(f"part{i}", os.MFD_CLOEXEC) for i in range(n)]


def allocated(serial: int, total: int, index: int, ids: list[int]) -> tuple[bytes, list[int]]:
    reply = Allocated(total, index, tuple(info(i) for i in ids))
    return protocol.encode(reply, serial), memfds(len(ids))


def requested(data: bytes) -> tuple[int, protocol.Message]:
    return protocol.decode(data, 0, "request")


# --- serials --------------------------------------------------------------------------------


def test_serials_count_from_one() -> None:
    conn = greeted()
    assert [conn.query().serial for _ in range(3)] == [2, 3, 4]
    assert requested(conn.stats().data)[0] == 5


def test_serials_wrap_past_zero_and_skip_those_in_flight() -> None:
    conn = ClientConnection()
    first = conn.query()  # serial 1, still in flight when the counter comes round
    conn._serial = 0xFFFFFFFE  # as after 2**32 - 2 requests
    assert conn.query().serial == 0xFFFFFFFF
    assert conn.query().serial == 2
    assert first.serial == 1 and not first.done


# --- typed results -------------------------------------------------------------------------


def test_hello_gives_server_info_and_query_an_offer() -> None:
    conn = greeted()
    assert conn.info is not None and conn.info.limits.max_count == 16
    call = conn.query()
    reply = Queried(
        Backend.MEMFD, "", (0, 0, 0), "", 1, 2, 3, 4, (), (0,), 10, 20, 1, 2
    )  # fmt: skip
    assert conn.receive(protocol.encode(reply, call.serial), []) == [call]
    offer = conn.take(call)
    assert isinstance(offer, primed.Offer) and isinstance(offer, primed.ServerInfo)
    assert offer.version == VERSION  # the connection's
    assert offer.limits == formats.Limits(1, 2, 4, 3)
    assert (offer.quota_buffers, offer.used_bytes) == (10, 2)
    assert offer.describe()["used"] == {"buffers": 1, "bytes": 2}
    assert offer.describe()["version"] == VERSION


def test_welcome_outside_the_offered_versions_breaks_the_connection() -> None:
    conn = ClientConnection()
    call = conn.hello()
    conn.receive(protocol.encode(welcome(VERSION + 1), call.serial), [])
    with pytest.raises(RemoteProtocolError, match="outside the offered"):
        conn.take(call)
    assert isinstance(conn.broken, RemoteProtocolError)
    with pytest.raises(ConnectionLost):
        conn.query()


def test_list_pages_are_typed_by_kind() -> None:
    conn = greeted()
    call = conn.list_clients()
    entry = ClientEntry(1, 2, 3, 4, 5, 6, 7, "x")
    conn.receive(protocol.encode(Listed(LIST_CLIENTS, 9, (entry,)), call.serial), [])
    page = conn.take(call)
    assert page.entries == (entry,) and page.next == 9
    wrong = conn.list_buffers()
    conn.receive(protocol.encode(Listed(LIST_CLIENTS, 0, ()), wrong.serial), [])
    with pytest.raises(RemoteProtocolError, match="LISTED of kind 1, expected 2"):
        conn.take(wrong)
    assert LIST_BUFFERS == 2


# --- replies that do not fit ----------------------------------------------------------------


def test_a_reply_of_the_wrong_type_fails_everything(fds_balance: None) -> None:
    conn = greeted()
    other = conn.allocate_many(16, 16, "XR24", 3)
    data, fds = allocated(other.serial, 3, 0, [1, 2])
    assert conn.receive(data, fds) == []  # a first part, held
    call = conn.allocate(16, 16, "XR24")
    done = conn.receive(protocol.encode(Released(1), call.serial), [])
    assert set(done) == {call, other}
    with pytest.raises(RemoteProtocolError, match="Released answers request"):
        conn.take(call)
    with pytest.raises(RemoteProtocolError, match="Released answers request"):
        conn.take(other)
    assert conn.pending == 0


def test_an_allocated_for_a_release_closes_its_fds(fds_balance: None) -> None:
    conn = greeted()
    call = conn.release([1])
    conn.receive(*allocated(call.serial, 1, 0, [1]))
    with pytest.raises(RemoteProtocolError, match="expects Released"):
        conn.take(call)


def test_a_reply_for_no_request_breaks_the_connection(fds_balance: None) -> None:
    conn = greeted()
    call = conn.query()
    assert conn.receive(*allocated(call.serial + 1, 1, 0, [1])) == [call]
    with pytest.raises(RemoteProtocolError, match="not in flight"):
        conn.take(call)
    assert conn.receive(*allocated(call.serial, 1, 0, [1])) == []  # ignored, fds closed


def test_a_malformed_datagram_breaks_the_connection(fds_balance: None) -> None:
    conn = greeted()
    call = conn.query()
    assert conn.receive(b"\x00" * 5, memfds(1)) == [call]
    with pytest.raises(RemoteProtocolError, match="shorter than a header"):
        conn.take(call)


def test_the_end_of_the_stream_is_connection_lost() -> None:
    conn = greeted()
    call = conn.query()
    assert conn.receive(b"", []) == [call]
    with pytest.raises(ConnectionLost, match="closed the connection") as lost:
        conn.take(call)
    assert isinstance(lost.value, ConnectionError)


def test_serial_zero_error_fails_everything_with_the_daemons_error() -> None:
    conn = ClientConnection()
    calls: list[Call[Any]] = [conn.hello(), conn.query()]
    refusal = Error(ErrorCode.PERMISSION_DENIED, 0, "not you")
    assert conn.receive(protocol.encode(refusal, 0), []) == calls
    for call in calls:
        with pytest.raises(ServerError) as refused:
            conn.take(call)
        assert refused.value.code == ErrorCode.PERMISSION_DENIED
    with pytest.raises(ConnectionLost, match="not you"):
        conn.stats()


def test_an_error_answers_only_its_request() -> None:
    conn = greeted()
    bad, good = conn.query(), conn.release([])
    conn.receive(protocol.encode(Error(ErrorCode.INVALID_ARGUMENT, 0, "no"), bad.serial), [])
    conn.receive(protocol.encode(Released(0), good.serial), [])
    with pytest.raises(ServerError, match="INVALID_ARGUMENT"):
        conn.take(bad)
    assert conn.take(good) == 0 and conn.broken is None


# --- ALLOCATED in parts ----------------------------------------------------------------------


def test_parts_are_assembled_in_order(fds_balance: None) -> None:
    conn = greeted()
    call = conn.allocate_many(16, 16, "XR24", 3)
    assert conn.receive(*allocated(call.serial, 3, 0, [1, 2])) == []
    assert not call.done
    assert conn.receive(*allocated(call.serial, 3, 2, [3])) == [call]
    buffers = conn.take(call)
    assert [b.id for b in buffers] == [1, 2, 3]
    assert all(b.backend == Backend.MEMFD and not b.closed for b in buffers)
    for b in buffers:
        b.close()


def test_a_part_out_of_order_closes_every_part(fds_balance: None) -> None:
    conn = greeted()
    call = conn.allocate_many(16, 16, "XR24", 3)
    conn.receive(*allocated(call.serial, 3, 0, [1]))
    assert conn.receive(*allocated(call.serial, 3, 2, [3])) == [call]
    with pytest.raises(RemoteProtocolError, match="part at 2 of 3, expected one at 1 of 3"):
        conn.take(call)


def test_a_total_other_than_asked_is_refused(fds_balance: None) -> None:
    conn = greeted()
    call = conn.allocate(16, 16, "XR24")
    conn.receive(*allocated(call.serial, 2, 0, [1, 2]))
    with pytest.raises(RemoteProtocolError, match="expected one at 0 of 1"):
        conn.take(call)


def test_an_error_after_parts_closes_them(fds_balance: None) -> None:
    conn = greeted()
    call = conn.allocate_many(16, 16, "XR24", 3)
    conn.receive(*allocated(call.serial, 3, 0, [1, 2]))
    failed = Error(ErrorCode.KERNEL, 24, "dup")
    assert conn.receive(protocol.encode(failed, call.serial), []) == [call]
    with pytest.raises(ServerError) as refused:
        conn.take(call)
    assert (refused.value.code, refused.value.errno) == (ErrorCode.KERNEL, 24)
    assert conn.broken is None


# --- abandonment and ownership ---------------------------------------------------------------


def test_an_abandoned_allocate_gives_its_buffers_back(fds_balance: None) -> None:
    conn = greeted()
    call = conn.allocate_many(16, 16, "XR24", 2)
    conn.abandon(call)
    assert conn.receive(*allocated(call.serial, 2, 0, [7, 8])) == []
    (release,) = conn.data_to_send()
    serial, message = requested(release)
    assert message == protocol.Release((7, 8))
    assert conn.data_to_send() == []
    # The RELEASE's own answer is nobody's: taken in, reported to no one.
    assert conn.receive(protocol.encode(Released(2), serial), []) == []
    assert conn.pending == 0 and conn.broken is None


def test_abandoning_an_answered_call_gives_back_at_once(fds_balance: None) -> None:
    conn = greeted()
    call = conn.allocate(16, 16, "XR24")
    conn.receive(*allocated(call.serial, 1, 0, [5]))
    conn.abandon(call)
    (release,) = conn.data_to_send()
    assert requested(release)[1] == protocol.Release((5,))


def test_opened_buffers_are_closed_not_released(fds_balance: None) -> None:
    conn = greeted()
    call = conn.open_shared(bytes(16))
    conn.abandon(call)
    conn.receive(*allocated(call.serial, 1, 0, [0]))
    assert conn.data_to_send() == []


def test_close_closes_answers_never_taken(fds_balance: None) -> None:
    conn = greeted()
    answered, waiting = conn.allocate(16, 16, "XR24"), conn.allocate_many(16, 16, "XR24", 2)
    conn.receive(*allocated(answered.serial, 1, 0, [1]))
    conn.receive(*allocated(waiting.serial, 2, 0, [2]))
    conn.close()
    with pytest.raises(ConnectionLost, match="connection was closed"):
        conn.take(waiting)
    with pytest.raises(ConnectionLost, match="before the answer was taken"):
        conn.take(answered)  # its fd went with the connection


def test_taken_buffers_are_the_callers(fds_balance: None) -> None:
    conn = greeted()
    call = conn.allocate(16, 16, "XR24")
    conn.receive(*allocated(call.serial, 1, 0, [1]))
    with conn.take(call) as buffer:
        conn.close()
        assert not buffer.closed


def test_a_withdrawn_call_is_forgotten() -> None:
    conn = greeted()
    call = conn.query()
    conn.withdraw(call)
    assert conn.pending == 0
    with pytest.raises(LocalProtocolError, match="never sent"):
        conn.take(call)


def test_a_result_is_not_there_before_its_answer() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="no answer yet"):
        conn.take(conn.query())


# --- truncated datagrams --------------------------------------------------------------------


def cut(data: bytes) -> fdpass.Truncated:
    """A Truncated as fdpass.recv raises it when only the fds were cut (MSG_CTRUNC)."""
    error = fdpass.Truncated("message truncated: its fds were cut off (MSG_CTRUNC)")
    error.datagram = data
    return error


def test_fds_cut_from_a_reply_fail_its_request_only(fds_balance: None) -> None:
    conn = greeted()
    call, later = conn.allocate_many(16, 16, "XR24", 3), conn.release([])
    data, fds = allocated(call.serial, 3, 0, [1, 2])
    fdpass.close_fds(fds)  # as the kernel's cut and recv() leave them
    assert conn.truncated(cut(data)) == [call]
    with pytest.raises(fdpass.Truncated):
        conn.take(call)
    # Its remaining part is drained, not taken for a stray reply.
    assert conn.receive(*allocated(call.serial, 3, 2, [3])) == []
    assert conn.receive(protocol.encode(Released(0), later.serial), []) == [later]
    assert conn.take(later) == 0 and conn.broken is None


def test_a_datagram_cut_short_breaks_the_connection() -> None:
    conn = greeted()
    call = conn.query()
    assert conn.truncated(fdpass.Truncated("message truncated: too long")) == [call]
    assert isinstance(conn.broken, fdpass.Truncated)
