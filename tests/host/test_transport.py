"""The daemon's transport in-process, over ``socketpair()``: bytes and fds, flow control, time.

Each test serves one end of a real SOCK_SEQPACKET socketpair with
:meth:`Daemon.serve_client` on the real MemfdBackend, and speaks the wire format
by hand on the other end. Two faults can't be had for real here and are
injected, said so where used: ETOOMANYREFS (root, which runs these tests, is
exempt from the in-flight fd limit) and EMFILE on accept. Every test checks
that this process holds the same fds at its end as at its start.
"""

from __future__ import annotations

import errno
import gc
import itertools
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from primed import fdpass, formats
from primed.daemon import transport
from primed.daemon.lean import LeanSocket
from primed.daemon.policy import Bounds, Policy, Quotas
from primed.daemon.process import bind, run
from primed.daemon.transport import QUEUED_BYTES, Daemon
from primed.errors import ErrorCode, PrimedError
from primed.formats import Format, Limits
from primed.kernel.allocation import Allocation, Owner
from primed.kernel.backends import MemfdBackend
from primed.wire import protocol
from primed.wire.protocol import Allocate, Allocated, Error, Hello, Query, Released, Welcome
from primed.wire.schema import MAX_FDS, MAX_MESSAGE
from tests.support import short_dir

XR24 = formats.fourcc("XR24")


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    # An earlier test's garbage, collected while this test runs, would close an fd that
    # was open before it: collect it first, so that the count is this test's alone.
    gc.collect()
    before = open_fds()
    yield
    assert open_fds() == before, "the transport or the test leaked fds"


class Client:
    """The client end of a socketpair whose other end a Daemon serves."""

    def __init__(self, sock: trio.socket.SocketType, served: LeanSocket):
        self.sock, self.served = sock, served
        self.kept: list[int] = []

    async def send(self, message: protocol.Request, serial: int) -> None:
        await self.sock.sendmsg([protocol.encode(message, serial)])

    async def receive(self) -> tuple[int, protocol.Message, list[int]]:
        data, fds = await fdpass.recv_async(self.sock)
        assert data or fds, "the daemon closed the connection"
        self.kept += fds
        serial, message = protocol.decode(data, len(fds), "reply")
        return serial, message, fds

    async def ask(self, message: protocol.Request, serial: int = 1) -> protocol.Message:
        await self.send(message, serial)
        got, reply, _ = await self.receive()
        assert got == serial
        return reply

    async def at_eof(self) -> bool:
        data, fds = await fdpass.recv_async(self.sock)
        fdpass.close_fds(fds)
        return not data and not fds

    def unread(self) -> int:
        """What the daemon sent that this end has not read (the daemon end's SIOCOUTQ)."""
        return transport._unread(self.served)


@pytest.fixture
async def serve(nursery: trio.Nursery) -> AsyncIterator[Any]:
    """``await serve(daemon)`` serves a new socketpair; its client end is closed at the end."""
    clients: list[Client] = []

    async def start(daemon: Daemon, hello: bool = True) -> Client:
        ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        served = LeanSocket(theirs)
        client = Client(ours, served)
        clients.append(client)
        nursery.start_soon(daemon.serve_client, served)
        if hello:
            assert isinstance(await client.ask(Hello(name="transport test")), Welcome)
        return client

    yield start
    for client in clients:
        client.sock.close()
        fdpass.close_fds(client.kept)
    await trio.testing.wait_all_tasks_blocked()


async def settle(condition: Any, what: str, timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds (the daemon's task runs meanwhile)."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


async def test_allocate_round_trip_and_disconnect_frees(serve: Any) -> None:
    daemon = Daemon(MemfdBackend())
    client = await serve(daemon)
    await client.send(Allocate(16, 16, XR24, count=2), 5)
    serial, reply, fds = await client.receive()
    assert serial == 5 and isinstance(reply, Allocated)
    assert [b.id for b in reply.buffers] == [1, 2] and len(fds) == 2
    assert os.fstat(fds[0]).st_size == reply.buffers[0].size
    assert await client.ask(protocol.Release((2,)), 6) == Released(1)
    assert daemon.core.live_buffers == 1
    client.sock.shutdown(socket.SHUT_WR)  # end of stream: the daemon frees what it held
    await settle(lambda: not daemon.core.sessions, "the disconnect")
    assert daemon.core.live_buffers == 0
    assert os.fstat(fds[1]).st_size == reply.buffers[1].size  # delivered fds stay valid


async def test_600_buffers_come_in_three_datagrams(serve: Any) -> None:
    daemon = Daemon(MemfdBackend())
    client = await serve(daemon)
    await client.send(Allocate(16, 16, XR24, count=600), 2)
    parts = [await client.receive() for _ in range(3)]
    assert all(isinstance(m, Allocated) for _, m, _ in parts)
    assert [(s, m.index, len(fds)) for s, m, fds in parts] == [
        (2, 0, MAX_FDS),
        (2, MAX_FDS, MAX_FDS),
        (2, 2 * MAX_FDS, 600 - 2 * MAX_FDS),
    ]
    assert isinstance(await client.ask(Query(), 3), protocol.Queried)


async def test_a_bad_message_is_answered_then_the_client_dropped(serve: Any) -> None:
    daemon = Daemon(MemfdBackend())
    client = await serve(daemon)
    read, write = os.pipe()
    try:
        # An fd the header does not count: BAD_MESSAGE, and the fd is closed unread.
        await client.sock.sendmsg([protocol.encode(Query(), 9)], fdpass.rights([write]))
        os.close(write)
        serial, reply, fds = await client.receive()
        assert (serial, fds) == (9, [])
        assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_MESSAGE
        assert reply.text == "header says 0 fds, 1 arrived"
        assert await client.at_eof()
        assert os.read(read, 1) == b""  # every copy of the write end is closed
    finally:
        os.close(read)
    await settle(lambda: not daemon.core.sessions, "the drop")
    assert daemon.core.stats["bad_messages"] == 1


async def test_unknown_opcode_keeps_the_client_and_before_hello_drops_it(serve: Any) -> None:
    daemon = Daemon(MemfdBackend())
    client = await serve(daemon)
    data = bytearray(protocol.encode(Query(), 4))
    data[0:2] = (0x6666).to_bytes(2, "little")
    await client.sock.sendmsg([bytes(data)])
    assert await client.receive() == (
        4,
        Error(ErrorCode.UNKNOWN_OPCODE, 0, "unknown opcode 0x6666"),
        [],
    )
    assert isinstance(await client.ask(Query(), 5), protocol.Queried)
    early = await serve(daemon, hello=False)
    assert await early.ask(Query(), 1) == Error(ErrorCode.BAD_STATE, 0, "HELLO must come first")
    assert await early.at_eof()


async def test_a_refused_peer_is_told_why_then_hung_up_on(serve: Any) -> None:
    daemon = Daemon(MemfdBackend(), policy=Policy(allowed_uids=frozenset({os.getuid() + 1})))
    client = await serve(daemon, hello=False)
    await client.send(Hello(), 1)  # unread by the daemon: the hang-up drains it
    serial, reply, _ = await client.receive()
    assert serial == 0 and isinstance(reply, Error)
    assert reply.code == ErrorCode.PERMISSION_DENIED
    assert await client.at_eof()
    assert daemon.core.stats["refused"] == 1 and not daemon.core.sessions


async def test_a_reply_with_fds_waits_for_the_client_to_read(serve: Any) -> None:
    daemon = Daemon(MemfdBackend())
    client = await serve(daemon)
    await client.send(Allocate(16, 16, XR24), 1)
    await settle(lambda: client.unread() > 0, "one reply queued")
    one_reply = client.unread()
    await client.receive()
    wanted = 3 * QUEUED_BYTES // one_reply
    for serial in range(2, 2 + wanted):
        await client.send(Allocate(16, 16, XR24), serial)
    # The daemon answers until the client has QUEUED_BYTES unread; then the next
    # reply (its buffer made, not yet exported) waits.
    await settle(lambda: client.unread() > QUEUED_BYTES, "the queue to fill")
    await trio.testing.wait_all_tasks_blocked()
    assert QUEUED_BYTES < client.unread() <= QUEUED_BYTES + one_reply
    queued = client.unread() // one_reply
    assert daemon.core.live_buffers in (1 + queued, 1 + queued + 1)  # the waiting one is made
    assert daemon.core.live_buffers < 1 + wanted
    for serial in range(2, 2 + wanted):
        got, reply, fds = await client.receive()
        assert got == serial and isinstance(reply, Allocated) and len(fds) == 1
        assert reply.buffers[0].id == serial
    assert daemon.core.live_buffers == 1 + wanted


async def test_a_client_that_stops_reading_is_dropped(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = Daemon(MemfdBackend(), send_timeout=0.3)
    client = await serve(daemon)
    for serial in range(2, 80):
        await client.send(Allocate(16, 16, XR24), serial)
    await settle(lambda: not daemon.core.sessions, "the drop", timeout=10)
    assert "read no reply for 0.3 s; dropping it" in caplog.text
    assert daemon.core.live_buffers == 0


class TooManyRefs(LeanSocket):
    """Fault injection: the first send that carries fds fails with ETOOMANYREFS, as
    sendmsg does for a non-root sender past its RLIMIT_NOFILE of fds in flight."""

    tripped = False

    def try_sendmsg(self, buffers: list[Any], ancdata: list[tuple[int, int, Any]]) -> int | None:
        if ancdata and not self.tripped:
            self.tripped = True
            raise OSError(errno.ETOOMANYREFS, os.strerror(errno.ETOOMANYREFS))
        return super().try_sendmsg(buffers, ancdata)


async def test_etoomanyrefs_fails_the_request_not_the_client(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = Daemon(MemfdBackend())
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        client = Client(ours, TooManyRefs(theirs))
        nursery.start_soon(daemon.serve_client, client.served)
        assert isinstance(await client.ask(Hello()), Welcome)
        reply = await client.ask(Allocate(16, 16, XR24, count=3), 2)
        strerror = os.strerror(errno.ETOOMANYREFS)
        assert reply == Error(ErrorCode.KERNEL, errno.ETOOMANYREFS, strerror)
        assert daemon.core.live_buffers == 0  # dropped, and their exported fds closed
        again = await client.ask(Allocate(16, 16, XR24), 3)
        assert isinstance(again, Allocated) and again.buffers[0].id == 4
        fdpass.close_fds(client.kept)
    uid = os.getuid()
    assert (
        f"request 2 failed: [Errno {errno.ETOOMANYREFS}] {strerror} (0 fd(s) in flight"
        in caplog.text
    )
    assert f"0 of them uid {uid}'s)" in caplog.text


async def test_a_kernel_error_while_exporting_fails_the_request(serve: Any) -> None:
    daemon = Daemon(MemfdBackend())
    client = await serve(daemon)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # A real EMFILE: room for the 2 memfds, not for the dups that deliver them.
    limit = max(open_fds()) + 1
    fillers: list[int] = []
    try:
        while (fd := os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)) < limit:
            fillers.append(fd)
        os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit + 2, hard))
        try:
            reply = await client.ask(Allocate(16, 16, XR24, count=2), 2)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        fdpass.close_fds(fillers)
    assert reply == Error(ErrorCode.KERNEL, errno.EMFILE, f"dup: {os.strerror(errno.EMFILE)}")
    assert daemon.core.live_buffers == 0
    assert isinstance(await client.ask(Allocate(16, 16, XR24), 3), Allocated)


class Listener:
    """Fault injection: a listening socket whose first accept fails with EMFILE."""

    def __init__(self, sock: trio.socket.SocketType):
        self.sock, self.failed = sock, False

    async def accept(self) -> tuple[trio.socket.SocketType, Any]:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return await self.sock.accept()


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    directory, made = short_dir(tmp_path)
    try:
        yield directory / "primed.sock"
    finally:
        if made:
            os.rmdir(directory)


async def test_accept_loop_backs_off_and_serves(
    nursery: trio.Nursery, sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = Daemon(MemfdBackend())
    with trio.socket.from_stdlib_socket(bind(str(sock_path))) as listening:
        scope = trio.CancelScope()

        async def serve_until_cancelled(*, task_status: Any) -> None:
            with scope:
                await daemon.serve(Listener(listening), task_status=task_status)  # type: ignore[arg-type]

        await nursery.start(serve_until_cancelled)
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            await sock.connect(str(sock_path))
            await sock.sendmsg([protocol.encode(Hello(), 1)])
            data, fds = await fdpass.recv_async(sock)
            assert isinstance(protocol.decode(data, len(fds), "reply")[1], Welcome)
        assert "accept: [Errno 24]" in caplog.text
        scope.cancel()
    os.unlink(sock_path)


@pytest.mark.parametrize("raise_fd_limit", [True, False])
async def test_run_serves_until_sigterm(sock_path: Path, raise_fd_limit: bool) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard - 1, 4096)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    served: list[Daemon] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run(
                    MemfdBackend(),
                    str(sock_path),
                    ready=served.append,
                    raise_fd_limit=raise_fd_limit,
                )
            )
            await settle(lambda: served, "the daemon to be ready")
            assert sock_path.exists()
            expected = hard if raise_fd_limit else lowered
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == (expected, hard)
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not sock_path.exists()


async def test_an_oversized_datagram_is_a_bad_message(serve: Any) -> None:
    daemon = Daemon(MemfdBackend())
    client = await serve(daemon)
    await client.sock.sendmsg([bytes(MAX_MESSAGE + 1)])
    serial, reply, _ = await client.receive()
    assert serial == 0 and isinstance(reply, Error) and reply.code == ErrorCode.BAD_MESSAGE
    assert reply.text == "message truncated: too long"
    assert await client.at_eof()


async def test_a_refused_peer_may_send_anything_before_the_hang_up(
    nursery: trio.Nursery,
) -> None:
    daemon = Daemon(MemfdBackend(), policy=Policy(allowed_uids=frozenset({os.getuid() + 1})))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        # Queued before the daemon looks: the hang-up drains both, one truncated.
        ours.sendmsg([bytes(MAX_MESSAGE + 1)])
        ours.sendmsg([protocol.encode(Hello(), 1)])
        served = LeanSocket(trio.socket.from_stdlib_socket(theirs))
        client = Client(trio.socket.from_stdlib_socket(ours), served)
        nursery.start_soon(daemon.serve_client, served)
        serial, reply, _ = await client.receive()
        assert serial == 0 and isinstance(reply, Error)
        assert reply.code == ErrorCode.PERMISSION_DENIED
        assert await client.at_eof()


async def test_a_reply_that_cannot_be_sent_in_time_drops_the_client(
    serve: Any, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    # Replies with no fds never wait for room: they fill the socket until sendmsg
    # blocks, and the send timeout (armed only then) ends the client.
    daemon = Daemon(MemfdBackend(), send_timeout=0.3)
    client = await serve(daemon)

    async def flood() -> None:
        try:
            for serial in itertools.count(2):
                await client.send(Query(), serial & 0xFFFFFFFF)
        except OSError:
            pass  # the daemon hung up

    nursery.start_soon(flood)
    await settle(lambda: not daemon.core.sessions, "the drop", timeout=10)
    assert "read no reply for 0.3 s; dropping it" in caplog.text


async def test_a_reset_connection_ends_its_session(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A socket closed with a reply unread makes the daemon's next recv fail.
    daemon = Daemon(MemfdBackend())
    client = await serve(daemon)
    await client.send(Query(), 2)
    await settle(lambda: client.unread() > 0, "the reply")
    with caplog.at_level(logging.INFO, "primed"):
        client.sock.close()
        await settle(lambda: not daemon.core.sessions, "the disconnect")
    assert "connection failed: [Errno 104]" in caplog.text


class Buggy(MemfdBackend):
    """A backend with a bug: allocate raises what no handler expects."""

    def allocate(
        self, fmt: Format, width: int, height: int, limits: Limits, owner: Owner | None = None
    ) -> Allocation:
        raise RuntimeError("a bug")


async def test_a_bug_costs_one_connection_never_the_daemon(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = Daemon(Buggy())
    client, other = await serve(daemon), await serve(daemon)
    await client.send(Allocate(16, 16, XR24), 2)
    assert await client.at_eof()
    assert "internal error; disconnecting it" in caplog.text
    assert isinstance(await other.ask(Query(), 2), protocol.Queried)
    assert len(daemon.core.sessions) == 1


def test_reload_takes_new_rules_or_keeps_the_old() -> None:
    rules: list[tuple[Limits, Policy] | PrimedError] = []

    def hook() -> tuple[Limits, Policy]:
        found = rules.pop()
        if isinstance(found, PrimedError):
            raise found
        return found

    daemon = Daemon(MemfdBackend(), reload=hook)
    new = (Limits(max_width=64), Policy(admin_gid=7))
    rules.append(new)
    assert daemon.reload()
    assert (daemon.core.limits, daemon.core.policy) == new
    rules.append(PrimedError("bad file"))
    assert not daemon.reload()
    assert (daemon.core.limits, daemon.core.policy) == new
    assert not Daemon(MemfdBackend()).reload()
    assert daemon.summary() == "0 client(s), 0 buffer(s), 0.0 MiB"


_STOP_THEN_RELOAD = """
import os, signal, sys, trio
from primed.daemon.process import run
from primed.kernel.backends import MemfdBackend

def ready(daemon):
    # Both arrive before the daemon's signal task runs: it takes SIGTERM first and
    # stops, with SIGHUP still pending when its receiver closes.
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGHUP)

trio.run(lambda: run(MemfdBackend(), sys.argv[1], ready=ready))
os.kill(os.getpid(), signal.SIGHUP)  # and one after the daemon has stopped
print("stopped whole")
"""


def test_a_sighup_outside_the_serving_loop_is_ignored(sock_path: Path) -> None:
    """A reload asked for while the daemon starts or stops must not kill it (SIGHUP's
    default action): trio hands a signal still pending when its receiver closes back to
    the handler that was there before, so that handler ignores SIGHUP."""
    done = subprocess.run(
        [sys.executable, "-c", _STOP_THEN_RELOAD, str(sock_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "stopped whole" in done.stdout
    assert not sock_path.exists()


async def test_a_connection_without_hello_is_told_then_dropped(serve: Any) -> None:
    daemon = Daemon(MemfdBackend(), hello_timeout=0.2)
    silent = await serve(daemon, hello=False)
    greeted = await serve(daemon)
    assert await silent.receive() == (0, Error(ErrorCode.BAD_STATE, 0, "no HELLO within 0.2 s"), [])
    assert await silent.at_eof()
    await trio.sleep(0.3)  # past the deadline: a client that said HELLO is not dropped
    assert isinstance(await greeted.ask(Query(), 2), protocol.Queried)
    assert len(daemon.core.sessions) == 1


async def test_reload_disconnects_the_clients_the_new_rules_refuse(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    uid = os.getuid()
    rules = [(Limits(), Policy(allowed_uids=frozenset({uid + 1})))]
    daemon = Daemon(MemfdBackend(), reload=rules.pop)
    idle = await serve(daemon)
    assert isinstance(await idle.ask(Allocate(16, 16, XR24), 2), Allocated)
    # Another with a reply waiting for it to read: the reload cancels the wait.
    busy = await serve(daemon)
    for serial in range(2, 22):
        await busy.send(Query(), serial)
    await busy.send(Allocate(16, 16, XR24), 22)
    await settle(lambda: daemon.core.live_buffers == 2, "the waiting reply's buffer")
    await trio.testing.wait_all_tasks_blocked()
    with caplog.at_level(logging.INFO, "primed"):
        assert daemon.reload()
    denied = Error(ErrorCode.PERMISSION_DENIED, 0, f"uid {uid} is not allowed to use this daemon")
    with trio.fail_after(5):
        assert await idle.receive() == (0, denied, [])
        assert await idle.at_eof()
        replies = []
        while (got := await busy.receive())[0]:
            replies.append(got)
        assert [serial for serial, _, _ in replies] == list(range(2, 22))  # what it was sent
        assert got == (0, denied, [])
        assert await busy.at_eof()
    await settle(lambda: not daemon.core.sessions, "the disconnects")
    assert daemon.core.live_buffers == 0
    assert caplog.text.count(f"uid {uid} is not allowed to use this daemon; disconnecting it") == 2
    assert "reloaded; 0 client(s) stay connected, 2 disconnected" in caplog.text


async def test_a_uid_over_its_share_of_fds_in_flight_waits_for_it_to_read(serve: Any) -> None:
    daemon = Daemon(MemfdBackend(), policy=Policy(quotas=Quotas(fds_in_flight_per_uid=3)))
    client = await serve(daemon)
    await client.send(Allocate(16, 16, XR24, count=2), 2)
    await client.send(Allocate(16, 16, XR24, count=2), 3)
    await settle(lambda: daemon.core.live_buffers == 4, "both requests made")
    await trio.testing.wait_all_tasks_blocked()
    assert daemon.fds_in_flight == 2  # the second reply waits: 2 + 2 > 3
    serial, _, fds = await client.receive()
    assert (serial, len(fds)) == (2, 2)
    serial, reply, fds = await client.receive()  # it goes once the first was read
    assert (serial, len(fds)) == (3, 2) and isinstance(reply, Allocated)
    assert isinstance(await client.ask(Query(), 4), protocol.Queried)
    assert daemon.fds_in_flight == 2  # the last ALLOCATED is counted until a look says read


async def test_a_uid_that_does_not_read_is_refused_past_its_share(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    uid = os.getuid()
    policy = Policy(quotas=Quotas(fds_in_flight_per_uid=3))
    daemon = Daemon(MemfdBackend(), policy=policy, send_timeout=0.3)
    client = await serve(daemon)
    await client.send(Allocate(16, 16, XR24, count=2), 2)
    await client.send(Allocate(16, 16, XR24, count=2), 3)
    await settle(lambda: daemon.core.live_buffers == 4, "both requests made")
    # Unread for longer than the send timeout: the second is refused, its buffers go.
    await settle(lambda: daemon.core.live_buffers == 2, "the refusal")
    assert (await client.receive())[0] == 2
    text = f"fds in flight per uid ({uid}): 2 unread, share 3"
    assert await client.receive() == (3, Error(ErrorCode.LIMIT_EXCEEDED, 0, text), [])
    assert daemon.core.live_buffers == 2  # the refused request's buffers are gone
    assert f"request 3 refused: fds in flight per uid ({uid})" in caplog.text
    reply = await client.ask(Allocate(16, 16, XR24, count=2), 4)
    assert isinstance(reply, Allocated) and [b.id for b in reply.buffers] == [5, 6]


async def test_the_daemon_bound_on_fds_in_flight(serve: Any) -> None:
    # One uid here (a socketpair): a share above the bound, so that the bound is what binds.
    policy = Policy(quotas=Quotas(fds_in_flight_per_uid=100), bounds=Bounds(fds_in_flight=3))
    daemon = Daemon(MemfdBackend(), policy=policy, send_timeout=0.3)
    first, second = await serve(daemon), await serve(daemon)
    await first.send(Allocate(16, 16, XR24, count=2), 2)  # and it does not read yet
    await settle(lambda: daemon.fds_in_flight == 2, "the first reply")
    reply = await second.ask(Allocate(16, 16, XR24, count=2), 2)
    assert reply == Error(ErrorCode.LIMIT_EXCEEDED, 0, "fds in flight: 2 unread, daemon bound 3")
    assert (await first.receive())[0] == 2
    # The next part's look (one SIOCOUTQ per connection holding fds) finds them read.
    assert isinstance(await second.ask(Allocate(16, 16, XR24, count=2), 3), Allocated)


async def test_a_dropped_client_keeps_its_fds_counted_until_it_closes(serve: Any) -> None:
    daemon = Daemon(MemfdBackend(), send_timeout=0.3)
    client = await serve(daemon)
    for serial in range(2, 80):
        await client.send(Allocate(16, 16, XR24), serial)
    await settle(lambda: not daemon.core.sessions, "the drop", timeout=10)
    unread = daemon.fds_in_flight
    assert unread > 10  # the kernel still charges them to the daemon's user
    await trio.testing.wait_all_tasks_blocked()
    assert daemon.fds_in_flight == unread
    client.sock.close()
    await settle(lambda: daemon.fds_in_flight == 0, "the count to drop")


async def test_a_refused_peer_that_never_reads_holds_its_fd_no_longer_than_the_send_timeout(
    nursery: trio.Nursery,
) -> None:
    daemon = Daemon(
        MemfdBackend(),
        policy=Policy(allowed_uids=frozenset({os.getuid() + 1})),
        send_timeout=0.3,
    )
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        served = LeanSocket(theirs)
        nursery.start_soon(daemon.serve_client, served)
        # It sends and never reads; the daemon's end closes anyway.
        await settle(lambda: served.fileno() == -1, "the daemon to close its end", timeout=2)


async def test_the_refusing_mode_logs_a_client_in_a_loop_only_a_few_times(
    nursery: trio.Nursery, sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from primed.service import refusing

    listener = bind(str(sock_path))
    try:
        done: list[bool] = []

        async def refuse() -> None:
            done.append(await refusing.refuse(listener, "a test"))

        with caplog.at_level(logging.INFO, "primed"):
            nursery.start_soon(refuse)
            for _ in range(30):
                with trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                    await sock.connect(str(sock_path))
                    data, fds = await fdpass.recv_async(sock)
                    assert isinstance(protocol.decode(data, len(fds), "reply")[1], Error)
            os.kill(os.getpid(), signal.SIGTERM)
            await settle(lambda: done, "the refusing mode to stop")
        assert done == [False]
        assert caplog.text.count("telling a client that primed can't serve") == 5
    finally:
        listener.close()
        os.unlink(sock_path)


async def test_drops_of_stalled_clients_are_logged_a_few_times_per_uid(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = Daemon(MemfdBackend(), send_timeout=0.2)
    clients = [await serve(daemon) for _ in range(8)]
    for client in clients:
        for serial in range(2, 60):
            await client.send(Allocate(16, 16, XR24), serial)
    await settle(lambda: not daemon.core.sessions, "the drops", timeout=10)
    assert caplog.text.count("read no reply for 0.2 s; dropping it") == 5  # then held back


async def test_run_passes_the_hello_timeout_on(sock_path: Path) -> None:
    served: list[Daemon] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run(MemfdBackend(), str(sock_path), ready=served.append, hello_timeout=0.2)
        )
        await settle(lambda: served, "the daemon to be ready")
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            await sock.connect(str(sock_path))
            data, fds = await fdpass.recv_async(sock)
            reply = protocol.decode(data, len(fds), "reply")
            assert reply == (0, Error(ErrorCode.BAD_STATE, 0, "no HELLO within 0.2 s"))
        os.kill(os.getpid(), signal.SIGTERM)


async def test_a_costly_client_lets_others_run_between_its_requests() -> None:
    # A client with many requests queued whose handling is costly (LIST pages of a
    # large listing) must not hold the loop for FAIRNESS of them in a row: its socket
    # yields once it has held the loop for the lean socket's SLICE.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        for n in range(12):
            left.send(b"request %d" % n)
        lean = LeanSocket(trio.socket.from_stdlib_socket(right))
        handled = 0
        seen: list[int] = []

        async def costly() -> None:
            nonlocal handled
            for _ in range(12):
                await lean.recv(64)
                until = time.perf_counter() + 0.002  # 2 ms of work per request
                while time.perf_counter() < until:
                    pass
                handled += 1

        async def other() -> None:
            for _ in range(3):
                await trio.lowlevel.checkpoint()
                seen.append(handled)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(costly)
            nursery.start_soon(other)
        lean.close()
    # Between two of the other task's turns the costly one handled one or two requests,
    # not a dozen (it would have done all twelve before the old count-only rule yielded).
    assert seen[0] <= 2 and all(b - a <= 2 for a, b in itertools.pairwise(seen)), seen


class Costly(MemfdBackend):
    """The memfd backend with 0.2 ms of work in every allocate (a slow driver's)."""

    made = 0

    def allocate(
        self, fmt: Format, width: int, height: int, limits: Limits, owner: Owner | None = None
    ) -> Allocation:
        until = time.perf_counter() + 0.0002
        while time.perf_counter() < until:
            pass
        self.made += 1
        return super().allocate(fmt, width, height, limits, owner)


async def test_others_are_served_while_a_large_batch_is_made(serve: Any) -> None:
    # 200 buffers at 0.2 ms each hold the kernel 40 ms; the batch is made a slice at a
    # time, so another client's QUERY is answered while it is under way.
    backend = Costly()
    daemon = Daemon(backend)
    batch, other = await serve(daemon), await serve(daemon)
    await batch.send(Allocate(16, 16, XR24, count=200), 2)
    await settle(lambda: backend.made > 0, "the batch's first buffer")
    assert isinstance(await other.ask(Query(), 3), protocol.Queried)
    made_then = backend.made
    assert made_then < 200, "the QUERY waited for the whole batch"
    serial, reply, fds = await batch.receive()
    assert serial == 2 and isinstance(reply, Allocated) and len(fds) == 200
    assert backend.made == 200
