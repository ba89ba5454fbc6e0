"""Shared by the reliability tests of both tiers: their counts, their record of what
they did, a fuzzer that talks to a live daemon, and a client that must never fail.

Counts are reduced unless $PRIMED_FULL is 1. With $PRIMED_RESULTS set to a folder,
each test appends what it did and checked to ``results.jsonl`` there, which
``scripts/reliability`` turns into RELIABILITY.md.
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import primed
from primed import fdpass, formats
from primed.errors import ErrorCode, RemoteProtocolError
from primed.wire import protocol
from primed.wire.schema import MAX_FDS, MAX_MESSAGE, TOKEN_SIZE, VERSION, Opcode

FULL = os.environ.get("PRIMED_FULL") == "1"
VECTORS = Path(__file__).parents[1] / "protocol" / "vectors"
HEADER = struct.Struct("<HHII")  # opcode, nfds, size, serial


def count(reduced: int, full: int) -> int:
    """``full`` with $PRIMED_FULL=1, else ``reduced``."""
    return full if FULL else reduced


def record(test: str, tier: str, did: str, checked: str, **figures: object) -> None:
    """Note what ``test`` did and checked, with its figures, for the report."""
    folder = os.environ.get("PRIMED_RESULTS")
    if not folder:
        return
    entry = {"test": test, "tier": tier, "full": FULL, "did": did, "checked": checked}
    entry["figures"] = figures
    with open(os.path.join(folder, "results.jsonl"), "a") as out:
        out.write(json.dumps(entry) + "\n")


def record_attack(
    attack: str, tier: str, config: str, counts: str, victim: str, result: str, **figures: object
) -> None:
    """Note one adversarial attack for the report's table of attacks: what the attacker
    did (``counts``), the victim's p50/p99 against its baseline, and the verdict, which
    is recorded before it is asserted (so a failed attack has its row too)."""
    folder = os.environ.get("PRIMED_RESULTS")
    if not folder:
        return
    entry = {
        "attack": attack, "tier": tier, "config": config, "full": FULL, "counts": counts,
        "victim": victim, "result": result, "figures": figures,
        "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0],
    }  # fmt: skip
    with open(os.path.join(folder, "results.jsonl"), "a") as out:
        out.write(json.dumps(entry) + "\n")


def stats(path: str) -> protocol.Statistics:
    """The daemon's counters, as an admin-less client sees them (root sees all)."""
    with primed.connect(path, name="stats") as client:
        return client.stats()


def settled_registry(path: str, timeout: float = 30.0) -> protocol.Statistics:
    """Stats once only the asking client is connected and nothing is held (else fail)."""
    deadline = time.monotonic() + timeout
    while True:
        now = stats(path)
        if (now.clients, now.buffers, now.tokens, now.held_bytes) == (1, 0, 0, 0):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"the registry never emptied: {now}")
        time.sleep(0.05)


# --- what the fuzzer sends -----------------------------------------------------------------

REQUEST_VECTORS = [
    (VECTORS / entry["file"]).read_bytes()
    for entry in json.loads((VECTORS / "vectors.json").read_text())["vectors"]
    if entry["direction"] == "request"
]
_EDGES32 = (0, 1, 2, 15, 16, 255, 256, 4095, 4096, 16383, 16384, 16385, 2**31 - 1, 2**31, 2**32 - 1)
_FOURCCS = [f.fourcc for f in formats.FORMATS.values()]


def _u32(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.4:
        return rng.choice(_EDGES32)
    if roll < 0.8:
        return rng.randrange(0, 70)
    return rng.getrandbits(32)


def schema_request(rng: random.Random) -> protocol.Request:
    """A well-formed request with fields anywhere in their range, edges often."""
    kind = rng.randrange(10)
    token = rng.randbytes(TOKEN_SIZE)
    if kind == 0:
        return protocol.Hello(rng.randrange(3), rng.randrange(3), "f" * rng.randrange(8))
    if kind in (1, 2):
        fourcc = rng.choice(_FOURCCS) if rng.random() < 0.7 else _u32(rng)
        count_ = rng.choice((1, 1, 2, 3, 0, 9, 300)) if rng.random() < 0.9 else _u32(rng)
        flags = 0 if rng.random() < 0.9 else _u32(rng)
        return protocol.Allocate(_u32(rng), _u32(rng), fourcc, count_, flags)
    if kind == 3:
        ids = [rng.choice((0, 1, 2, 3, 2**64 - 1)) for _ in range(rng.randrange(5))]
        return protocol.Release(tuple(ids))
    if kind == 4:
        uids = tuple(rng.choice((0, 1000, 2**32 - 1)) for _ in range(rng.randrange(4)))
        return protocol.Share(rng.randrange(5), rng.random() < 0.5, uids)
    if kind == 5:
        return protocol.OpenShared(token)
    if kind == 6:
        return protocol.Revoke(token)
    if kind == 7:
        return protocol.Query()
    if kind == 8:
        return protocol.List(rng.randrange(4), rng.choice((0, 1, 2**32 - 1)))
    return protocol.OpenBuffer(rng.randrange(4), rng.randrange(4))


def mutate(rng: random.Random, data: bytes) -> bytes:
    """``data`` with one to a few random edits: bits, bytes, lengths, header fields."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        edit = rng.randrange(7)
        if edit == 0 and buf:
            at = rng.randrange(len(buf))
            buf[at] ^= 1 << rng.randrange(8)
        elif edit == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif edit == 2:
            del buf[rng.randrange(len(buf) + 1) :]
        elif edit == 3:
            buf += rng.randbytes(rng.choice((1, 2, 4, 8, 72, rng.randrange(300))))
        elif edit == 4 and len(buf) >= HEADER.size:
            field = rng.randrange(4)
            values = list(HEADER.unpack_from(buf))
            values[field] = rng.choice((0, 1, 2, 253, 254, 0xFFFF, len(buf), rng.getrandbits(16)))
            if field in (2, 3):
                values[field] = rng.choice((0, 1, len(buf) - HEADER.size, 2**32 - 1, values[field]))
            buf[: HEADER.size] = HEADER.pack(*values)
        elif edit == 5 and len(buf) > HEADER.size:
            at = rng.randrange(HEADER.size, len(buf))
            buf[at:at] = rng.randbytes(rng.randrange(1, 9))
        elif len(buf) > HEADER.size:
            start = rng.randrange(HEADER.size, len(buf))
            del buf[start : start + rng.randrange(1, 9)]
    return bytes(buf)


def fix_size(data: bytes) -> bytes:
    """``data`` with its header's size field telling the truth (so the body is what's judged)."""
    if len(data) < HEADER.size:
        return data
    opcode, nfds, _, serial = HEADER.unpack_from(data)
    return HEADER.pack(opcode, nfds, len(data) - HEADER.size, serial) + data[HEADER.size :]


def fuzz_datagram(rng: random.Random, serial: int) -> tuple[str, bytes]:
    """One datagram for the daemon, and the name of the strategy that made it."""
    roll = rng.randrange(100)
    if roll < 30:
        data = protocol.encode(schema_request(rng), serial)
        return "schema", data
    if roll < 55:
        data = mutate(rng, rng.choice(REQUEST_VECTORS))
        return "vector mutation", fix_size(data) if rng.random() < 0.5 else data
    if roll < 70:
        data = mutate(rng, protocol.encode(schema_request(rng), serial))
        return "schema mutation", fix_size(data) if rng.random() < 0.5 else data
    if roll < 78:
        opcode = rng.choice(
            (0, 0x000B, 0x00FF, 0x0100, 0x7FFF, 0x8000, 0x8002, rng.getrandbits(16))
        )
        if opcode in protocol.REQUESTS:
            opcode = 0x0777
        body = rng.randbytes(rng.randrange(40))
        return "unknown opcode", HEADER.pack(opcode, 0, len(body), serial) + body
    if roll < 86:
        data = protocol.encode(schema_request(rng), serial)
        nfds = rng.choice((1, 2, 253, 254, 0xFFFF))
        return "fd count mismatch", HEADER.pack(
            *HEADER.unpack_from(data)[:1], nfds, *HEADER.unpack_from(data)[2:]
        ) + data[HEADER.size :]
    if roll < 92:
        return "random bytes", rng.randbytes(
            rng.choice((1, 3, 11, 12, 13, 20, 32, rng.randrange(200)))
        )
    if roll < 94:
        size = rng.choice((MAX_MESSAGE - HEADER.size, MAX_MESSAGE + 100))
        return "oversize", HEADER.pack(Opcode.RELEASE, 0, size, serial) + bytes(size)
    if roll < 95:
        return "empty datagram", b""
    return "valid allocate", protocol.encode(protocol.Allocate(16, 16, _FOURCCS[0], 2), serial)


FdKind = Callable[[], list[int]]


class Fuzzer:
    """Sends fuzzed datagrams to a live daemon, one at a time, and judges each answer.

    Every datagram must get an Error or a well-formed reply to its serial (or serial
    0), or the connection must end; anything else raises AssertionError. ``fd_kinds``
    (name -> a function returning fresh fds) attaches fds to some datagrams.
    """

    def __init__(self, path: str, seed: int, fd_kinds: dict[str, FdKind] | None = None):
        self.path = path
        self.rng = random.Random(seed)
        self.fd_kinds = fd_kinds or {}
        self.sock: socket.socket | None = None
        self.serial = 0
        self.sent: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(60)
        sock.connect(self.path)
        if self.rng.random() < 0.9:
            sock.send(protocol.encode(protocol.Hello(VERSION, VERSION, "fuzzer"), 1))
            self._answers(sock, 1)
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _answers(self, sock: socket.socket, serial: int) -> str:
        """Read the whole answer to ``serial``: its outcome's name."""
        while True:
            try:
                data, fds = fdpass.recv(sock)
            except ConnectionResetError:
                return "dropped"
            if not data and not fds:
                return "dropped"
            try:
                got, reply = protocol.decode(data, len(fds), "reply")
            except RemoteProtocolError as e:
                raise AssertionError(f"the daemon sent a malformed reply: {e}: {data!r}") from e
            finally:
                fdpass.close_fds(fds)
            assert got in (serial, 0), f"reply to {got}, expected {serial}: {reply}"
            if isinstance(reply, protocol.Allocated):
                if reply.index + len(reply.buffers) < reply.total:
                    continue
                return "answered"
            if isinstance(reply, protocol.Error):
                if reply.code == ErrorCode.BAD_MESSAGE:
                    tail, more = fdpass.recv(sock)
                    fdpass.close_fds(more)
                    assert not tail and not more, "a BAD_MESSAGE must end the connection"
                    return "bad message, dropped"
                return f"error {ErrorCode(reply.code).name}"
            return "answered"

    def one(self) -> None:
        self.serial = self.serial % 0xFFFFFFF0 + 2
        how, data = fuzz_datagram(self.rng, self.serial)
        fds: list[int] = []
        if self.fd_kinds and self.rng.random() < 0.15:
            name = self.rng.choice(sorted(self.fd_kinds))
            fds = self.fd_kinds[name]()
            how = f"fds: {name}"
        self.send(how, data, fds)

    def send(self, how: str, data: bytes, fds: list[int] | None = None) -> None:
        """Send ``data`` (with ``fds``, which are closed here) and judge the answer."""
        fds = fds or []
        if self.sock is None:
            try:
                self.sock = self._connect()
            except BaseException:
                fdpass.close_fds(fds)
                raise
        serial = HEADER.unpack_from(data)[3] if len(data) >= HEADER.size else 0
        self.sent[how] += 1
        try:
            self.sock.sendmsg([data], fdpass.rights(fds))
        except OSError as e:
            # EPERM: SO_PASSRIGHTS refused our fds; EMSGSIZE: over the socket's limit;
            # EPIPE, ECONNRESET: the daemon had dropped us already.
            if e.errno not in (errno.EPERM, errno.EMSGSIZE, errno.EPIPE, errno.ECONNRESET):
                raise
            self.outcomes[f"send {errno.errorcode[e.errno or 0]}"] += 1
            if e.errno in (errno.EPIPE, errno.ECONNRESET):
                self.close()
            return
        finally:
            fdpass.close_fds(fds)
        if not data and not fds:
            outcome = self._answers(self.sock, serial)
            assert outcome == "dropped", outcome
        else:
            outcome = self._answers(self.sock, serial)
        self.outcomes[outcome] += 1
        if outcome.endswith("dropped"):
            self.close()

    def run(self, messages: int) -> None:
        try:
            for _ in range(messages):
                self.one()
        finally:
            self.close()


# --- a client that must never fail ----------------------------------------------------------

#: Run as ``python -c WELL_BEHAVED SOCKET``: allocates, paints, shares, opens, checks,
#: releases, queries, until stdin closes; prints {"rounds": n} and exits 0, or fails.
WELL_BEHAVED = r"""
import hashlib, json, os, select, sys
import primed
rounds = 0
with primed.connect(sys.argv[1], name="well-behaved") as client:
    while not select.select([sys.stdin], [], [], 0)[0]:
        count = rounds % 3 + 1
        bufs = client.allocate_many(64, 32, "XR24", count)
        assert len(bufs) == count and all(b.id > 0 for b in bufs), bufs
        for i, buf in enumerate(bufs):
            with buf.map() as pixels:
                assert bytes(pixels[:64]) == bytes(64), "a fresh buffer is not zeroed"
                pixels[:8] = (rounds * 8 + i).to_bytes(8, "little")
        token = client.share(bufs[0], once=True)
        other = client.open_shared(token)
        with other.map(write=False) as pixels:
            assert bytes(pixels[:8]) == (rounds * 8).to_bytes(8, "little")
        other.close()
        offer = client.query()
        assert offer.used_buffers == count, (offer.used_buffers, count)
        assert client.release(*bufs) == count
        rounds += 1
print(json.dumps({"rounds": rounds}), flush=True)
"""


def fd_sources() -> dict[str, FdKind]:
    """Fds of kinds no request should carry."""

    def pipe() -> list[int]:
        return list(os.pipe())

    def sock() -> list[int]:
        a, b = socket.socketpair()
        return [a.detach(), b.detach()]

    def memfd() -> list[int]:
        return [os.memfd_create("fuzz", os.MFD_CLOEXEC)]

    def hundreds() -> list[int]:
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        try:
            return [os.dup(fd) for _ in range(MAX_FDS)]
        finally:
            os.close(fd)

    return {"pipe": pipe, "socket": sock, "memfd": memfd, f"{MAX_FDS} fds": hundreds}


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# --- load ---------------------------------------------------------------------------------

#: Run as ``python -c LOAD SOCKET CONNECTIONS HELD ROUNDS SEED``: opens CONNECTIONS
#: clients holding HELD buffers each, says "ready", waits for a line, then does
#: ROUNDS rounds on random clients (release one buffer and allocate another; every
#: 4th round share it once and open it from another client; every 8th a query),
#: timing every request; prints its latencies and holds everything until stdin closes.
LOAD = r"""
import json, random, sys, time
import primed
path, conns, held, rounds, seed = sys.argv[1], *map(int, sys.argv[2:])
rng = random.Random(seed)
latencies, setup = [], []

def timed(call, *args, **kwargs):
    started = time.perf_counter()
    result = call(*args, **kwargs)
    latencies.append(time.perf_counter() - started)
    return result

clients = []
for n in range(conns):
    started = time.perf_counter()
    client = primed.connect(path, name=f"load {seed}:{n}")
    bufs = client.allocate_many(64, 64, "XR24", held)
    setup.append(time.perf_counter() - started)
    assert len(bufs) == held
    clients.append((client, bufs))
print("ready", flush=True)
sys.stdin.readline()
requests = 0
started = time.perf_counter()
for r in range(rounds):
    client, bufs = rng.choice(clients)
    i = rng.randrange(held)
    assert timed(client.release, bufs[i]) == 1
    bufs[i] = timed(client.allocate, 64, 64, "XR24")
    requests += 2
    if r % 4 == 0:
        token = timed(client.share, bufs[i], once=True)
        other = rng.choice(clients)[0]
        timed(other.open_shared, token).close()
        requests += 2
    if r % 8 == 0:
        assert timed(client.query).used_buffers == held
        requests += 1
elapsed = time.perf_counter() - started
for client, bufs in clients:
    assert client.query().used_buffers == held
print(json.dumps({"requests": requests, "elapsed": elapsed, "latencies": latencies,
                  "setup": setup}), flush=True)
sys.stdin.readline()
for client, _ in clients:
    client.close()
"""


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def run_load(workers: Sequence[subprocess.Popen[str]], timeout: float) -> tuple[list[Any], float]:
    """Tell every ready LOAD worker to go; return each one's JSON result, and the wall time."""
    started = time.monotonic()
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    results = []
    for worker in workers:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        assert line, f"a load client failed: {worker.communicate(timeout=timeout)[1]}"
        results.append(json.loads(line))
    return results, time.monotonic() - started
