"""Isolation on the memfd backend: buffer ids are per client and a guess tells nothing;
tokens are unguessable, scoped, single-use and mortal, even for an opener the daemon
has to wait for; no buffer's pages reach a second client unless shared; a client of a
uid the policy refuses is refused at connect.

Root is an admin in these tests, so the non-admin client is a child process that
becomes uid nobody after importing primed and before connecting (SO_PEERCRED is taken
at connect time); the daemon's socket is in a directory every uid can traverse.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import primed
from primed import fdpass
from primed.errors import ErrorCode, ServerError
from primed.wire import protocol
from primed.wire.schema import VERSION
from tests.reliability import count, record, settled_registry
from tests.support import Daemon, run_client, settled_fds, start_daemon, wait_for, wait_for_fds

NOBODY = 65534

#: Prefix of every client run as uid nobody: sys.argv[1] is the daemon's socket.
AS_NOBODY = f"""
import json, os, sys, primed
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
"""


def as_nobody(code: str, *args: str, timeout: float = 120.0) -> dict[str, object]:
    """Run ``code`` (after AS_NOBODY) in a child of uid nobody; the JSON it printed."""
    assert os.getuid() == 0, "these tests need root, to run a client as another uid"
    result: dict[str, object] = json.loads(run_client(AS_NOBODY + code, *args, timeout=timeout))
    return result


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every uid may traverse, for a socket of mode 666."""
    directory = tempfile.mkdtemp(prefix="primed-", dir="/tmp")
    os.chmod(directory, 0o755)
    try:
        yield Path(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def open_daemon(open_dir: Path) -> Iterator[Daemon]:
    """A memfd daemon every uid may connect to."""
    daemon = start_daemon(open_dir / "open.sock", "--backend", "memfd", "--socket-mode", "666")
    try:
        yield daemon
    finally:
        daemon.stop()


def answer(call: Callable[[], object]) -> tuple[str, int, str]:
    """The Error a request must get: (code, errno, text)."""
    with pytest.raises(ServerError) as refused:
        call()
    return refused.value.code.name, refused.value.errno, refused.value.text


def paint(buf: primed.Buffer, seed: int) -> bytes:
    pattern = random.Random(seed).randbytes(buf.size)
    with buf.map() as pixels:
        pixels[:] = pattern
    return pattern


# --- buffer ids ---------------------------------------------------------------------------

IDS = count(64, 512)

# Holds two buffers of its own (ids 1 and 2), probes every id in argv[2:] with
# release and share, and every (client, id) pair of argv[...] with open_buffer.
PROBE_IDS = r"""
probes = json.loads(sys.argv[2])
pairs = json.loads(sys.argv[3])
seen = {"release": {}, "share": {}, "open_buffer": [], "open_shared": []}
with primed.connect(sys.argv[1], name="prober") as client:
    mine = client.allocate_many(16, 16, "XR24", 2)
    assert [b.id for b in mine] == [1, 2], [b.id for b in mine]
    for ident in probes:
        for what, call in (("release", client.release), ("share", client.share)):
            try:
                call(ident)
                seen[what][str(ident)] = "succeeded"
            except primed.ServerError as e:
                seen[what][str(ident)] = [e.code.name, e.errno, e.text]
    for number, ident in pairs:
        try:
            client.open_buffer(number, ident).close()
            seen["open_buffer"].append("opened")
        except primed.ServerError as e:
            seen["open_buffer"].append([e.code.name, e.errno, e.text])
    for _ in range(50):
        try:
            client.open_shared(os.urandom(16)).close()
            seen["open_shared"].append("opened")
        except primed.ServerError as e:
            seen["open_shared"].append([e.code.name, e.errno, e.text])
    seen["released own"] = client.release(*mine)
print(json.dumps(seen))
"""


def test_ids_are_per_client_and_a_guess_tells_nothing(open_daemon: Daemon) -> None:
    owner = primed.connect(open_daemon.socket, name="owner")
    bufs = owner.allocate_many(32, 32, "XR24", IDS)
    patterns = [paint(b, n) for n, b in enumerate(bufs)]
    for b in bufs[::4]:
        owner.share(b)
    (me,) = [c for c in owner.clients() if c.name == "owner"]
    held = {b.id for b in bufs}
    assert held == set(range(1, IDS + 1))
    # Ids 3..IDS exist for the owner only; past IDS, nowhere. Plus the edges.
    probes = [*range(3, 2 * IDS + 3), 0, 2**64 - 1]
    exists = [i for i in probes if i in held]
    nowhere = [i for i in probes if i not in held]

    # Another client of the same uid: the same answer, whether the id exists or not.
    timing: dict[bool, list[float]] = {True: [], False: []}
    with primed.connect(open_daemon.socket, name="same uid") as other:
        assert [b.id for b in other.allocate_many(16, 16, "XR24", 2)] == [1, 2]
        for ident in probes:
            for call in (other.release, other.share):
                started = time.perf_counter()
                got = answer(lambda: call(ident))  # noqa: B023 (called at once)
                timing[ident in held].append(time.perf_counter() - started)
                assert got == ("UNKNOWN_BUFFER", 0, f"unknown buffer id {ident}"), got
        assert other.release(1, 2) == 2  # its own 1 and 2, not the owner's

    # A client of another uid (not an admin): the same for release and share, and one
    # PERMISSION_DENIED for open_buffer (what `primed dump CLIENT:ID` sends) of any pair.
    pairs = [[me.number, i] for i in range(1, 2 * IDS + 1)]
    pairs += [[me.number + 1000, 1], [me.number + 1, 1], [0, 0], [2**32 - 1, 2**64 - 1]]
    seen = as_nobody(PROBE_IDS, open_daemon.socket, json.dumps(probes), json.dumps(pairs))
    for what in ("release", "share"):
        answers = seen[what]
        assert isinstance(answers, dict)
        for ident in probes:
            expected = ["UNKNOWN_BUFFER", 0, f"unknown buffer id {ident}"]
            assert answers[str(ident)] == expected, (what, ident, answers[str(ident)])
    opened = seen["open_buffer"]
    assert isinstance(opened, list) and len(opened) == len(pairs)
    assert {json.dumps(a) for a in opened} == {
        json.dumps(["PERMISSION_DENIED", 0, "only root and the admin group open other "
                    "clients' buffers"])
    }  # fmt: skip
    guessed = seen["open_shared"]
    assert isinstance(guessed, list)
    assert {tuple(a) for a in guessed} == {("UNKNOWN_TOKEN", 0, "no such token")}
    assert seen["released own"] == 2

    # The owner lost nothing: every buffer is still its own, with its pixels.
    assert owner.query().used_buffers == IDS
    for buf, pattern in zip(bufs, patterns, strict=True):
        with buf.map(write=False) as pixels:
            assert bytes(pixels) == pattern
    assert owner.release(*bufs) == IDS
    owner.close()
    settled_registry(open_daemon.socket)
    medians = {k: statistics.median(v) * 1e6 for k, v in timing.items()}
    record(
        "buffer ids are per client; guessing tells nothing",
        "host",
        f"an owner held {IDS} painted buffers (ids 1..{IDS}); a client of the same uid "
        f"and one of uid nobody (not an admin), each holding ids 1 and 2 of its own, "
        f"tried release and share on {len(exists)} ids the owner holds and "
        f"{len(nowhere)} held by nobody, open_buffer on {len(pairs)} (client, id) pairs, "
        "open_shared on 50 random tokens",
        "release and share answer UNKNOWN_BUFFER 'unknown buffer id N' alike for ids that "
        "exist for another client and ids that exist nowhere; open_buffer answers one and "
        "the same PERMISSION_DENIED to a non-admin for every pair; the probers' own 1 and "
        "2 were theirs; the owner kept all its buffers and pixels. Median answer: "
        f"{medians[True]:.0f} us for another's ids, {medians[False]:.0f} us for none "
        "(same uid, not asserted)",
        ids=IDS,
        probes=len(probes),
        pairs=len(pairs),
        median_us_existing=round(medians[True]),
        median_us_nowhere=round(medians[False]),
    )


# --- tokens -------------------------------------------------------------------------------

TOKENS = count(5_000, 100_000)
GUESSES = count(5_000, 100_000)


def test_tokens_are_unguessable(open_daemon: Daemon) -> None:
    owner = primed.connect(open_daemon.socket, name="owner")
    buf = owner.allocate(16, 16, "XR24")
    tokens: list[int] = []
    live: list[str] = []
    while len(tokens) < TOKENS:  # in batches under the cap of live tokens per client
        for t in live:
            owner.revoke(t)
        live = [owner.share(buf) for _ in range(min(1000, TOKENS - len(tokens)))]
        tokens += [int(t, 16) for t in live]
    assert len(set(tokens)) == TOKENS
    # Each of the 128 bits is set about half the time (within 6 sigma).
    sigma = 0.5 / TOKENS**0.5
    bias = max(abs(sum(t >> i & 1 for t in tokens) / TOKENS - 0.5) for i in range(128))
    assert bias < 6 * sigma, bias
    # No two tokens share their first 32 bits (a birthday clash is ~TOKENS^2/2^33).
    prefixes = Counter(t >> 96 for t in tokens)
    clashes = sum(n - 1 for n in prefixes.values())
    assert clashes <= 1 + TOKENS**2 // 2**31, clashes
    # Guesses from another client: random ones, and live tokens with one bit flipped.
    answers: Counter[tuple[str, int, str]] = Counter()
    rng = random.Random()
    with primed.connect(open_daemon.socket, name="guesser") as guesser:
        for n in range(GUESSES):
            if n % 2:
                guess = int(rng.choice(live), 16) ^ (1 << rng.randrange(128))
                token = guess.to_bytes(16, "big")
            else:
                token = rng.randbytes(16)
            answers[answer(lambda: guesser.open_shared(token))] += 1  # noqa: B023
        # ... and the live ones open.
        for t in live[:10]:
            guesser.open_shared(t).close()
    assert answers == Counter({("UNKNOWN_TOKEN", 0, "no such token"): GUESSES}), answers
    owner.close()
    settled_registry(open_daemon.socket)
    record(
        "share tokens are unguessable",
        "host",
        f"{TOKENS:,} tokens made; another client tried {GUESSES:,} guesses (half random, "
        "half a live token with one bit flipped)",
        f"all distinct; every bit set within 6 sigma of half the time (largest bias "
        f"{bias:.4f}, sigma {sigma:.4f}); {clashes} shared 32-bit prefixes; every guess "
        "got the one UNKNOWN_TOKEN answer, the live tokens opened",
        tokens=TOKENS,
        guesses=GUESSES,
        bias=round(bias, 5),
    )


# Opens each token of argv[2] (a JSON list) and prints what each got.
OPEN_TOKENS = r"""
got = []
with primed.connect(sys.argv[1], name="nobody") as client:
    for token in json.loads(sys.argv[2]):
        try:
            buf = client.open_shared(token)
            with buf, buf.map(write=False) as pixels:
                got.append(bytes(pixels[:8]).hex())
        except primed.ServerError as e:
            got.append([e.code.name, e.errno, e.text])
print(json.dumps({"got": got}))
"""


def test_tokens_scoped_by_uid(open_daemon: Daemon) -> None:
    with primed.connect(open_daemon.socket, name="owner") as owner:
        buf = owner.allocate(16, 16, "XR24")
        head = paint(buf, 1)[:8].hex()
        for_nobody = owner.share(buf, uids=[NOBODY])
        for_root = owner.share(buf, uids=[0])
        for_both = owner.share(buf, uids=[0, NOBODY])
        wrong = os.urandom(16).hex()
        seen = as_nobody(
            OPEN_TOKENS, open_daemon.socket, json.dumps([for_nobody, for_root, for_both, wrong])
        )
        refused = ["UNKNOWN_TOKEN", 0, "no such token"]
        assert seen["got"] == [head, refused, head, refused], seen
        with primed.connect(open_daemon.socket, name="root") as other:
            assert answer(lambda: other.open_shared(for_nobody)) == tuple(refused)
            other.open_shared(for_root).close()
            other.open_shared(for_both).close()
    record(
        "tokens scoped by uid",
        "host",
        "tokens for uid nobody, for root, for both, and a random one; opened by a client "
        "of uid nobody and one of root",
        "each uid opens exactly the tokens that name it (reading the owner's pixels); a "
        "token for another uid gets the same UNKNOWN_TOKEN as a random one",
    )


RACES = count(30, 300)
RACERS = 8


def test_single_use_tokens_under_a_race(open_daemon: Daemon) -> None:
    owner = primed.connect(open_daemon.socket, name="owner")
    buf = owner.allocate(16, 16, "XR24")
    racers = [primed.connect(open_daemon.socket, name=f"racer {n}") for n in range(RACERS)]
    winners: Counter[int] = Counter()
    problems: list[BaseException] = []
    for _ in range(RACES):
        token = owner.share(buf, once=True)
        gate = threading.Barrier(RACERS)
        won: list[int] = []

        def race(
            n: int, token: str = token, gate: threading.Barrier = gate, won: list[int] = won
        ) -> None:
            gate.wait()
            try:
                racers[n].open_shared(token).close()
                won.append(n)
            except ServerError as e:
                if e.code != ErrorCode.UNKNOWN_TOKEN:
                    problems.append(e)
            except BaseException as e:
                problems.append(e)

        threads = [threading.Thread(target=race, args=(n,)) for n in range(RACERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not problems, problems
        assert len(won) == 1, won
        winners[won[0]] += 1
    for racer in racers:
        racer.close()
    owner.close()
    settled_registry(open_daemon.socket)
    record(
        "single-use tokens under a race",
        "host",
        f"{RACES} single-use tokens, each raced for by {RACERS} clients at once",
        f"exactly one opener per token, the rest UNKNOWN_TOKEN (wins by racer: "
        f"{dict(sorted(winners.items()))})",
        races=RACES,
        racers=RACERS,
    )


class Stalled:
    """A raw client with about 40 Query replies unread, so that the daemon must wait
    (over 16 KiB unread) before it sends this client any fd."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.sock.send(protocol.encode(protocol.Hello(VERSION, VERSION, "stalled"), 1))
        _, fds = fdpass.recv(self.sock)
        fdpass.close_fds(fds)
        for serial in range(2, 42):
            self.sock.send(protocol.encode(protocol.Query(), serial))

    def ask(self, request: protocol.Request) -> None:
        self.sock.send(protocol.encode(request, 100))

    def drain(self) -> tuple[protocol.Message, list[int]]:
        """Read every reply; the one to the last request, with its fds (the caller's)."""
        while True:
            data, fds = fdpass.recv(self.sock)
            assert data, "the daemon hung up"
            serial, reply = protocol.decode(data, len(fds), "reply")
            if serial == 100:
                return reply, fds
            fdpass.close_fds(fds)

    def close(self) -> None:
        self.sock.close()


def test_tokens_die_for_an_opener_the_daemon_waits_for(open_daemon: Daemon) -> None:
    # An OPEN_SHARED the daemon can't answer yet (its client has too much unread) must
    # see the token as it is when the answer goes: used up, revoked, or dead with its
    # buffer, whose memfd's fd number another client's buffer or socket may have taken.
    path = open_daemon.socket
    no_token = protocol.Error(ErrorCode.UNKNOWN_TOKEN, 0, "no such token")
    outcomes = {}
    with primed.connect(path, name="owner") as owner:
        buf = owner.allocate(64, 64, "XR24")
        for case in ("used up", "revoked", "released", "owner gone"):
            owning = owner if case != "owner gone" else primed.connect(path, name="leaving")
            target = buf if case != "owner gone" else owning.allocate(64, 64, "XR24")
            token = owning.share(target, once=case == "used up")
            stalled = Stalled(path)
            stalled.ask(protocol.OpenShared(bytes.fromhex(token)))
            wait_for(lambda: len(owner.clients()) >= 2, "the stalled client")
            time.sleep(0.2)  # its request waits in the daemon now
            newcomers = []
            if case == "used up":
                with primed.connect(path, name="first") as first:
                    first.open_shared(token).close()
            elif case == "revoked":
                owner.revoke(token)
            else:
                if case == "released":
                    owner.release(buf)
                else:
                    owning.close()
                    wait_for(lambda: len(owner.clients()) == 2, "the owner's disconnect")
                # Take the freed fd number, with a socket and with a painted buffer.
                for n in range(3):
                    newcomer = primed.connect(path, name=f"newcomer {n}")
                    newcomers.append(newcomer)
                    paint(newcomer.allocate(64, 64, "XR24"), 100 + n)
            reply, fds = stalled.drain()
            fdpass.close_fds(fds)
            stalled.close()
            assert (reply, fds) == (no_token, []), (case, reply, len(fds))
            outcomes[case] = "UNKNOWN_TOKEN"
            for newcomer in newcomers:
                newcomer.close()
            if case == "released":
                buf = owner.allocate(64, 64, "XR24")
    settled_registry(path)
    assert "internal error" not in open_daemon.log()
    record(
        "tokens die for an opener the daemon waits for",
        "host",
        "an OPEN_SHARED held up in the daemon (its client had 40 replies unread) while the "
        "token was used up by another client, revoked, its buffer released, or its owner "
        "disconnected (then new clients took the freed fd numbers)",
        "each stalled opener got UNKNOWN_TOKEN and no fd, once it read on; no internal "
        "error in the log (before the fix in primed/daemon/server.py it got the buffer in all "
        "four cases, or whatever had taken the freed fd number)",
        **outcomes,
    )


# --- pages never reach a second client ----------------------------------------------------

FRESH = count(3_000, 30_000)
SIZES = ((16, 16, "XR24"), (64, 64, "XR24"), (256, 256, "XR24"), (320, 240, "NV12"))


def test_fresh_buffers_are_always_zeroed(open_daemon: Daemon) -> None:
    baseline = settled_fds(open_daemon.pid)
    rng = random.Random()
    clients = [primed.connect(open_daemon.socket, name=f"writer {n}") for n in range(4)]
    held: list[list[primed.Buffer]] = [[] for _ in clients]
    inodes: set[int] = set()
    checked = painted_bytes = 0
    while checked < FRESH:
        n = rng.randrange(len(clients))
        width, height, code = rng.choice(SIZES)
        for buf in clients[n].allocate_many(width, height, code, rng.randrange(1, 4)):
            inode = os.fstat(buf.fd).st_ino
            assert inode not in inodes, "a buffer came back"
            inodes.add(inode)
            with buf.map() as pixels:
                assert not any(pixels), f"buffer {checked} is not zeroed"
                pixels[:] = bytes([rng.randrange(1, 256)]) * len(pixels)
                painted_bytes += len(pixels)
            held[n].append(buf)
            checked += 1
        while len(held[n]) > 6:  # release the oldest ones, painted
            clients[n].release(held[n].pop(rng.randrange(len(held[n]))))
    for client in clients:
        client.close()
    settled_registry(open_daemon.socket)
    wait_for_fds(open_daemon.pid, baseline)
    record(
        "fresh buffers are always zeroed (memfd)",
        "host",
        f"4 clients allocated {checked:,} buffers of 4 sizes, painted each with a "
        f"non-zero byte ({painted_bytes / 2**20:.0f} MiB in all) and released them in "
        "random order while the others allocated",
        "every fresh buffer read as all zeroes; no buffer (memfd inode) was handed out twice",
        buffers=checked,
        painted_mib=round(painted_bytes / 2**20),
    )


# --- policy -------------------------------------------------------------------------------

REFUSALS = count(20, 200)

# Tries to connect argv[2] times; prints what each attempt got.
TRY_CONNECT = r"""
seen = []
for _ in range(int(sys.argv[2])):
    try:
        primed.connect(sys.argv[1]).close()
        seen.append("admitted")
    except primed.ServerError as e:
        seen.append([e.code.name, e.text])
print(json.dumps({"seen": seen, "pid": os.getpid()}))
"""


def test_other_uid_refused_at_connect(open_dir: Path) -> None:
    # tests/host/test_policy.py checks the refusal itself (serial 0, before HELLO, the
    # log line naming pid, uid and gid); here the refused client is of another uid.
    config = open_dir / "primed.toml"
    config.write_text("[access]\nallowed_uids = [0]\n")
    daemon = start_daemon(
        open_dir / "policy.sock", "--backend", "memfd", "--socket-mode", "666",
        "--config", str(config),
    )  # fmt: skip
    try:
        with primed.connect(daemon.socket, name="root") as root:
            buf = root.allocate(16, 16, "XR24")
            seen = as_nobody(TRY_CONNECT, daemon.socket, str(REFUSALS))
            assert root.release(buf) == 1  # still served
            refused = root.stats().counters
    finally:
        log = daemon.stop()
    reason = f"uid {NOBODY} is not allowed to use this daemon"
    assert seen["seen"] == [["PERMISSION_DENIED", reason]] * REFUSALS, seen
    line = f"refused a client (pid {seen['pid']}, uid {NOBODY}, gid {NOBODY}): {reason}"
    # The log is rate-limited per uid (a burst of 5 per 10 s, then held back and counted:
    # tests/host/test_adversarial.py has the loop that proves it); the stats count all.
    written = log.count(line + "\n")
    assert 1 <= written <= 5, log[-2000:]
    assert (3, 2, REFUSALS) in refused
    record(
        "a refused uid is refused at connect, and logged",
        "host",
        f"policy admits uid 0 only; a client of uid nobody tried to connect {REFUSALS} "
        "times beside an admitted root client (refusal details: tests/host/test_policy.py)",
        f"each attempt got PERMISSION_DENIED '{reason}'; the log names pid, uid and gid "
        f"{written} times (rate-limited per uid); stats count {REFUSALS} refusals; the root "
        "client was served",
        attempts=REFUSALS,
    )


# --- no holder's file flags reach another ---------------------------------------------------

# Opens the buffer shared as argv[2], sets O_APPEND on its fd and tries to resize it or
# add a seal; prints what the kernel said and the fd's flags.
HOSTILE_HOLDER = r"""
import errno, fcntl
with primed.connect(sys.argv[1], name="hostile") as client:
    buf = client.open_shared(sys.argv[2])
    fd = buf.fd
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
    tried = {}
    for what, call in (
        ("shrink", lambda: os.ftruncate(fd, 0)),
        ("grow", lambda: os.ftruncate(fd, buf.size * 2)),
        ("seal", lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)),
    ):
        try:
            call()
            tried[what] = "done"
        except OSError as e:
            tried[what] = errno.errorcode[e.errno]
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    print(json.dumps({"tried": tried, "flags": flags, "seals": fcntl.fcntl(fd, fcntl.F_GET_SEALS)}))
    buf.close()
"""


def test_a_holders_file_flags_stay_its_own(open_daemon: Daemon) -> None:
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    with primed.connect(open_daemon.socket, name="owner") as owner:
        buf = owner.allocate(64, 64, "XR24")
        token = owner.share(buf)
        mine = owner.open_shared(token)  # a second delivery to the same client
        hostile = as_nobody(HOSTILE_HOLDER, open_daemon.socket, owner.share(buf))
        assert hostile["flags"] & os.O_APPEND  # type: ignore[operator]
        assert hostile["tried"] == {"shrink": "EPERM", "grow": "EPERM", "seal": "EPERM"}
        assert hostile["seals"] == seals
        for fd in (buf.fd, mine.fd):
            assert os.pwrite(fd, b"still mine", 0) == 10
            assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == seals
        fcntl.fcntl(mine.fd, fcntl.F_SETFL, fcntl.fcntl(mine.fd, fcntl.F_GETFL) | os.O_APPEND)
        assert os.pwrite(buf.fd, b"and again", 0) == 9
        assert os.pread(mine.fd, 9, 0) == b"and again"
        assert fcntl.fcntl(mine.fd, fcntl.F_GETFL) != fcntl.fcntl(buf.fd, fcntl.F_GETFL)
        assert os.fstat(buf.fd).st_size == buf.size
        mine.close()
        owner.release(buf)
    record(
        "a holder's file flags stay its own (memfd)",
        "host",
        "a client of uid nobody opened a shared buffer, set O_APPEND on its fd and tried "
        "to shrink, grow and seal it; the owner's two deliveries (ALLOCATE, OPEN_SHARED) "
        "then wrote at offset 0",
        "the owner's pwrite at offset 0 worked on both fds and their flags stayed without "
        "O_APPEND; shrink, grow and F_ADD_SEALS got EPERM; the seals were unchanged",
    )
