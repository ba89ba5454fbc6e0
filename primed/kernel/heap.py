"""dma-buf heaps (/dev/dma_heap/NAME): plain memory handed out as dma-bufs.

DMA_HEAP_IOCTL_ALLOC, named as include/uapi/linux/dma-heap.h names it
(tests/host/test_alloc_abi.py checks against the header), and
:class:`HeapBackend`, a BufferSource whose buffers are laid out as memfd ones
(formats.plan, every plane in one buffer) but are dma-bufs any importer can
take: vgem imports them; virtio-gpu refuses them with ENODEV, as it refuses
every buffer it did not make.

Ownership: the daemon's Allocation holds the heap's dma-buf fd (``ref``);
each delivery is a dup of it. A dma-buf has exactly one open file description
(the kernel hands out that same file on every export, even PRIME's), so a new
one per delivery is not possible; sharing it costs nothing either: the status
flags F_SETFL can change (O_NONBLOCK, O_ASYNC, ...) mean nothing to a dma-buf,
which has no read or write, and its access mode is fixed at allocation.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from primed.errors import KernelError, NoDevice
from primed.formats import Format, Limits, plan
from primed.kernel import dmabuf, drm
from primed.kernel.allocation import Allocation, Owner
from primed.kernel.backends import DmabufFdBackend, page_rounded
from primed.wire.schema import Backend, Kind

#: Where the kernel puts one character device per heap.
HEAP_ROOT = "/dev/dma_heap"

# struct dma_heap_allocation_data { __u64 len; __u32 fd; __u32 fd_flags; __u64 heap_flags; }
dma_heap_allocation_data = struct.Struct("=QIIQ")
DMA_HEAP_IOCTL_ALLOC = drm._iowr("H", 0x0, dma_heap_allocation_data.size)
#: The only fd flags the kernel takes (EINVAL for any other, O_NONBLOCK included).
DMA_HEAP_VALID_FD_FLAGS = os.O_CLOEXEC | os.O_ACCMODE
#: No heap flags are defined (EINVAL for any bit).
DMA_HEAP_VALID_HEAP_FLAGS = 0


def heaps(root: str = HEAP_ROOT) -> list[str]:
    """The names of the heaps this kernel offers, sorted; [] without dma-heap support."""
    try:
        return sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"list {root}") from None


def open_heap(name: str, root: str = HEAP_ROOT) -> int:
    """Open heap ``name``; the caller closes the fd.

    Raises NoDevice naming the node if it does not exist, KernelError otherwise
    (EACCES: the node is root's, mode 0600, on Debian's 6.12).
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a heap name: {name!r}")
    path = os.path.join(root, name)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        offered = ", ".join(heaps(root)) or f"no {root}: the kernel has no dma-buf heaps"
        raise NoDevice(errno.ENOENT, f"open {path} ({offered})") from None
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"open {path}") from None


def alloc(heap_fd: int, length: int, fd_flags: int = os.O_RDWR | os.O_CLOEXEC) -> int:
    """DMA_HEAP_IOCTL_ALLOC: a new dma-buf fd of ``length`` bytes (the kernel rounds up to a page).

    The system heap gives zeroed pages, all at once; it has no limit of its own
    short of memory (the OOM killer ends the caller first), so callers must cap
    ``length``. Raises KernelError (EINVAL for length 0 or bad flags).
    """
    arg = bytearray(dma_heap_allocation_data.pack(length, 0, fd_flags, 0))
    try:
        fcntl.ioctl(heap_fd, DMA_HEAP_IOCTL_ALLOC, arg, True)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"DMA_HEAP_IOCTL_ALLOC({length})") from None
    return int(dma_heap_allocation_data.unpack(arg)[1])


class HeapBackend(DmabufFdBackend):
    """Buffers from one dma-buf heap, e.g. ``HeapBackend("system")``.

    ``kind`` is Backend.DRM, the wire's name for "a dma-buf" (the wire has no
    heap kind yet); ``node`` is the heap's path; ``driver`` names the heap.
    Raises NoDevice if the heap does not exist.
    """

    kind = Backend.DRM
    allocator_kind = Kind.HEAP

    def __init__(self, name: str = "system", root: str = HEAP_ROOT):
        self.fd = open_heap(name, root)
        self.name = name
        self.node = os.path.join(root, name)
        self.driver = drm.Version(f"dma-heap/{name}", 0, 0, 0, "", f"dma-buf heap {self.node}")
        self.namer = dmabuf.Namer(self.node)

    def allocate(
        self, fmt: Format, width: int, height: int, limits: Limits, owner: Owner | None = None
    ) -> Allocation:
        lay = plan(fmt, width, height, limits)  # refuses before any ioctl
        size = page_rounded(lay.size)
        return self._adopt(alloc(self.fd, size), fmt, width, height, lay, size, owner)
