"""What the daemon's core holds of a buffer, and what it asks of an allocator. No I/O here.

An allocator (a :class:`BufferSource`: :mod:`primed.kernel.backends`,
:mod:`primed.kernel.heap`, :mod:`primed.kernel.udmabuf`) makes an
:class:`Allocation`, exports it as a new fd for each delivery (the caller sends
it, then closes its copy), and frees it. The daemon keeps the Allocation (a GEM
handle, or an fd) for as long as the owning client holds it; every fd already
delivered stays valid after that. The daemon's core sees allocators only
through this protocol, so it imports nothing that makes a system call.

A daemon serving several allocators is given an :class:`Allocators`: itself a
BufferSource (its default allocator, the first), which also holds every
allocator under its name, what each is and serves (:class:`Served`), and the
import matrix recorded at start (:class:`ImportMatrix`). Each Allocation
remembers which allocator made it (``source``), and export and free go there.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from primed.formats import MOD_LINEAR, Format, Layout, Limits
from primed.wire.messages import USAGE_CPU, USAGE_SCANOUT
from primed.wire.schema import Backend, Kind

if TYPE_CHECKING:  # a type only: the core never calls into the ioctl module
    from primed.kernel.drm import Version


@dataclasses.dataclass(slots=True, eq=False)
class Allocation:
    width: int
    height: int
    fourcc: int
    size: int
    planes: tuple[tuple[int, int], ...]  #: (offset, pitch) of each plane
    ref: int  #: what keeps it alive: the GEM handle (DRM) or the fd (memfd, heap, udmabuf)
    modifier: int = MOD_LINEAR
    born: float = dataclasses.field(default_factory=time.monotonic)
    source: int = 0  #: the position of the allocator that made it, in its Allocators


class BufferSource(Protocol):
    kind: Backend
    driver: Version
    node: str

    def allocate(self, fmt: Format, width: int, height: int, limits: Limits) -> Allocation: ...
    def export(self, allocation: Allocation) -> int: ...
    def free(self, allocation: Allocation) -> None: ...
    def close(self) -> None: ...


def planes_of(lay: Layout) -> tuple[tuple[int, int], ...]:
    """A layout's planes as an Allocation holds them: (offset, pitch) pairs."""
    return tuple((p.offset, p.pitch) for p in lay.planes)


#: What each kind of allocator's buffers serve (the wire's USAGE_ bits).
USAGE = {
    Kind.DUMB: USAGE_SCANOUT | USAGE_CPU,
    Kind.HEAP: USAGE_CPU,
    Kind.UDMABUF: USAGE_CPU,
    Kind.MEMFD: USAGE_CPU,
}


def kind_of(source: BufferSource) -> Kind:
    """What ``source`` is, by the ``allocator_kind`` it declares; a source that declares
    none is a dumb-buffer one if it makes dma-bufs, else a memfd one."""
    kind = getattr(source, "allocator_kind", None)
    if isinstance(kind, Kind):
        return kind
    return Kind.MEMFD if source.kind == Backend.MEMFD else Kind.DUMB


def name_for(kind: Kind, node: str) -> str:
    """An allocator's name: its card node's (``card0``), ``heap:`` and the heap's
    (``heap:system``), ``udmabuf`` or ``memfd``."""
    base = node.rpartition("/")[2]
    if kind == Kind.DUMB:
        return base or "dumb"
    if kind == Kind.HEAP:
        return f"heap:{base}"
    return kind.name.lower()


@dataclasses.dataclass(frozen=True, slots=True)
class Served:
    """One allocator of a daemon: its name (``card0``, ``heap:system``, ``udmabuf``,
    ``memfd``), what it is, the usage bits its buffers serve, and the source itself."""

    name: str
    kind: Kind
    source: BufferSource

    @property
    def usage(self) -> int:
        return USAGE[self.kind]


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceRow:
    """One render node of the import matrix: for each allocator (in the Allocators'
    order) what importing one of its buffers there gave: 0, or the kernel's errno."""

    node: str
    driver: str
    imports: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class ImportMatrix:
    """What was recorded at start: which allocator's buffers import on which render node."""

    rows: tuple[DeviceRow, ...] = ()

    def row(self, node: str) -> DeviceRow | None:
        return next((r for r in self.rows if r.node == node), None)


class Allocators:
    """Several allocators behind one BufferSource.

    As a BufferSource it is its first allocator, the default: what a version-1
    client and ALLOCATE allocate from (``kind``, ``driver`` and ``node`` are its).
    :meth:`allocate_from` allocates from any of them; every Allocation carries the
    position of the one that made it, and :meth:`export` and :meth:`free` go to it.
    Closing closes them all.
    """

    def __init__(self, served: Sequence[Served], matrix: ImportMatrix | None = None):
        if not served:
            raise ValueError("an Allocators needs at least one allocator")
        names = [s.name for s in served]
        if len(set(names)) != len(names):
            raise ValueError(f"allocator names must differ: {names}")
        self.served = tuple(served)
        self.matrix = matrix or ImportMatrix()
        default = served[0].source
        self.kind, self.driver, self.node = default.kind, default.driver, default.node

    @classmethod
    def of(cls, source: BufferSource) -> Allocators:
        """``source`` itself if it is an Allocators, else it alone, under its kind's name."""
        if isinstance(source, Allocators):
            return source
        kind = kind_of(source)
        return cls([Served(name_for(kind, source.node), kind, source)])

    def index(self, name: str) -> int | None:
        """The position of the allocator called ``name``; None if there is none."""
        return next((i for i, s in enumerate(self.served) if s.name == name), None)

    def allocate_from(
        self, index: int, fmt: Format, width: int, height: int, limits: Limits
    ) -> Allocation:
        allocation = self.served[index].source.allocate(fmt, width, height, limits)
        allocation.source = index
        return allocation

    def allocate(self, fmt: Format, width: int, height: int, limits: Limits) -> Allocation:
        return self.allocate_from(0, fmt, width, height, limits)

    def export(self, allocation: Allocation) -> int:
        return self.served[allocation.source].source.export(allocation)

    def free(self, allocation: Allocation) -> None:
        self.served[allocation.source].source.free(allocation)

    def close(self) -> None:
        failed: OSError | None = None
        for served in self.served:  # each one, whatever the others do
            try:
                served.source.close()
            except OSError as e:
                failed = failed or e
        if failed is not None:
            raise failed
