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
from collections.abc import Sequence

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
# struct drm_mode_fb_cmd2 { __u32 fb_id, width, height, pixel_format, flags; __u32 handles[4],
# pitches[4], offsets[4]; (4 bytes of padding) __u64 modifier[4]; }
drm_mode_fb_cmd2 = struct.Struct("=IIIII4I4I4I4x4Q")
# struct drm_mode_card_res { __u64 fb_id_ptr, crtc_id_ptr, connector_id_ptr, encoder_id_ptr;
# __u32 count_fbs, count_crtcs, count_connectors, count_encoders, min_width, max_width,
# min_height, max_height; }
drm_mode_card_res = struct.Struct("=4Q8I")
# struct drm_mode_modeinfo { __u32 clock; __u16 hdisplay, hsync_start, hsync_end, htotal, hskew,
# vdisplay, vsync_start, vsync_end, vtotal, vscan; __u32 vrefresh, flags, type; char name[32]; }
drm_mode_modeinfo = struct.Struct("=I10H3I32s")
# struct drm_mode_get_connector { __u64 encoders_ptr, modes_ptr, props_ptr, prop_values_ptr;
# __u32 count_modes, count_props, count_encoders, encoder_id, connector_id, connector_type,
# connector_type_id, connection, mm_width, mm_height, subpixel, pad; }
drm_mode_get_connector = struct.Struct("=4Q12I")
# struct drm_mode_get_encoder { __u32 encoder_id, encoder_type, crtc_id, possible_crtcs,
# possible_clones; }
drm_mode_get_encoder = struct.Struct("=5I")
# struct drm_mode_crtc { __u64 set_connectors_ptr; __u32 count_connectors, crtc_id, fb_id, x, y,
# gamma_size, mode_valid; struct drm_mode_modeinfo mode; }
drm_mode_crtc = struct.Struct("=Q7I" + drm_mode_modeinfo.format.lstrip("="))

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
DRM_IOCTL_MODE_GETRESOURCES = _iowr("d", 0xA0, drm_mode_card_res.size)
DRM_IOCTL_MODE_GETCRTC = _iowr("d", 0xA1, drm_mode_crtc.size)
DRM_IOCTL_MODE_SETCRTC = _iowr("d", 0xA2, drm_mode_crtc.size)
DRM_IOCTL_MODE_GETENCODER = _iowr("d", 0xA6, drm_mode_get_encoder.size)
DRM_IOCTL_MODE_GETCONNECTOR = _iowr("d", 0xA7, drm_mode_get_connector.size)
DRM_IOCTL_MODE_RMFB = _iowr("d", 0xAF, ctypes.sizeof(ctypes.c_uint))  # takes an unsigned int
DRM_IOCTL_MODE_ADDFB2 = _iowr("d", 0xB8, drm_mode_fb_cmd2.size)
DRM_IOCTL_MODE_GETFB2 = _iowr("d", 0xCE, drm_mode_fb_cmd2.size)
DMA_BUF_IOCTL_SYNC = _iow("b", 0, dma_buf_sync.size)

DRM_CAP_DUMB_BUFFER = 0x1
DRM_CAP_PRIME = 0x5
DRM_CAP_ADDFB2_MODIFIERS = 0x10  #: 1 if ADDFB2 takes DRM_MODE_FB_MODIFIERS (KMS drivers only)
DRM_PRIME_CAP_IMPORT = 0x1
DRM_PRIME_CAP_EXPORT = 0x2
DRM_RDWR = os.O_RDWR
DRM_CLOEXEC = os.O_CLOEXEC

DMA_BUF_SYNC_READ = 1 << 0
DMA_BUF_SYNC_WRITE = 2 << 0
DMA_BUF_SYNC_RW = DMA_BUF_SYNC_READ | DMA_BUF_SYNC_WRITE
DMA_BUF_SYNC_START = 0 << 2
DMA_BUF_SYNC_END = 1 << 2

DRM_MODE_FB_MODIFIERS = 1 << 1  #: drm_mode_fb_cmd2.modifier[] is valid
DRM_MODE_TYPE_PREFERRED = 1 << 3  #: the mode a connector's sink prefers

#: drm_fourcc.h's "no modifier given": the layout is whatever the driver implies
#: for the buffer (on a dumb buffer, linear). Never a real layout: unlike
#: DRM_FORMAT_MOD_LINEAR (0), it goes to ADDFB2 as the absence of
#: DRM_MODE_FB_MODIFIERS, never as a modifier.
DRM_FORMAT_MOD_INVALID = 0x00FFFFFFFFFFFFFF

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


def set_master(fd: int) -> None:
    """DRM_IOCTL_SET_MASTER: become DRM master, needed to modeset.

    The kernel allows it to root, or to an fd that was master before, and only
    while nobody else is master (EBUSY otherwise).
    """
    _ioctl(fd, DRM_IOCTL_SET_MASTER, bytearray(), "DRM_IOCTL_SET_MASTER")


def addfb2(
    fd: int,
    width: int,
    height: int,
    pixel_format: int,
    handles: Sequence[int],
    pitches: Sequence[int],
    offsets: Sequence[int],
    modifiers: Sequence[int] = (),
    flags: int = 0,
) -> int:
    """DRM_IOCTL_MODE_ADDFB2: a framebuffer over up to four GEM handles; returns its id.

    Missing planes are zero, as the kernel requires; ``modifiers`` count only
    with DRM_MODE_FB_MODIFIERS in ``flags``.
    """

    def four(values: Sequence[int]) -> list[int]:
        if len(values) > 4:
            raise ValueError(f"a framebuffer has at most 4 planes, not {len(values)}")
        return [*values, *[0] * (4 - len(values))]

    arg = bytearray(
        drm_mode_fb_cmd2.pack(
            0, width, height, pixel_format, flags,
            *four(handles), *four(pitches), *four(offsets), *four(modifiers),
        )
    )  # fmt: skip
    _ioctl(fd, DRM_IOCTL_MODE_ADDFB2, arg, "DRM_IOCTL_MODE_ADDFB2")
    return int(drm_mode_fb_cmd2.unpack(arg)[0])


@dataclasses.dataclass(frozen=True, slots=True)
class FbCmd2:
    """What DRM_IOCTL_MODE_GETFB2 says about a framebuffer (struct drm_mode_fb_cmd2)."""

    fb_id: int
    width: int
    height: int
    pixel_format: int
    flags: int  #: DRM_MODE_FB_MODIFIERS if it was added with an explicit modifier
    handles: tuple[int, int, int, int]  #: new GEM handles the caller must close; 0 if none
    pitches: tuple[int, int, int, int]
    offsets: tuple[int, int, int, int]
    modifiers: tuple[int, int, int, int]  #: only filled with DRM_MODE_FB_MODIFIERS in flags


def get_fb2(fd: int, fb_id: int) -> FbCmd2:
    """DRM_IOCTL_MODE_GETFB2: any framebuffer of the device, not only this fd's.

    ENOENT if there is no framebuffer ``fb_id``. Only DRM master or root get
    handles: new ones on ``fd`` (one per distinct GEM object), which the caller
    must GEM_CLOSE; anyone else gets zeros.
    """
    arg = bytearray(drm_mode_fb_cmd2.pack(fb_id, *[0] * 20))
    _ioctl(fd, DRM_IOCTL_MODE_GETFB2, arg, f"DRM_IOCTL_MODE_GETFB2({fb_id})")
    fields = drm_mode_fb_cmd2.unpack(arg)

    def four(at: int) -> tuple[int, int, int, int]:
        a, b, c, d = fields[at : at + 4]
        return (a, b, c, d)

    fb, width, height, pixel_format, flags = fields[:5]
    return FbCmd2(fb, width, height, pixel_format, flags, four(5), four(9), four(13), four(17))


def rmfb(fd: int, fb_id: int) -> None:
    """DRM_IOCTL_MODE_RMFB: remove a framebuffer this fd added (ENOENT for any other id).

    A framebuffer on screen is taken off first: its CRTC or plane is disabled.
    """
    arg = bytearray(struct.pack("=I", fb_id))
    _ioctl(fd, DRM_IOCTL_MODE_RMFB, arg, "DRM_IOCTL_MODE_RMFB")


@dataclasses.dataclass(frozen=True, slots=True)
class ModeInfo:
    """struct drm_mode_modeinfo, field for field (``name`` decoded as Latin-1)."""

    clock: int
    hdisplay: int
    hsync_start: int
    hsync_end: int
    htotal: int
    hskew: int
    vdisplay: int
    vsync_start: int
    vsync_end: int
    vtotal: int
    vscan: int
    vrefresh: int
    flags: int
    type: int
    name: str

    @classmethod
    def unpack_from(cls, raw: bytes | bytearray, offset: int = 0) -> ModeInfo:
        fields = list(drm_mode_modeinfo.unpack_from(raw, offset))
        fields[-1] = fields[-1].rstrip(b"\0").decode("latin-1")
        return cls(*fields)

    def pack(self) -> bytes:
        return drm_mode_modeinfo.pack(*dataclasses.astuple(self)[:-1], self.name.encode("latin-1"))


@dataclasses.dataclass(frozen=True, slots=True)
class CardRes:
    """What DRM_IOCTL_MODE_GETRESOURCES lists: object ids and size limits."""

    fbs: tuple[int, ...]
    crtcs: tuple[int, ...]
    connectors: tuple[int, ...]
    encoders: tuple[int, ...]
    min_width: int
    max_width: int
    min_height: int
    max_height: int


def _u32_array(count: int) -> ctypes.Array[ctypes.c_uint32]:
    return (ctypes.c_uint32 * max(count, 1))()


def get_resources(fd: int) -> CardRes:
    """DRM_IOCTL_MODE_GETRESOURCES (EOPNOTSUPP on a driver without KMS).

    Asked again until the counts hold still, as hotplug may change them between
    the call that counts and the call that fills.
    """
    counts = [0, 0, 0, 0]
    while True:
        arrays = [_u32_array(n) for n in counts]
        arg = bytearray(
            drm_mode_card_res.pack(*(ctypes.addressof(a) for a in arrays), *counts, 0, 0, 0, 0)
        )
        _ioctl(fd, DRM_IOCTL_MODE_GETRESOURCES, arg, "DRM_IOCTL_MODE_GETRESOURCES")
        fields = drm_mode_card_res.unpack(arg)
        found = list(fields[4:8])
        if all(f <= n for f, n in zip(found, counts, strict=True)):
            fbs, crtcs, connectors, encoders = (
                tuple(a[:f]) for a, f in zip(arrays, found, strict=True)
            )
            return CardRes(fbs, crtcs, connectors, encoders, *fields[8:12])
        counts = found


@dataclasses.dataclass(frozen=True, slots=True)
class Connector:
    """What DRM_IOCTL_MODE_GETCONNECTOR says about one connector (properties left out)."""

    connector_id: int
    connector_type: int
    connector_type_id: int
    connection: int  #: enum drm_connector_status: 1 connected, 2 disconnected, 3 unknown
    encoder_id: int  #: the encoder driving it now, 0 if none
    mm_width: int
    mm_height: int
    modes: tuple[ModeInfo, ...]
    encoders: tuple[int, ...]  #: the encoders that can drive it


def get_connector(fd: int, connector_id: int) -> Connector:
    """DRM_IOCTL_MODE_GETCONNECTOR.

    Only DRM master makes the kernel probe the sink again; anyone else gets the
    modes of the last probe.
    """
    modes = encoders = 0
    while True:
        mode_buf = ctypes.create_string_buffer(max(modes, 1) * drm_mode_modeinfo.size)
        encoder_buf = _u32_array(encoders)
        arg = bytearray(
            drm_mode_get_connector.pack(
                ctypes.addressof(encoder_buf), ctypes.addressof(mode_buf), 0, 0,
                modes, 0, encoders, 0, connector_id, 0, 0, 0, 0, 0, 0, 0,
            )
        )  # fmt: skip
        _ioctl(fd, DRM_IOCTL_MODE_GETCONNECTOR, arg, f"DRM_IOCTL_MODE_GETCONNECTOR({connector_id})")
        fields = drm_mode_get_connector.unpack(arg)
        found_modes, _, found_encoders, encoder_id, _, kind, kind_id, connection, mm_w, mm_h = (
            fields[4:14]
        )
        if found_modes <= modes and found_encoders <= encoders:
            size = drm_mode_modeinfo.size
            return Connector(
                connector_id=connector_id,
                connector_type=kind,
                connector_type_id=kind_id,
                connection=connection,
                encoder_id=encoder_id,
                mm_width=mm_w,
                mm_height=mm_h,
                modes=tuple(
                    ModeInfo.unpack_from(mode_buf.raw, i * size) for i in range(found_modes)
                ),
                encoders=tuple(encoder_buf[:found_encoders]),
            )
        modes, encoders = found_modes, found_encoders


@dataclasses.dataclass(frozen=True, slots=True)
class Encoder:
    encoder_id: int
    encoder_type: int
    crtc_id: int  #: the CRTC it feeds now, 0 if none
    possible_crtcs: int  #: bit i: the i-th CRTC of GETRESOURCES
    possible_clones: int


def get_encoder(fd: int, encoder_id: int) -> Encoder:
    """DRM_IOCTL_MODE_GETENCODER."""
    arg = bytearray(drm_mode_get_encoder.pack(encoder_id, 0, 0, 0, 0))
    _ioctl(fd, DRM_IOCTL_MODE_GETENCODER, arg, f"DRM_IOCTL_MODE_GETENCODER({encoder_id})")
    return Encoder(*drm_mode_get_encoder.unpack(arg))


@dataclasses.dataclass(frozen=True, slots=True)
class Crtc:
    crtc_id: int
    fb_id: int  #: the framebuffer it scans out, 0 if none
    x: int
    y: int
    gamma_size: int
    mode: ModeInfo | None  #: None when the CRTC is off


def get_crtc(fd: int, crtc_id: int) -> Crtc:
    """DRM_IOCTL_MODE_GETCRTC."""
    arg = bytearray(drm_mode_crtc.size)
    struct.pack_into("=QII", arg, 0, 0, 0, crtc_id)
    _ioctl(fd, DRM_IOCTL_MODE_GETCRTC, arg, f"DRM_IOCTL_MODE_GETCRTC({crtc_id})")
    _, _, _, fb_id, x, y, gamma_size, mode_valid = struct.unpack_from("=Q7I", arg)
    mode = ModeInfo.unpack_from(arg, struct.calcsize("=Q7I")) if mode_valid else None
    return Crtc(crtc_id, fb_id, x, y, gamma_size, mode)


def set_crtc(
    fd: int,
    crtc_id: int,
    fb_id: int,
    connectors: Sequence[int],
    mode: ModeInfo | None,
    x: int = 0,
    y: int = 0,
) -> None:
    """DRM_IOCTL_MODE_SETCRTC: show ``fb_id`` from (x, y) on ``connectors`` in ``mode``.

    ``mode`` None (with no framebuffer and no connectors) turns the CRTC off.
    Needs DRM master (EACCES otherwise).
    """
    ids = (ctypes.c_uint32 * max(len(connectors), 1))(*connectors)
    head = struct.pack(
        "=Q7I", ctypes.addressof(ids), len(connectors), crtc_id, fb_id, x, y, 0, mode is not None
    )
    arg = bytearray(head + (mode.pack() if mode else bytes(drm_mode_modeinfo.size)))
    _ioctl(fd, DRM_IOCTL_MODE_SETCRTC, arg, f"DRM_IOCTL_MODE_SETCRTC({crtc_id})")


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
