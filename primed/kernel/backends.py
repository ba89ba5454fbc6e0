"""Two of the daemon's allocators: DRM dumb buffers, and sealed memfds.

Each is a :class:`~primed.kernel.allocation.BufferSource`; that module says what
the daemon expects of one, and how a buffer is named for its owner.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

from primed.errors import KernelError, NoDevice
from primed.formats import Format, Layout, LayoutError, Limits, layout, plan
from primed.kernel import dmabuf, drm
from primed.kernel.allocation import Allocation, Owner, planes_of
from primed.wire.schema import Backend, Kind

#: The longest memfd name (MFD_NAME_MAX_LEN: NAME_MAX less "memfd:"), NUL not counted.
MFD_NAME_MAX_LEN = 249
#: What a memfd is called when it has no owner.
MEMFD_NAME = "primed-buffer"
#: The longest dma-buf name, NUL not counted.
DMABUF_LABEL_LEN = dmabuf.DMA_BUF_NAME_LEN - 1


def page_rounded(size: int) -> int:
    """``size`` rounded up to whole pages: what a buffer made of pages holds."""
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


class DmabufFdBackend:
    """What the allocators whose Allocation holds a dma-buf fd share (dma-heap,
    udmabuf): a delivery is a dup of that fd (a dma-buf has one open file
    description, whatever the path: see :mod:`primed.kernel.heap`), freeing closes
    it, and the allocator's device fd is ``fd``. Each buffer is named for its owner
    as soon as it exists (:meth:`_adopt`), through ``namer``."""

    fd: int
    namer: dmabuf.Namer

    def _adopt(
        self,
        fd: int,
        fmt: Format,
        width: int,
        height: int,
        lay: Layout,
        size: int,
        owner: Owner | None,
    ) -> Allocation:
        """The Allocation that owns ``fd``, a dma-buf just made, named for ``owner`` (a
        refusal is counted, not raised: see Namer). Until it is returned the fd is this
        call's: closed if anything fails."""
        made = False
        try:
            if owner is not None:
                self.namer.name(fd, owner.label(DMABUF_LABEL_LEN))
            allocation = Allocation(width, height, fmt.fourcc, size, planes_of(lay), fd)
            made = True
            return allocation
        finally:
            if not made:
                os.close(fd)

    def export(self, allocation: Allocation) -> int:
        try:
            return os.dup(allocation.ref)  # F_DUPFD_CLOEXEC: never inherited
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, "dup") from None

    def set_name(self, allocation: Allocation, name: str) -> None:
        """Label the buffer for its owner (DMA_BUF_SET_NAME); every fd to it shows the name."""
        dmabuf.set_name(allocation.ref, name)

    def free(self, allocation: Allocation) -> None:
        # Fds already delivered keep the buffer; the memory goes with the last one.
        os.close(allocation.ref)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DumbBackend:
    """Dumb buffers on a DRM card node, exported with PRIME.

    A buffer is named at allocation through a PRIME export made for the purpose and
    closed at once: the exporter's handle keeps that one dma-buf (the kernel's prime
    table holds a reference until the handle is destroyed), and every later export
    of the handle gives that same dma-buf, name and all. If the export fails the
    buffer goes unnamed, counted as a refusal (a name is not worth failing for).
    """

    kind = Backend.DRM
    allocator_kind = Kind.DUMB

    def __init__(self, path: str):
        self.node = path
        self.fd = drm.open_node(path)
        try:
            self.driver = drm.get_version(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self.namer = dmabuf.Namer(path)

    def allocate(
        self, fmt: Format, width: int, height: int, limits: Limits, owner: Owner | None = None
    ) -> Allocation:
        plan(fmt, width, height, limits)  # refuse before any ioctl
        # All planes share one dumb buffer. It is asked for in 32-bit pixels,
        # the one depth every driver takes (virtio-gpu refuses any other): wide
        # enough for a row of plane 0, with enough rows for every plane. The
        # kernel picks the pitch; the planes are laid out on it, and take no more
        # rows than asked for, since chroma pitches scale with plane 0's.
        tight = layout(fmt, width, height, pitch0=width * fmt.cpp[0])
        row = tight.planes[0].pitch
        rows = -(-tight.size // row)
        dumb = drm.create_dumb(self.fd, -(-row // 4), rows, 32)
        made = False  # the handle is ours until the Allocation that owns it is returned
        try:
            try:
                lay = layout(fmt, width, height, pitch0=dumb.pitch)
                if lay.size > dumb.size:
                    raise LayoutError(f"kernel gave {dumb.size} bytes, {lay.size} needed")
            except LayoutError as e:
                raise KernelError(
                    errno.EINVAL, f"unusable dumb buffer pitch {dumb.pitch}: {e}"
                ) from e
            allocation = Allocation(
                width, height, fmt.fourcc, dumb.size, planes_of(lay), dumb.handle
            )
            if owner is not None:
                self._name(dumb.handle, owner.label(DMABUF_LABEL_LEN))
            made = True
            return allocation
        finally:
            if not made:
                drm.destroy_dumb(self.fd, dumb.handle)

    def _name(self, handle: int, label: str) -> None:
        try:
            fd = drm.handle_to_fd(self.fd, handle)
        except KernelError as e:
            self.namer.refused(e.errno or errno.EIO, label)
            return
        try:
            self.namer.name(fd, label)
        finally:
            os.close(fd)

    def export(self, allocation: Allocation) -> int:
        return drm.handle_to_fd(self.fd, allocation.ref)

    def free(self, allocation: Allocation) -> None:
        drm.destroy_dumb(self.fd, allocation.ref)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def find_dumb_node(root: str = "/dev/dri") -> str:
    """The first card node whose driver creates a dumb buffer (tried, not asked:
    vgem makes them but answers DRM_CAP_DUMB_BUFFER with EOPNOTSUPP).

    Raises NoDevice naming what was tried.
    """
    tried = []
    for node in drm.nodes(root):
        if not node.primary:
            continue
        try:
            fd = drm.open_node(node.path)
        except KernelError as e:
            tried.append(f"{node.path}: {e}")
            continue
        try:
            dumb = drm.create_dumb(fd, 16, 16, 32)
            drm.destroy_dumb(fd, dumb.handle)
            return node.path
        except KernelError as e:
            tried.append(f"{node.path} ({node.driver}): {e}")
        finally:
            os.close(fd)
    detail = "; ".join(tried) if tried else f"no card node under {root}"
    raise NoDevice(errno.ENODEV, f"no DRM device that creates dumb buffers ({detail})")


_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class MemfdBackend:
    """Sealed memfds laid out like dumb buffers: CPU-only sharing, no DRM device needed.

    The seals forbid resizing, so no holder can shrink a buffer under another's
    mapping (SIGBUS); writing stays allowed, as with a dma-buf. Each export is
    an open file description of its own, so no holder's fcntl(F_SETFL) reaches
    another holder. A buffer's owner is its memfd's name (``/memfd:primed:...`` in
    /proc/PID/fd), which every holder sees, however it got the fd.
    """

    kind = Backend.MEMFD
    allocator_kind = Kind.MEMFD
    node = ""
    driver = drm.Version("memfd", 0, 0, 0, "", "sealed memfd buffers")

    def allocate(
        self, fmt: Format, width: int, height: int, limits: Limits, owner: Owner | None = None
    ) -> Allocation:
        lay = plan(fmt, width, height, limits)
        size, planes = page_rounded(lay.size), planes_of(lay)  # planes_of: cached per layout
        # The owner's label is the memfd's name from its birth: no step of its own.
        name = MEMFD_NAME if owner is None else owner.label(MFD_NAME_MAX_LEN)
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, "memfd_create") from None
        made = False  # the memfd is ours until the Allocation that owns it is returned
        try:
            try:
                os.ftruncate(fd, size)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            except OSError as e:
                raise KernelError(e.errno or errno.EIO, "memfd size and seals") from None
            allocation = Allocation(width, height, fmt.fourcc, size, planes, fd)
            made = True
            return allocation
        finally:
            if not made:
                os.close(fd)

    def export(self, allocation: Allocation) -> int:
        # Reopened, not dup()ed: a dup shares one open file description, whose
        # status flags any holder may change (O_APPEND turns every other holder's
        # pwrite into an append past the sealed end: EPERM). Each delivery gets
        # its own description; the seals belong to the inode and bind them all.
        try:
            return os.open(f"/proc/self/fd/{allocation.ref}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            # Still named "dup" (a dup of the file, not of the fd): the text clients see.
            raise KernelError(e.errno or errno.EIO, "dup") from None

    def free(self, allocation: Allocation) -> None:
        os.close(allocation.ref)

    def close(self) -> None:
        pass
