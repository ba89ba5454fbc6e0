"""The few DRM and dma-buf ioctls primed needs, named as the kernel names them.

Structs and request numbers follow include/uapi/drm/drm.h, drm_mode.h and
linux/dma-buf.h; tests/host/test_drm_abi.py compiles those headers and checks
every size and number here against them. Each wrapper takes a file descriptor,
issues one ioctl and raises :class:`KernelError` (with the kernel's errno) on
failure: no state, no ownership. Ownership lives in the callers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import glob
import os
import struct

from primed.errors import KernelError

# asm-generic/ioctl.h
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


def _io(kind: str, nr: int) -> int:
    return _ioc(0, kind, nr, 0)


def _iow(kind: str, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, kind, nr, size)


def _iowr(kind: str, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, kind, nr, size)


# struct drm_version: three ints, then three (size_t length, char *buffer) pairs.
drm_version = struct.Struct("=iii4xQQQQQQ")
# struct drm_gem_close { __u32 handle; __u32 pad; }
drm_gem_close = struct.Struct("=II")
# struct drm_get_cap { __u64 capability; __u64 value; }
drm_get_cap = struct.Struct("=QQ")
# struct drm_prime_handle { __u32 handle; __u32 flags; __s32 fd; }
drm_prime_handle = struct.Struct("=IIi")
# struct drm_mode_create_dumb { __u32 height, width, bpp, flags, handle, pitch; __u64 size; }
drm_mode_create_dumb = struct.Struct("=IIIIIIQ")
# struct drm_mode_map_dumb { __u32 handle; __u32 pad; __u64 offset; }
drm_mode_map_dumb = struct.Struct("=IIQ")
# struct drm_mode_destroy_dumb { __u32 handle; }
drm_mode_destroy_dumb = struct.Struct("=I")
# struct dma_buf_sync { __u64 flags; }
dma_buf_sync = struct.Struct("=Q")

DRM_IOCTL_VERSION = _iowr("d", 0x00, drm_version.size)
DRM_IOCTL_GEM_CLOSE = _iow("d", 0x09, drm_gem_close.size)
DRM_IOCTL_GET_CAP = _iowr("d", 0x0C, drm_get_cap.size)
DRM_IOCTL_SET_MASTER = _io("d", 0x1E)
DRM_IOCTL_DROP_MASTER = _io("d", 0x1F)
DRM_IOCTL_PRIME_HANDLE_TO_FD = _iowr("d", 0x2D, drm_prime_handle.size)
DRM_IOCTL_PRIME_FD_TO_HANDLE = _iowr("d", 0x2E, drm_prime_handle.size)
DRM_IOCTL_MODE_CREATE_DUMB = _iowr("d", 0xB2, drm_mode_create_dumb.size)
DRM_IOCTL_MODE_MAP_DUMB = _iowr("d", 0xB3, drm_mode_map_dumb.size)
DRM_IOCTL_MODE_DESTROY_DUMB = _iowr("d", 0xB4, drm_mode_destroy_dumb.size)
DMA_BUF_IOCTL_SYNC = _iow("b", 0, dma_buf_sync.size)

DRM_CAP_DUMB_BUFFER = 0x1
DRM_CAP_PRIME = 0x5
DRM_PRIME_CAP_IMPORT = 0x1
DRM_PRIME_CAP_EXPORT = 0x2
DRM_RDWR = os.O_RDWR
DRM_CLOEXEC = os.O_CLOEXEC

DMA_BUF_SYNC_READ = 1 << 0
DMA_BUF_SYNC_WRITE = 2 << 0
DMA_BUF_SYNC_RW = DMA_BUF_SYNC_READ | DMA_BUF_SYNC_WRITE
DMA_BUF_SYNC_START = 0 << 2
DMA_BUF_SYNC_END = 1 << 2

#: The major device number of DRM nodes.
DRM_MAJOR = 226


def _ioctl(fd: int, request: int, arg: bytearray, what: str) -> None:
    try:
        fcntl.ioctl(fd, request, arg, True)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, what) from None


@dataclasses.dataclass(frozen=True, slots=True)
class Version:
    name: str  #: driver name, e.g. "vgem" or "virtio_gpu"
    major: int
    minor: int
    patch: int
    date: str
    desc: str


def get_version(fd: int) -> Version:
    """DRM_IOCTL_VERSION: the driver behind ``fd``."""
    name, date, desc = (ctypes.create_string_buffer(128) for _ in range(3))
    arg = bytearray(
        drm_version.pack(
            0, 0, 0,
            128, ctypes.addressof(name),
            128, ctypes.addressof(date),
            128, ctypes.addressof(desc),
        )
    )  # fmt: skip
    _ioctl(fd, DRM_IOCTL_VERSION, arg, "DRM_IOCTL_VERSION")
    major, minor, patch, *_ = drm_version.unpack(arg)
    return Version(
        name.value.decode(errors="replace"),
        major,
        minor,
        patch,
        date.value.decode(errors="replace"),
        desc.value.decode(errors="replace"),
    )


def get_cap(fd: int, capability: int) -> int:
    """DRM_IOCTL_GET_CAP."""
    arg = bytearray(drm_get_cap.pack(capability, 0))
    _ioctl(fd, DRM_IOCTL_GET_CAP, arg, f"DRM_IOCTL_GET_CAP({capability})")
    return int(drm_get_cap.unpack(arg)[1])


def drop_master(fd: int) -> None:
    """DRM_IOCTL_DROP_MASTER (allowed without root since Linux 5.8)."""
    _ioctl(fd, DRM_IOCTL_DROP_MASTER, bytearray(), "DRM_IOCTL_DROP_MASTER")


@dataclasses.dataclass(frozen=True, slots=True)
class Dumb:
    handle: int
    pitch: int
    size: int


def create_dumb(fd: int, width: int, height: int, bpp: int) -> Dumb:
    """DRM_IOCTL_MODE_CREATE_DUMB: a linear buffer; the kernel picks pitch and size."""
    arg = bytearray(drm_mode_create_dumb.pack(height, width, bpp, 0, 0, 0, 0))
    _ioctl(fd, DRM_IOCTL_MODE_CREATE_DUMB, arg, "DRM_IOCTL_MODE_CREATE_DUMB")
    _, _, _, _, handle, pitch, size = drm_mode_create_dumb.unpack(arg)
    return Dumb(handle, pitch, size)


def map_dumb(fd: int, handle: int) -> int:
    """DRM_IOCTL_MODE_MAP_DUMB: the offset to mmap() ``fd`` at to reach the buffer."""
    arg = bytearray(drm_mode_map_dumb.pack(handle, 0, 0))
    _ioctl(fd, DRM_IOCTL_MODE_MAP_DUMB, arg, "DRM_IOCTL_MODE_MAP_DUMB")
    return int(drm_mode_map_dumb.unpack(arg)[2])


def destroy_dumb(fd: int, handle: int) -> None:
    """DRM_IOCTL_MODE_DESTROY_DUMB: drop the handle of a buffer this fd created."""
    arg = bytearray(drm_mode_destroy_dumb.pack(handle))
    _ioctl(fd, DRM_IOCTL_MODE_DESTROY_DUMB, arg, "DRM_IOCTL_MODE_DESTROY_DUMB")


def handle_to_fd(fd: int, handle: int, flags: int = DRM_CLOEXEC | DRM_RDWR) -> int:
    """DRM_IOCTL_PRIME_HANDLE_TO_FD: a new dma-buf fd the caller must close."""
    arg = bytearray(drm_prime_handle.pack(handle, flags, -1))
    _ioctl(fd, DRM_IOCTL_PRIME_HANDLE_TO_FD, arg, "DRM_IOCTL_PRIME_HANDLE_TO_FD")
    return int(drm_prime_handle.unpack(arg)[2])


def fd_to_handle(fd: int, dmabuf: int) -> int:
    """DRM_IOCTL_PRIME_FD_TO_HANDLE: the GEM handle of ``dmabuf`` on ``fd``.

    Importing one dma-buf twice on one fd returns the same handle, which one
    GEM_CLOSE frees: callers must count their own references.
    """
    arg = bytearray(drm_prime_handle.pack(0, 0, dmabuf))
    _ioctl(fd, DRM_IOCTL_PRIME_FD_TO_HANDLE, arg, "DRM_IOCTL_PRIME_FD_TO_HANDLE")
    return int(drm_prime_handle.unpack(arg)[0])


def gem_close(fd: int, handle: int) -> None:
    """DRM_IOCTL_GEM_CLOSE."""
    arg = bytearray(drm_gem_close.pack(handle, 0))
    _ioctl(fd, DRM_IOCTL_GEM_CLOSE, arg, "DRM_IOCTL_GEM_CLOSE")


def sync_dmabuf(fd: int, flags: int) -> None:
    """DMA_BUF_IOCTL_SYNC on a dma-buf fd: bracket CPU access to its mapping."""
    arg = bytearray(dma_buf_sync.pack(flags))
    _ioctl(fd, DMA_BUF_IOCTL_SYNC, arg, "DMA_BUF_IOCTL_SYNC")


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    path: str
    driver: str
    primary: bool  #: a card node (dumb buffers allowed), not a render node


def nodes(root: str = "/dev/dri") -> list[Node]:
    """Every DRM node under ``root`` with its driver, card nodes first, in number order.

    Nodes that cannot be opened are left out.
    """
    found = []
    paths = glob.glob(os.path.join(root, "card*")) + glob.glob(os.path.join(root, "renderD*"))

    def order(path: str) -> tuple[int, int]:
        base = os.path.basename(path)
        digits = base.removeprefix("card").removeprefix("renderD")
        return (0 if base.startswith("card") else 1, int(digits) if digits.isdigit() else 0)

    for path in sorted(paths, key=order):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            driver = get_version(fd).name
        except KernelError:
            continue
        finally:
            os.close(fd)
        found.append(Node(path, driver, os.path.basename(path).startswith("card")))
    return found


def open_node(path: str) -> int:
    """Open a DRM node read-write; on a card node, give up DRM master at once.

    The first opener of a card node becomes master, which would lock a
    compositor out of modesetting. DROP_MASTER fails with EINVAL when we are
    not master, which is the state we want anyway. Raises KernelError.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"open {path}") from None
    try:
        if os.path.basename(path).startswith("card"):
            try:
                drop_master(fd)
            except KernelError as e:
                if e.errno not in (errno.EINVAL, errno.EACCES):
                    raise
    except BaseException:
        os.close(fd)
        raise
    return fd
