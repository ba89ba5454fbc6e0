"""A client's Device on a real kernel: what ADDFB2 makes of the modifier (LINEAR given,
none given, one the driver lacks) on virtio-gpu, and what a Device dropped without
close() leaves behind once collected: nothing, seen from outside it.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import os
import weakref
from pathlib import Path

import pytest

import primed
from primed import formats
from primed.client.device import BufferLayout
from primed.kernel import drm
from tests.kernel.conftest import Nodes, serve
from tests.kernel.test_drm_path import shmem_kib
from tests.support import Daemon, wait_for

#: I915_FORMAT_MOD_X_TILED: a real modifier that virtio-gpu's planes do not list.
X_TILED = (0x01 << 56) | 1


@pytest.fixture(scope="module")
def driver() -> str:
    """Framebuffers need KMS: the daemon of this module serves virtio-gpu's card node."""
    return "virtio_gpu"


def describe_fb(fd: int, fb_id: int, keep: int) -> drm.FbCmd2:
    """GETFB2, closing the handles it makes on ``fd`` as root (all but ``keep``, ours)."""
    info = drm.get_fb2(fd, fb_id)
    for handle in set(info.handles) - {0, keep}:
        drm.gem_close(fd, handle)
    return info


def test_linear_with_and_without_the_modifiers_flag(
    daemon: Daemon, nodes: dict[str, Nodes]
) -> None:
    """What the kernel does with LINEAR given explicitly decides what the Device sends.

    A driver that says it takes no modifiers (DRM_CAP_ADDFB2_MODIFIERS 0, as
    virtio-gpu on Linux 6.1) refuses DRM_MODE_FB_MODIFIERS outright, LINEAR
    included: the Device then sends LINEAR as no modifier, which such a driver
    reads as linear. Where the cap is 1 the flag and LINEAR are taken as given.
    """
    with primed.connect(daemon.socket) as client, primed.Device(nodes["virtio_gpu"].card) as card:
        takes_modifiers = drm.get_cap(card.fd, drm.DRM_CAP_ADDFB2_MODIFIERS)
        buf = client.allocate(64, 48, "XR24")
        own = BufferLayout.of(buf)
        assert own.modifier == formats.MOD_LINEAR
        with (
            card.import_buffer(buf) as linear,
            card.import_buffer(
                buf, layout=dataclasses.replace(own, modifier=drm.DRM_FORMAT_MOD_INVALID)
            ) as implicit,
        ):
            assert linear.handle == implicit.handle
            pitch = buf.planes[0].pitch

            def raw(flags: int) -> int:
                return drm.addfb2(
                    card.fd, 64, 48, buf.fourcc, [linear.handle], [pitch], [0], [0], flags
                )

            # The kernel itself, LINEAR with the flag and without it.
            if takes_modifiers:
                drm.rmfb(card.fd, raw(drm.DRM_MODE_FB_MODIFIERS))
            else:
                with pytest.raises(primed.KernelError) as refused_flag:
                    raw(drm.DRM_MODE_FB_MODIFIERS)
                assert refused_flag.value.errno == errno.EINVAL
            drm.rmfb(card.fd, raw(0))

            linear_fb, implicit_fb = card.add_framebuffer(linear), card.add_framebuffer(implicit)
            sent = formats.MOD_LINEAR if takes_modifiers else drm.DRM_FORMAT_MOD_INVALID
            assert (linear_fb.modifier, implicit_fb.modifier) == (sent, drm.DRM_FORMAT_MOD_INVALID)
            # What the kernel recorded: LINEAR as a modifier where it takes them, else none.
            given = describe_fb(card.fd, linear_fb.id, linear.handle)
            assert bool(given.flags & drm.DRM_MODE_FB_MODIFIERS) == bool(takes_modifiers)
            assert given.modifiers[0] == formats.MOD_LINEAR
            none = describe_fb(card.fd, implicit_fb.id, linear.handle)
            assert not none.flags & drm.DRM_MODE_FB_MODIFIERS
            for info in (given, none):
                assert (info.width, info.height, info.pixel_format) == (64, 48, buf.fourcc)
                assert (info.pitches[0], info.offsets[0]) == (pitch, 0)
            print(
                f"virtio-gpu: DRM_CAP_ADDFB2_MODIFIERS {takes_modifiers}; GETFB2 of LINEAR: "
                f"{given}; of none given: {none}"
            )

            # A modifier that no default stands for goes to the kernel, which refuses it.
            tiled = dataclasses.replace(own, modifier=X_TILED)
            with card.import_buffer(buf, layout=tiled) as imported:
                with pytest.raises(primed.KernelError) as refused:
                    card.add_framebuffer(imported)
                assert refused.value.errno == errno.EINVAL
                assert f"modifier {X_TILED:#x}" in str(refused.value)
                if not takes_modifiers:
                    assert "takes no modifiers" in str(refused.value)
            assert card.framebuffers() == [linear_fb, implicit_fb]
        client.release(buf)


def test_a_bare_fd_needs_a_layout_for_a_framebuffer(
    daemon: Daemon, nodes: dict[str, Nodes]
) -> None:
    with primed.connect(daemon.socket) as client, primed.Device(nodes["virtio_gpu"].card) as card:
        buf = client.allocate(64, 48, "XR24")
        fd = buf.detach()  # from here on only a dma-buf fd, as from another process
        try:
            with card.import_buffer(fd) as bare:
                assert bare.layout is None and bare.size == buf.size
                with pytest.raises(ValueError, match="no layout"):
                    card.add_framebuffer(bare)
                assert drm.get_resources(card.fd).fbs == ()
            pitch = buf.planes[0].pitch
            layout = BufferLayout(32, 48, buf.fourcc, (primed.Plane(0, pitch),))
            with card.import_buffer(fd, layout=layout) as described:
                fb = card.add_framebuffer(described)
                info = describe_fb(card.fd, fb.id, described.handle)
                assert (info.width, info.height, info.pitches[0]) == (32, 48, pitch)
                assert not info.flags & drm.DRM_MODE_FB_MODIFIERS  # none was given
        finally:
            os.close(fd)
        client.release(buf)


def test_a_dropped_device_removes_its_framebuffers(daemon: Daemon, nodes: dict[str, Nodes]) -> None:
    card_path = nodes["virtio_gpu"].card
    # GETFB2 finds any fd's framebuffer by id: a second fd watches the first's.
    watcher = drm.open_node(card_path)
    try:
        with primed.connect(daemon.socket) as client:
            buf = client.allocate(64, 64, "XR24")
            device = primed.Device(card_path)
            fd, alive = device.fd, weakref.ref(device)
            imported = device.import_buffer(buf)
            fb_id = device.add_framebuffer(imported).id
            assert describe_fb(watcher, fb_id, 0).width == 64
            assert os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(card_path)
            del device, imported  # never closed; the Device and its Framebuffer form a cycle
            gc.collect()
            assert alive() is None
            with pytest.raises(primed.KernelError) as gone:
                drm.get_fb2(watcher, fb_id)
            assert gone.value.errno == errno.ENOENT
            assert not os.path.exists(f"/proc/self/fd/{fd}") or os.path.realpath(
                f"/proc/self/fd/{fd}"
            ) != os.path.realpath(card_path)
            client.release(buf)
    finally:
        os.close(watcher)


def test_a_dropped_device_frees_the_memory_it_held(tmp_path: Path, nodes: dict[str, Nodes]) -> None:
    # vgem buffers are shmem: once the daemon and the client let go, only the
    # Device's GEM handles hold the pages, and collecting the Device frees them.
    running = serve(tmp_path / "gc.sock", "--device", nodes["vgem"].card)
    try:
        baseline = shmem_kib()
        device = primed.Device(nodes["vgem"].render)
        alive = weakref.ref(device)
        with primed.connect(running.socket) as client:
            bufs = client.allocate_many(2048, 2048, "XR24", 4)  # 64 MiB
            imports = [device.import_buffer(b) for b in bufs]
            for buf in bufs:
                with buf.map() as pixels:
                    pixels[::4096] = b"\x01" * len(pixels[::4096])  # touch every page
            client.release(*bufs)  # the daemon's handles and our fds go
        held = shmem_kib() - baseline
        assert held >= 60 * 1024, f"Shmem is {held} kB above its baseline with the handles held"
        del device, imports
        gc.collect()
        assert alive() is None
        wait_for(
            lambda: shmem_kib() - baseline < 4 * 1024, "Shmem to fall back to its baseline", 60
        )
        print(f"vgem: {held} kB of Shmem held by a dropped Device's handles, freed when collected")
    finally:
        running.stop()
