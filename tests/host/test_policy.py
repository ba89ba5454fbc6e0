"""Who may connect and how much each may hold: the rules alone, then a real daemon.

The daemon runs as a process on the memfd backend; clients are real sockets. A
refused client is told why (PERMISSION_DENIED, serial 0) before the daemon
closes the connection; a client over quota is told which quota (QUOTA_EXCEEDED).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

import primed
from primed import fdpass
from primed.daemon import server
from primed.daemon.policy import Bounds, Ledger, Peer, Policy, QuotaExceeded, Quotas
from primed.errors import ErrorCode
from primed.wire import protocol
from tests.host.conftest import StartDaemon
from tests.support import wait_for

ME = Peer(os.getpid(), os.getuid(), os.getgid(), frozenset(os.getgroups()))
#: A uid and a gid this test process does not have.
OTHER = 4242

# --- the rules alone -----------------------------------------------------------------------


def test_open_to_anyone_by_default() -> None:
    assert Policy().refusal(Peer(1, OTHER, OTHER)) is None


@pytest.mark.parametrize(
    ("policy", "peer", "admitted"),
    [
        (Policy(allowed_uids=frozenset({1000})), Peer(1, 1000, 100), True),
        (Policy(allowed_uids=frozenset({1000})), Peer(1, 1001, 100), False),
        (Policy(allowed_gids=frozenset({44})), Peer(1, 1001, 44), True),
        (Policy(allowed_gids=frozenset({44})), Peer(1, 1001, 100, frozenset({44})), True),
        (Policy(allowed_gids=frozenset({44})), Peer(1, 1001, 100, frozenset({45})), False),
        (Policy(allowed_uids=frozenset({1}), admin_gid=10), Peer(1, 2, 3, frozenset({10})), True),
        (Policy(admin_gid=10), Peer(1, 2, 3), True),
    ],
)
def test_who_is_admitted(policy: Policy, peer: Peer, admitted: bool) -> None:
    refusal = policy.refusal(peer)
    assert (refusal is None) == admitted
    if refusal is not None:
        assert f"uid {peer.uid}" in refusal


def test_quotas_per_client_and_per_uid() -> None:
    policy = Policy(quotas=Quotas(buffers_per_client=2, bytes_per_uid=300))
    ledger = Ledger()
    first, second = ledger.open(Peer(1, 1000, 1000)), ledger.open(Peer(2, 1000, 1000))
    ledger.check(first, policy, 2, 100)
    ledger.charge(first, 2, 100)
    with pytest.raises(QuotaExceeded, match=r"^quota: 2 buffers per client; 2 held, 1 more"):
        ledger.check(first, policy, 1, 1)
    ledger.check(second, policy, 2, 200)
    ledger.charge(second, 2, 200)
    with pytest.raises(QuotaExceeded, match=r"^quota: 300 bytes per uid \(1000\); 300 held"):
        ledger.check(ledger.open(Peer(3, 1000, 1000)), policy, 1, 1)
    ledger.check(ledger.open(Peer(4, 1001, 1000)), policy, 2, 300)  # another uid
    ledger.refund(first, 1, 50)
    ledger.check(first, policy, 1, 50)
    assert ledger.usage(1000).buffers == 3


def test_closing_an_account_refunds_its_uid() -> None:
    ledger = Ledger()
    first, second = ledger.open(Peer(1, 1000, 1000)), ledger.open(Peer(2, 1000, 1000))
    ledger.charge(first, 3, 3000)
    ledger.charge(second, 1, 10)
    ledger.close(first)
    assert (ledger.usage(1000).buffers, ledger.usage(1000).bytes) == (1, 10)
    ledger.close(second)
    assert ledger.usage(1000).buffers == 0
    again = ledger.open(Peer(3, 1000, 1000))
    assert again.uid.buffers == 0


def test_admins_have_no_quota_and_zero_means_none() -> None:
    ledger = Ledger()
    admin = ledger.open(Peer(1, 1000, 1000, frozenset({10})))
    policy = Policy(admin_gid=10, quotas=Quotas(1, 1, 1, 1))
    ledger.check(admin, policy, 100, 1 << 40)
    plain = ledger.open(Peer(2, 1001, 1001))
    ledger.check(plain, Policy(bounds=Bounds(buffers=1 << 20)), 1 << 20, 1 << 50)


def test_the_daemon_wide_bounds_hold_for_everyone() -> None:
    # Quotas 0 (off) and admins exempt: the bounds still refuse, naming themselves.
    ledger = Ledger()
    admin = ledger.open(Peer(1, 1000, 1000, frozenset({10})))
    policy = Policy(admin_gid=10, bounds=Bounds(buffers=4, bytes=1000))
    ledger.charge(admin, 3, 600)
    with pytest.raises(QuotaExceeded, match=r"^bound: 4 buffers daemon-wide; 3 held, 2 more"):
        ledger.check(admin, policy, 2, 10)
    with pytest.raises(QuotaExceeded, match=r"^bound: 1000 bytes daemon-wide; 600 held"):
        ledger.check(ledger.open(Peer(2, 1001, 1001)), policy, 1, 401)
    ledger.check(admin, policy, 1, 400)


def test_connections_per_uid_and_the_daemon_wide_bound() -> None:
    ledger = Ledger()
    policy = Policy(
        admin_gid=10, quotas=Quotas(connections_per_uid=2), bounds=Bounds(connections=5)
    )
    me, admin = Peer(1, 1000, 1000), Peer(2, 1001, 1001, frozenset({10}))
    first = ledger.open(me)
    assert ledger.connection_refusal(me, policy) is None
    ledger.open(me)
    assert ledger.connection_refusal(me, policy) == "connections per uid (2): 2 open"
    assert ledger.connection_refusal(Peer(3, 1002, 1002), policy) is None  # another uid
    for _ in range(3):  # admins have no share ...
        assert ledger.connection_refusal(admin, policy) is None
        ledger.open(admin)
    # ... but meet the bound, as everyone does
    assert ledger.connection_refusal(admin, policy) == "connections (daemon-wide, 5): 5 open"
    ledger.close(first)
    assert ledger.connections(1000) == 1 and ledger.connection_refusal(me, policy) is None


async def test_credentials_come_from_the_kernel() -> None:
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        assert server.credentials(ours) == ME


# --- a real daemon -------------------------------------------------------------------------


def configure(directory: Path, text: str) -> str:
    path = directory / "primed.toml"
    path.write_text(text)
    return str(path)


def test_refused_at_connect_before_hello(spawn: StartDaemon, sock_dir: Path) -> None:
    daemon = spawn("--config", configure(sock_dir, f"[access]\nallowed_uids = [{OTHER}]\n"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(10)
        sock.connect(daemon.socket)
        data, fds = fdpass.recv(sock)
        serial, message = protocol.decode(data, len(fds), "reply")
        assert serial == 0
        assert isinstance(message, protocol.Error)
        assert message.code == ErrorCode.PERMISSION_DENIED
        assert message.text == f"uid {os.getuid()} is not allowed to use this daemon"
        assert fdpass.recv(sock) == (b"", [])  # and then it hung up
    log = daemon.stop()
    assert f"refused a client (pid {os.getpid()}, uid {os.getuid()}, gid {os.getgid()})" in log


def test_refused_blocking_client_says_why(spawn: StartDaemon, sock_dir: Path) -> None:
    daemon = spawn("--config", configure(sock_dir, f"[access]\nallowed_gids = [{OTHER}]\n"))
    for _ in range(20):  # the daemon's reply and close may come before or after our Hello
        with pytest.raises(primed.ServerError) as refused:
            primed.connect(daemon.socket)
        assert refused.value.code == ErrorCode.PERMISSION_DENIED


async def test_refused_trio_client_says_why(spawn: StartDaemon, sock_dir: Path) -> None:
    daemon = spawn("--config", configure(sock_dir, f"[access]\nallowed_gids = [{OTHER}]\n"))
    for _ in range(20):
        with pytest.raises(primed.ServerError) as refused:
            async with primed.connect_async(daemon.socket):
                pass
        assert refused.value.code == ErrorCode.PERMISSION_DENIED


@pytest.mark.parametrize("key", ["allowed_uids = [{uid}]", "allowed_gids = [{gid}]"])
def test_admitted_by_uid_or_gid(spawn: StartDaemon, sock_dir: Path, key: str) -> None:
    entry = key.format(uid=os.getuid(), gid=os.getgid())
    daemon = spawn("--config", configure(sock_dir, f"[access]\n{entry}\n"))
    with primed.connect(daemon.socket) as client:
        client.release(client.allocate(16, 16))


def test_quota_per_client_is_freed_by_release(spawn: StartDaemon, sock_dir: Path) -> None:
    daemon = spawn("--config", configure(sock_dir, "[quotas]\nbuffers_per_client = 2\n"))
    with primed.connect(daemon.socket) as client:
        with pytest.raises(primed.ServerError) as over:
            client.allocate_many(16, 16, "XR24", 3)  # refused whole: nothing is made
        assert over.value.code == ErrorCode.QUOTA_EXCEEDED
        assert over.value.text.startswith("quota: 2 buffers per client; 0 held, 3 more asked")
        first, second = client.allocate_many(16, 16, "XR24", 2)
        with pytest.raises(primed.ServerError, match="quota: 2 buffers per client; 2 held"):
            client.allocate(16, 16)
        client.release(first)
        third = client.allocate(16, 16)
        client.release(second, third)
        client.release(*client.allocate_many(16, 16, "XR24", 2))
    with primed.connect(daemon.socket) as other:  # every client has its own
        other.release(*other.allocate_many(16, 16, "XR24", 2))


def test_quota_of_bytes_counts_the_sizes_made(spawn: StartDaemon, sock_dir: Path) -> None:
    daemon = spawn("--config", configure(sock_dir, "[quotas]\nbytes_per_client = 40000\n"))
    with primed.connect(daemon.socket) as client:
        buffers = client.allocate_many(64, 64, "XR24", 2)
        assert sum(b.size for b in buffers) == 32768
        with pytest.raises(primed.ServerError) as over:
            client.allocate(64, 64, "XR24")
        assert over.value.code == ErrorCode.QUOTA_EXCEEDED
        assert over.value.text == "quota: 40000 bytes per client; 32768 held, 16384 more asked"
        client.release(buffers[0])
        client.release(client.allocate(64, 64, "XR24"))
        buffers[1].close()


def test_quota_per_uid_is_freed_by_disconnect(spawn: StartDaemon, sock_dir: Path) -> None:
    daemon = spawn("--config", configure(sock_dir, "[quotas]\nbuffers_per_uid = 3\n"))
    with primed.connect(daemon.socket) as second:
        with primed.connect(daemon.socket) as first:
            for buffer in first.allocate_many(16, 16, "XR24", 2):
                buffer.close()
            second.allocate(16, 16).close()
            with pytest.raises(primed.ServerError) as over:
                second.allocate(16, 16)
            assert over.value.code == ErrorCode.QUOTA_EXCEEDED
            assert over.value.text.startswith(f"quota: 3 buffers per uid ({os.getuid()}); 3 held")
        wait_for(lambda: "disconnected; freed 2 buffer(s)" in daemon.log(), "the disconnect")
        for buffer in second.allocate_many(16, 16, "XR24", 2):
            buffer.close()


def test_admin_group_passes_and_has_no_quota(spawn: StartDaemon, sock_dir: Path) -> None:
    text = (
        f"[access]\nallowed_uids = [{OTHER}]\nadmin_group = {os.getgid()}\n"
        "[quotas]\nbuffers_per_client = 1\nbuffers_per_uid = 1\n"
    )
    daemon = spawn("--config", configure(sock_dir, text))
    with primed.connect(daemon.socket) as client:
        for buffer in client.allocate_many(16, 16, "XR24", 5):
            buffer.close()


def test_limit_errors_name_the_limit(spawn: StartDaemon, sock_dir: Path) -> None:
    text = "[limits]\nmax_width = 100\nmax_count = 2\n"
    daemon = spawn("--config", configure(sock_dir, text))
    with primed.connect(daemon.socket) as client:
        with pytest.raises(primed.ServerError) as wide:
            client.allocate(101, 1)
        assert wide.value.code == ErrorCode.LIMIT_EXCEEDED
        assert "exceeds the limit of 100x16384" in wide.value.text
        with pytest.raises(primed.ServerError) as many:
            client.allocate_many(1, 1, "XR24", 3)
        assert many.value.code == ErrorCode.LIMIT_EXCEEDED
        assert many.value.text == "count 3 is not within 1..2"
