"""The order in which a Device removes framebuffers and closes GEM handles, with the
ioctls replaced by a recorder.

The kernel accepts either order (a framebuffer holds its own reference to the
memory), so only the calls themselves can show it; tests/kernel/test_kms.py checks
the same paths against virtio-gpu.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

import primed
from primed import formats
from primed.client.buffer import Buffer, Plane
from primed.kernel import drm
from primed.wire.schema import Backend

HANDLE = 7


class Kernel:
    """Stands in for primed.kernel.drm's ioctls; ``calls`` lists what they were asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.next_fb = 40
        self.fail_rmfb = False

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
        return [c[0] if c[0] == "addfb2" else c for c in self.calls]


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    fake = Kernel()
    monkeypatch.setattr(drm, "open_node", lambda path: os.open(os.devnull, os.O_RDWR))
    monkeypatch.setattr(drm, "get_version", lambda fd: drm.Version("fake", 1, 0, 0, "", ""))
    monkeypatch.setattr(drm, "fd_to_handle", lambda fd, dmabuf: HANDLE)
    for name in ("addfb2", "rmfb", "gem_close"):
        monkeypatch.setattr(drm, name, getattr(fake, name))
    return fake


def make_buffer(code: str = "NV12", modifier: int = formats.MOD_LINEAR) -> Buffer:
    fmt = formats.lookup(code)
    layout = formats.layout(fmt, 64, 32)
    return Buffer(
        os.memfd_create("dmabuf", os.MFD_CLOEXEC),
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


def test_addfb2_gets_every_plane_of_the_one_handle(kernel: Kernel, buf: Buffer) -> None:
    with primed.Device("card") as device, device.import_buffer(buf) as imported:
        fb = device.add_framebuffer(imported, buf)
        (_, fb_id, width, height, fourcc, planes) = kernel.calls[0]
        assert (fb_id, width, height, fourcc) == (fb.id, 64, 32, formats.fourcc("NV12"))
        assert planes == {
            "handles": [HANDLE, HANDLE],
            "pitches": [64, 64],
            "offsets": [0, 64 * 32],
            "modifiers": (),
            "flags": 0,
        }


def test_a_modifier_other_than_linear_is_passed_with_the_flag(kernel: Kernel) -> None:
    with (
        make_buffer("XR24", modifier=0x0100000000000001) as tiled,
        primed.Device("card") as device,
        device.import_buffer(tiled) as imported,
    ):
        device.add_framebuffer(imported, tiled)
        planes = kernel.calls[0][-1]
        assert isinstance(planes, dict)
        assert planes["modifiers"] == [0x0100000000000001]
        assert planes["flags"] == drm.DRM_MODE_FB_MODIFIERS


def test_last_import_removes_framebuffers_then_closes_the_handle(
    kernel: Kernel, buf: Buffer
) -> None:
    with primed.Device("card") as device:
        first, second = device.import_buffer(buf), device.import_buffer(buf)
        fbs = [device.add_framebuffer(first, buf), device.add_framebuffer(second, buf)]
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
    assert len(kernel.calls) == 5  # nothing twice, not even when the Device closes


def test_device_close_removes_framebuffers_before_any_handle(kernel: Kernel, buf: Buffer) -> None:
    with make_buffer("XR24") as other:
        device = primed.Device("card")
        fbs = [device.add_framebuffer(device.import_buffer(b), b) for b in (buf, other)]
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
        with device.add_framebuffer(imported, buf) as fb:
            pass
        fb.close()
        assert kernel.names() == ["addfb2", ("rmfb", fb.id)]
    assert kernel.names()[-1] == ("gem_close", HANDLE)


def test_a_failed_rmfb_still_closes_the_handle(kernel: Kernel, buf: Buffer) -> None:
    with primed.Device("card") as device:
        imported = device.import_buffer(buf)
        device.add_framebuffer(imported, buf)
        kernel.fail_rmfb = True
        with pytest.raises(primed.KernelError) as failed:
            imported.close()
        assert failed.value.errno == errno.EIO
        assert kernel.names()[-1] == ("gem_close", HANDLE)
        assert device.references(HANDLE) == 0


def test_framebuffer_needs_the_matching_open_import(kernel: Kernel, buf: Buffer) -> None:
    with make_buffer("XR24") as other, primed.Device("card") as device:
        imported = device.import_buffer(buf)
        with pytest.raises(ValueError, match="not the dma-buf"):
            device.add_framebuffer(imported, other)
        with primed.Device("card") as elsewhere, pytest.raises(ValueError, match="not an open"):
            elsewhere.add_framebuffer(imported, buf)
        imported.close()
        with pytest.raises(ValueError, match="not an open"):
            device.add_framebuffer(imported, buf)
    assert kernel.names() == [("gem_close", HANDLE)]
