"""Mesa's GBM (libgbm.so.1) through ctypes: what the kernel tier needs to have a
consumer nobody here wrote import primed's buffers.

Named as Mesa's gbm.h names things, so a reader can grep it. Only what the tests
call is declared: a device on a DRM fd, GBM_BO_IMPORT_FD_MODIFIER, and what a bo
says about itself. Every object is freed by a context manager (``with Device(fd)
as dev, dev.import_fd_modifier(...) as bo:``); a bo must be destroyed before its
device, and the device before the DRM fd is closed (GBM does not own that fd).

gbm_bo_map is left out: with Debian 12's Mesa (22.3) mapping an imported bo failed
with EACCES on render nodes and with EINVAL for another driver's buffer on 6.1,
and killed the process (SIGSEGV) on vgem's nodes on 6.12.

GBM's failures come back as NULL with errno set by whatever failed underneath
(the kernel's ioctl, or Mesa itself): they are raised here as OSError with that
errno, so a test can tell the kernel's refusal from Mesa's.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
from types import TracebackType

#: The Debian 12 package libgbm1 ships it under this name.
LIBRARY = "libgbm.so.1"

#: enum gbm_bo_flags (usage).
GBM_BO_USE_SCANOUT = 1 << 0
GBM_BO_USE_CURSOR = 1 << 1
GBM_BO_USE_RENDERING = 1 << 2
GBM_BO_USE_WRITE = 1 << 3
GBM_BO_USE_LINEAR = 1 << 4

#: gbm_bo_import's type for struct gbm_import_fd_modifier_data.
GBM_BO_IMPORT_FD_MODIFIER = 0x5504
GBM_MAX_PLANES = 4


class gbm_import_fd_modifier_data(ctypes.Structure):
    _fields_ = (
        ("width", ctypes.c_uint32),
        ("height", ctypes.c_uint32),
        ("format", ctypes.c_uint32),
        ("num_fds", ctypes.c_uint32),
        ("fds", ctypes.c_int * GBM_MAX_PLANES),
        ("strides", ctypes.c_int * GBM_MAX_PLANES),
        ("offsets", ctypes.c_int * GBM_MAX_PLANES),
        ("modifier", ctypes.c_uint64),
    )


def _load() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError as e:
        raise RuntimeError(f"cannot load {LIBRARY} (apt-get install libgbm1): {e}") from None
    p, u32, i32, u64 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint64
    signatures: dict[str, tuple[type | None, list[type]]] = {
        "gbm_create_device": (p, [i32]),
        "gbm_device_destroy": (None, [p]),
        "gbm_device_get_backend_name": (ctypes.c_char_p, [p]),
        "gbm_device_get_fd": (i32, [p]),
        "gbm_device_is_format_supported": (i32, [p, u32, u32]),
        "gbm_device_get_format_modifier_plane_count": (i32, [p, u32, u64]),
        "gbm_bo_import": (p, [p, u32, p, u32]),
        "gbm_bo_destroy": (None, [p]),
        "gbm_bo_get_width": (u32, [p]),
        "gbm_bo_get_height": (u32, [p]),
        "gbm_bo_get_format": (u32, [p]),
        "gbm_bo_get_bpp": (u32, [p]),
        "gbm_bo_get_modifier": (u64, [p]),
        "gbm_bo_get_plane_count": (i32, [p]),
        "gbm_bo_get_stride_for_plane": (u32, [p, i32]),
        "gbm_bo_get_offset": (u32, [p, i32]),
        # union gbm_bo_handle { void *ptr; int32_t s32; uint32_t u32; int64_t s64;
        # uint64_t u64; } is 8 bytes of INTEGER class: x86-64 returns it in rax, as a
        # uint64_t. A GEM handle is its u32, the low half.
        "gbm_bo_get_handle_for_plane": (u64, [p, i32]),
        "gbm_bo_get_fd_for_plane": (i32, [p, i32]),
        "gbm_bo_get_device": (p, [p]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """libgbm, loaded and declared on first use. Raises RuntimeError if it is missing."""
    global _lib  # noqa: PLW0603 (one library per process, loaded lazily)
    if _lib is None:
        _lib = _load()
    return _lib


def _failed(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code or errno.EIO, f"{what}: {os.strerror(code) if code else 'failed'}")


class Device:
    """``gbm_create_device(fd)``: GBM on a DRM fd the caller keeps open until ``close()``.

    Raises OSError if GBM has no backend for the node.
    """

    def __init__(self, fd: int):
        ctypes.set_errno(0)
        pointer = lib().gbm_create_device(fd)
        if not pointer:
            raise _failed(f"gbm_create_device({fd})")
        self._ptr: int | None = pointer
        self.fd = fd

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise ValueError("GBM device destroyed")
        return self._ptr

    @property
    def backend_name(self) -> str:
        """The backend GBM loaded, e.g. "drm" (Mesa's DRI backend)."""
        name: bytes | None = lib().gbm_device_get_backend_name(self.ptr)
        return (name or b"").decode()

    def is_format_supported(self, fourcc: int, usage: int) -> bool:
        return bool(lib().gbm_device_is_format_supported(self.ptr, fourcc, usage))

    def plane_count(self, fourcc: int, modifier: int) -> int:
        """How many planes GBM expects for ``fourcc`` with ``modifier`` (-1 if it cannot say)."""
        return int(lib().gbm_device_get_format_modifier_plane_count(self.ptr, fourcc, modifier))

    def import_fd_modifier(
        self,
        width: int,
        height: int,
        fourcc: int,
        fds: list[int],
        strides: list[int],
        offsets: list[int],
        modifier: int,
        usage: int,
    ) -> Bo:
        """gbm_bo_import(GBM_BO_IMPORT_FD_MODIFIER): one entry per plane in each list.

        GBM imports the fds into this device (PRIME) and does not keep them: the
        caller still owns them. Raises OSError with the errno GBM left.
        """
        if not len(fds) == len(strides) == len(offsets) <= GBM_MAX_PLANES:
            raise ValueError(f"{len(fds)} fds, {len(strides)} strides, {len(offsets)} offsets")
        data = gbm_import_fd_modifier_data(width, height, fourcc, len(fds))
        data.fds[: len(fds)] = fds
        data.strides[: len(strides)] = strides
        data.offsets[: len(offsets)] = offsets
        data.modifier = modifier
        ctypes.set_errno(0)
        pointer = lib().gbm_bo_import(
            self.ptr, GBM_BO_IMPORT_FD_MODIFIER, ctypes.addressof(data), usage
        )
        if not pointer:
            raise _failed(f"gbm_bo_import({width}x{height}, {fourcc:#x}, {len(fds)} fds)")
        return Bo(self, pointer)

    def close(self) -> None:
        """gbm_device_destroy; idempotent. Destroy its bos first."""
        if self._ptr is not None:
            lib().gbm_device_destroy(self._ptr)
            self._ptr = None

    def __enter__(self) -> Device:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class Plane:
    """One plane as GBM reports it."""

    stride: int
    offset: int
    handle: int  #: the GEM handle on the device's fd (GBM's, not ours to close)


class Bo:
    """A gbm_bo, destroyed by ``close()`` (which closes the GEM handle GBM made)."""

    def __init__(self, device: Device, pointer: int):
        self.device = device
        self._ptr: int | None = pointer

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise ValueError("GBM bo destroyed")
        return self._ptr

    @property
    def width(self) -> int:
        return int(lib().gbm_bo_get_width(self.ptr))

    @property
    def height(self) -> int:
        return int(lib().gbm_bo_get_height(self.ptr))

    @property
    def format(self) -> int:
        return int(lib().gbm_bo_get_format(self.ptr))

    @property
    def bpp(self) -> int:
        return int(lib().gbm_bo_get_bpp(self.ptr))

    @property
    def modifier(self) -> int:
        return int(lib().gbm_bo_get_modifier(self.ptr))

    @property
    def plane_count(self) -> int:
        return int(lib().gbm_bo_get_plane_count(self.ptr))

    @property
    def device_ptr(self) -> int:
        return int(lib().gbm_bo_get_device(self.ptr) or 0)

    def plane(self, index: int) -> Plane:
        return Plane(
            int(lib().gbm_bo_get_stride_for_plane(self.ptr, index)),
            int(lib().gbm_bo_get_offset(self.ptr, index)),
            int(lib().gbm_bo_get_handle_for_plane(self.ptr, index)) & 0xFFFFFFFF,
        )

    def planes(self) -> list[Plane]:
        return [self.plane(i) for i in range(self.plane_count)]

    def export_fd(self, plane: int = 0) -> int:
        """gbm_bo_get_fd_for_plane: a new dma-buf fd, the caller's to close. Raises OSError."""
        ctypes.set_errno(0)
        fd = int(lib().gbm_bo_get_fd_for_plane(self.ptr, plane))
        if fd < 0:
            raise _failed(f"gbm_bo_get_fd_for_plane({plane})")
        return fd

    def close(self) -> None:
        """gbm_bo_destroy; idempotent."""
        if self._ptr is not None:
            lib().gbm_bo_destroy(self._ptr)
            self._ptr = None

    def __enter__(self) -> Bo:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
