"""Buffers named for their owner, on the host: the label's format, what a refused name
costs (nothing but a count and a rate-limited log line), the id the core names a buffer
with, and memfd daemons as real processes whose clients read their buffers' names back.

The dma-buf side (DMA_BUF_SET_NAME on vgem, virtio-gpu, the system heap and udmabuf) is
tests/kernel/test_names.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

import primed
from primed import fdpass, formats
from primed.daemon.core import Answer, Core, Delivery, Outcome
from primed.daemon.policy import Peer
from primed.daemon.sessions import Session
from primed.errors import ErrorCode, KernelError
from primed.formats import Format, Limits
from primed.kernel import dmabuf
from primed.kernel.allocation import Allocation, Owner
from primed.kernel.backends import (
    DMABUF_LABEL_LEN,
    MEMFD_NAME,
    MFD_NAME_MAX_LEN,
    DmabufFdBackend,
    MemfdBackend,
)
from primed.kernel.drm import Version
from primed.wire import protocol
from primed.wire.protocol import Allocate, Allocated, Error, Hello, Release, Reply, Request
from primed.wire.schema import HEADER, HELLO_HEAD, MAX_NAME, VERSION, Backend, Kind, Opcode
from tests.host.conftest import StartDaemon
from tests.support import Daemon, run_client

XR24 = formats.fourcc("XR24")

#: Names a client may give itself that try to break or spoof the label: colons that
#: would shift the fields, NUL and newlines (a NUL ends a C string, a newline would
#: start a line of its own in fdinfo), non-ASCII, and the longest the wire takes.
HOSTILE = (
    "0:0:1:root",
    ":::::",
    "x\x00y\nname:\tspoof",
    "ü" * 127,  # 254 bytes of UTF-8
    "\u202e\U0001f600 rtl",
    "a" * MAX_NAME,
    "0" * 200 + ":0:0",
)


def fields(label: str) -> list[str]:
    """A label split as its readers split it: prefix, uid, id, pid, then the name whole."""
    return label.split(":", 4)


# --- the label ----------------------------------------------------------------------------


def test_a_label_says_uid_id_pid_and_name() -> None:
    assert Owner(1000, 4242, 3, "weston").label(DMABUF_LABEL_LEN) == "primed:1000:3:4242:weston"
    assert Owner(1000, 4242, 3).label(DMABUF_LABEL_LEN) == "primed:1000:3:4242"
    # The name is cut to the room left; the daemon's fields never are.
    cut = Owner(1000, 1234567, 12, "gst-launch-1.0").label(DMABUF_LABEL_LEN)
    assert cut == "primed:1000:12:1234567:gst-laun"
    assert len(cut) == DMABUF_LABEL_LEN
    # The memfd limit keeps a long name whole.
    assert Owner(0, 1, 1, "a" * 200).label(MFD_NAME_MAX_LEN) == "primed:0:1:1:" + "a" * 200


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("limit", [DMABUF_LABEL_LEN, MFD_NAME_MAX_LEN])
def test_a_hostile_name_neither_breaks_nor_spoofs_the_label(name: str, limit: int) -> None:
    label = Owner(1000, 4242, 77, name).label(limit)
    assert len(label.encode()) <= limit and label.isascii() and label.isprintable(), label
    prefix, uid, ident, pid, *rest = fields(label)
    assert (prefix, uid, ident, pid) == ("primed", "1000", "77", "4242"), label
    (shown,) = rest  # a name is always shown, if only its first byte
    assert re.fullmatch(r"[A-Za-z0-9._-]+", shown), label
    assert len(shown) == min(len(name), limit - len("primed:1000:77:4242:"))


def test_the_daemons_fields_are_whole_or_absent() -> None:
    # The largest uid and a 13-digit id still fit 31 bytes, exactly; one digit more and
    # the id is left out (with the pid and the name after it), never cut to a wrong one.
    uid = (1 << 32) - 1
    assert Owner(uid, 4194304, 10**12, "x").label(31) == f"primed:{uid}:{10**12}"
    assert len(f"primed:{uid}:{10**12}") == 31
    assert Owner(uid, 4194304, 10**13, "x").label(31) == f"primed:{uid}"
    # No room for the pid whole: no pid, and no name either (it would sit in the pid's place).
    assert Owner(uid, 4194304, 10**6, "x").label(31) == f"primed:{uid}:{10**6}"
    assert Owner(uid, 42, 10**6, "xyz").label(31) == f"primed:{uid}:{10**6}:42:xy"


# --- a refused name ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_refused_name_is_counted_and_logged_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A memfd is no dma-buf: the kernel itself refuses DMA_BUF_SET_NAME on it (ENOTTY),
    # as a kernel without the ioctl does for a real one.
    fd = os.memfd_create("not-a-dmabuf", os.MFD_CLOEXEC)
    clock = Clock()
    namer = dmabuf.Namer("/dev/test", every=60.0, clock=clock)
    try:
        with caplog.at_level(logging.WARNING, "primed"):
            assert namer.name(fd, "primed:1:1:1") is False
            for _ in range(9):
                clock.now += 1
                assert namer.name(fd, "primed:1:2:1") is False
            assert namer.failures == {errno.ENOTTY: 10}
            first = [r.getMessage() for r in caplog.records]
            assert len(first) == 1, first
            assert "/dev/test: the kernel refused to name a buffer 'primed:1:1:1'" in first[0]
            assert os.strerror(errno.ENOTTY) in first[0]
            clock.now += 60
            namer.name(fd, "primed:1:3:1")
            lines = [r.getMessage() for r in caplog.records]
            assert len(lines) == 2, lines
            assert "10 more buffer(s) unnamed" in lines[1] and "11 in all" in lines[1]
            # Another errno is news: logged at once.
            namer.refused(errno.EBUSY, "primed:1:4:1")
            assert len(caplog.records) == 3
            assert namer.failures == {errno.ENOTTY: 11, errno.EBUSY: 1}
    finally:
        os.close(fd)


class Unnameable(DmabufFdBackend):
    """A dma-buf allocator as the daemon sees one, whose buffers the kernel will not name:
    they are memfds (DMA_BUF_SET_NAME: ENOTTY). It records every owner it was given."""

    kind = Backend.DRM
    allocator_kind = Kind.HEAP
    node = "/dev/dma_heap/unnameable"
    driver = Version("dma-heap/unnameable", 0, 0, 0, "", "buffers no kernel names")

    def __init__(self, fail_at: int = 0) -> None:
        self.fd = -1
        self.namer = dmabuf.Namer(self.node)
        self.owners: list[Owner | None] = []
        self.fail_at = fail_at  # the allocate call (1-based) that fails with EMFILE

    def allocate(
        self, fmt: Format, width: int, height: int, limits: Limits, owner: Owner | None = None
    ) -> Allocation:
        self.owners.append(owner)
        if len(self.owners) == self.fail_at:
            raise KernelError(errno.EMFILE, "injected allocate fault")
        lay = formats.plan(fmt, width, height, limits)
        fd = os.memfd_create("unnameable", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, lay.size)
        except BaseException:
            os.close(fd)
            raise
        return self._adopt(fd, fmt, width, height, lay, lay.size, owner)


class Harness:
    """A core on one Unnameable allocator, the fds it delivered kept to be closed."""

    def __init__(self, backend: Unnameable):
        self.backend = backend
        self.core = Core(backend)
        self.received: list[int] = []

    def connect(self, pid: int, uid: int, name: str) -> Session:
        session = self.core.connect(Peer(pid, uid, uid, frozenset()))
        self.ask(session, Hello(1, VERSION, name))
        return session

    def ask(self, session: Session, request: Request) -> Reply:
        outcome = self.core.handle(session, 7, request)
        assert isinstance(outcome, Answer) and not outcome.drop, outcome
        return outcome.reply

    def allocate(self, session: Session, count: int) -> list[int] | Error:
        """The ids of ``count`` new buffers, their fds received (or the Error)."""
        outcome: Outcome = self.core.handle(session, 9, Allocate(16, 16, XR24, count=count))
        if isinstance(outcome, Answer):
            assert isinstance(outcome.reply, Error), outcome
            return outcome.reply
        assert isinstance(outcome, Delivery)
        ids = []
        while outcome.pending:
            if not outcome.ready:
                outcome.prepare()
                continue
            fds: list[int] = []
            reply = outcome.export(fds)
            self.received += fds
            if isinstance(reply, Error):
                return reply
            assert isinstance(reply, Allocated), reply
            ids += [b.id for b in reply.buffers]
            outcome.sent()
        return ids

    def close(self) -> None:
        for session in list(self.core.sessions):
            self.core.disconnect(session)
        fdpass.close_fds(self.received)


@pytest.fixture
def harness() -> Iterator[Harness]:
    before = len(os.listdir("/proc/self/fd"))
    made = Harness(Unnameable(fail_at=5))
    try:
        yield made
    finally:
        made.close()
    assert len(os.listdir("/proc/self/fd")) == before, "the core or the test leaked fds"


def test_a_buffer_the_kernel_will_not_name_is_delivered_all_the_same(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    session = harness.connect(4242, 1000, "app")
    with caplog.at_level(logging.WARNING, "primed"):
        assert harness.allocate(session, 3) == [1, 2, 3]
    assert len(harness.received) == 3
    for fd in harness.received:
        assert os.fstat(fd).st_size == formats.plan(formats.FORMATS[XR24], 16, 16, Limits()).size
    assert harness.backend.namer.failures == {errno.ENOTTY: 3}
    refusals = [r for r in caplog.records if "refused to name" in r.getMessage()]
    assert len(refusals) == 1, caplog.text  # once, not once a buffer


def test_each_buffer_is_named_with_the_id_it_is_given(harness: Harness) -> None:
    """The owner the core passes carries the id adoption then gives the buffer, through a
    failed batch (which takes no ids), a release, and a batch made step by step."""
    backend = harness.backend
    alice = harness.connect(4242, 1000, "alice")
    bob = harness.connect(4343, 1001, "")
    assert harness.allocate(alice, 2) == [1, 2]
    assert harness.allocate(bob, 1) == [1]
    failed = harness.allocate(alice, 3)  # the 5th allocate call fails: nothing adopted
    assert isinstance(failed, Error) and failed.code == ErrorCode.KERNEL
    assert harness.ask(alice, Release((1,))) == protocol.Released(1)
    assert harness.allocate(alice, 12) == list(range(3, 15))  # over MADE_AT_ONCE: deferred
    seen = [(o.uid, o.pid, o.id, o.name) for o in backend.owners if o is not None]
    assert len(seen) == len(backend.owners)
    assert seen[:3] == [(1000, 4242, 1, "alice"), (1000, 4242, 2, "alice"), (1001, 4343, 1, "")]
    assert [s[2] for s in seen[3:5]] == [3, 4]  # the failed batch: made 3, failed at 4
    assert seen[5:] == [(1000, 4242, i, "alice") for i in range(3, 15)]


# --- memfd daemons, real processes ------------------------------------------------------------

# A client in a process of its own: allocates one buffer under the name in argv[2], shares
# it, and prints what its fd's link says, with its pid and the buffer's id.
OWNER = """
import json, os, sys, primed
with primed.connect(sys.argv[1], name=sys.argv[2]) as client:
    buf = client.allocate(64, 64, "XR24")
    token = client.share(buf)
    link = os.readlink(f"/proc/self/fd/{buf.fd}")
    print(json.dumps({"pid": os.getpid(), "id": buf.id, "link": link, "token": token}))
    sys.stdout.flush()
    sys.stdin.read()  # hold the buffer until told to go
"""
# Opens a token in a process of its own and prints what the fd's link says.
OPENER = """
import os, sys, primed
with primed.connect(sys.argv[1], name=sys.argv[2]) as client:
    with client.open_shared(sys.argv[3]) as buf:
        print(os.readlink(f"/proc/self/fd/{buf.fd}"))
"""


def memfd_label(link: str) -> str:
    """The memfd's name in a /proc/PID/fd link: ``/memfd:NAME (deleted)``."""
    match = re.fullmatch(r"/memfd:(.*) \(deleted\)", link)
    assert match, link
    return match[1]


def test_a_received_memfd_says_whose_it_is(spawn: StartDaemon) -> None:
    daemon = spawn()
    with primed.connect(daemon.socket, name="host-test") as client:
        first, second = client.allocate(64, 64, "XR24"), client.allocate(32, 32, "NV12")
        with first, second:
            for buf in (first, second):
                label = memfd_label(os.readlink(f"/proc/self/fd/{buf.fd}"))
                assert label == f"primed:{os.getuid()}:{buf.id}:{os.getpid()}:host-test"
                assert fcntl.fcntl(buf.fd, fcntl.F_GET_SEALS)  # still primed's sealed memfd
            assert (first.id, second.id) == (1, 2)
    with primed.connect(daemon.socket, name="") as nameless, nameless.allocate(16, 16, "XR24") as b:
        link = os.readlink(f"/proc/self/fd/{b.fd}")
        assert memfd_label(link) == f"primed:{os.getuid()}:1:{os.getpid()}"


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_owner_cannot_spoof_its_buffers_name(spawn: StartDaemon, name: str) -> None:
    """Whatever a client calls itself, its buffer's name says the uid, id and pid the
    daemon knows, and a second process that opens it by token sees the same name."""
    daemon = spawn()
    owner = _start_owner(daemon, name)
    try:
        told = json.loads(owner.stdout.readline() if owner.stdout else "")
        label = memfd_label(told["link"])
        prefix, uid, ident, pid, *rest = fields(label)
        assert (prefix, uid, ident, pid) == ("primed", str(os.getuid()), "1", str(told["pid"]))
        assert told["id"] == 1 and told["pid"] != os.getpid()
        assert rest and re.fullmatch(r"[A-Za-z0-9._-]+", rest[0]), label
        assert len(label) <= MFD_NAME_MAX_LEN
        # Another client (a name of its own, spoofing too) opens it: the owner's name.
        seen = run_client(OPENER, daemon.socket, "9:9:9:opener", told["token"]).strip()
        assert memfd_label(seen) == label
    finally:
        _stop(owner)


def _start_owner(daemon: Daemon, name: str) -> subprocess.Popen[str]:
    # NUL can't ride in argv: the client gets the name JSON-encoded and decodes it.
    code = OWNER.replace("name=sys.argv[2]", "name=json.loads(sys.argv[2])")
    return subprocess.Popen(
        [sys.executable, "-c", code, daemon.socket, json.dumps(name)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _stop(process: subprocess.Popen[str]) -> None:
    try:
        if process.stdin:
            process.stdin.close()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()


def test_a_name_over_the_wire_limit_never_reaches_a_buffer(spawn: StartDaemon) -> None:
    """A 300-byte name is refused at HELLO, by the client library and by the daemon when
    sent raw: no buffer is ever made under it."""
    daemon = spawn()
    with pytest.raises(primed.LocalProtocolError):
        primed.connect(daemon.socket, name="n" * 300)
    name = ("é:" * 100).encode()  # 300 bytes
    body = (
        HELLO_HEAD.build({"min_version": 1, "max_version": VERSION, "name_len": len(name)}) + name
    )
    head = HEADER.build({"opcode": Opcode.HELLO, "nfds": 0, "size": len(body), "serial": 1})
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(10)
        sock.connect(daemon.socket)
        sock.send(head + body)
        _, reply = protocol.decode(sock.recv(65536), 0, "reply")
        assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_MESSAGE, reply
        assert sock.recv(65536) == b""  # and it hangs up
    with primed.connect(daemon.socket) as client:
        assert client.stats().buffers == 0


def test_unowned_memfds_keep_the_plain_name() -> None:
    backend = MemfdBackend()
    allocation = backend.allocate(formats.FORMATS[XR24], 16, 16, Limits())
    try:
        assert memfd_label(os.readlink(f"/proc/self/fd/{allocation.ref}")) == MEMFD_NAME
    finally:
        backend.free(allocation)
