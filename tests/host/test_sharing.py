"""Sharing on the memfd backend: tokens, direct passing, query, pipelining.

Every "other" client is a separate process; the DRM side of the same claims is
checked on both drivers in tests/kernel/test_sharing.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket

import pytest
import trio

import primed
from primed import fdpass, formats
from primed.errors import ErrorCode
from primed.wire import protocol
from tests.host.conftest import StartDaemon
from tests.support import Daemon, run_client, settled_fds, wait_for, wait_for_fds

# Opens a token in a new process, prints the layout and the pixels' SHA-256.
OPEN = """
import hashlib, sys, primed
with primed.connect(sys.argv[1]) as client:
    try:
        buf = client.open_shared(sys.argv[2])
    except primed.ServerError as e:
        print(e.code.name, e.text)
        raise SystemExit(0)
    with buf, buf.map(write=False) as pixels:
        print(buf.id, buf.width, buf.height, buf.format, hashlib.sha256(pixels).hexdigest())
"""


def digest(buf: primed.Buffer) -> str:
    with buf.map(write=False) as pixels:
        return hashlib.sha256(pixels).hexdigest()


def paint(buf: primed.Buffer, seed: int) -> str:
    with buf.map() as pixels:
        pixels[:] = random.Random(seed).randbytes(buf.size)
    return digest(buf)


def open_elsewhere(daemon: Daemon, token: str) -> list[str]:
    return run_client(OPEN, daemon.socket, token).split()


def test_another_process_opens_a_token(shared: Daemon, client: primed.Client) -> None:
    buf = client.allocate(320, 200, "NV12")
    expected = paint(buf, 1)
    token = client.share(buf)
    assert len(bytes.fromhex(token)) == 16
    assert open_elsewhere(shared, token) == ["0", "320", "200", "NV12", expected]
    # A token works until revoked, for anyone, any number of times.
    assert open_elsewhere(shared, token)[-1] == expected


def test_tokens_are_unguessable(client: primed.Client) -> None:
    buf = client.allocate(16, 16)
    tokens = {client.share(buf) for _ in range(200)}
    assert len(tokens) == 200
    # 128 random bits: every bit position takes both values across 200 tokens.
    bits = [int(t, 16) for t in tokens]
    assert all(
        any(b >> i & 1 for b in bits) and not all(b >> i & 1 for b in bits) for i in range(128)
    )


def test_every_unusable_token_gets_one_answer(shared: Daemon, client: primed.Client) -> None:
    buf = client.allocate(16, 16)
    revoked = client.share(buf)
    client.revoke(revoked)
    once = client.share(buf, once=True)
    assert open_elsewhere(shared, once)[0] == "0"
    foreign_uid = client.share(buf, uids=[os.getuid() + 1])
    doomed = client.allocate(16, 16)
    dead = client.share(doomed)
    client.release(doomed)
    wrong = os.urandom(16).hex()
    answers = {t: open_elsewhere(shared, t) for t in (revoked, once, foreign_uid, dead, wrong)}
    assert all(a == ["UNKNOWN_TOKEN", "no", "such", "token"] for a in answers.values()), answers


def test_uids_limit_who_may_open(shared: Daemon, client: primed.Client) -> None:
    buf = client.allocate(16, 16)
    mine = client.share(buf, uids=[os.getuid()])
    assert open_elsewhere(shared, mine)[0] == "0"


def test_only_the_owner_revokes(shared: Daemon, client: primed.Client) -> None:
    buf = client.allocate(16, 16)
    token = client.share(buf)
    with primed.connect(shared.socket) as other:
        with pytest.raises(primed.ServerError) as refused:
            other.revoke(token)
        assert refused.value.code == ErrorCode.UNKNOWN_TOKEN
        opened = other.open_shared(token)  # still works: the revoke was refused
        opened.close()
        # The opened buffer (id 0) is not the opener's to release or share.
        for attempt in (lambda: other.release(0), lambda: other.share(0)):
            with pytest.raises(primed.ServerError) as not_yours:
                attempt()
            assert not_yours.value.code == ErrorCode.UNKNOWN_BUFFER
    client.revoke(token)
    with pytest.raises(primed.ServerError) as twice:
        client.revoke(token)
    assert twice.value.code == ErrorCode.UNKNOWN_TOKEN


def test_opened_buffers_outlive_the_owner(shared: Daemon) -> None:
    owner = primed.connect(shared.socket)
    buf = owner.allocate(64, 64, "AR24")
    expected = paint(buf, 2)
    token = owner.share(buf)
    with primed.connect(shared.socket) as other:
        opened = other.open_shared(token)
        owner.close()  # the owner goes: the token dies, what was opened stays
        buf.close()
        assert digest(opened) == expected
        opened.close()
        # The daemon hears of the disconnect in its own time: wait until it has.
        wait_for(lambda: len(other.clients()) == 1, "the owner's disconnect")
        with pytest.raises(primed.ServerError) as gone:
            other.open_shared(token)
        assert gone.value.code == ErrorCode.UNKNOWN_TOKEN


def test_share_needs_a_live_buffer_and_has_a_cap(client: primed.Client) -> None:
    with pytest.raises(primed.ServerError) as unknown:
        client.share(999)
    assert unknown.value.code == ErrorCode.UNKNOWN_BUFFER
    buf = client.allocate(16, 16)
    for _ in range(1024):
        client.share(buf)
    with pytest.raises(primed.ServerError) as capped:
        client.share(buf)
    assert capped.value.code == ErrorCode.LIMIT_EXCEEDED
    client.release(buf)  # the tokens die with it, and the cap is free again
    client.share(client.allocate(16, 16))


def test_tokens_are_freed_with_their_buffers(spawn: StartDaemon) -> None:
    daemon = spawn()
    with primed.connect(daemon.socket) as client:
        # Settled, then waited for: read from outside, the daemon's count may catch it
        # between two steps of its own (seen once on a loaded machine).
        before = settled_fds(daemon.pid)
        bufs = client.allocate_many(16, 16, "XR24", 10)
        tokens = [client.share(b) for b in bufs for _ in range(3)]
        client.release(*bufs)
        wait_for_fds(daemon.pid, before)
        for token in tokens[:3]:
            with pytest.raises(primed.ServerError):
                client.open_shared(token)


def test_query_describes_the_offer_and_our_use(spawn: StartDaemon) -> None:
    daemon = spawn("--max-count", "7")
    with primed.connect(daemon.socket) as client, primed.connect(daemon.socket) as other:
        offer = client.query()
        assert offer.backend == primed.Backend.MEMFD
        assert offer.limits.max_count == 7
        assert offer.modifiers == (formats.MOD_LINEAR,)
        table = {f.fourcc: (f.cpp, f.hsub, f.vsub) for f in formats.FORMATS.values()}
        assert {f.fourcc: (f.cpp, f.hsub, f.vsub) for f in offer.formats} == table
        assert (offer.used_buffers, offer.used_bytes) == (0, 0)
        bufs = client.allocate_many(64, 64, "XR24", 3)
        offer = client.query()
        assert (offer.used_buffers, offer.used_bytes) == (3, sum(b.size for b in bufs))
        # What another client opened is not charged to it.
        other.open_shared(client.share(bufs[0])).close()
        assert other.query().used_buffers == 0
        assert offer.describe()["used"] == {"buffers": 3, "bytes": offer.used_bytes}


def test_blocking_client_pipelines(client: primed.Client) -> None:
    pending = [client.start_allocate_many(16 * (i + 1), 16, "XR24", 2) for i in range(20)]
    single = client.start_allocate(8, 8)
    got = [p.wait() for p in reversed(pending)]  # answers arrive in order, are taken in any
    assert [bufs[0].width for bufs in got] == [16 * (i + 1) for i in reversed(range(20))]
    first = single.wait()
    assert isinstance(first, primed.Buffer) and first.width == 8
    everything = [b for bufs in got for b in bufs] + [first]
    assert client.start_release(*everything).wait() == 41
    for b in everything:
        b.close()


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM])
def test_direct_passing_between_processes(client: primed.Client, kind: int) -> None:
    buf = client.allocate(128, 96, "YU12")
    expected = paint(buf, 3)
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    with ours, theirs:
        primed.send_buffer(ours, buf)
        primed.send_buffer(ours, buf)  # two in a row: the receiver must not read past one
        code = """
import hashlib, socket, sys, primed
with socket.socket(fileno=int(sys.argv[1])) as channel:
    for _ in range(2):
        with primed.recv_buffer(channel) as buf, buf.map(write=False) as pixels:
            planes = [(p.offset, p.pitch) for p in buf.planes]
            print(buf.format, planes, hashlib.sha256(pixels).hexdigest())
"""
        out = run_client(code, str(theirs.fileno()), pass_fds=(theirs.fileno(),))
    planes = [(p.offset, p.pitch) for p in buf.planes]
    assert out.splitlines() == [f"YU12 {planes} {expected}"] * 2


async def test_direct_passing_with_trio(shared: Daemon) -> None:
    async with primed.connect_async(shared.socket) as client:
        buf = await client.allocate(32, 32)
        expected = paint(buf, 4)
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with a, b:
            await primed.send_buffer_async(a, buf)
            with await primed.recv_buffer_async(b) as got:
                assert digest(got) == expected and got.fd != buf.fd


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_malformed_direct_messages_close_what_arrived(client: primed.Client) -> None:
    buf = client.allocate(16, 16)
    good = protocol.encode(
        protocol.Passed(
            primed.Backend.MEMFD,
            protocol.BufferInfo(1, 16, 16, formats.fourcc("XR24"), 0, buf.size, ((0, 64),)),
        ),
        0,
    )
    before = _fds()
    for data, nfds in ((good + b"x", 1), (good, 2), (good[:20], 1), (good[:12] + b"\0" * 4, 1)):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with a, b:
            a.sendmsg([data], fdpass.rights([buf.fd] * nfds))
            with pytest.raises(primed.RemoteProtocolError):
                primed.recv_buffer(b)
    assert _fds() == before
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with b:
        with a:
            a.sendmsg([good[:30]], fdpass.rights([buf.fd]))
        with pytest.raises(primed.ConnectionLost):
            primed.recv_buffer(b)
    assert _fds() == before
