"""udmabuf (/dev/udmabuf): a dma-buf made of a sealed memfd's pages.

UDMABUF_CREATE, named as include/uapi/linux/udmabuf.h names it
(tests/host/test_alloc_abi.py checks against the header), and
:class:`UdmabufBackend`, a BufferSource laid out as memfd buffers are, whose
buffers are dma-bufs: vgem imports them, virtio-gpu refuses them (ENODEV).

The kernel's rules (seen on Debian's 6.12): the memfd must carry F_SEAL_SHRINK
and must not carry F_SEAL_WRITE; offset and size are page-aligned and inside
the file; size is at most the module's size_limit_mb (64 MiB by default,
/sys/module/udmabuf/parameters/size_limit_mb); EINVAL for each of these.

Ownership: the backend closes the memfd as soon as the udmabuf exists. The
udmabuf pins the pages, so the buffer lives on whole; keeping the memfd would
cost a second fd per buffer and keep a second way in to those pages that can
drift from the dma-buf: F_SEAL_SHRINK does not forbid punching a hole, after
which the memfd reads zeros where the udmabuf still shows the old pixels. The
price: pinned pages that left the memfd count in no /proc/meminfo field but
MemFree (not Shmem). After the udmabuf's last fd closes, MemFree recovers
late, not at once (seen on 6.12 with a 64 MiB buffer; nothing piled up over
12 rounds): use debugfs's dma_buf/bufinfo, not MemFree, to see a buffer go.
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

#: The misc device.
UDMABUF_DEVICE = "/dev/udmabuf"
#: Where the kernel shows the largest size UDMABUF_CREATE accepts, in MiB.
SIZE_LIMIT_PARAMETER = "/sys/module/udmabuf/parameters/size_limit_mb"

# struct udmabuf_create { __u32 memfd; __u32 flags; __u64 offset; __u64 size; }
udmabuf_create = struct.Struct("=IIQQ")
UDMABUF_CREATE = drm._iow("u", 0x42, udmabuf_create.size)
UDMABUF_FLAGS_CLOEXEC = 0x01

#: Seals the backend puts on its memfds: no resizing at all, and no more seals
#: (so nobody can add F_SEAL_WRITE, which udmabuf refuses).
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def open_device(path: str = UDMABUF_DEVICE) -> int:
    """Open the udmabuf device; the caller closes the fd.

    Raises NoDevice naming ``path`` if it does not exist, KernelError otherwise
    (EACCES: it is root:kvm 0660 on Debian's 6.12).
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoDevice(errno.ENOENT, f"open {path} (the kernel has no udmabuf)") from None
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"open {path}") from None


def size_limit() -> int | None:
    """The kernel's size limit for one udmabuf in bytes, None if it does not say."""
    try:
        with open(SIZE_LIMIT_PARAMETER, encoding="ascii") as f:
            return int(f.read().strip()) << 20
    except (OSError, ValueError):
        return None


def create(
    device_fd: int, memfd: int, offset: int, size: int, flags: int = UDMABUF_FLAGS_CLOEXEC
) -> int:
    """UDMABUF_CREATE: a new dma-buf fd over ``size`` bytes of ``memfd`` from ``offset``.

    The fd is the ioctl's return value. Raises KernelError (EINVAL when a rule
    in the module docstring is broken).
    """
    # A mutable buffer makes fcntl.ioctl return the ioctl's result, not a copy.
    arg = bytearray(udmabuf_create.pack(memfd, flags, offset, size))
    try:
        return int(fcntl.ioctl(device_fd, UDMABUF_CREATE, arg, True))
    except OSError as e:
        what = f"UDMABUF_CREATE(offset {offset}, size {size})"
        limit = size_limit()
        if e.errno == errno.EINVAL and limit is not None and size > limit:
            what += f": over the kernel's limit of {limit >> 20} MiB ({SIZE_LIMIT_PARAMETER})"
        raise KernelError(e.errno or errno.EIO, what) from None


def sealed_memfd(size: int, name: str = "primed-udmabuf") -> int:
    """A memfd of ``size`` bytes carrying SEALS, as UDMABUF_CREATE wants it. Raises KernelError."""
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, "memfd_create") from None
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError as e:
        os.close(fd)
        raise KernelError(e.errno or errno.EIO, "memfd size and seals") from None
    return fd


class UdmabufBackend(DmabufFdBackend):
    """Buffers made by udmabuf over sealed memfds.

    ``kind`` is Backend.DRM, the wire's name for "a dma-buf" (the wire has no
    udmabuf kind yet). Raises NoDevice if the device does not exist.
    """

    kind = Backend.DRM
    allocator_kind = Kind.UDMABUF

    def __init__(self, path: str = UDMABUF_DEVICE):
        self.fd = open_device(path)
        self.node = path
        self.driver = drm.Version("udmabuf", 0, 0, 0, "", f"udmabuf over sealed memfds ({path})")
        self.namer = dmabuf.Namer(path)

    def allocate(
        self, fmt: Format, width: int, height: int, limits: Limits, owner: Owner | None = None
    ) -> Allocation:
        lay = plan(fmt, width, height, limits)  # refuses before any ioctl
        size = page_rounded(lay.size)
        memfd = sealed_memfd(size)
        try:
            fd = create(self.fd, memfd, 0, size)
        finally:
            os.close(memfd)  # the udmabuf holds the pages: see the module docstring
        return self._adopt(fd, fmt, width, height, lay, size, owner)
