"""What the daemon's core holds of a buffer, and what it asks of an allocator. No I/O here.

An allocator (a :class:`BufferSource`: :mod:`primed.kernel.backends`,
:mod:`primed.kernel.heap`, :mod:`primed.kernel.udmabuf`) makes an
:class:`Allocation`, exports it as a new fd for each delivery (the caller sends
it, then closes its copy), and frees it. The daemon keeps the Allocation (a GEM
handle, or an fd) for as long as the owning client holds it; every fd already
delivered stays valid after that. The daemon's core sees allocators only
through this protocol, so it imports nothing that makes a system call.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Protocol

from primed.formats import MOD_LINEAR, Format, Layout, Limits
from primed.wire.schema import Backend

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
