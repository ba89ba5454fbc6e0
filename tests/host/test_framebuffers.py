"""What a Device asks of the kernel, with the ioctls replaced by a recorder: the
layout and modifier ADDFB2 gets from an Import, the order in which framebuffers are
removed and GEM handles closed, and the release of a Device nobody closed.

The kernel accepts either order (a framebuffer holds its own reference to the
memory), so only the calls themselves can show it; tests/kernel/test_kms.py and
tests/kernel/test_device.py check the same paths against virtio-gpu and vgem.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import os
import weakref
from collections.abc import Iterator

import pytest

import primed
from primed import formats
from primed.client.buffer import Buffer, Plane
from primed.client.device import BufferLayout
from primed.kernel import drm
from primed.wire.schema import Backend

HANDLE = 7


class Kernel:
    """Stands in for primed.kernel.drm's ioctls; ``calls`` lists what they were asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.next_fb = 40
        self.fail_rmfb = False
        #: what GET_CAP(DRM_CAP_ADDFB2_MODIFIERS) answers; an int errno for a failure
        self.modifiers_cap: int | None = 1
        self.opened: list[int] = []

    def open_node(self, path: str) -> int:
        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.opened.append(fd)
        return fd

    def get_cap(self, fd: int, capability: int) -> int:
        assert capability == drm.DRM_CAP_ADDFB2_MODIFIERS
        self.calls.append(("get_cap", capability))
        if self.modifiers_cap is None:
            raise primed.KernelError(errno.EOPNOTSUPP, "DRM_IOCTL_GET_CAP")
        return self.modifiers_cap

    def addfb2(self, fd: int, *args: object, **kwargs: object) -> int:
        self.next_fb += 1
        self.calls.append(("addfb2", self.next_fb, *args, kwargs))
        return self.next_fb

    def rmfb(self, fd: int, fb_id: int) -> None:
        self.calls.append(("rmfb", fb_id))
        if self.fail_rmfb:
            raise primed.KernelError(errno.EIO, "DRM_IOCTL_MODE_RMFB")

    def gem_close(self, fd: int, handle: int) -> None:
        self.calls.append(("gem_close", handle))

    def names(self) -> list[object]:
        return [c[0] if c[0] == "addfb2" else c for c in self.calls if c[0] != "get_cap"]

    def addfb2_args(self, index: int = 0) -> dict[str, object]:
        """The keyword arguments of the index-th ADDFB2."""
        added = [c for c in self.calls if c[0] == "addfb2"][index][-1]
        assert isinstance(added, dict)
        return added


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    fake = Kernel()
    monkeypatch.setattr(drm, "get_version", lambda fd: drm.Version("fake", 1, 0, 0, "", ""))
    monkeypatch.setattr(drm, "fd_to_handle", lambda fd, dmabuf: HANDLE)
    for name in ("open_node", "get_cap", "addfb2", "rmfb", "gem_close"):
        monkeypatch.setattr(drm, name, getattr(fake, name))
    return fake


def make_buffer(code: str = "NV12", modifier: int = formats.MOD_LINEAR) -> Buffer:
    """A memfd standing in for a dma-buf, of the layout's size (as a dma-buf's inode is)."""
    fmt = formats.lookup(code)
    layout = formats.layout(fmt, 64, 32)
    fd = os.memfd_create("dmabuf", os.MFD_CLOEXEC)
    os.ftruncate(fd, layout.size)
    return Buffer(
        fd,
        id=1,
        width=64,
        height=32,
        fourcc=fmt.fourcc,
        modifier=modifier,
        size=layout.size,
        planes=tuple(Plane(p.offset, p.pitch) for p in layout.planes),
        backend=Backend.DRM,
    )


@pytest.fixture
def buf() -> Iterator[Buffer]:
    with make_buffer() as b:
        yield b


def test_an_import_carries_the_buffers_layout(kernel: Kernel, buf: Buffer) -> None:
    with primed.Device("card") as device, device.import_buffer(buf) as imported:
        assert (int(imported), imported.handle) == (HANDLE, HANDLE)
        assert imported.layout == BufferLayout.of(buf)
        assert (imported.width, imported.height, imported.format) == (64, 32, "NV12")
        assert (imported.fourcc, imported.modifier) == (buf.fourcc, formats.MOD_LINEAR)
        assert imported.planes == buf.planes == (Plane(0, 64), Plane(64 * 32, 64))
        assert imported.size == buf.size == 64 * 32 * 3 // 2


def test_addfb2_gets_every_plane_of_the_one_handle(kernel: Kernel, buf: Buffer) -> None:
    with primed.Device("card") as device, device.import_buffer(buf) as imported:
        buf.close()  # the Import alone is enough
        fb = device.add_framebuffer(imported)
        (_, fb_id, width, height, fourcc, planes) = next(
            c for c in kernel.calls if c[0] == "addfb2"
        )
        assert (fb_id, width, height, fourcc) == (fb.id, 64, 32, formats.fourcc("NV12"))
        assert planes == {
            "handles": [HANDLE, HANDLE],
            "pitches": [64, 64],
            "offsets": [0, 64 * 32],
            "modifiers": [formats.MOD_LINEAR] * 2,
            "flags": drm.DRM_MODE_FB_MODIFIERS,
        }
        assert (fb.width, fb.height, fb.fourcc, fb.modifier) == (64, 32, fourcc, 0)


def test_a_modifier_other_than_linear_is_passed_with_the_flag(kernel: Kernel) -> None:
    with (
        make_buffer("XR24", modifier=0x0100000000000001) as tiled,
        primed.Device("card") as device,
        device.import_buffer(tiled) as imported,
    ):
        device.add_framebuffer(imported)
        assert kernel.addfb2_args()["modifiers"] == [0x0100000000000001]
        assert kernel.addfb2_args()["flags"] == drm.DRM_MODE_FB_MODIFIERS


def test_mod_invalid_goes_without_the_flag(kernel: Kernel, buf: Buffer) -> None:
    implicit = dataclasses.replace(BufferLayout.of(buf), modifier=drm.DRM_FORMAT_MOD_INVALID)
    with primed.Device("card") as device:
        with device.import_buffer(buf, layout=implicit) as imported:
            assert imported.modifier == drm.DRM_FORMAT_MOD_INVALID
            fb = device.add_framebuffer(imported)
        assert kernel.addfb2_args()["modifiers"] == ()
        assert kernel.addfb2_args()["flags"] == 0
        assert fb.modifier == drm.DRM_FORMAT_MOD_INVALID
    assert [c for c in kernel.calls if c[0] == "get_cap"] == []  # not asked: nothing to decide


@pytest.mark.parametrize(
    ("cap", "modifier", "flags"),
    [
        (1, formats.MOD_LINEAR, drm.DRM_MODE_FB_MODIFIERS),
        (None, formats.MOD_LINEAR, drm.DRM_MODE_FB_MODIFIERS),  # won't say (no KMS): try it
        (0, formats.MOD_LINEAR, 0),  # the kernel would refuse the flag: linear is its default
        (0, 0x0100000000000001, drm.DRM_MODE_FB_MODIFIERS),  # no default can stand for it
    ],
)
def test_linear_goes_without_the_flag_only_where_modifiers_are_not_taken(
    kernel: Kernel, cap: int | None, modifier: int, flags: int
) -> None:
    kernel.modifiers_cap = cap
    with (
        make_buffer("XR24", modifier=modifier) as b,
        primed.Device("card") as device,
        device.import_buffer(b) as imported,
    ):
        first, second = device.add_framebuffer(imported), device.add_framebuffer(imported)
        for i in (0, 1):
            assert kernel.addfb2_args(i)["flags"] == flags
            assert kernel.addfb2_args(i)["modifiers"] == ([modifier] if flags else ())
        expected = modifier if flags else drm.DRM_FORMAT_MOD_INVALID
        assert first.modifier == second.modifier == expected
        asked = [c for c in kernel.calls if c[0] == "get_cap"]
        assert len(asked) == (1 if modifier == formats.MOD_LINEAR else 0)  # once per Device


def test_a_refused_modifier_says_the_driver_takes_none(
    kernel: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fd: int, *args: object, **kwargs: object) -> int:
        raise primed.KernelError(errno.EINVAL, "DRM_IOCTL_MODE_ADDFB2")

    kernel.modifiers_cap = 0
    monkeypatch.setattr(drm, "addfb2", refuse)
    with (
        make_buffer("XR24", modifier=0x0100000000000001) as tiled,
        primed.Device("card") as device,
        device.import_buffer(tiled) as imported,
    ):
        with pytest.raises(primed.KernelError, match="takes no modifiers") as refused:
            device.add_framebuffer(imported)
        assert refused.value.errno == errno.EINVAL
        assert "modifier 0x100000000000001" in str(refused.value)
        assert device.framebuffers() == []


def test_a_bare_fd_carries_no_layout_unless_given_one(kernel: Kernel, buf: Buffer) -> None:
    with primed.Device("card") as device:
        bare = device.import_buffer(buf.fd)
        assert bare.layout is None and bare.size == buf.size  # the size is the fd's own
        with pytest.raises(ValueError, match="no layout"):
            bare.width  # noqa: B018
        with pytest.raises(ValueError, match=r"no layout.*layout="):
            device.add_framebuffer(bare)
        assert kernel.names() == []

        given = BufferLayout(64, 32, formats.fourcc("XR24"), (Plane(0, 256),))
        assert given.modifier == drm.DRM_FORMAT_MOD_INVALID and given.format == "XR24"
        described = device.import_buffer(buf.fd, layout=given)
        assert described.handle == bare.handle and device.references(HANDLE) == 2
        fb = device.add_framebuffer(described)
        assert kernel.addfb2_args() == {
            "handles": [HANDLE],
            "pitches": [256],
            "offsets": [0],
            "modifiers": (),
            "flags": 0,
        }
        assert (fb.width, fb.height, fb.fourcc) == (64, 32, formats.fourcc("XR24"))
        bare.close()
        assert not fb.closed  # the handle lives on in `described`
        described.close()
        assert fb.closed and kernel.names()[-2:] == [("rmfb", fb.id), ("gem_close", HANDLE)]


def test_imports_of_one_dma_buf_share_the_handle_not_the_layout(
    kernel: Kernel, buf: Buffer
) -> None:
    top = BufferLayout(64, 16, buf.fourcc, buf.planes, formats.MOD_LINEAR)
    with primed.Device("card") as device:
        whole, half = device.import_buffer(buf), device.import_buffer(buf, layout=top)
        assert whole.handle == half.handle and device.references(HANDLE) == 2
        assert (whole.height, half.height) == (32, 16)
        device.add_framebuffer(half)
        assert [c[3] for c in kernel.calls if c[0] == "addfb2"] == [16]
        whole.close()
        half.close()
    assert kernel.names()[-1] == ("gem_close", HANDLE)


def test_last_import_removes_framebuffers_then_closes_the_handle(
    kernel: Kernel, buf: Buffer
) -> None:
    with primed.Device("card") as device:
        first, second = device.import_buffer(buf), device.import_buffer(buf)
        fbs = [device.add_framebuffer(first), device.add_framebuffer(second)]
        first.close()
        assert kernel.names() == ["addfb2", "addfb2"]
        assert not any(fb.closed for fb in fbs)
        second.close()
        assert kernel.names() == [
            "addfb2",
            "addfb2",
            ("rmfb", fbs[0].id),
            ("rmfb", fbs[1].id),
            ("gem_close", HANDLE),
        ]
        assert all(fb.closed for fb in fbs) and device.framebuffers() == []
        fbs[0].close()
    assert len(kernel.names()) == 5  # nothing twice, not even when the Device closes


def test_device_close_removes_framebuffers_before_any_handle(kernel: Kernel, buf: Buffer) -> None:
    with make_buffer("XR24") as other:
        device = primed.Device("card")
        fbs = [device.add_framebuffer(device.import_buffer(b)) for b in (buf, other)]
        device.close()
    assert kernel.names()[2:] == [
        ("rmfb", fbs[0].id),
        ("rmfb", fbs[1].id),
        ("gem_close", HANDLE),
        ("gem_close", HANDLE),
    ]
    assert all(fb.closed for fb in fbs)


def test_closing_a_framebuffer_is_rmfb_once(kernel: Kernel, buf: Buffer) -> None:
    with primed.Device("card") as device, device.import_buffer(buf) as imported:
        with device.add_framebuffer(imported) as fb:
            pass
        fb.close()
        assert kernel.names() == ["addfb2", ("rmfb", fb.id)]
    assert kernel.names()[-1] == ("gem_close", HANDLE)


def test_a_failed_rmfb_still_closes_the_handle(kernel: Kernel, buf: Buffer) -> None:
    with primed.Device("card") as device:
        imported = device.import_buffer(buf)
        device.add_framebuffer(imported)
        kernel.fail_rmfb = True
        with pytest.raises(primed.KernelError) as failed:
            imported.close()
        assert failed.value.errno == errno.EIO
        assert kernel.names()[-1] == ("gem_close", HANDLE)
        assert device.references(HANDLE) == 0


def test_framebuffer_needs_an_open_import_of_this_device(kernel: Kernel, buf: Buffer) -> None:
    with primed.Device("card") as device:
        imported = device.import_buffer(buf)
        with primed.Device("card") as elsewhere, pytest.raises(ValueError, match="not an open"):
            elsewhere.add_framebuffer(imported)
        imported.close()
        with pytest.raises(ValueError, match="not an open"):
            device.add_framebuffer(imported)
    assert kernel.names() == [("gem_close", HANDLE)]


def test_a_dropped_device_is_released_when_collected(kernel: Kernel, buf: Buffer) -> None:
    device = primed.Device("card")
    fd = device.fd
    imported = device.import_buffer(buf)
    fb = device.add_framebuffer(imported)
    fb_id, alive = fb.id, weakref.ref(device)
    del device, fb
    gc.collect()
    assert alive() is not None and kernel.names() == ["addfb2"]  # the Import keeps it
    del imported
    gc.collect()  # the Device and its Framebuffer refer to each other: a cycle
    assert alive() is None, gc.get_referrers(alive())
    assert kernel.names() == ["addfb2", ("rmfb", fb_id), ("gem_close", HANDLE)]
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF


def test_a_device_without_framebuffers_goes_with_its_last_reference(
    kernel: Kernel, buf: Buffer
) -> None:
    device = primed.Device("card")
    fd = device.fd
    device.import_buffer(buf)  # an Import dropped at once: its handle stays the Device's
    alive = weakref.ref(device)
    gc.disable()
    try:
        del device  # no cycle: reference counting alone frees it
        assert alive() is None
    finally:
        gc.enable()
    assert kernel.names() == [("gem_close", HANDLE)]
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_closed_device_is_not_released_again(kernel: Kernel, buf: Buffer) -> None:
    device = primed.Device("card")
    device.add_framebuffer(device.import_buffer(buf))
    device.close()
    released = list(kernel.calls)
    reused = kernel.open_node("card")  # the closed fd's number, now someone else's
    try:
        assert reused == kernel.opened[0]
        del device
        gc.collect()
        assert kernel.calls == released
        os.fstat(reused)  # still open
    finally:
        os.close(reused)
