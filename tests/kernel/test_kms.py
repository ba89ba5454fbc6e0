"""Scan-out: a buffer from the daemon, drawn by a client, imported on virtio-gpu's card
node, made a framebuffer and set on a CRTC; QEMU's screen is read back and compared
with what was drawn, pixel for pixel. Also: framebuffers are removed before their GEM
handle is closed, and what the kernel says on a render node and on vgem.

The screen is read by the host (tests/kernel/screendump.py, which scripts/test starts
and names in $PRIMED_SCREEN_DIR): without it the scan-out test fails.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import time

import pytest

import primed
from primed.client.device import BufferLayout
from primed.kernel import drm
from tests.kernel.conftest import Nodes
from tests.kernel.screendump import screendump
from tests.support import Daemon

#: virtio-gpu's preferred mode under QEMU.
WIDTH, HEIGHT = 1280, 800
#: enum drm_connector_status's connected (kernel-internal; libdrm calls it DRM_MODE_CONNECTED).
CONNECTED = 1
#: The red level of each quadrant: top left, top right, bottom left, bottom right.
QUADRANT_RED = (0x00, 0x55, 0xAA, 0xFF)


@pytest.fixture(scope="module")
def driver() -> str:
    """Only virtio-gpu has KMS: the daemon of this module serves its card node."""
    return "virtio_gpu"


def rows(width: int, height: int) -> list[tuple[bytes, bytes]]:
    """The pattern, row by row, as XRGB8888 (little-endian B, G, R, X) and as RGB.

    Four quadrants of rising red over two gradients that repeat every 256 pixels:
    green is x mod 256, blue is y mod 256, so a pixel moved by one row or column
    no longer matches.
    """
    green = bytes(x & 0xFF for x in range(width))
    half = width // 2
    out = []
    for y in range(height):
        top = 0 if y < height // 2 else 2
        red = bytes([QUADRANT_RED[top]]) * half + bytes([QUADRANT_RED[top + 1]]) * (width - half)
        blue = bytes([y & 0xFF]) * width
        xrgb, rgb = bytearray(width * 4), bytearray(width * 3)
        xrgb[0::4], xrgb[1::4], xrgb[2::4], xrgb[3::4] = blue, green, red, b"\xff" * width
        rgb[0::3], rgb[1::3], rgb[2::3] = red, green, blue
        out.append((bytes(xrgb), bytes(rgb)))
    return out


def parse_ppm(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of a binary PPM with 8-bit samples."""
    header = re.match(rb"P6\s+(\d+)\s+(\d+)\s+255\s", data)
    assert header, f"not an 8-bit P6 PPM: {data[:20]!r}"
    width, height = int(header[1]), int(header[2])
    pixels = data[header.end() :]
    assert len(pixels) == width * height * 3, f"{len(pixels)} bytes of pixels for {width}x{height}"
    return width, height, pixels


def differences(seen: bytes, expected: bytes, width: int) -> str:
    """How many RGB pixels differ, and the first few as (x, y) seen-not-expected."""
    bad = [i // 3 for i in range(0, len(expected), 3) if seen[i : i + 3] != expected[i : i + 3]]
    shown = ", ".join(
        f"({p % width}, {p // width}) {seen[3 * p : 3 * p + 3].hex()}"
        f" not {expected[3 * p : 3 * p + 3].hex()}"
        for p in bad[:8]
    )
    return f"{len(bad)} of {len(expected) // 3} pixels differ: {shown}"


@dataclasses.dataclass(frozen=True)
class Output:
    connector: drm.Connector
    mode: drm.ModeInfo
    crtc: int


def find_output(fd: int) -> Output:
    """A connected connector, its preferred mode and a CRTC one of its encoders can feed."""
    resources = drm.get_resources(fd)
    for connector_id in resources.connectors:
        connector = drm.get_connector(fd, connector_id)
        if connector.connection != CONNECTED or not connector.modes:
            continue
        preferred = [m for m in connector.modes if m.type & drm.DRM_MODE_TYPE_PREFERRED]
        mode = (preferred or list(connector.modes))[0]
        for encoder_id in (connector.encoder_id, *connector.encoders):
            if not encoder_id:
                continue
            encoder = drm.get_encoder(fd, encoder_id)
            if encoder.crtc_id:
                return Output(connector, mode, encoder.crtc_id)
            for i, crtc in enumerate(resources.crtcs):
                if encoder.possible_crtcs & (1 << i):
                    return Output(connector, mode, crtc)
    raise AssertionError(f"no connected connector with a usable CRTC among {resources}")


def screen_dir() -> str:
    directory = os.environ.get("PRIMED_SCREEN_DIR")
    if not directory:
        pytest.fail(
            "PRIMED_SCREEN_DIR is not set: run the kernel tier with scripts/test, which starts "
            "the host's screendump service and names its folder there",
            pytrace=False,
        )
    return directory


def test_scan_out_a_primed_buffer(daemon: Daemon, nodes: dict[str, Nodes]) -> None:
    directory = screen_dir()
    pattern = rows(WIDTH, HEIGHT)
    with primed.connect(daemon.socket) as client, primed.Device(nodes["virtio_gpu"].card) as card:
        buf = client.allocate(WIDTH, HEIGHT, "XR24")
        pitch = buf.planes[0].pitch
        with buf.map() as pixels:
            for y, (xrgb, _) in enumerate(pattern):
                pixels[y * pitch : y * pitch + len(xrgb)] = xrgb
        # Device() dropped master on opening; the daemon holds none, and root may take it.
        drm.set_master(card.fd)
        try:
            output = find_output(card.fd)
            shown = (output.mode.hdisplay, output.mode.vdisplay)
            assert shown == (WIDTH, HEIGHT), f"preferred mode {output.mode}"
            imported = card.import_buffer(buf)
            assert imported.layout == BufferLayout.of(buf)
            fb = card.add_framebuffer(imported)
            drm.set_crtc(card.fd, output.crtc, fb.id, [output.connector.connector_id], output.mode)
            assert drm.get_crtc(card.fd, output.crtc).fb_id == fb.id
            time.sleep(0.5)

            width, height, seen = parse_ppm(screendump(directory, f"scanout-{os.getpid()}"))
            assert (width, height) == (WIDTH, HEIGHT)
            expected = b"".join(rgb for _, rgb in pattern)
            assert seen == expected, differences(seen, expected, width)

            # The last Import goes: its framebuffer is removed (and so taken off the
            # CRTC) before the handle is closed.
            imported.close()
            assert fb.closed and card.framebuffers() == []
            with pytest.raises(primed.KernelError) as removed:
                drm.rmfb(card.fd, fb.id)
            assert removed.value.errno == errno.ENOENT
            assert drm.get_crtc(card.fd, output.crtc).fb_id == 0
            with pytest.raises(primed.KernelError) as closed:
                drm.handle_to_fd(card.fd, imported.handle)
            assert closed.value.errno == errno.ENOENT
        finally:
            drm.drop_master(card.fd)
        client.release(buf)


def test_framebuffers_go_before_their_handle(daemon: Daemon, nodes: dict[str, Nodes]) -> None:
    # No master needed: ADDFB2 and RMFB are for any opener of a card node.
    # GETRESOURCES lists the framebuffers of the calling fd only.
    with primed.connect(daemon.socket) as client:
        buf, other = client.allocate_many(64, 64, "XR24", 2)
        with primed.Device(nodes["virtio_gpu"].card) as card:
            first, second = card.import_buffer(buf), card.import_buffer(buf.fd)
            fb = card.add_framebuffer(first)
            assert fb.id in drm.get_resources(card.fd).fbs
            with pytest.raises(ValueError, match="no layout"):
                card.add_framebuffer(second)  # a bare fd: it has a handle but no layout
            assert drm.get_resources(card.fd).fbs == (fb.id,)
            first.close()  # the handle lives on in `second`, and so does its framebuffer
            assert not fb.closed and fb.id in drm.get_resources(card.fd).fbs
            second.close()
            assert fb.closed and fb.id not in drm.get_resources(card.fd).fbs

            with card.import_buffer(buf) as imported, card.add_framebuffer(imported) as fb:
                assert fb.id in drm.get_resources(card.fd).fbs
            assert drm.get_resources(card.fd).fbs == ()
            fb.close()  # idempotent

            imported = card.import_buffer(other)
            kept = card.add_framebuffer(imported)
        assert kept.closed and imported.handle > 0
        imported.close()  # after the Device: nothing left to do


def test_render_node_and_vgem_refuse_framebuffers(daemon: Daemon, nodes: dict[str, Nodes]) -> None:
    with primed.connect(daemon.socket) as client:
        buf = client.allocate(64, 64, "XR24")
        # A virtio-gpu buffer imports everywhere, but only a KMS card node makes framebuffers.
        for path, code, hint in (
            (nodes["virtio_gpu"].render, errno.EACCES, "render node"),
            (nodes["vgem"].card, errno.EOPNOTSUPP, "no KMS"),
        ):
            with primed.Device(path) as device, device.import_buffer(buf) as imported:
                with pytest.raises(primed.KernelError) as refused:
                    device.add_framebuffer(imported)
                assert refused.value.errno == code, f"{path}: {refused.value}"
                assert hint in str(refused.value) and path in str(refused.value)
                assert device.framebuffers() == []
