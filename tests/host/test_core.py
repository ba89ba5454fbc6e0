"""The daemon's core in-process: every handler and every error path, with no socket.

The core is driven as the transport drives it: decoded requests (or datagrams)
in, outcomes out. Deliveries are carried out by :meth:`Harness.carry`, which
keeps the transport's contract (export, then "send" by keeping the fds, and on
a KernelError hand the error to failed()). Buffers come from the real
MemfdBackend: every fd checked here is a real memfd. Kernel failures are real
where they can be provoked cheaply (a lowered RLIMIT_NOFILE makes memfd_create
and dup fail with EMFILE); where they can't, :class:`Faulty` wraps the real
backend and raises KernelError at a chosen call: fault injection, said so at
each use. Every test checks that this process holds no more fds at its end than
at its start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import resource
from collections.abc import Iterator

import pytest

from primed import fdpass, formats
from primed.daemon.core import (
    LIST_PAGE_BUFFERS,
    LIST_PAGE_CLIENTS,
    MADE_AT_ONCE,
    NO_TOKEN,
    SERVED_PAGE_BUFFERS,
    Answer,
    Core,
    Delivery,
    Outcome,
)
from primed.daemon.policy import Bounds, Peer, Policy, Quotas
from primed.daemon.sessions import Session
from primed.errors import ErrorCode, KernelError
from primed.formats import Format, Limits
from primed.kernel.allocation import Allocation, Owner
from primed.kernel.backends import MemfdBackend
from primed.wire import protocol
from primed.wire.protocol import (
    USAGE_CPU,
    Allocate,
    Allocated,
    AllocatorInfo,
    BufferEntry,
    ClientEntry,
    Error,
    Hello,
    List,
    Listed,
    OpenBuffer,
    OpenShared,
    Queried,
    Query,
    Release,
    Released,
    Reply,
    Request,
    Revoke,
    Revoked,
    Share,
    Shared,
    Statistics,
    Stats,
    Welcome,
)
from primed.wire.schema import MAX_FDS, VERSION, Backend, Kind, Opcode

XR24 = formats.fourcc("XR24")
NV12 = formats.fourcc("NV12")
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
ADMIN_GID = 4343
#: Daemon-wide bounds roomy enough for the tests that hold many buffers at once.
ROOMY = Bounds.for_nofile(20000)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")} - {-1}


def page_round(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


class Faulty(MemfdBackend):
    """The real memfd backend, with faults injected: the ``n``-th call (from 1) of
    allocate, export or free raises KernelError(``errno``) instead of running."""

    def __init__(self) -> None:
        self.calls = {"allocate": 0, "export": 0, "free": 0}
        self.faults: dict[str, tuple[int, int]] = {}

    def fail(self, call: str, nth: int, err: int) -> None:
        self.faults[call] = (self.calls[call] + nth, err)

    def _count(self, call: str) -> None:
        self.calls[call] += 1
        nth, err = self.faults.get(call, (0, 0))
        if self.calls[call] == nth:
            raise KernelError(err, f"injected {call} fault")

    def allocate(
        self, fmt: Format, width: int, height: int, limits: Limits, owner: Owner | None = None
    ) -> Allocation:
        self._count("allocate")
        return super().allocate(fmt, width, height, limits, owner)

    def export(self, allocation: Allocation) -> int:
        self._count("export")
        return super().export(allocation)

    def free(self, allocation: Allocation) -> None:
        try:
            self._count("free")
        except KernelError:
            super().free(allocation)  # the kernel freed it all the same: no leak here
            raise
        super().free(allocation)


class Harness:
    """A core on a (fault-injectable) memfd backend, and the fds it handed out."""

    def __init__(self, limits: Limits | None = None, policy: Policy | None = None):
        self.backend = Faulty()
        self.core = Core(self.backend, limits, policy)
        self.received: list[int] = []

    def connect(
        self, uid: int | None = None, groups: frozenset[int] = frozenset(), hello: bool = True
    ) -> Session:
        uid = os.getuid() if uid is None else uid
        session = self.core.connect(Peer(os.getpid(), uid, 1000, groups))
        if hello:
            assert isinstance(self.ask(session, Hello(name="core test")), Welcome)
        return session

    def ask(self, session: Session, request: Request, serial: int = 7) -> Reply:
        """The reply (no fds) to ``request``; the client is not dropped."""
        outcome = self.core.handle(session, serial, request)
        assert isinstance(outcome, Answer), outcome
        assert (outcome.serial, outcome.drop) == (serial, False)
        return outcome.reply

    def error(self, session: Session, request: Request) -> Error:
        reply = self.ask(session, request)
        assert isinstance(reply, Error), reply
        return reply

    def carry(self, outcome: Outcome) -> list[tuple[Reply, list[int]]]:
        """Every reply of ``outcome`` with its fds, as the transport sends them."""
        if isinstance(outcome, Answer):
            return [(outcome.reply, [])]
        sent: list[tuple[Reply, list[int]]] = []
        while outcome.pending:
            while not outcome.ready:
                outcome.prepare()
            fds: list[int] = []
            try:
                reply = outcome.export(fds)
            except KernelError as e:
                fdpass.close_fds(fds)
                failure = outcome.failed(e)
                assert failure.serial == outcome.serial and not failure.drop
                sent.append((failure.reply, []))
                break
            self.received += fds
            sent.append((reply, fds))
            outcome.sent()
        assert not outcome.pending
        return sent

    def allocate(self, session: Session, request: Allocate) -> tuple[list[Allocated], list[int]]:
        """The parts of a successful ALLOCATE and all their fds."""
        outcome = self.core.handle(session, 9, request)
        assert isinstance(outcome, Delivery) and outcome.serial == 9
        parts = self.carry(outcome)
        replies = [reply for reply, _ in parts]
        assert all(isinstance(r, Allocated) for r in replies), replies
        return replies, [fd for _, fds in parts for fd in fds]  # type: ignore[return-value]

    def close(self) -> None:
        for session in list(self.core.sessions):
            self.core.disconnect(session)
        fdpass.close_fds(self.received)


@pytest.fixture
def harness() -> Iterator[Harness]:
    before = open_fds()
    made = Harness()
    try:
        yield made
    finally:
        made.close()
    assert open_fds() == before, "the core or the test leaked fds"


def shares(harness: Harness, owner: Session) -> dict[int, set[bytes]]:
    """Each of ``owner``'s shared buffers and its live tokens, as the registry chains them."""
    tokens = harness.core.tokens
    found = {ident: set(tokens.of(owner, ident)) for ident in owner.shares}
    assert all(tokens.count(owner, ident) == len(t) for ident, t in found.items())
    return found


def code(reply: Reply) -> int:
    assert isinstance(reply, Error), reply
    return reply.code


def clients(reply: Reply) -> list[ClientEntry]:
    assert isinstance(reply, Listed), reply
    assert all(isinstance(e, ClientEntry) for e in reply.entries)
    return list(reply.entries)  # type: ignore[arg-type]


def buffer_rows(reply: Reply) -> list[BufferEntry]:
    assert isinstance(reply, Listed), reply
    assert all(isinstance(e, BufferEntry) for e in reply.entries)
    return list(reply.entries)  # type: ignore[arg-type]


def held(core: Core) -> tuple[int, int, int]:
    """Buffers and bytes the core holds, and live tokens."""
    return core.live_buffers, core.held_bytes, len(core.tokens)


# --- connections and the handshake ---------------------------------------------------------


def test_hello_answers_welcome_with_the_limits(harness: Harness) -> None:
    harness.core.configure(Limits(640, 480, 1 << 20, 8), Policy())
    session = harness.connect(hello=False)
    welcome = harness.ask(session, Hello(1, VERSION + 5, "painter"))
    memfd = AllocatorInfo("memfd", Kind.MEMFD, USAGE_CPU, "memfd", (0, 0, 0), "")
    assert welcome == Welcome(
        VERSION, Backend.MEMFD, 640, 480, 1 << 20, 8, "memfd", (0, 0, 0), "", (memfd,)
    )
    assert (session.version, session.name) == (VERSION, "painter")
    assert "'painter'" in str(session)


def test_second_hello_is_bad_state_and_keeps_the_client(harness: Harness) -> None:
    session = harness.connect()
    error = harness.error(session, Hello())
    assert (error.code, error.text) == (ErrorCode.BAD_STATE, "HELLO was already sent")


def test_no_common_version(harness: Harness) -> None:
    session = harness.connect(hello=False)
    error = harness.error(session, Hello(VERSION + 1, VERSION + 3))
    assert error.code == ErrorCode.UNSUPPORTED_VERSION
    assert error.text == f"client speaks {VERSION + 1}..{VERSION + 3}, server 1..{VERSION}"
    assert session.version == 0
    assert isinstance(harness.ask(session, Hello()), Welcome)  # it may try again


@pytest.mark.parametrize(
    "request_", [Query(), Allocate(16, 16, XR24), Stats(), Release((1,))], ids=repr
)
def test_anything_before_hello_drops_the_client(harness: Harness, request_: Request) -> None:
    session = harness.connect(hello=False)
    outcome = harness.core.handle(session, 3, request_)
    assert isinstance(outcome, Answer) and outcome.drop and outcome.serial == 3
    assert outcome.reply == Error(ErrorCode.BAD_STATE, 0, "HELLO must come first")
    assert harness.backend.calls["allocate"] == 0


def test_refusal_is_permission_denied_serial_0_and_a_drop(harness: Harness) -> None:
    harness.core.configure(Limits(), Policy(allowed_uids=frozenset({4242})))
    outcome = harness.core.refusal(Peer(1, 4343, 4343))
    assert outcome is not None and outcome.drop and outcome.serial == 0
    assert isinstance(outcome.reply, Error) and outcome.reply.code == ErrorCode.PERMISSION_DENIED
    assert outcome.reply.text == "uid 4343 is not allowed to use this daemon"
    assert harness.core.refusal(Peer(1, 4242, 4343)) is None
    assert harness.core.stats["refused"] == 1
    assert harness.core.errors_by_code[ErrorCode.PERMISSION_DENIED] == 1
    assert not harness.core.sessions  # a refusal makes no session


def test_disconnect_frees_buffers_tokens_and_quota(harness: Harness) -> None:
    core = harness.core
    session, other = harness.connect(), harness.connect()
    _, fds = harness.allocate(session, Allocate(64, 64, XR24, count=3))
    shared = harness.ask(session, Share(2))
    assert isinstance(shared, Shared)
    harness.allocate(other, Allocate(16, 16, XR24))
    before_refs = [a.ref for a in session.buffers.values()]
    assert held(core) == (4, 3 * page_round(64 * 64 * 4) + page_round(16 * 16 * 4), 1)
    assert core.disconnect(session) == 3
    assert held(core) == (1, page_round(16 * 16 * 4), 0)
    assert core.ledger.usage(os.getuid()).buffers == 1
    for ref in before_refs:  # the daemon's memfds are closed...
        with pytest.raises(OSError) as gone:
            os.fstat(ref)
        assert gone.value.errno == errno.EBADF
    assert os.fstat(fds[0]).st_size == page_round(64 * 64 * 4)  # ...the client's copies live
    assert open_shared(harness, other, shared.token) == (
        Error(ErrorCode.UNKNOWN_TOKEN, 0, NO_TOKEN),
        [],
    )


# --- ALLOCATE ------------------------------------------------------------------------------


def test_allocate_one_delivers_a_sealed_memfd(harness: Harness) -> None:
    session = harness.connect()
    replies, fds = harness.allocate(session, Allocate(100, 50, XR24))
    (reply,) = replies
    (info,) = reply.buffers
    assert (reply.total, reply.index, info.id) == (1, 0, 1)
    assert (info.width, info.height, info.fourcc, info.modifier) == (100, 50, XR24, 0)
    assert info.size == page_round(formats.plan(formats.FORMATS[XR24], 100, 50, Limits()).size)
    assert info.planes == ((0, 448),)  # 400 bytes a row, rounded to 64
    (fd,) = fds
    assert os.fstat(fd).st_size == info.size
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == SEALS
    with mmap.mmap(fd, info.size) as view:  # the daemon's and the client's are one buffer
        view[:5] = b"hello"
    with mmap.mmap(session.buffers[1].ref, info.size) as theirs:
        assert theirs[:5] == b"hello"
    assert harness.backend.calls == {"allocate": 1, "export": 1, "free": 0}
    _, (fd2,) = harness.allocate(session, Allocate(16, 16, XR24))
    assert sorted(session.buffers) == [1, 2]
    assert os.fstat(fd2).st_ino != os.fstat(fd).st_ino


def test_allocate_600_comes_in_parts_of_253(harness: Harness) -> None:
    harness.core.configure(Limits(), Policy(bounds=ROOMY))
    session = harness.connect()
    replies, fds = harness.allocate(session, Allocate(16, 16, XR24, count=600))
    assert [(r.total, r.index, len(r.buffers)) for r in replies] == [
        (600, 0, MAX_FDS),
        (600, MAX_FDS, MAX_FDS),
        (600, 2 * MAX_FDS, 600 - 2 * MAX_FDS),
    ]
    assert [b.id for r in replies for b in r.buffers] == list(range(1, 601))
    assert len(fds) == 600
    assert len({os.fstat(fd).st_ino for fd in fds}) == 600
    assert session.account.own.buffers == 600


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [
        # 1. the format comes first, whatever else is wrong
        (Allocate(0, 0, formats.fourcc("ZZZZ"), count=0, flags=1),
         ErrorCode.UNSUPPORTED_FORMAT, "unknown fourcc 'ZZZZ'"),
        # 2. then the flags
        (Allocate(0, 0, XR24, count=0, flags=6), ErrorCode.INVALID_ARGUMENT, "unknown flags 0x6"),
        # 3. then the count: 0 is an invalid argument, too many a limit
        (Allocate(0, 0, XR24, count=0), ErrorCode.INVALID_ARGUMENT, "count 0 is not within 1..4"),
        (Allocate(0, 0, XR24, count=5), ErrorCode.LIMIT_EXCEEDED, "count 5 is not within 1..4"),
        # 4. then each buffer's size, as formats.plan says
        (Allocate(0, 16, XR24, count=4), ErrorCode.INVALID_ARGUMENT,
         "0x16: width and height must be at least 1"),
        (Allocate(16, 0, XR24), ErrorCode.INVALID_ARGUMENT,
         "16x0: width and height must be at least 1"),
        (Allocate(129, 16, XR24), ErrorCode.LIMIT_EXCEEDED, "129x16 exceeds the limit of 128x96"),
        (Allocate(16, 97, XR24), ErrorCode.LIMIT_EXCEEDED, "16x97 exceeds the limit of 128x96"),
        (Allocate(127, 95, NV12), ErrorCode.INVALID_ARGUMENT,
         "NV12 needs a width divisible by 2 and a height divisible by 2, not 127x95"),
        (Allocate(128, 96, XR24), ErrorCode.LIMIT_EXCEEDED,
         "128x96 XR24 needs 49152 bytes, over the limit of 40000"),
        # 5. then the quota, on the planned size times the count (here 4 x 16 KiB)
        (Allocate(64, 64, XR24, count=4), ErrorCode.QUOTA_EXCEEDED,
         "quota: 50000 bytes per client; 0 held, 65536 more asked"),
    ],
    ids=lambda v: v.name if isinstance(v, ErrorCode) else None,
)  # fmt: skip
def test_allocate_checks_in_order(
    harness: Harness, request_: Allocate, code: ErrorCode, text: str
) -> None:
    policy = Policy(quotas=Quotas(bytes_per_client=50000))
    harness.core.configure(Limits(128, 96, 40000, 4), policy)
    session = harness.connect()
    assert harness.error(session, request_) == Error(code, 0, text)
    assert harness.backend.calls["allocate"] == 0  # all refused before the kernel
    assert held(harness.core) == (0, 0, 0)
    assert harness.core.stats["errors"] == 1
    assert harness.core.errors_by_code == {code: 1}


def test_quota_is_checked_again_on_the_sizes_the_kernel_gave(harness: Harness) -> None:
    # 16x16 XR24 plans 1024 bytes; a memfd is page-rounded to 4096. Two planned fit
    # in 5000 bytes, two made do not: both are made, refused and freed.
    harness.core.configure(Limits(), Policy(quotas=Quotas(bytes_per_client=5000)))
    session = harness.connect()
    error = harness.error(session, Allocate(16, 16, XR24, count=2))
    assert error == Error(
        ErrorCode.QUOTA_EXCEEDED,
        0,
        f"quota: 5000 bytes per client; 0 held, {2 * mmap.PAGESIZE} more asked",
    )
    assert harness.backend.calls == {"allocate": 2, "export": 0, "free": 2}
    assert held(harness.core) == (0, 0, 0)
    harness.allocate(session, Allocate(16, 16, XR24))  # one fits
    assert session.account.own.bytes == mmap.PAGESIZE


# A batch of more than MADE_AT_ONCE is made one buffer per prepare(): the transport lets
# other clients run between the steps, so whatever the steps do must hold across them.


def test_a_large_batch_is_made_one_buffer_per_step(harness: Harness) -> None:
    session = harness.connect()
    small = harness.core.handle(session, 4, Allocate(16, 16, XR24, count=MADE_AT_ONCE))
    assert isinstance(small, Delivery) and small.ready
    assert harness.backend.calls["allocate"] == MADE_AT_ONCE
    harness.carry(small)
    count = MADE_AT_ONCE + 1
    batch = harness.core.handle(session, 5, Allocate(16, 16, XR24, count=count))
    assert isinstance(batch, Delivery) and batch.pending and not batch.ready
    for step in range(1, count + 1):
        batch.prepare()
        assert harness.backend.calls["allocate"] == MADE_AT_ONCE + step
        # Not the session's until all are made: a LIST or QUERY meanwhile sees none.
        assert len(session.buffers) == MADE_AT_ONCE + (count if step == count else 0)
        assert batch.ready == (step == count)
    ((reply, fds),) = harness.carry(batch)
    assert isinstance(reply, Allocated) and (reply.total, len(fds)) == (count, count)
    assert session.account.own.buffers == MADE_AT_ONCE + count


@pytest.mark.parametrize("nth", [1, 5, MADE_AT_ONCE + 3])
def test_a_kernel_failure_while_making_a_batch_frees_what_was_made(
    harness: Harness, nth: int
) -> None:
    session = harness.connect()
    harness.backend.fail("allocate", nth, errno.ENOSPC)
    parts = harness.carry(harness.core.handle(session, 5, Allocate(16, 16, XR24, count=20)))
    text = "injected allocate fault: " + os.strerror(errno.ENOSPC)
    assert parts == [(Error(ErrorCode.KERNEL, errno.ENOSPC, text), [])]
    assert harness.backend.calls == {"allocate": nth, "export": 0, "free": nth - 1}
    assert held(harness.core) == (0, 0, 0) and session.account.own.buffers == 0
    assert harness.core.errors_by_code == {ErrorCode.KERNEL: 1}


def test_a_batch_is_checked_against_what_the_uid_took_while_it_was_made(
    harness: Harness,
) -> None:
    # Both fit the quota when asked; the second, made while the first was being made,
    # takes the room: the first is refused on what the kernel gave, and freed.
    count = MADE_AT_ONCE + 2
    quota = count + MADE_AT_ONCE - 1
    policy = Policy(quotas=Quotas(buffers_per_uid=quota))
    harness.core.configure(Limits(), policy)
    first, second = harness.connect(uid=5000), harness.connect(uid=5000)
    batch = harness.core.handle(first, 5, Allocate(16, 16, XR24, count=count))
    assert isinstance(batch, Delivery)
    batch.prepare()
    harness.allocate(second, Allocate(16, 16, XR24, count=MADE_AT_ONCE))
    parts = harness.carry(batch)
    text = f"quota: {quota} buffers per uid (5000); {MADE_AT_ONCE} held, {count} more asked"
    assert parts == [(Error(ErrorCode.QUOTA_EXCEEDED, 0, text), [])]
    assert harness.backend.calls["free"] == count
    assert harness.core.live_buffers == MADE_AT_ONCE and not first.buffers


@pytest.mark.parametrize("undo", ["refused", "failed", "disconnect"])
def test_a_batch_undone_while_it_is_made_frees_what_was_made(harness: Harness, undo: str) -> None:
    session = harness.connect()
    batch = harness.core.handle(session, 5, Allocate(16, 16, XR24, count=30))
    assert isinstance(batch, Delivery)
    for _ in range(7):
        batch.prepare()
    if undo == "refused":
        answer = batch.refused("the connection ended")
        assert answer.reply == Error(ErrorCode.LIMIT_EXCEEDED, 0, "the connection ended")
    elif undo == "failed":
        answer = batch.failed(OSError(errno.ETOOMANYREFS, "too many references"))
        assert answer.reply == Error(ErrorCode.KERNEL, errno.ETOOMANYREFS, "too many references")
    else:  # what the transport does when a connection ends mid-request: both, in this order
        batch.refused("the connection ended")
        harness.core.disconnect(session)
    assert not batch.pending
    assert harness.backend.calls == {"allocate": 7, "export": 0, "free": 7}
    assert held(harness.core) == (0, 0, 0)


def test_quotas_per_uid_span_clients_and_admins_have_none(harness: Harness) -> None:
    policy = Policy(admin_gid=ADMIN_GID, quotas=Quotas(buffers_per_uid=3))
    harness.core.configure(Limits(), policy)
    first, second = harness.connect(uid=5000), harness.connect(uid=5000)
    harness.allocate(first, Allocate(16, 16, XR24, count=2))
    error = harness.error(second, Allocate(16, 16, XR24, count=2))
    assert error.text == "quota: 3 buffers per uid (5000); 2 held, 2 more asked"
    admin = harness.connect(uid=5009, groups=frozenset({ADMIN_GID}))
    harness.allocate(admin, Allocate(16, 16, XR24, count=5))
    harness.allocate(second, Allocate(16, 16, XR24))


@contextlib.contextmanager
def room_for(room: int) -> Iterator[None]:
    """Let this process open exactly ``room`` more fds (a lowered soft RLIMIT_NOFILE,
    the holes below its highest fd filled with /dev/null), then undo it."""
    limit = max(open_fds()) + 1
    fillers: list[int] = []
    try:
        while (fd := os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)) < limit:
            fillers.append(fd)
        os.close(fd)  # the lowest free fd is the limit: every hole below is filled
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit + room, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        fdpass.close_fds(fillers)


def test_kernel_refusal_travels_back_with_errno_and_nothing_is_kept(harness: Harness) -> None:
    # A real kernel failure: with room for 3 more fds, the 4th memfd_create fails.
    session = harness.connect()
    with room_for(3):
        error = harness.error(session, Allocate(16, 16, XR24, count=4))
    assert (error.code, error.errno) == (ErrorCode.KERNEL, errno.EMFILE)
    assert error.text == f"memfd_create: {os.strerror(errno.EMFILE)}"
    assert harness.backend.calls == {"allocate": 4, "export": 0, "free": 3}
    assert held(harness.core) == (0, 0, 0)
    assert session.next_id == 1


def test_a_layout_the_backend_refuses_is_answered_as_plan_would(harness: Harness) -> None:
    # Fault injection: neither backend refuses a layout plan() accepted.
    class Picky(MemfdBackend):
        def allocate(
            self, fmt: Format, width: int, height: int, limits: Limits, owner: Owner | None = None
        ) -> Allocation:
            if width > 32:
                raise formats.LayoutError("too wide for this device", limit=True)
            return super().allocate(fmt, width, height, limits, owner)

    harness.core.backend = Picky()
    session = harness.connect()
    assert harness.error(session, Allocate(64, 8, XR24)) == Error(
        ErrorCode.LIMIT_EXCEEDED, 0, "too wide for this device"
    )
    harness.allocate(session, Allocate(32, 8, XR24))


def test_export_failure_fails_the_whole_request(harness: Harness) -> None:
    # A real kernel failure: room for the 3 memfds and 1 dup; the 2nd dup fails.
    session = harness.connect()
    harness.allocate(session, Allocate(16, 16, XR24))  # kept: only the failed request goes
    with room_for(4):
        parts = harness.carry(harness.core.handle(session, 5, Allocate(16, 16, XR24, count=3)))
    assert parts == [
        (Error(ErrorCode.KERNEL, errno.EMFILE, f"dup: {os.strerror(errno.EMFILE)}"), [])
    ]
    assert harness.backend.calls["export"] == 1 + 2
    assert sorted(session.buffers) == [1]
    assert session.account.own.buffers == 1
    assert harness.core.ledger.usage(os.getuid()).buffers == 1


def test_export_failure_in_a_later_part_takes_the_parts_sent(harness: Harness) -> None:
    # Fault injection: the kernel's dup would fail only at thousands of fds.
    session = harness.connect()
    harness.backend.fail("export", MAX_FDS + 10, errno.ENOMEM)
    parts = harness.carry(harness.core.handle(session, 5, Allocate(16, 16, XR24, count=300)))
    (first, fds), (failure, none) = parts
    assert isinstance(first, Allocated) and (first.total, first.index) == (300, 0)
    assert len(fds) == MAX_FDS and none == []
    assert failure == Error(
        ErrorCode.KERNEL, errno.ENOMEM, "injected export fault: " + os.strerror(errno.ENOMEM)
    )
    assert held(harness.core) == (0, 0, 0)  # the client closes what it got; so did we
    assert harness.backend.calls["free"] == 300


def test_send_failure_etoomanyrefs_fails_the_whole_request(harness: Harness) -> None:
    # What the transport does when sendmsg says ETOOMANYREFS: it hands the error to failed().
    session = harness.connect()
    outcome = harness.core.handle(session, 4, Allocate(16, 16, XR24, count=2))
    assert isinstance(outcome, Delivery)
    fds: list[int] = []
    try:
        assert isinstance(outcome.export(fds), Allocated)
        assert len(fds) == 2
    finally:
        fdpass.close_fds(fds)
    failure = outcome.failed(OSError(errno.ETOOMANYREFS, os.strerror(errno.ETOOMANYREFS)))
    assert failure == Answer(
        4, Error(ErrorCode.KERNEL, errno.ETOOMANYREFS, os.strerror(errno.ETOOMANYREFS))
    )
    assert not outcome.pending
    assert held(harness.core) == (0, 0, 0)


def test_a_failed_free_is_logged_and_the_others_still_freed(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # Fault injection: freeing a memfd (close) does not fail on its own.
    session = harness.connect()
    harness.allocate(session, Allocate(16, 16, XR24, count=3))
    harness.backend.fail("free", 2, errno.EIO)
    with caplog.at_level(logging.ERROR, "primed"):
        assert harness.core.disconnect(session) == 3
    assert harness.backend.calls["free"] == 3
    assert "freeing a buffer failed: [Errno 5] injected free fault" in caplog.text
    assert harness.core.ledger.usage(os.getuid()).buffers == 0


def test_reload_applies_from_the_next_request(harness: Harness) -> None:
    session = harness.connect()
    harness.allocate(session, Allocate(200, 200, XR24))
    harness.core.configure(Limits(max_width=100), Policy())
    assert harness.error(session, Allocate(200, 200, XR24)).code == ErrorCode.LIMIT_EXCEEDED
    assert len(session.buffers) == 1  # what it holds stays


# --- RELEASE -------------------------------------------------------------------------------


def test_release_frees_and_counts(harness: Harness) -> None:
    session = harness.connect()
    _, fds = harness.allocate(session, Allocate(16, 16, XR24, count=3))
    refs = {i: a.ref for i, a in session.buffers.items()}
    assert harness.ask(session, Release((3, 1))) == Released(2)
    assert sorted(session.buffers) == [2]
    assert session.account.own == type(session.account.own)(1, mmap.PAGESIZE)
    with pytest.raises(OSError):
        os.fstat(refs[1])
    assert os.fstat(fds[0]).st_size == mmap.PAGESIZE  # the client's fd stays valid


@pytest.mark.parametrize(
    ("ids", "text"),
    [
        ((1, 9), "unknown buffer id 9"),
        ((2, 2), "an id appears twice"),
        ((0,), "unknown buffer id 0"),
    ],
)
def test_release_with_a_bad_id_releases_nothing(
    harness: Harness, ids: tuple[int, ...], text: str
) -> None:
    session = harness.connect()
    harness.allocate(session, Allocate(16, 16, XR24, count=2))
    assert harness.error(session, Release(ids)) == Error(ErrorCode.UNKNOWN_BUFFER, 0, text)
    assert sorted(session.buffers) == [1, 2]


def test_ids_are_per_client(harness: Harness) -> None:
    one, two = harness.connect(), harness.connect()
    harness.allocate(one, Allocate(16, 16, XR24))
    assert harness.error(two, Release((1,))).code == ErrorCode.UNKNOWN_BUFFER
    harness.allocate(two, Allocate(16, 16, XR24))
    assert list(two.buffers) == [1]
    assert one.buffers[1] is not two.buffers[1]


# --- datagrams in: decode, unknown opcodes, malformed messages -----------------------------


def test_receive_decodes_and_handles(harness: Harness) -> None:
    session = harness.connect(hello=False)
    outcome = harness.core.receive(session, protocol.encode(Hello(name="bytes"), 12), 0)
    assert isinstance(outcome, Answer) and outcome.serial == 12
    assert isinstance(outcome.reply, Welcome)
    assert harness.core.requests_by_opcode == {Opcode.HELLO: 1}


def test_unknown_opcode_is_answered_and_the_client_stays(harness: Harness) -> None:
    session = harness.connect()
    data = bytearray(protocol.encode(Query(), 44))
    data[0:2] = (0x7777).to_bytes(2, "little")
    outcome = harness.core.receive(session, bytes(data), 0)
    assert outcome == Answer(44, Error(ErrorCode.UNKNOWN_OPCODE, 0, "unknown opcode 0x7777"))
    assert harness.core.stats["errors"] == 1


@pytest.mark.parametrize(
    ("data", "nfds", "serial"),
    [
        (b"\x01\x00", 0, 0),  # shorter than a header
        (protocol.encode(Query(), 5) + b"x", 0, 5),  # the header's size is wrong
        (protocol.encode(Query(), 6), 1, 6),  # an fd the header does not count
    ],
)
def test_malformed_datagram_drops_the_client(
    harness: Harness, data: bytes, nfds: int, serial: int
) -> None:
    session = harness.connect()
    outcome = harness.core.receive(session, data, nfds)
    assert isinstance(outcome, Answer) and outcome.drop and outcome.serial == serial
    assert isinstance(outcome.reply, Error) and outcome.reply.code == ErrorCode.BAD_MESSAGE
    assert harness.core.stats["bad_messages"] == 1
    assert harness.core.errors_by_code == {ErrorCode.BAD_MESSAGE: 1}


def test_a_request_the_core_does_not_know(harness: Harness) -> None:
    class Novel(Request):
        __slots__ = ()
        OPCODE = Opcode.QUERY

    session = harness.connect()
    assert harness.error(session, Novel()).code == ErrorCode.UNKNOWN_OPCODE


# --- QUERY and STATS -----------------------------------------------------------------------


def test_query_reports_limits_formats_tightest_quota_and_usage(harness: Harness) -> None:
    quotas = Quotas(
        buffers_per_client=10, bytes_per_client=0, buffers_per_uid=4, bytes_per_uid=1 << 20
    )
    harness.core.configure(
        Limits(320, 240, 1 << 19, 16), Policy(admin_gid=ADMIN_GID, quotas=quotas)
    )
    session = harness.connect()
    harness.allocate(session, Allocate(16, 16, XR24, count=2))
    queried = harness.ask(session, Query())
    assert isinstance(queried, Queried)
    assert (queried.backend, queried.driver, queried.node) == (Backend.MEMFD, "memfd", "")
    assert (queried.max_width, queried.max_height, queried.max_count, queried.max_size) == (
        320, 240, 16, 1 << 19,
    )  # fmt: skip
    assert {f.fourcc for f in queried.formats} == set(formats.FORMATS)
    assert queried.modifiers == (formats.MOD_LINEAR,)
    assert (queried.quota_buffers, queried.quota_bytes) == (4, 1 << 20)
    assert (queried.used_buffers, queried.used_bytes) == (2, 2 * mmap.PAGESIZE)
    admin = harness.connect(groups=frozenset({ADMIN_GID}))
    queried = harness.ask(admin, Query())
    assert isinstance(queried, Queried)
    assert (queried.quota_buffers, queried.quota_bytes, queried.used_buffers) == (0, 0, 0)


def test_stats_count_requests_errors_and_events(harness: Harness) -> None:
    core = harness.core
    core.configure(Limits(), Policy(allowed_uids=frozenset({os.getuid()})))
    session = harness.connect()
    harness.allocate(session, Allocate(16, 16, XR24, count=2))
    harness.ask(session, Share(1))
    harness.error(session, Release((5,)))
    core.receive(session, b"junk", 0)
    core.refusal(Peer(1, os.getuid() + 1, 0))
    stats = harness.ask(session, Stats())
    assert isinstance(stats, Statistics)
    assert stats.uptime_ms >= 0
    assert (stats.clients, stats.buffers, stats.held_bytes, stats.tokens) == (
        1, 2, 2 * mmap.PAGESIZE, 1,
    )  # fmt: skip
    assert stats.counters == (
        (1, Opcode.HELLO, 1),
        (1, Opcode.ALLOCATE, 1),
        (1, Opcode.RELEASE, 1),
        (1, Opcode.SHARE, 1),
        (1, Opcode.STATS, 1),
        (2, ErrorCode.BAD_MESSAGE, 1),
        (2, ErrorCode.UNKNOWN_BUFFER, 1),
        (2, ErrorCode.PERMISSION_DENIED, 1),
        (3, 1, 1),
        (3, 2, 1),
    )
    assert core.summary() == "1 client(s), 2 buffer(s), 0.0 MiB"


# --- SHARE, OPEN_SHARED, REVOKE ------------------------------------------------------------


def share(harness: Harness, session: Session, ident: int, **options: object) -> bytes:
    reply = harness.ask(session, Share(ident, **options))  # type: ignore[arg-type]
    assert isinstance(reply, Shared)
    return reply.token


def open_shared(harness: Harness, session: Session, token: bytes) -> tuple[Reply, list[int]]:
    outcome = harness.core.handle(session, 8, OpenShared(token))
    assert isinstance(outcome, Delivery)  # it waits for room before the lookup
    ((reply, fds),) = harness.carry(outcome)
    return reply, fds


def test_a_token_opens_the_same_buffer_as_id_0(harness: Harness) -> None:
    owner, guest = harness.connect(), harness.connect(uid=5001)
    _, (fd,) = harness.allocate(owner, Allocate(32, 8, XR24))
    token = share(harness, owner, 1)
    assert len(token) == 16
    reply, (opened,) = open_shared(harness, guest, token)
    assert isinstance(reply, Allocated) and (reply.total, reply.index) == (1, 0)
    (info,) = reply.buffers
    assert (info.id, info.width, info.height, info.size) == (0, 32, 8, mmap.PAGESIZE)
    assert os.fstat(opened).st_ino == os.fstat(fd).st_ino
    assert not guest.buffers and guest.account.own.buffers == 0  # it stays the owner's
    again, _ = open_shared(harness, guest, token)  # a plain token opens again
    assert isinstance(again, Allocated)
    assert shares(harness, owner) == {1: {token}} and owner.tokens == 1


def test_a_once_token_is_spent_by_its_export(harness: Harness) -> None:
    owner = harness.connect()
    harness.allocate(owner, Allocate(16, 16, XR24))
    token = share(harness, owner, 1, once=True)
    reply, _ = open_shared(harness, owner, token)
    assert isinstance(reply, Allocated)
    assert open_shared(harness, owner, token) == (Error(ErrorCode.UNKNOWN_TOKEN, 0, NO_TOKEN), [])
    assert (owner.shares, owner.tokens, len(harness.core.tokens)) == ({}, 0, 0)


def test_a_once_token_survives_a_failed_export(harness: Harness) -> None:
    # Fault injection at the export: the token was not used, so it still works.
    owner = harness.connect()
    harness.allocate(owner, Allocate(16, 16, XR24))
    token = share(harness, owner, 1, once=True)
    harness.backend.fail("export", 1, errno.EMFILE)
    reply, fds = open_shared(harness, owner, token)
    assert (reply, fds) == (
        Error(
            ErrorCode.KERNEL, errno.EMFILE, "injected export fault: " + os.strerror(errno.EMFILE)
        ),
        [],
    )
    reply, _ = open_shared(harness, owner, token)
    assert isinstance(reply, Allocated)
    assert len(harness.core.tokens) == 0


def test_a_once_token_is_spent_only_when_its_open_was_sent(harness: Harness) -> None:
    # PROTOCOL.md: a ONCE token is used up by an open that succeeds. The send of its
    # fd may fail (ETOOMANYREFS: too many fds in flight) or be refused by the fd
    # budget: then the token opens again; while the send is under way it opens nothing.
    owner, rival = harness.connect(), harness.connect()
    harness.allocate(owner, Allocate(16, 16, XR24))
    token = share(harness, owner, 1, once=True)
    for undo in ("failed", "refused"):
        outcome = harness.core.handle(owner, 8, OpenShared(token))
        assert isinstance(outcome, Delivery) and outcome.part_fds == 1
        fds: list[int] = []
        try:
            assert isinstance(outcome.export(fds), Allocated)
        finally:
            fdpass.close_fds(fds)
        racing = harness.carry(harness.core.handle(rival, 9, OpenShared(token)))
        assert racing == [(Error(ErrorCode.UNKNOWN_TOKEN, 0, NO_TOKEN), [])]
        if undo == "failed":
            failure = outcome.failed(OSError(errno.ETOOMANYREFS, "too many references"))
            want = Error(ErrorCode.KERNEL, errno.ETOOMANYREFS, "too many references")
        else:
            failure = outcome.refused("fds in flight")
            want = Error(ErrorCode.LIMIT_EXCEEDED, 0, "fds in flight")
        assert failure.reply == want and not outcome.pending
        assert len(harness.core.tokens) == 1 and len(owner.buffers) == 1
    ((reply, fds),) = harness.carry(harness.core.handle(rival, 10, OpenShared(token)))
    assert isinstance(reply, Allocated) and len(fds) == 1
    assert len(harness.core.tokens) == 0


def test_a_once_token_whose_buffer_went_is_not_put_back(harness: Harness) -> None:
    owner = harness.connect()
    harness.allocate(owner, Allocate(16, 16, XR24))
    token = share(harness, owner, 1, once=True)
    outcome = harness.core.handle(owner, 8, OpenShared(token))
    assert isinstance(outcome, Delivery)
    fds: list[int] = []
    try:
        outcome.export(fds)
    finally:
        fdpass.close_fds(fds)
    assert harness.ask(owner, Release((1,))) == Released(1)
    outcome.failed(OSError(errno.ETOOMANYREFS, "too many references"))
    assert len(harness.core.tokens) == 0 and not owner.shares and owner.tokens == 0


def test_the_token_is_looked_up_at_export_not_before(harness: Harness) -> None:
    # The transport may wait for room between handle() and export(): whatever
    # happens meanwhile (a revoke, a release, the owner leaving) is seen by export().
    owner, guest = harness.connect(), harness.connect()
    harness.allocate(owner, Allocate(16, 16, XR24, count=3))
    revoked, released, left = (share(harness, owner, i) for i in (1, 2, 3))
    waiting = [harness.core.handle(guest, 8, OpenShared(t)) for t in (revoked, released, left)]
    assert harness.ask(owner, Revoke(revoked)) == Revoked()
    assert harness.ask(owner, Release((2,))) == Released(1)
    exports_before = harness.backend.calls["export"]
    for index, outcome in enumerate(waiting):
        if index == 2:
            harness.core.disconnect(owner)
        assert harness.carry(outcome) == [(Error(ErrorCode.UNKNOWN_TOKEN, 0, NO_TOKEN), [])]
    assert harness.backend.calls["export"] == exports_before


def test_a_token_for_other_uids(harness: Harness) -> None:
    owner, friend, stranger = (harness.connect(uid=u) for u in (5000, 5001, 5002))
    harness.allocate(owner, Allocate(16, 16, XR24))
    token = share(harness, owner, 1, uids=(5001,))
    assert open_shared(harness, stranger, token)[0] == Error(ErrorCode.UNKNOWN_TOKEN, 0, NO_TOKEN)
    assert isinstance(open_shared(harness, friend, token)[0], Allocated)
    assert code(open_shared(harness, owner, token)[0]) == ErrorCode.UNKNOWN_TOKEN


def test_share_errors(harness: Harness) -> None:
    owner = harness.connect()
    assert harness.error(owner, Share(1)) == Error(
        ErrorCode.UNKNOWN_BUFFER, 0, "unknown buffer id 1"
    )


def test_token_quotas_per_buffer_per_uid_and_the_bound() -> None:
    # Tokens are held per uid and per buffer now, not per connection: a uid with
    # many connections gets no more, and the daemon-wide bound holds for admins too.
    quotas = Quotas(tokens_per_uid=6, tokens_per_buffer=4)
    policy = Policy(admin_gid=ADMIN_GID, quotas=quotas, bounds=Bounds(tokens=10))
    harness = Harness(policy=policy)
    try:
        one, two = harness.connect(uid=5000), harness.connect(uid=5000)
        harness.allocate(one, Allocate(16, 16, XR24, count=2))
        harness.allocate(two, Allocate(16, 16, XR24))
        first = [share(harness, one, 1) for _ in range(4)]
        assert harness.error(one, Share(1)) == Error(
            ErrorCode.LIMIT_EXCEEDED, 0, "quota: 4 tokens per buffer; 4 live"
        )
        share(harness, one, 2)
        share(harness, two, 1)
        assert harness.error(two, Share(1)) == Error(
            ErrorCode.LIMIT_EXCEEDED, 0, "quota: 6 tokens per uid (5000); 6 live"
        )
        harness.ask(one, Revoke(first.pop()))
        share(harness, two, 1)  # a revoke makes room, on any connection of the uid
        admin = harness.connect(uid=5001, groups=frozenset({ADMIN_GID}))
        harness.allocate(admin, Allocate(16, 16, XR24))
        for _ in range(4):  # past the per-buffer quota: admins hold none
            share(harness, admin, 1)
        assert harness.error(admin, Share(1)) == Error(
            ErrorCode.LIMIT_EXCEEDED, 0, "bound: 10 tokens daemon-wide; 10 live"
        )
        harness.core.disconnect(one)  # its tokens go, and their charge with them
        assert harness.core.ledger.usage(5000).tokens == 2 and len(harness.core.tokens) == 6
        share(harness, admin, 1)
    finally:
        harness.close()


def test_only_the_owner_revokes_and_only_once(harness: Harness) -> None:
    owner, other = harness.connect(), harness.connect()
    harness.allocate(owner, Allocate(16, 16, XR24))
    token = share(harness, owner, 1)
    assert harness.error(other, Revoke(token)) == Error(ErrorCode.UNKNOWN_TOKEN, 0, NO_TOKEN)
    assert harness.ask(owner, Revoke(token)) == Revoked()
    assert harness.error(owner, Revoke(token)).code == ErrorCode.UNKNOWN_TOKEN
    assert harness.error(owner, Revoke(bytes(16))).code == ErrorCode.UNKNOWN_TOKEN


def test_releasing_a_buffer_kills_its_tokens_only(harness: Harness) -> None:
    owner = harness.connect()
    harness.allocate(owner, Allocate(16, 16, XR24, count=2))
    first, second, kept = (
        share(harness, owner, 1),
        share(harness, owner, 1),
        share(harness, owner, 2),
    )
    harness.ask(owner, Release((1,)))
    assert shares(harness, owner) == {2: {kept}} and owner.tokens == 1
    for token in (first, second):
        assert code(open_shared(harness, owner, token)[0]) == ErrorCode.UNKNOWN_TOKEN


# --- OPEN_BUFFER and LIST ------------------------------------------------------------------


def test_open_buffer_is_for_admins_and_root(harness: Harness) -> None:
    harness.core.configure(Limits(), Policy(admin_gid=ADMIN_GID))
    owner, plain = harness.connect(uid=5000), harness.connect(uid=5001)
    admin = harness.connect(uid=5002, groups=frozenset({ADMIN_GID}))
    root = harness.connect(uid=0)
    _, (fd,) = harness.allocate(owner, Allocate(16, 16, XR24))
    # A refusal needs no room: it is an Answer, not a Delivery.
    assert harness.error(plain, OpenBuffer(owner.number, 1)) == Error(
        ErrorCode.PERMISSION_DENIED, 0, "only root and the admin group open other clients' buffers"
    )
    for opener in (admin, root):
        ((reply, (opened,)),) = harness.carry(
            harness.core.handle(opener, 3, OpenBuffer(owner.number, 1))
        )
        assert isinstance(reply, Allocated) and reply.buffers[0].id == 0
        assert os.fstat(opened).st_ino == os.fstat(fd).st_ino
    for client, ident in ((owner.number, 2), (999, 1)):
        assert harness.carry(harness.core.handle(admin, 3, OpenBuffer(client, ident))) == [
            (Error(ErrorCode.UNKNOWN_BUFFER, 0, f"no buffer {client}:{ident}"), [])
        ]


def test_list_clients_and_buffers_as_seen_by_each(harness: Harness) -> None:
    harness.core.configure(Limits(), Policy(admin_gid=ADMIN_GID))
    one, two = harness.connect(uid=5000), harness.connect(uid=5001)
    admin = harness.connect(uid=5002, groups=frozenset({ADMIN_GID}))
    harness.allocate(one, Allocate(16, 16, XR24))
    harness.allocate(two, Allocate(32, 32, NV12, count=2))
    share(harness, two, 2)
    mine = harness.ask(one, List(protocol.LIST_CLIENTS))
    assert isinstance(mine, Listed) and mine.next == 0
    (entry,) = clients(mine)
    assert (entry.number, entry.uid, entry.buffers, entry.held_bytes, entry.name) == (
        one.number, 5000, 1, mmap.PAGESIZE, "core test",
    )  # fmt: skip
    everyone = harness.ask(admin, List(protocol.LIST_CLIENTS))
    assert isinstance(everyone, Listed)
    assert [e.number for e in clients(everyone)] == [one.number, two.number, admin.number]
    buffers = harness.ask(admin, List(protocol.LIST_BUFFERS))
    assert isinstance(buffers, Listed)
    rows = [(e.client, e.id, e.width, e.fourcc, e.tokens) for e in buffer_rows(buffers)]
    assert rows == [
        (one.number, 1, 16, XR24, 0),
        (two.number, 1, 32, NV12, 0),
        (two.number, 2, 32, NV12, 1),
    ]
    assert all(e.age_ms >= 0 for e in buffer_rows(buffers))
    assert harness.error(one, List(3)) == Error(ErrorCode.INVALID_ARGUMENT, 0, "LIST of kind 3")


def test_list_pages(harness: Harness) -> None:
    harness.core.configure(Limits(), Policy(bounds=ROOMY))
    root = harness.connect(uid=0)
    for _ in range(LIST_PAGE_CLIENTS):
        harness.connect(hello=False)
    pages = []
    start = 0
    while True:
        page = harness.ask(root, List(protocol.LIST_CLIENTS, start))
        assert isinstance(page, Listed)
        pages.append(len(page.entries))
        if not page.next:
            break
        start = page.next
    assert pages == [LIST_PAGE_CLIENTS, 1]  # the second from client 201 on
    harness.allocate(root, Allocate(16, 16, XR24, count=SERVED_PAGE_BUFFERS // 2))
    harness.allocate(root, Allocate(16, 16, XR24, count=SERVED_PAGE_BUFFERS // 2 + 3))
    first = harness.ask(root, List(protocol.LIST_BUFFERS))
    # The cursor is the key of the first buffer not listed yet (keys count up from 1).
    assert isinstance(first, Listed) and first.next == SERVED_PAGE_BUFFERS + 1
    rest = harness.ask(root, List(protocol.LIST_BUFFERS, first.next))
    assert isinstance(rest, Listed) and rest.next == 0
    assert [e.id for e in buffer_rows(first) + buffer_rows(rest)] == list(
        range(1, SERVED_PAGE_BUFFERS + 4)
    )
    assert SERVED_PAGE_BUFFERS <= LIST_PAGE_BUFFERS  # what PROTOCOL.md allows
