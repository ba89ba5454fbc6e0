"""GStreamer's kmssink shows a primed buffer: a consumer nobody here wrote puts a
dma-buf from the daemon on virtio-gpu's screen, and QEMU's screen is read back and
compared pixel for pixel.

The test draws a pattern into a buffer the daemon made on virtio-gpu's card node
and hands the dma-buf (an inherited fd) to tests/kernel/kmssink_show.py, run
under Debian's /usr/bin/python3 (PyGObject and Debian's GStreamer 1.22). That
script wraps the fd with GstAllocators.DmaBufAllocator, attaches the offsets and
strides primed announced as GstVideo meta, and pushes it through ``appsrc !
kmssink``. kmssink opens the card node itself and, since the daemon holds no DRM
master, becomes master. Besides the pixels, the kernel shows that kmssink did not
copy: the framebuffer on the CRTC is primed's dma-buf itself.

The screen is read by the host (tests/kernel/screendump.py, which scripts/test
starts and names in $PRIMED_SCREEN_DIR): without it the test fails.
"""

from __future__ import annotations

import errno
import os
import selectors
import subprocess
import time
from pathlib import Path
from typing import IO

import pytest

import primed
from primed import formats
from primed.client.buffer import Plane
from primed.kernel import drm
from tests.kernel.conftest import Nodes
from tests.kernel.screendump import screendump
from tests.kernel.test_kms import differences, find_output, parse_ppm, screen_dir
from tests.support import Daemon

#: Debian's own Python, which has PyGObject; the project's virtualenv does not.
SYSTEM_PYTHON = "/usr/bin/python3"
SCRIPT = Path(__file__).with_name("kmssink_show.py")
#: virtio-gpu's preferred mode under QEMU: the buffer fills the screen.
WIDTH, HEIGHT = 1280, 800
#: GStreamer's name for DRM's XRGB8888 (bytes B, G, R, X in memory).
GST_FORMAT = {"XR24": "BGRx"}
#: Python, GStreamer and Mesa start slowly under software emulation.
SHOW_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def driver() -> str:
    """kmssink needs KMS: the daemon of this module serves virtio-gpu's card node."""
    return "virtio_gpu"


def pattern(width: int, height: int) -> list[tuple[bytes, bytes]]:
    """Rows as XRGB8888 (little-endian B, G, R, X) and as RGB: not test_kms's pattern,
    so a screen left from that test cannot pass for this one. Blue is x mod 256,
    green y mod 256, red 0x30 on the left half and 0xC0 on the right."""
    blue = bytes(x & 0xFF for x in range(width))
    half = width // 2
    red = b"\x30" * half + b"\xc0" * (width - half)
    out = []
    for y in range(height):
        green = bytes([y & 0xFF]) * width
        xrgb, rgb = bytearray(width * 4), bytearray(width * 3)
        xrgb[0::4], xrgb[1::4], xrgb[2::4], xrgb[3::4] = blue, green, red, b"\xff" * width
        rgb[0::3], rgb[1::3], rgb[2::3] = red, green, blue
        out.append((bytes(xrgb), bytes(rgb)))
    return out


def read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line from a child's pipe, b"" at its end; fails after ``timeout`` seconds."""
    line = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise AssertionError(f"no line from the child within {timeout} s: {line!r}")
            chunk = os.read(stream.fileno(), 1)
            if not chunk:
                break
            line += chunk
    return line


def test_kmssink_shows_a_primed_buffer(daemon: Daemon, nodes: dict[str, Nodes]) -> None:
    directory = screen_dir()
    rows = pattern(WIDTH, HEIGHT)
    with primed.connect(daemon.socket) as client, primed.Device(nodes["virtio_gpu"].card) as card:
        buf = client.allocate(WIDTH, HEIGHT, "XR24")
        try:
            (plane,) = buf.planes
            with buf.map() as pixels:
                for y, (xrgb, _) in enumerate(rows):
                    pixels[plane.offset + y * plane.pitch :][: len(xrgb)] = xrgb
            output = find_output(card.fd)
            assert (output.mode.hdisplay, output.mode.vdisplay) == (WIDTH, HEIGHT), output.mode
            command = [
                SYSTEM_PYTHON,
                str(SCRIPT),
                f"--fd={buf.fd}",
                f"--size={buf.size}",
                f"--width={buf.width}",
                f"--height={buf.height}",
                f"--format={GST_FORMAT[buf.format]}",
                f"--offsets={','.join(str(p.offset) for p in buf.planes)}",
                f"--strides={','.join(str(p.pitch) for p in buf.planes)}",
                "--driver=virtio_gpu",
                f"--connector={output.connector.connector_id}",
            ]
            with subprocess.Popen(
                command,
                pass_fds=(buf.fd,),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ) as child:
                assert child.stdin and child.stdout and child.stderr
                try:
                    said = read_line(child.stdout, SHOW_TIMEOUT)
                    if said != b"shown\n":
                        child.wait(SHOW_TIMEOUT)
                        raise AssertionError(
                            f"kmssink_show said {said!r}, exit {child.returncode}:\n"
                            + child.stderr.read().decode(errors="replace")
                        )
                    fb_id = shown_framebuffer(card.fd, output.crtc, buf.fd, plane)
                    width, height, seen = parse_ppm(screendump(directory, f"kmssink-{os.getpid()}"))
                    assert (width, height) == (WIDTH, HEIGHT)
                    expected = b"".join(rgb for _, rgb in rows)
                    assert seen == expected, differences(seen, expected, width)
                finally:
                    child.stdin.close()  # the script takes the frame down and exits
                    code = child.wait(SHOW_TIMEOUT)
                errors = child.stderr.read().decode(errors="replace")
                assert code == 0, f"kmssink_show exited {code}:\n{errors}"
            # kmssink removed its framebuffer when it closed the card.
            with pytest.raises(primed.KernelError) as gone:
                drm.get_fb2(card.fd, fb_id)
            assert gone.value.errno == errno.ENOENT
        finally:
            client.release(buf)


def shown_framebuffer(fd: int, crtc_id: int, dmabuf: int, plane: Plane) -> int:
    """The framebuffer ``crtc_id`` scans out, checked to be ``dmabuf`` itself with
    ``plane`` its layout: kmssink imported the buffer, not a copy of it. Its id."""
    fb_id = drm.get_crtc(fd, crtc_id).fb_id
    assert fb_id, "the CRTC scans out nothing"
    fb = drm.get_fb2(fd, fb_id)  # root: we get handles of our own for its buffer
    handles = sorted({h for h in fb.handles if h})
    try:
        assert len(handles) == 1, fb
        exported = drm.handle_to_fd(fd, handles[0])
        try:
            same = os.fstat(exported).st_ino == os.fstat(dmabuf).st_ino
        finally:
            os.close(exported)
        assert same, f"framebuffer {fb_id} is another buffer than primed's: kmssink copied"
        assert (fb.width, fb.height, fb.pixel_format) == (WIDTH, HEIGHT, formats.fourcc("XR24"))
        assert (fb.pitches[0], fb.offsets[0]) == (plane.pitch, plane.offset), fb
    finally:
        for handle in handles:
            drm.gem_close(fd, handle)
    return fb_id
