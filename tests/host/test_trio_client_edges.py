"""The trio client's edge paths, against a scripted daemon: one that answers only
what the test says, when the test says, so each edge happens for certain."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

import primed
from primed import fdpass
from primed.wire import protocol
from primed.wire.protocol import Allocated, BufferInfo, Released, Welcome
from primed.wire.schema import VERSION, Backend

XR24 = 0x34325258


class Scripted:
    """The daemon's end of one accepted connection, driven by the test."""

    def __init__(self, sock: trio.socket.SocketType):
        self.sock = sock

    async def read(self) -> tuple[int, protocol.Message]:
        """The next request (serial, message); fds sent with it are closed."""
        with trio.fail_after(5):
            data, fds = await fdpass.recv_async(self.sock)
        fdpass.close_fds(fds)
        return protocol.decode(data, len(fds), "request")

    async def answer(
        self, serial: int, reply: protocol.Reply, fds: list[int] | None = None
    ) -> None:
        with trio.fail_after(5):
            await self.sock.sendmsg([protocol.encode(reply, serial)], fdpass.rights(fds or []))


def _info(ident: int) -> BufferInfo:
    return BufferInfo(ident, 16, 16, XR24, 0, 4096, ((0, 64),))


@asynccontextmanager
async def scripted(tmp_path: Path) -> AsyncIterator[tuple[primed.AsyncClient, Scripted]]:
    """A trio client connected to a scripted daemon that has welcomed it."""
    path = str(tmp_path / "scripted.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with listener:
        await listener.bind(path)
        listener.listen(1)
        async with trio.open_nursery() as nursery:
            accepted: list[Scripted] = []

            async def greet() -> None:
                sock, _ = await listener.accept()
                daemon = Scripted(sock)
                accepted.append(daemon)
                serial, hello = await daemon.read()
                assert isinstance(hello, protocol.Hello)
                welcome = Welcome(VERSION, Backend.MEMFD, 4096, 4096, 1 << 24, 16)
                await daemon.answer(serial, welcome)

            nursery.start_soon(greet)
            async with primed.connect_async(path) as client:
                with accepted[0].sock:
                    yield client, accepted[0]


def _fill(client: primed.AsyncClient) -> int:
    """Fill the client's socket until a send would block (the daemon reads none of
    it); returns how many datagrams that took."""
    raw = socket.socket(fileno=os.dup(client._sock.fileno()))
    with raw:
        raw.setblocking(False)
        sent = 0
        try:
            while True:
                raw.send(protocol.encode(protocol.Query(), 0xFFFF0000 + sent))
                sent += 1
        except BlockingIOError:
            return sent


async def test_waiter_gets_connection_lost_when_the_block_exits(tmp_path: Path) -> None:
    got: list[BaseException] = []
    finished = trio.Event()

    async def waiter(client: primed.AsyncClient) -> None:
        try:
            await client.query()  # never answered
        except BaseException as e:
            got.append(e)
        finally:
            finished.set()

    async with trio.open_nursery() as outer:
        async with scripted(tmp_path) as (client, daemon):
            outer.start_soon(waiter, client)
            _, query = await daemon.read()
            assert isinstance(query, protocol.Query)
        with trio.fail_after(5):
            await finished.wait()
    assert len(got) == 1 and isinstance(got[0], primed.ConnectionLost), got


async def test_cancelled_open_shared_sends_no_release_of_id_0(tmp_path: Path) -> None:
    async with scripted(tmp_path) as (client, daemon):
        scope = trio.CancelScope()

        async def opener() -> None:
            with scope:
                await client.open_shared("00" * 16)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(opener)
            serial, request = await daemon.read()
            assert isinstance(request, protocol.OpenShared)
            scope.cancel()  # in flight: sent, not answered
        assert scope.cancelled_caught
        fd = os.memfd_create("opened", os.MFD_CLOEXEC)
        try:
            await daemon.answer(serial, Allocated(1, 0, (_info(0),)), [fd])
        finally:
            os.close(fd)
        before = len(os.listdir("/proc/self/fd"))
        await client.start_release(7)  # the next datagram the daemon gets: no RELEASE of 0
        _, after = await daemon.read()
        assert after == protocol.Release((7,)), after
        await trio.testing.wait_all_tasks_blocked()
        assert len(os.listdir("/proc/self/fd")) <= before  # the opened fd was closed


async def test_request_cancelled_before_it_was_sent_is_forgotten(tmp_path: Path) -> None:
    async with scripted(tmp_path) as (client, _):
        _fill(client)
        pending = client._core.pending
        scope = trio.CancelScope()

        async def allocator() -> None:
            with scope:
                await client.allocate(16, 16)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(allocator)
            await trio.testing.wait_all_tasks_blocked()  # on the full socket: never sent
            scope.cancel()
        assert scope.cancelled_caught
        assert client._core.pending == pending
        assert client._parked == {}
        assert client._core.data_to_send() == []


async def test_give_back_does_not_stall_the_reader_on_a_full_socket(tmp_path: Path) -> None:
    async with scripted(tmp_path) as (client, daemon):
        abandoned = await client.start_allocate(16, 16)
        with trio.move_on_after(0) as scope:
            await abandoned.wait()
        assert scope.cancelled_caught
        waited = await client.start_release(9)
        serial_a, _ = await daemon.read()
        serial_w, _ = await daemon.read()
        _fill(client)  # the daemon reads no more: the RELEASE it would get can't go out
        fd = os.memfd_create("given back", os.MFD_CLOEXEC)
        try:
            await daemon.answer(serial_a, Allocated(1, 0, (_info(1),)), [fd])
        finally:
            os.close(fd)
        await daemon.answer(serial_w, Released(1))
        # Only the reader can read this answer: it must not be stuck sending.
        with trio.fail_after(5):
            assert await waited.wait() == 1


class _Waiters:
    """Two tasks, each waiting on a QUERY: ``first`` waits first and so reads the
    socket, ``second`` sleeps. ``got`` holds their outcomes as they end, ``ended``
    is set as each ends, ``scopes`` cancels them, ``serials`` are their requests'."""

    def __init__(self) -> None:
        self.got: dict[str, object] = {}
        self.ended = {"first": trio.Event(), "second": trio.Event()}
        self.scopes = {"first": trio.CancelScope(), "second": trio.CancelScope()}
        self.serials: dict[str, int] = {}

    async def ended_all(self) -> None:
        with trio.fail_after(5):
            for ended in self.ended.values():
                await ended.wait()


async def _reader_and_sleeper(
    client: primed.AsyncClient, daemon: Scripted, nursery: trio.Nursery
) -> _Waiters:
    waiters = _Waiters()

    async def ask(who: str) -> None:
        try:
            with waiters.scopes[who]:
                try:
                    waiters.got[who] = await client.query()
                except primed.PrimedError as e:
                    waiters.got[who] = e
                return
            waiters.got[who] = "cancelled"
        finally:
            waiters.ended[who].set()

    for who in ("first", "second"):
        nursery.start_soon(ask, who)
        waiters.serials[who], _ = await daemon.read()
        await trio.testing.wait_all_tasks_blocked()
    assert client._reading and list(client._parked) == [waiters.serials["second"]]
    return waiters


def _queried() -> protocol.Queried:
    return protocol.Queried(
        Backend.MEMFD, "", (0, 0, 0), "", 64, 64, 4, 1 << 20, (), (), 0, 0, 0, 0
    )


async def test_a_cancelled_reader_hands_the_reading_to_a_sleeping_waiter(tmp_path: Path) -> None:
    async with scripted(tmp_path) as (client, daemon), trio.open_nursery() as nursery:
        waiters = await _reader_and_sleeper(client, daemon, nursery)
        waiters.scopes["first"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert waiters.got == {"first": "cancelled"}
        assert client._reading and client._parked == {}  # the sleeper reads now
        await daemon.answer(waiters.serials["second"], _queried())
        await waiters.ended_all()
        assert isinstance(waiters.got["second"], primed.Offer)
        assert not client._reading and client._parked == {}


@pytest.mark.parametrize("order", [("first", "second"), ("second", "first")])
async def test_answers_in_any_order_reach_the_reader_and_the_sleeper(
    tmp_path: Path, order: tuple[str, str]
) -> None:
    async with scripted(tmp_path) as (client, daemon), trio.open_nursery() as nursery:
        waiters = await _reader_and_sleeper(client, daemon, nursery)
        for who in order:
            await daemon.answer(waiters.serials[who], _queried())
            with trio.fail_after(5):
                await waiters.ended[who].wait()
        assert all(isinstance(waiters.got[who], primed.Offer) for who in order)
        assert not client._reading and client._parked == {}


async def test_every_waiter_gets_connection_lost_when_the_daemon_hangs_up(tmp_path: Path) -> None:
    async with scripted(tmp_path) as (client, daemon), trio.open_nursery() as nursery:
        waiters = await _reader_and_sleeper(client, daemon, nursery)
        daemon.sock.close()
        await waiters.ended_all()
        assert all(isinstance(e, primed.ConnectionLost) for e in waiters.got.values())


async def test_answers_to_started_requests_are_taken_in_before_anyone_waits(
    tmp_path: Path,
) -> None:
    async with scripted(tmp_path) as (client, daemon):
        first = await client.start_allocate(16, 16)
        serial, _ = await daemon.read()
        fd = os.memfd_create("early", os.MFD_CLOEXEC)
        try:
            await daemon.answer(serial, Allocated(1, 0, (_info(1),)), [fd])
        finally:
            os.close(fd)
        second = await client.start_release(1)  # takes in the first's answer, fd and all
        assert client._core.pending == 1
        serial, _ = await daemon.read()
        await daemon.answer(serial, Released(1))
        with trio.fail_after(5):
            buffer = await first.wait()
            assert await second.wait() == 1
        buffer.close()


class _Steps(trio.abc.Instrument):
    """Counts the steps (resumptions) of every task but those in ``apart``."""

    def __init__(self, apart: set[trio.lowlevel.Task]):
        self.apart = apart
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += task not in self.apart


async def test_one_request_at_a_time_resumes_its_task_once(tmp_path: Path) -> None:
    async with scripted(tmp_path) as (client, daemon), trio.open_nursery() as nursery:
        daemon_side: set[trio.lowlevel.Task] = set()

        async def serve() -> None:
            daemon_side.add(trio.lowlevel.current_task())
            while True:
                serial, _ = await daemon.read()
                await daemon.answer(serial, Released(1))

        nursery.start_soon(serve)
        assert await client.release(1) == 1  # the reader's first wait is behind us
        steps = _Steps(daemon_side)
        trio.lowlevel.add_instrument(steps)
        try:
            for _ in range(20):
                assert await client.release(1) == 1
        finally:
            trio.lowlevel.remove_instrument(steps)
        # The client's side runs once per request, when the answer is there to read:
        # no trip for the send, none through a reader task, none after a receive.
        assert steps.steps == 20, steps.steps
        nursery.cancel_scope.cancel()


async def _answer_releases(daemon: Scripted, count: int) -> None:
    for _ in range(count):
        serial, request = await daemon.read()
        assert isinstance(request, protocol.Release), request
        await daemon.answer(serial, Released(len(request.ids)))


async def test_fresh_requests_wait_first_once_answers_keep_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from primed.client import trio as trio_client

    empty = 0
    receive = trio_client._recv

    def counting(sock: socket.socket) -> tuple[bytes, list[int]]:
        nonlocal empty
        try:
            return receive(sock)
        except BlockingIOError:
            empty += 1
            raise

    monkeypatch.setattr(trio_client, "_recv", counting)
    async with scripted(tmp_path) as (client, daemon):
        # The scripted daemon runs only when the client yields: no answer is ever
        # there right after its request went out, the HELLO's neither.
        assert client._misses == 1
        empty = 0
        # MISSES - 1 more misses; then twice WAIT_FIRST requests that wait first and
        # one that tries at once (and misses).
        rounds = trio_client.MISSES - 1 + 2 * (trio_client.WAIT_FIRST + 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_answer_releases, daemon, rounds)
            for ident in range(1, rounds + 1):
                assert await client.release(ident) == 1
    assert empty == trio_client.MISSES + 1, (empty, rounds)


async def test_a_request_cancelled_while_it_waits_first_is_given_back(tmp_path: Path) -> None:
    from primed.client import trio as trio_client

    async with scripted(tmp_path) as (client, daemon):
        async with trio.open_nursery() as nursery:
            # The HELLO missed (see above), and so do MISSES - 1 requests more.
            nursery.start_soon(_answer_releases, daemon, trio_client.MISSES - 1)
            for ident in range(1, trio_client.MISSES):
                await client.release(ident)
        assert client._wait_first == trio_client.WAIT_FIRST  # the next request waits first
        scope = trio.CancelScope()

        async def allocator() -> None:
            with scope:
                await client.allocate(16, 16)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(allocator)
            serial, request = await daemon.read()
            assert isinstance(request, protocol.Allocate)
            scope.cancel()  # sent, waiting for readiness, not answered
        assert scope.cancelled_caught
        fd = os.memfd_create("given back", os.MFD_CLOEXEC)
        try:
            await daemon.answer(serial, Allocated(1, 0, (_info(5),)), [fd])
        finally:
            os.close(fd)
        before = len(os.listdir("/proc/self/fd"))
        await client.start_release(8)  # sent, then the answer taken in: given back
        _, sent = await daemon.read()
        assert sent == protocol.Release((8,)), sent
        _, given_back = await daemon.read()
        assert given_back == protocol.Release((5,)), given_back
        await trio.testing.wait_all_tasks_blocked()
        assert len(os.listdir("/proc/self/fd")) <= before  # the received fd was closed
