"""primed end to end: a daemon, and two client processes sharing one buffer.

1. Starts ``primed serve`` on the first DRM card node that makes dumb buffers.
2. Process A asks the daemon for a 640x480 XRGB8888 buffer, draws a gradient
   into it through its mapping and imports it as a GEM handle on a render node.
3. Process B receives the dma-buf fd from A over a Unix socket, imports it on
   its own render node and reads the pixels back through that import.
4. The daemon stops; the buffer lives on in B as long as B holds it.

Run as ``python examples/demo.py``; ``--device`` picks a card node.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import primed
from primed.kernel import drm

WIDTH, HEIGHT = 640, 480


def render_node(driver: str) -> str:
    for node in drm.nodes():
        if node.driver == driver and not node.primary:
            return node.path
    raise SystemExit(f"no render node for {driver}")


def gradient(buf: primed.Buffer) -> bytes:
    width, pitch = buf.width, buf.planes[0].pitch
    row = bytearray(pitch)
    row[0 : 4 * width : 4] = bytes(x * 255 // width for x in range(width))  # blue
    row[2 : 4 * width : 4] = b"\x80" * width  # red
    row[3 : 4 * width : 4] = b"\xff" * width  # alpha
    rows = []
    for y in range(buf.height):
        row[1 : 4 * width : 4] = bytes((y * 255 // buf.height,)) * width  # green
        rows.append(bytes(row))
    return b"".join(rows).ljust(buf.size, b"\0")


def process_b(channel: socket.socket, node: str) -> None:
    message, fds, _, _ = socket.recv_fds(channel, 1024, 1)
    size = int(message)
    (dmabuf,) = fds
    with primed.Device(node) as device, device.import_buffer(dmabuf) as imported:
        os.close(dmabuf)  # the GEM handle alone keeps the buffer alive now
        view = drm.handle_to_fd(device.fd, imported.handle)
        with primed.Mapping(view, size, write=False, sync=True) as pixels:
            digest = hashlib.sha256(pixels).hexdigest()[:16]
        os.close(view)
        print(
            f"B (pid {os.getpid()}): imported it as GEM handle {imported.handle} on {node}, "
            f"read {size} bytes through that handle, sha256 {digest}",
            flush=True,
        )
    channel.sendall(digest.encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="DRM card node for the daemon")
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        with socket.socket(fileno=int(args.peer)) as channel:
            process_b(channel, os.environ["PRIMED_DEMO_NODE"])
        return 0

    workdir = tempfile.mkdtemp(prefix="primed-demo-")
    path = os.path.join(workdir, "primed.sock")
    serve = [sys.executable, "-m", "primed", "serve", "--socket", path]
    daemon = subprocess.Popen([*serve, *(["--device", args.device] if args.device else [])])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = primed.connect(path, name="demo A")
                break
            except OSError:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print("the daemon did not start", file=sys.stderr)
                    return 1
                time.sleep(0.1)
        with client:
            info = client.info
            print(f"daemon: {info.backend.name} buffers from {info.node} ({info.driver})")
            node = render_node(info.driver)
            buf = client.allocate(WIDTH, HEIGHT, "XR24")
            print(
                f"A (pid {os.getpid()}): got buffer {buf.id}: {buf.width}x{buf.height} "
                f"{buf.format}, pitch {buf.planes[0].pitch}, {buf.size} bytes, dma-buf fd {buf.fd}"
            )
            image = gradient(buf)
            with buf.map() as pixels:
                pixels[:] = image
            with primed.Device(node) as device, device.import_buffer(buf) as imported:
                print(f"A: imported it as GEM handle {imported.handle} on {node}; drew a gradient")
                a_end, b_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                with a_end, b_end:
                    peer = subprocess.Popen(
                        [sys.executable, __file__, "--peer", str(b_end.fileno())],
                        pass_fds=(b_end.fileno(),),
                        env={**os.environ, "PRIMED_DEMO_NODE": node},
                    )
                    socket.send_fds(a_end, [str(buf.size).encode()], [buf.fd])
                    digest = a_end.recv(64).decode()
                    peer.wait(timeout=120)
            client.release(buf)
        ours = hashlib.sha256(image).hexdigest()[:16]
        if digest != ours or peer.returncode != 0:
            print(f"FAILED: B read {digest or 'nothing'}, A wrote {ours}", file=sys.stderr)
            return 1
        print(f"A: B saw exactly the pixels A drew (sha256 {ours}); buffer released")
        return 0
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        if not os.path.exists(path):
            os.rmdir(workdir)


if __name__ == "__main__":
    sys.exit(main())
