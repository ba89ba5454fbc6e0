"""Backpressure that costs nothing while it waits: a thousand clients with a reply
they never read, against a real ``primed serve`` process.

Each stalled client leaves more than the room threshold of replies unread and then
asks for a buffer: its reply (which carries an fd) waits in the daemon. The daemon
must wait for those clients to read without spending CPU on them (a wake on
writability, not a poll), while another client keeps getting answers.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import subprocess
import time

from primed import fdpass, formats
from primed.daemon import core, transport
from primed.wire import protocol
from primed.wire.protocol import Allocate, Allocated, Hello, Release, Welcome
from tests.host.conftest import StartDaemon
from tests.reliability import record
from tests.support import client_command, cpu_seconds, settled_fds, wait_for_fds

STALLED = 1000
#: Unread replies each stalled client leaves before the request whose reply waits:
#: 20 QUERY replies (1,280 bytes each as the kernel counts them) pass the threshold.
QUERIES = 20
#: CPU time the daemon may spend per second of wall time while they wait.
BUDGET = 0.05
WINDOW = 3.0

_STALL = """
import socket, sys
from primed import fdpass, formats
from primed.wire import protocol
from primed.wire.protocol import Allocate, Hello, Query

path, count, queries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(count):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.sendmsg([protocol.encode(Hello(name="stalled"), 1)])
    data, fds = fdpass.recv(sock)
    fdpass.close_fds(fds)
    for serial in range(2, 2 + queries):
        sock.sendmsg([protocol.encode(Query(), serial)])
    sock.sendmsg([protocol.encode(Allocate(16, 16, formats.fourcc("XR24")), 99)])
    held.append(sock)
print("ready", flush=True)
sys.stdin.read()  # hold every connection, reading nothing, until told to go
"""


def round_trip(sock: socket.socket, serial: int) -> None:
    """ALLOCATE one buffer and RELEASE it; asserts both answers."""
    sock.sendmsg([protocol.encode(Allocate(16, 16, formats.fourcc("XR24")), serial)])
    data, fds = fdpass.recv(sock)
    fdpass.close_fds(fds)
    got, reply = protocol.decode(data, len(fds), "reply")
    assert got == serial and isinstance(reply, Allocated), reply
    sock.sendmsg([protocol.encode(Release((reply.buffers[0].id,)), serial + 1)])
    data, fds = fdpass.recv(sock)
    assert protocol.decode(data, len(fds), "reply") == (serial + 1, protocol.Released(1))


def test_a_thousand_stalled_clients_cost_the_daemon_almost_nothing(spawn: StartDaemon) -> None:
    assert QUERIES * 1280 > transport.QUEUED_BYTES  # else nothing would wait
    # The stalled clients are all of one uid: its connection share is switched off.
    daemon = spawn("--send-timeout", "120", "--connections-per-uid", "0")
    baseline = settled_fds(daemon.pid)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def raise_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    stalled = subprocess.Popen(
        client_command(_STALL, daemon.socket, str(STALLED), str(QUERIES)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=raise_limit,  # noqa: PLW1509 (no threads here)
    )  # fmt: skip
    try:
        assert stalled.stdout is not None and stalled.stdin is not None
        line = stalled.stdout.readline()
        assert line == "ready\n", f"{line!r}: {stalled.communicate(timeout=60)[1]}"
        # A socket and a made buffer per stalled client: each ALLOCATE is waiting.
        wait_for_fds(daemon.pid, baseline + 2 * STALLED, timeout=60)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as victim:
            victim.connect(daemon.socket)
            victim.sendmsg([protocol.encode(Hello(name="victim"), 1)])
            data, fds = fdpass.recv(victim)
            assert isinstance(protocol.decode(data, len(fds), "reply")[1], Welcome)
            before, started = cpu_seconds(daemon.pid), time.monotonic()
            answered = 0
            while time.monotonic() - started < WINDOW:
                round_trip(victim, 2 + 2 * answered)
                answered += 1
                time.sleep(0.05)  # a paced victim: its own cost stays small
            used, wall = cpu_seconds(daemon.pid) - before, time.monotonic() - started
        share = used / wall
        print(
            f"{STALLED} stalled clients: daemon {used * 1000:.0f} ms CPU in {wall:.1f} s "
            f"({share:.1%} of a core), victim {answered} round trips"
        )
        record(
            "test_a_thousand_stalled_clients_cost_the_daemon_almost_nothing",
            "host",
            f"{STALLED} clients each left a reply with an fd waiting, unread",
            f"daemon CPU under {BUDGET:.0%} of a core while a victim kept being answered",
            stalled=STALLED,
            cpu_share=round(share, 4),
            victim_round_trips=answered,
        )
        assert answered > 0
        assert share < BUDGET, f"daemon used {share:.1%} of a core on stalled clients"
        assert stalled.poll() is None
        # Reading now, a stalled client gets what was waiting.
    finally:
        stalled.kill()
        stalled.communicate(timeout=30)
    wait_for_fds(daemon.pid, baseline, timeout=60)
    assert "Traceback" not in daemon.log()


def test_the_largest_replies_fit_in_one_datagram_of_the_send_buffer() -> None:
    # A SEQPACKET datagram larger than the send buffer less 32 bytes gets EMSGSIZE.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        room = transport.size_send_buffer(left)
        limit = left.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 32
        assert room == transport.QUEUED_BYTES
        info = protocol.BufferInfo(
            2**32 - 1, 2**16, 2**16, 2**32 - 1, 2**64 - 1, 2**64 - 1, ((2**32 - 1, 2**32 - 1),) * 4
        )
        allocated = protocol.encode(Allocated(2**32 - 1, 0, (info,) * 253), 2**32 - 1)
        name = "x" * 255
        clients = tuple(
            protocol.ClientEntry(
                2**32 - 1, 2**31 - 1, 2**32 - 1, 2**32 - 1, 2**63, 2**32 - 1, 2**63, name
            )
            for _ in range(core.LIST_PAGE_CLIENTS)
        )
        buffers = tuple(
            protocol.BufferEntry(
                2**32 - 1, 2**32 - 1, 2**16, 2**16, 2**32 - 1, 2**63, 2**63, 2**32 - 1
            )
            for _ in range(core.LIST_PAGE_BUFFERS)
        )
        pages = [
            protocol.encode(protocol.Listed(1, 2**32 - 1, clients), 1),
            protocol.encode(protocol.Listed(2, 2**32 - 1, buffers), 1),
        ]
        for datagram in (allocated, *pages):
            assert len(datagram) <= limit
            left.sendmsg([datagram])  # the kernel agrees
            assert right.recv(len(datagram) + 1) == datagram


def check_writability_rule() -> None:
    """Assert what the transport relies on, on the running kernel: with the send buffer
    size_send_buffer() gives, an AF_UNIX SEQPACKET socket polls writable exactly while
    SIOCOUTQ is at most the room threshold, as messages with fds fill it and drain."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read, write = os.pipe()
    received: list[int] = []
    try:
        with left, right:
            room = transport.size_send_buffer(left)
            left.setblocking(False)
            poller = select.poll()
            poller.register(left, select.POLLOUT)
            seen = 0

            def agree() -> int:
                unread = transport._unread(left)
                assert bool(poller.poll(0)) == (unread <= room), (unread, room)
                return unread

            for size in (60, 700, 3000, 20000):
                while agree() <= room:
                    fdpass.send(left, bytes(size), [write, write])
                    seen += 1
                while agree():
                    _, fds = fdpass.recv(right)
                    received += fds
            assert seen > 20
    finally:
        fdpass.close_fds([read, write, *received])


def test_writability_is_the_room_threshold() -> None:
    check_writability_rule()
