"""Show one dma-buf full screen with GStreamer's kmssink, until told to stop.

Run by tests/kernel/test_kmssink.py under Debian's /usr/bin/python3, which has
PyGObject and GStreamer's introspection data (the project's virtualenv has
neither), with the dma-buf passed as an inherited fd:

    /usr/bin/python3 tests/kernel/kmssink_show.py --fd N --size BYTES \\
        --width W --height H --format BGRx --offsets 0 --strides 5120 \\
        --driver virtio_gpu --connector 34

The fd is wrapped as it is (GstAllocators.DmaBufAllocator, which takes it over),
given the layout primed announced as GstVideo video meta (offsets and strides,
not GStreamer's own idea of them), and pushed through ``appsrc ! kmssink``. Once
the pipeline has prerolled (kmssink has put the frame on screen and waited for
it to be scanned out), one line ``shown`` goes to stdout; the frame stays up
until stdin is closed or a line arrives on it. Exit status 0, else 1 with the
reason on stderr.
"""

from __future__ import annotations

import argparse
import sys

import gi  # type: ignore[import-not-found, unused-ignore]

gi.require_version("Gst", "1.0")
gi.require_version("GstAllocators", "1.0")
gi.require_version("GstApp", "1.0")
gi.require_version("GstVideo", "1.0")
from gi.repository import (  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
    Gst,
    GstAllocators,
    GstVideo,
)

#: How long kmssink may take to preroll (software emulation is slow), in seconds.
PREROLL_TIMEOUT = 60


def numbers(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--fd", type=int, required=True, help="the dma-buf, inherited")
    parser.add_argument("--size", type=int, required=True, help="its size in bytes")
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--format", required=True, help="GStreamer's name, e.g. BGRx")
    parser.add_argument("--offsets", type=numbers, required=True, help="per plane, by commas")
    parser.add_argument("--strides", type=numbers, required=True, help="per plane, by commas")
    parser.add_argument("--driver", required=True, help="kmssink's driver-name")
    parser.add_argument("--connector", type=int, required=True, help="kmssink's connector-id")
    args = parser.parse_args()
    if len(args.offsets) != len(args.strides):
        parser.error("one offset and one stride per plane")

    Gst.init(None)
    video_format = GstVideo.VideoFormat.from_string(args.format)
    if video_format == GstVideo.VideoFormat.UNKNOWN:
        parser.error(f"GStreamer has no format {args.format}")

    pipeline = Gst.parse_launch(
        "appsrc name=src format=time ! "
        f"kmssink name=sink driver-name={args.driver} connector-id={args.connector} "
        "force-modesetting=true sync=false"
    )
    source = pipeline.get_by_name("src")
    source.set_property(
        "caps",
        Gst.Caps.from_string(
            f"video/x-raw,format={args.format},width={args.width},height={args.height},"
            "framerate=0/1"
        ),
    )
    buffer = Gst.Buffer.new()
    # The allocator owns the fd from here: it closes it when the memory goes.
    # (alloc is a function of the class in the GIR data, not a method: pass the allocator.)
    allocator = GstAllocators.DmaBufAllocator.new()
    memory = GstAllocators.DmaBufAllocator.alloc(allocator, args.fd, args.size)
    buffer.append_memory(memory)
    GstVideo.buffer_add_video_meta_full(
        buffer,
        GstVideo.VideoFrameFlags.NONE,
        video_format,
        args.width,
        args.height,
        len(args.offsets),
        args.offsets + [0] * (GstVideo.VIDEO_MAX_PLANES - len(args.offsets)),
        args.strides + [0] * (GstVideo.VIDEO_MAX_PLANES - len(args.strides)),
    )
    buffer.pts = 0

    bus = pipeline.get_bus()
    try:
        if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            print("kmssink_show: the pipeline would not start", file=sys.stderr)
            return 1
        if source.emit("push-buffer", buffer) != Gst.FlowReturn.OK:
            print("kmssink_show: appsrc refused the buffer", file=sys.stderr)
            return 1
        message = bus.timed_pop_filtered(
            PREROLL_TIMEOUT * Gst.SECOND, Gst.MessageType.ASYNC_DONE | Gst.MessageType.ERROR
        )
        if message is None:
            print(f"kmssink_show: no preroll within {PREROLL_TIMEOUT} s", file=sys.stderr)
            return 1
        if message.type == Gst.MessageType.ERROR:
            error, debug = message.parse_error()
            print(f"kmssink_show: {error.message} ({debug})", file=sys.stderr)
            return 1
        print("shown", flush=True)
        sys.stdin.readline()
        return 0
    finally:
        pipeline.set_state(Gst.State.NULL)


if __name__ == "__main__":
    sys.exit(main())
