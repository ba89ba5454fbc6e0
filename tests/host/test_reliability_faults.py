"""Faults on the memfd backend: clients killed at random points, the daemon killed,
fd limits on either side, clients that stop reading, SIGTERM under load."""

from __future__ import annotations

import os
import random
import re
import resource
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

import primed
from primed import fdpass, formats
from primed.errors import ConnectionLost, ErrorCode, ServerError
from primed.wire import protocol
from primed.wire.schema import VERSION
from tests.host.conftest import StartDaemon
from tests.reliability import count, record, settled_registry
from tests.support import open_fds, settled_fds, wait_for, wait_for_fds

XR24 = formats.fourcc("XR24")
KILLS = count(200, 1000)


def _child(path: str, stage: str, ready: int, seed: int) -> None:
    """What a doomed client does before its SIGKILL (runs in a forked child)."""
    rng = random.Random(seed)
    if stage == "connecting":
        os.write(ready, b"r")
        client = primed.connect(path, name="doomed")
        while True:
            client.release(client.allocate(32, 32, "XR24"))
    client = primed.connect(path, name="doomed")
    if stage == "mid-request":
        os.write(ready, b"r")
        while True:
            bufs = client.allocate_many(32, 32, "XR24", rng.randrange(1, 4))
            client.share(bufs[0])
            client.release(*bufs)
    if stage == "replies unread":
        for _ in range(rng.randrange(1, 30)):
            client.start_allocate_many(16, 16, "XR24", rng.randrange(1, 5))
        os.write(ready, b"r")
    if stage == "holding mappings":
        bufs = client.allocate_many(64, 64, "XR24", rng.randrange(1, 6))
        views = [b.map().__enter__() for b in bufs]
        for view in views:
            view[:4] = b"\xff\x00\xff\x00"
        client.share(bufs[0], once=True)
        opened = client.open_shared(client.share(bufs[-1]))
        views.append(opened.map().__enter__())
        os.write(ready, b"r")
    time.sleep(3600)


STAGES = ("connecting", "mid-request", "replies unread", "holding mappings")


def test_clients_killed_at_random_points(spawn: StartDaemon) -> None:
    daemon = spawn()
    settled_registry(daemon.socket)
    baseline = settled_fds(daemon.pid)
    rng = random.Random()
    by_stage = dict.fromkeys(STAGES, 0)
    for n in range(KILLS):
        stage = STAGES[n % len(STAGES)]
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child never returns)
            try:
                os.close(read_end)
                _child(daemon.socket, stage, write_end, rng.randrange(2**32))
            finally:
                os._exit(0)
        os.close(write_end)
        try:
            assert os.read(read_end, 1) == b"r"
            if stage in ("connecting", "mid-request"):
                time.sleep(rng.random() * 0.01)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status), f"{stage}: the client exited by itself ({status})"
        finally:
            os.close(read_end)
        by_stage[stage] += 1
    assert daemon.process.poll() is None
    settled_registry(daemon.socket)
    wait_for_fds(daemon.pid, baseline, timeout=30)
    record(
        "clients killed with SIGKILL",
        "host",
        f"{KILLS:,} client processes killed: {by_stage}",
        "daemon alive; its fds, buffers, tokens and clients back at baseline",
        kills=KILLS,
    )


def test_daemon_killed_while_clients_hold_buffers(spawn: StartDaemon) -> None:
    daemon = spawn(name="a.sock")
    client = primed.connect(daemon.socket)
    bufs = client.allocate_many(128, 64, "XR24", 4)
    views = []
    for i, buf in enumerate(bufs):
        view = buf.map().__enter__()
        view[:] = bytes([i + 1]) * len(view)
        views.append(view)
    daemon.kill()
    for i, view in enumerate(views):  # still mapped, still ours
        assert bytes(view[:16]) == bytes([i + 1]) * 16
    for i, buf in enumerate(bufs):
        with buf.map(write=False) as again:
            assert again[len(again) - 1] == i + 1
    with pytest.raises(ConnectionLost, match="closed the connection"):
        client.allocate(16, 16, "XR24")
    client.close()
    back = spawn(name="a.sock")
    assert back.socket == daemon.socket
    with primed.connect(back.socket) as again:
        assert again.release(again.allocate(16, 16, "XR24")) == 1
    for view in views:
        view.release()
    for buf in bufs:
        buf.close()
    record(
        "daemon killed with SIGKILL (memfd)",
        "host",
        "4 buffers mapped and painted, then the daemon killed",
        "mappings and fds still read back the paint; the next call raises ConnectionLost; "
        "a new daemon on the same path serves a new connection",
        buffers=4,
    )


def test_daemon_at_its_fd_limit(spawn: StartDaemon, tmp_path: Path) -> None:
    # A memfd buffer holds one of the daemon's fds. With every quota off, the daemon-wide
    # bound (from RLIMIT_NOFILE, less the reserve) still refuses the allocation that would
    # take the daemon's last fds: it never meets EMFILE, and newcomers are still welcomed.
    config = tmp_path / "primed.toml"
    config.write_text("[quotas]\nbuffers_per_client = 0\nbuffers_per_uid = 0\n")
    daemon = spawn("--config", str(config), nofile=64)
    first = primed.connect(daemon.socket, name="first")
    held = []
    with pytest.raises(ServerError) as refused:
        for _ in range(100):
            held.append(first.allocate(16, 16, "XR24"))
    assert refused.value.code == ErrorCode.QUOTA_EXCEEDED, refused.value
    assert "daemon-wide" in refused.value.text and len(held) < 64
    late = [primed.connect(daemon.socket, name=f"late {n}") for n in range(3)]
    for client in late:
        assert client.query().used_buffers == 0
        client.close()
    assert first.query().used_buffers == len(held)
    assert first.release(*held) == len(held)
    first.close()
    assert "EMFILE" not in daemon.log() and "Too many open files" not in daemon.log()
    record(
        "daemon at its RLIMIT_NOFILE",
        "host",
        f"daemon run with 64 fds and every quota off; a client allocated until refused "
        f"(held {len(held)} buffers)",
        f"the daemon-wide bound refused the next one (QUOTA_EXCEEDED '{refused.value.text}') "
        "before the daemon ran out of fds; 3 newcomers were welcomed at once; no EMFILE "
        "anywhere in the log",
        buffers=len(held),
    )


def _truncated_child(path: str, report: int, disconnect: bool) -> None:
    client = primed.connect(path, name="at its limit")
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 4, hard))
    filler = []
    try:
        while True:
            filler.append(os.dup(0))
    except OSError:
        pass
    for fd in filler[:3]:  # room for exactly 3 of the 20
        os.close(fd)
    before = len(os.listdir("/proc/self/fd"))
    try:
        client.allocate_many(16, 16, "XR24", 20)
        os.write(report, b"no error")
        return
    except fdpass.Truncated as e:
        assert "MSG_CTRUNC" in str(e), e
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    after = len(os.listdir("/proc/self/fd"))
    assert after == before, f"{after - before} fds left open by the cut reply"
    if disconnect:
        os.write(report, b"ok")
        return
    held = [b.id for b in client.buffers()]
    assert len(held) == 20, held  # counted as delivered: still ours
    assert client.release(*held) == 20
    os.write(report, b"ok")


@pytest.mark.parametrize("then", ["release", "disconnect"])
def test_client_at_its_fd_limit(spawn: StartDaemon, then: str) -> None:
    daemon = spawn()
    settled_registry(daemon.socket)
    baseline = settled_fds(daemon.pid)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        try:
            os.close(read_end)
            _truncated_child(daemon.socket, write_end, then == "disconnect")
        except BaseException as e:
            os.write(write_end, repr(e).encode()[:500])
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        said = os.read(read_end, 1000)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert said == b"ok", said
    settled_registry(daemon.socket)
    wait_for_fds(daemon.pid, baseline)
    record(
        f"client at its RLIMIT_NOFILE, then {then}",
        "host",
        "a client with room for 3 more fds asked for 20 buffers",
        "the reply's fds are cut (MSG_CTRUNC): the library closes the 3 that arrived and "
        "raises Truncated; the daemon counts the 20 as delivered (the client lists and "
        "releases them / they are freed at disconnect); daemon fds at baseline",
        buffers=20,
    )


def test_client_that_never_reads(spawn: StartDaemon) -> None:
    daemon = spawn("--send-timeout", "0.5")
    settled_registry(daemon.socket)
    baseline = settled_fds(daemon.pid)
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    mute.connect(daemon.socket)
    mute.send(protocol.encode(protocol.Hello(VERSION, VERSION, "mute"), 1))
    mute.setblocking(False)
    asked = 0
    try:
        for serial in range(2, 2000):
            mute.send(protocol.encode(protocol.Allocate(16, 16, XR24, 1), serial))
            asked += 1
    except BlockingIOError:
        pass
    # The others are served meanwhile, and after.
    rounds = 0
    with primed.connect(daemon.socket, name="beside") as beside:
        deadline = time.monotonic() + 120
        while "read no reply" not in daemon.log() or rounds < 200:
            assert beside.release(beside.allocate(16, 16, "XR24")) == 1
            rounds += 1
            assert time.monotonic() < deadline, daemon.log()
    mute.close()
    pattern = r"'mute' .* disconnected; freed (\d+) buffer"
    wait_for(lambda: re.search(pattern, daemon.log()) is not None, "the mute client's end", 60)
    freed = re.search(pattern, daemon.log())
    assert freed is not None, daemon.log()
    delivered = int(freed[1])
    # SIOCOUTQ bound: about 16 KiB of unread small replies, some 20 of them.
    assert 1 <= delivered <= 64, delivered
    settled_registry(daemon.socket)
    wait_for_fds(daemon.pid, baseline)
    record(
        "client that never reads",
        "host",
        f"a client sent {asked} Allocates and read nothing; another did {rounds} round trips",
        f"the other was served throughout; the mute one was dropped after the send timeout "
        f"having had only {delivered} buffers made for it (the replies queued, unread); "
        "fds and registry at baseline",
        asked=asked,
        queued=delivered,
        rounds=rounds,
    )


def test_client_that_reads_too_slowly(spawn: StartDaemon) -> None:
    daemon = spawn("--send-timeout", "0.5")
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    slow.connect(daemon.socket)
    slow.settimeout(60)
    slow.send(protocol.encode(protocol.Hello(VERSION, VERSION, "slow"), 1))
    try:
        for serial in range(2, 200):
            slow.send(protocol.encode(protocol.Allocate(16, 16, XR24, 1), serial))
    except (BrokenPipeError, ConnectionResetError):
        pass  # dropped already: the replies it queued are unread
    reads = 0
    while True:
        try:
            data, fds = fdpass.recv(slow)
        except ConnectionResetError:  # dropped with our requests unread
            break
        fdpass.close_fds(fds)
        if not data:
            break
        reads += 1
        assert reads < 199, "the slow reader was never dropped"
        if "read no reply" in daemon.log():
            break
        if reads > 1:
            time.sleep(2)
    slow.close()
    wait_for(lambda: "read no reply" in daemon.log(), "the slow reader to be dropped", 60)
    record(
        "client that reads one reply every 2 s",
        "host",
        "198 requests sent, one reply read every 2 s, daemon --send-timeout 0.5",
        f"the daemon dropped it after it had read {reads} replies",
        reads=reads,
    )


def test_sigterm_with_requests_in_flight(spawn: StartDaemon, tmp_path: Path) -> None:
    config = tmp_path / "primed.toml"  # the workers, of one uid, hold more than its share
    config.write_text("[quotas]\nbuffers_per_client = 0\nbuffers_per_uid = 0\n")
    daemon = spawn("--config", str(config))
    workers = 4
    outcomes: dict[str, int] = {"answered": 0, "connection lost": 0}
    lock = threading.Lock()
    problems: list[BaseException] = []
    started = threading.Barrier(workers + 1)

    def work() -> None:
        try:
            client = primed.connect(daemon.socket)
        except BaseException as e:
            problems.append(e)
            raise
        started.wait()
        with client:
            try:
                while True:
                    bufs = client.allocate_many(32, 32, "XR24", 300)
                    assert len(bufs) == 300
                    for b in bufs:
                        b.close()
                    with lock:
                        outcomes["answered"] += 1
            except ConnectionLost:
                with lock:
                    outcomes["connection lost"] += 1
            except BaseException as e:
                problems.append(e)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    started.wait()
    wait_for(lambda: outcomes["answered"] >= workers, "some answers", timeout=60)
    log = daemon.stop()
    for t in threads:
        t.join(60)
    assert not problems, problems
    assert outcomes["connection lost"] == workers
    assert "freed" in log
    leftovers = [fd for fd, what in open_fds(os.getpid()).items() if "memfd:" in what]
    assert not leftovers, f"buffers of cut replies left open: {leftovers}"
    record(
        "SIGTERM with requests in flight",
        "host",
        f"{workers} clients allocating 300 buffers a request (two parts each) when SIGTERM came",
        f"{outcomes['answered']} requests answered whole, every client then saw "
        "ConnectionLost; no buffer of a cut reply left open; daemon exit 0, socket removed",
        **outcomes,
    )
