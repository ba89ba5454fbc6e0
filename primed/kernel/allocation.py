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

Every buffer is named for its owner (an :class:`Owner`, which the core passes to
``allocate``) before any fd to it leaves the daemon, so that whoever holds it
can see whose it is: a dma-buf by DMA_BUF_SET_NAME (fdinfo's ``name:`` line), a
memfd by the name it is created with (``/memfd:NAME`` in /proc/PID/fd and maps).
:meth:`Owner.label` makes that name; what it says is documented there.
"""

from __future__ import annotations

import dataclasses
import functools
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


#: What every buffer's name starts with.
LABEL_PREFIX = "primed"
_HEAD = f"{LABEL_PREFIX}:"  # one global look-up and no format step per label
#: Characters of a client's own name a label keeps; every other becomes "_".
_KEPT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@functools.lru_cache(maxsize=256)
def _cleaned(name: str) -> str:
    # Cached: a client's name is the same for every buffer it allocates.
    return "".join(c if c in _KEPT else "_" for c in name)


@dataclasses.dataclass(slots=True)  # not frozen: one is made per buffer, and frozen costs 2x
class Owner:
    """Whose a new buffer is, as the daemon knows it: the client's uid and pid (from
    SO_PEERCRED, the kernel's word), the id the buffer will have among the client's
    (the daemon's count), and the name the client gave itself at HELLO (its own
    word, so untrusted: it may say anything)."""

    uid: int
    pid: int
    id: int
    name: str = ""

    def label(self, limit: int) -> str:
        """The buffer's name, at most ``limit`` bytes of ASCII (no NUL, no newline):
        ``primed:UID:ID:PID:NAME``, e.g. ``primed:1000:3:4242:weston``.

        The daemon's fields come first, each whole or not at all (a field that would
        pass ``limit`` is left out with everything after it); the client's name comes
        last, cut to the room left, with every character but ASCII letters, digits and
        ``. _ -`` replaced by ``_``. So a name can hold no ``:`` and push no field out
        of its place: splitting a label at its first four colons always gives the
        daemon's uid, id and pid, whatever the client called itself. A client with no
        name gets ``primed:UID:ID:PID``. Within the dma-buf limit (31 bytes) uid and id
        fit whole until a client's ids pass 13 digits (with a 10-digit uid); past that
        the label is ``primed:UID``, short but never wrong.
        """
        text = f"{_HEAD}{self.uid}:{self.id}:{self.pid}"
        if len(text) > limit:  # rare: huge ids or pids; drop whole fields from the end
            text = LABEL_PREFIX
            for field in (self.uid, self.id):
                part = f":{field}"
                if len(text) + len(part) > limit:
                    break
                text += part
            return text
        name = self.name
        if name:
            room = limit - len(text) - 1
            if room > 0:
                return f"{text}:{_cleaned(name)[:room]}"
        return text


class BufferSource(Protocol):
    """An allocator. ``allocate`` names the buffer for ``owner`` before returning it
    (see :meth:`Owner.label`); with no owner (the daemon's own test buffers) it may
    leave it unnamed."""

    kind: Backend
    driver: Version
    node: str

    def allocate(
        self, fmt: Format, width: int, height: int, limits: Limits, owner: Owner | None = None
    ) -> Allocation: ...
    def export(self, allocation: Allocation) -> int: ...
    def free(self, allocation: Allocation) -> None: ...
    def close(self) -> None: ...


#: planes_of()'s cache: id(layout) -> (the layout, its pairs). The layout is kept, so
#: its id can't be reused while its entry stands, and a hit must be that very layout.
_PAIRS: dict[int, tuple[Layout, tuple[tuple[int, int], ...]]] = {}
_PAIRS_MAX = 256


def planes_of(lay: Layout) -> tuple[tuple[int, int], ...]:
    """A layout's planes as an Allocation holds them: (offset, pitch) pairs.

    Cached per layout object: formats.plan() hands out the same Layout for a size it
    has planned, so the allocators' per-buffer call is one dict look-up."""
    hit = _PAIRS.get(id(lay))
    if hit is not None and hit[0] is lay:
        return hit[1]
    pairs = tuple((p.offset, p.pitch) for p in lay.planes)
    if len(_PAIRS) >= _PAIRS_MAX:  # bounded: the DRM backends' layouts are made per buffer
        _PAIRS.clear()
    _PAIRS[id(lay)] = (lay, pairs)
    return pairs


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
        self._default = default.allocate  # bound once: allocate() is per buffer

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
        self,
        index: int,
        fmt: Format,
        width: int,
        height: int,
        limits: Limits,
        owner: Owner | None = None,
    ) -> Allocation:
        allocation = self.served[index].source.allocate(fmt, width, height, limits, owner)
        allocation.source = index
        return allocation

    def allocate(
        self, fmt: Format, width: int, height: int, limits: Limits, owner: Owner | None = None
    ) -> Allocation:
        # Straight to the default allocator, not through allocate_from: one call less
        # per buffer, and an Allocation's source is already 0, the default's position.
        return self._default(fmt, width, height, limits, owner)

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
