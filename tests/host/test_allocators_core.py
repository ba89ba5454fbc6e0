"""The daemon's core serving several allocators, with no socket: protocol versions 1 and 2.

Every allocator here is a real memfd backend standing for one kind (a card node's dumb
buffers, a heap, udmabuf, memfd): the core sees allocators only through BufferSource, and
what this file tests is which one it asks, and what it tells each version of client. The
import matrix is given by hand, as the process layer would record it at start.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from primed import fdpass, formats
from primed.daemon.core import Answer, Core, Delivery, Outcome
from primed.daemon.policy import Peer, Policy, Quotas
from primed.daemon.sessions import Session
from primed.errors import ErrorCode
from primed.formats import Format, Limits
from primed.kernel.allocation import (
    Allocation,
    Allocators,
    DeviceRow,
    ImportMatrix,
    Owner,
    Served,
)
from primed.kernel.backends import MemfdBackend
from primed.wire.protocol import (
    USAGE_CPU,
    USAGE_SCANOUT,
    Allocate,
    Allocated,
    AllocateFrom,
    AllocatorInfo,
    DeviceImports,
    Error,
    Hello,
    List,
    Listed,
    OpenShared,
    Queried,
    Query,
    Release,
    Released,
    Reply,
    Request,
    Share,
    Shared,
    Welcome,
)
from primed.wire.schema import Backend, Kind

XR24 = formats.fourcc("XR24")
RENDER_VIRTIO, RENDER_VGEM = "/dev/dri/renderD128", "/dev/dri/renderD129"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Counted(MemfdBackend):
    """A memfd backend that counts what it is asked to do."""

    def __init__(self) -> None:
        self.made = self.exported = self.freed = 0

    def allocate(
        self, fmt: Format, width: int, height: int, limits: Limits, owner: Owner | None = None
    ) -> Allocation:
        self.made += 1
        return super().allocate(fmt, width, height, limits, owner)

    def export(self, allocation: Allocation) -> int:
        self.exported += 1
        return super().export(allocation)

    def free(self, allocation: Allocation) -> None:
        self.freed += 1
        super().free(allocation)


NAMES = ("card0", "card1", "heap:system", "udmabuf")
KINDS = (Kind.DUMB, Kind.DUMB, Kind.HEAP, Kind.UDMABUF)
# virtio-gpu imports only card0's buffers; vgem every allocator's.
MATRIX = ImportMatrix(
    (
        DeviceRow(RENDER_VIRTIO, "virtio_gpu", (0, errno.ENODEV, errno.ENODEV, errno.ENODEV)),
        DeviceRow(RENDER_VGEM, "vgem", (0, 0, 0, 0)),
    )
)


class Harness:
    def __init__(self, policy: Policy | None = None):
        self.sources = [Counted() for _ in NAMES]
        self.allocators = Allocators(
            [Served(n, k, s) for n, k, s in zip(NAMES, KINDS, self.sources, strict=True)],
            MATRIX,
        )
        self.core = Core(self.allocators, Limits(), policy)
        self.received: list[int] = []

    def connect(self, version: int = 2) -> Session:
        session = self.core.connect(Peer(os.getpid(), os.getuid(), 1000, frozenset()))
        welcome = self.ask(session, Hello(1, version, "test"))
        assert isinstance(welcome, Welcome) and welcome.version == version
        return session

    def ask(self, session: Session, request: Request) -> Reply:
        outcome = self.core.handle(session, 7, request)
        assert isinstance(outcome, Answer) and not outcome.drop, outcome
        return outcome.reply

    def error(self, session: Session, request: Request) -> Error:
        reply = self.ask(session, request)
        assert isinstance(reply, Error), reply
        return reply

    def carry(self, outcome: Outcome) -> list[Allocated]:
        """The ALLOCATED parts of ``outcome``, their fds kept to be closed at the end."""
        assert isinstance(outcome, Delivery), outcome
        parts = []
        while outcome.pending:
            fds: list[int] = []
            reply = outcome.export(fds)
            self.received += fds
            assert isinstance(reply, Allocated), reply
            parts.append(reply)
            outcome.sent()
        return parts

    def allocate(self, session: Session, request: Request) -> list[Allocated]:
        return self.carry(self.core.handle(session, 9, request))

    def close(self) -> None:
        for session in list(self.core.sessions):
            self.core.disconnect(session)
        fdpass.close_fds(self.received)
        self.allocators.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    before = open_fds()
    made = Harness()
    try:
        yield made
    finally:
        made.close()
    assert open_fds() == before, "the core or the test leaked fds"


def test_version_1_sees_the_default_allocator_only(harness: Harness) -> None:
    session = harness.connect(version=1)
    welcome = harness.core.handle(
        harness.core.connect(Peer(1, os.getuid(), 1, frozenset())), 1, Hello(1, 1)
    )
    assert isinstance(welcome, Answer) and isinstance(welcome.reply, Welcome)
    assert welcome.reply.allocators == () and welcome.reply.version == 1
    (part,) = harness.allocate(session, Allocate(16, 16, XR24))
    assert part.allocator == 0
    assert [s.made for s in harness.sources] == [1, 0, 0, 0]
    queried = harness.ask(session, Query())
    assert isinstance(queried, Queried) and queried.devices == ()
    refused = harness.error(session, AllocateFrom(16, 16, XR24, name="card1"))
    assert refused.code == ErrorCode.UNKNOWN_OPCODE and "version 2" in refused.text
    assert [s.made for s in harness.sources] == [1, 0, 0, 0]


def test_version_2_lists_every_allocator_and_the_matrix(harness: Harness) -> None:
    session = harness.core.connect(Peer(os.getpid(), os.getuid(), 1000, frozenset()))
    welcome = harness.ask(session, Hello(1, 5, "new"))
    assert isinstance(welcome, Welcome) and welcome.version == 2
    memfd = ("memfd", (0, 0, 0), "")
    assert welcome.allocators == (
        AllocatorInfo("card0", Kind.DUMB, USAGE_SCANOUT | USAGE_CPU, *memfd),
        AllocatorInfo("card1", Kind.DUMB, USAGE_SCANOUT | USAGE_CPU, *memfd),
        AllocatorInfo("heap:system", Kind.HEAP, USAGE_CPU, *memfd),
        AllocatorInfo("udmabuf", Kind.UDMABUF, USAGE_CPU, *memfd),
    )
    queried = harness.ask(session, Query())
    assert isinstance(queried, Queried)
    assert queried.devices == (
        DeviceImports(RENDER_VIRTIO, "virtio_gpu", (0, errno.ENODEV, errno.ENODEV, errno.ENODEV)),
        DeviceImports(RENDER_VGEM, "vgem", (0, 0, 0, 0)),
    )


def test_a_named_allocator_makes_exports_and_frees_its_buffers(harness: Harness) -> None:
    session = harness.connect()
    parts = harness.allocate(session, AllocateFrom(16, 16, XR24, count=3, name="heap:system"))
    assert [p.allocator for p in parts] == [2]
    heap = harness.sources[2]
    assert (heap.made, heap.exported) == (3, 3)
    assert sum(s.made for s in harness.sources) == 3
    ids = tuple(b.id for b in parts[0].buffers)
    assert harness.ask(session, Release(ids[:2])) == Released(2)
    assert heap.freed == 2 and sum(s.freed for s in harness.sources) == 2
    harness.core.disconnect(session)  # the last one goes back to its allocator too
    assert heap.freed == 3 and sum(s.freed for s in harness.sources) == 3


def test_an_unknown_name_is_no_allocator(harness: Harness) -> None:
    session = harness.connect()
    refused = harness.error(session, AllocateFrom(16, 16, XR24, name="heap:cma"))
    assert refused == Error(
        ErrorCode.NO_ALLOCATOR,
        0,
        "no allocator named 'heap:cma' (served: card0, card1, heap:system, udmabuf)",
    )
    assert sum(s.made for s in harness.sources) == 0


def test_the_daemon_chooses_by_usage_and_import(harness: Harness) -> None:
    session = harness.connect()
    # Scanout: a card node's dumb buffer; the first one.
    (part,) = harness.allocate(session, AllocateFrom(16, 16, XR24, usage=USAGE_SCANOUT))
    assert part.allocator == 0
    # CPU and importable on vgem: the first allocator, still card0.
    (part,) = harness.allocate(
        session, AllocateFrom(16, 16, XR24, usage=USAGE_CPU, device=RENDER_VGEM)
    )
    assert part.allocator == 0
    # A heap buffer for vgem: asked by name and checked against the matrix.
    (part,) = harness.allocate(
        session, AllocateFrom(16, 16, XR24, name="udmabuf", device=RENDER_VGEM)
    )
    assert part.allocator == 3
    assert [s.made for s in harness.sources] == [2, 0, 0, 1]


def test_a_choice_that_nothing_fits_is_refused_saying_why(harness: Harness) -> None:
    session = harness.connect()
    refused = harness.error(
        session, AllocateFrom(16, 16, XR24, name="heap:system", device=RENDER_VIRTIO)
    )
    assert refused.code == ErrorCode.NO_ALLOCATOR
    assert refused.text == f"heap:system's buffers do not serve import on {RENDER_VIRTIO} (ENODEV)"
    refused = harness.error(session, AllocateFrom(16, 16, XR24, name="udmabuf", usage=1))
    assert refused.text == "udmabuf's buffers do not serve scanout"
    refused = harness.error(
        session, AllocateFrom(16, 16, XR24, name="card1", usage=USAGE_SCANOUT, device=RENDER_VIRTIO)
    )
    assert refused.text == f"card1's buffers do not serve import on {RENDER_VIRTIO} (ENODEV)"
    refused = harness.error(session, AllocateFrom(16, 16, XR24, device="/dev/dri/renderD200"))
    assert refused.code == ErrorCode.NO_ALLOCATOR
    assert "/dev/dri/renderD200 is not in the import matrix" in refused.text
    assert RENDER_VIRTIO in refused.text and RENDER_VGEM in refused.text
    refused = harness.error(session, AllocateFrom(16, 16, XR24, usage=4))
    assert refused == Error(ErrorCode.INVALID_ARGUMENT, 0, "unknown usage bits 0x4")
    # The request's own checks follow the choice, as for ALLOCATE.
    refused = harness.error(session, AllocateFrom(16, 16, 0x20202020, name="card1"))
    assert refused.code == ErrorCode.UNSUPPORTED_FORMAT
    assert sum(s.made for s in harness.sources) == 0


def test_one_quota_holds_across_allocators() -> None:
    before = open_fds()
    harness = Harness(Policy(quotas=Quotas(buffers_per_client=3)))
    try:
        session = harness.connect()
        harness.allocate(session, Allocate(16, 16, XR24))
        harness.allocate(session, AllocateFrom(16, 16, XR24, name="heap:system"))
        harness.allocate(session, AllocateFrom(16, 16, XR24, name="udmabuf"))
        refused = harness.error(session, AllocateFrom(16, 16, XR24, name="card1"))
        assert refused.code == ErrorCode.QUOTA_EXCEEDED
        queried = harness.ask(session, Query())
        assert isinstance(queried, Queried) and queried.used_buffers == 3
        listed = harness.ask(session, List(2))
        assert isinstance(listed, Listed) and len(listed.entries) == 3
    finally:
        harness.close()
    assert open_fds() == before


def test_a_token_opens_a_buffer_of_any_allocator_in_either_version(harness: Harness) -> None:
    owner = harness.connect()
    (part,) = harness.allocate(owner, AllocateFrom(16, 16, XR24, name="udmabuf"))
    shared = harness.ask(owner, Share(part.buffers[0].id))
    assert isinstance(shared, Shared)
    newer, older = harness.connect(version=2), harness.connect(version=1)
    (got,) = harness.carry(harness.core.handle(newer, 3, OpenShared(shared.token)))
    assert got.allocator == 3  # version 2 is told where it comes from
    (got,) = harness.carry(harness.core.handle(older, 3, OpenShared(shared.token)))
    assert got.allocator == 0  # version 1 has no such field: 0 always
    assert harness.sources[3].exported == 3 and harness.sources[0].exported == 0


def test_a_bare_source_is_one_allocator_named_for_its_kind() -> None:
    allocators = Allocators.of(MemfdBackend())
    assert [(s.name, s.kind, s.usage) for s in allocators.served] == [
        ("memfd", Kind.MEMFD, USAGE_CPU)
    ]
    assert allocators.kind == Backend.MEMFD and Allocators.of(allocators) is allocators
    with pytest.raises(ValueError, match="names must differ"):
        Allocators([Served("card0", Kind.DUMB, MemfdBackend())] * 2)
    with pytest.raises(ValueError, match="at least one"):
        Allocators([])
