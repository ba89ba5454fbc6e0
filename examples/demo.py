"""primed end to end: one daemon serving several allocators, and two client processes sharing
each allocator's buffer.

1. Starts ``primed serve`` with every allocator this machine has: each DRM card node that
   makes dumb buffers, the dma-heap ``system`` and udmabuf when the kernel has them.
2. Process A prints what the daemon serves and its import matrix (which render node imports
   which allocator's buffers, or the errno it refuses them with), then, for each allocator,
   asks for a 640x480 XRGB8888 buffer, draws a pattern into it through its mapping and shares
   it by token.
3. Process B, a client of its own, opens each buffer by its token, imports it on every render
   node (where the matrix says it imports, it reads the pixels back through that import;
   where it says the node refuses, B sees the same errno) and tells A what it read.
4. A checks that B saw its pixels, and that the matrix told the truth, for every allocator.

Run as ``python examples/demo.py``; ``--device`` (repeatable) names the card nodes instead.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import primed
from primed.kernel import drm

WIDTH, HEIGHT = 640, 480


def pattern(buf: primed.Buffer, seed: int) -> bytes:
    """A gradient whose colour says which allocator's buffer it is."""
    width, pitch = buf.width, buf.planes[0].pitch
    row = bytearray(pitch)
    row[0 : 4 * width : 4] = bytes(x * 255 // width for x in range(width))  # blue
    row[2 : 4 * width : 4] = bytes(((seed * 67) & 0xFF,)) * width  # red: the allocator
    row[3 : 4 * width : 4] = b"\xff" * width  # alpha
    rows = []
    for y in range(buf.height):
        row[1 : 4 * width : 4] = bytes((y * 255 // buf.height,)) * width  # green
        rows.append(bytes(row))
    return b"".join(rows).ljust(buf.size, b"\0")


def errname(err: int) -> str:
    return "ok" if not err else errno.errorcode.get(err, str(err))


def read_through(node: str, buf: primed.Buffer) -> tuple[int, str]:
    """Import ``buf`` on ``node``; (0, sha256 of what reads back through the import),
    or (errno, "") if the node refuses it."""
    with primed.Device(node) as device:
        try:
            imported = device.import_buffer(buf)
        except primed.KernelError as e:
            return e.errno or errno.EIO, ""
        with imported:
            # Read through the GEM handle, not the fd B was given: a new dma-buf fd
            # from the handle proves the import is this buffer.
            view = drm.handle_to_fd(device.fd, imported.handle)
            try:
                with primed.Mapping(view, buf.size, write=False, sync=True) as pixels:
                    return 0, hashlib.sha256(pixels).hexdigest()[:16]
            finally:
                os.close(view)


def process_b(channel: socket.socket, path: str) -> None:
    """One line from A per buffer (a token), one line back (what each node did with it)."""
    renders = [n.path for n in drm.nodes() if not n.primary]
    with primed.connect(path, name="demo B") as client, channel.makefile("rw") as lines:
        for line in lines:
            buf = client.open_shared(line.strip())
            with buf:
                seen = {node: read_through(node, buf) for node in renders}
            print(
                f"B (pid {os.getpid()}): opened {buf.allocator or 'the'} buffer by token: "
                + ", ".join(
                    f"{os.path.basename(n)} {f'read sha256 {d}' if not e else errname(e)}"
                    for n, (e, d) in seen.items()
                ),
                flush=True,
            )
            lines.write(json.dumps(seen) + "\n")
            lines.flush()


def every_allocator() -> list[str]:
    """``serve``'s arguments for every allocator this machine has."""
    args = []
    for node in drm.nodes():
        if node.primary:
            args += ["--device", node.path]
    if os.path.exists("/dev/dma_heap/system"):
        args += ["--heap", "system"]
    if os.path.exists("/dev/udmabuf"):
        args += ["--udmabuf"]
    return args


def connect(path: str, daemon: subprocess.Popen[bytes]) -> primed.Client:
    deadline = time.monotonic() + 60
    while True:
        try:
            return primed.connect(path, name="demo A")
        except OSError:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon did not start") from None
            time.sleep(0.1)


def show(offer: primed.Offer) -> None:
    print(f"daemon: protocol version {offer.version}, {len(offer.allocators)} allocators:")
    for a in offer.allocators:
        print(f"  {a.name:<12} {a.driver or a.kind.name.lower():<16} {a.node}")
    print("import matrix: what importing each allocator's buffer on a render node gives")
    width = max((len(f"{r.node} ({r.driver})") for r in offer.devices), default=0) + 2
    print("  " + " " * width + "".join(f"{a.name:<13}" for a in offer.allocators))
    for row in offer.devices:
        cells = "".join(f"{errname(e):<13}" for e in row.imports)
        print(f"  {f'{row.node} ({row.driver})':<{width}}{cells}".rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", action="append", help="a DRM card node for the daemon")
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        with socket.socket(fileno=int(args.peer)) as channel:
            process_b(channel, os.environ["PRIMED_DEMO_SOCKET"])
        return 0

    workdir = tempfile.mkdtemp(prefix="primed-demo-")
    path = os.path.join(workdir, "primed.sock")

    chosen = [a for d in args.device for a in ("--device", d)] if args.device else every_allocator()
    serve = [sys.executable, "-m", "primed", "serve", "--socket", path, *chosen]
    # The daemon's log says what this prints; warnings and errors still show.
    serve += ["--log-level", "warning"]
    print("$", " ".join(["primed", *serve[3:]]), flush=True)
    daemon = subprocess.Popen(serve)
    failures = []
    try:
        with connect(path, daemon) as client:
            offer = client.query()
            show(offer)
            a_end, b_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            with a_end, b_end, a_end.makefile("rw") as lines:
                peer = subprocess.Popen(
                    [sys.executable, __file__, "--peer", str(b_end.fileno())],
                    pass_fds=(b_end.fileno(),),
                    env={**os.environ, "PRIMED_DEMO_SOCKET": path},
                )
                b_end.close()
                for seed, allocator in enumerate(offer.allocators):
                    with client.allocate(WIDTH, HEIGHT, "XR24", allocator=allocator.name) as buf:
                        image = pattern(buf, seed)
                        with buf.map() as pixels:
                            pixels[:] = image
                        ours = hashlib.sha256(image).hexdigest()[:16]
                        print(
                            f"A (pid {os.getpid()}): {allocator.name}: buffer {buf.id}, "
                            f"{buf.width}x{buf.height} {buf.format}, pitch "
                            f"{buf.planes[0].pitch}, drew sha256 {ours}, shared by token",
                            flush=True,
                        )
                        lines.write(client.share(buf, once=True) + "\n")
                        lines.flush()
                        seen = json.loads(lines.readline() or "{}")
                        client.release(buf)
                    for row in offer.devices:
                        said = row.imports[seed]
                        err, digest = seen.get(row.node, (-1, ""))
                        if err != said or (not err and digest != ours):
                            failures.append(
                                f"{allocator.name} on {row.node}: matrix {errname(said)}, "
                                f"B got {errname(err)} {digest}"
                            )
                a_end.shutdown(socket.SHUT_WR)
                peer.wait(timeout=120)
        if peer.returncode != 0:
            failures.append(f"B exited with status {peer.returncode}")
        for failure in failures:
            print("FAILED:", failure, file=sys.stderr)
        if failures:
            return 1
        print(
            f"A: for all {len(offer.allocators)} allocators, B saw exactly the pixels A drew, "
            "on every render node the matrix said imports them, and the refusal it said elsewhere"
        )
        return 0
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        if not os.path.exists(path):
            os.rmdir(workdir)


if __name__ == "__main__":
    sys.exit(main())
