"""The floor: primed's work done with no daemon framework at all.

The same kernel calls as primed's backends (memfd_create, ftruncate and seals;
CREATE_DUMB and PRIME export; DMA_HEAP_IOCTL_ALLOC; or a sealed memfd made a
udmabuf; each dma-buf named with DMA_BUF_SET_NAME as primed names it), the same
SCM_RIGHTS passing over the same kind of socket, the same import on the
client's side; but struct-packed
messages of fixed size, no validation beyond what struct does, no event loop,
no objects per buffer. Whatever primed costs beyond these figures is its own.

Run as a server: ``python -m benchmarks.floor --socket PATH --backend memfd``
(or ``--backend drm --device /dev/dri/cardN``, ``--backend heap --heap system``,
``--backend udmabuf``), ``--mode blocking`` serving one connection at a time with
plain blocking calls, ``--mode epoll`` serving many at once from one epoll loop, or
``--mode trio`` doing so from trio's.
"""

from __future__ import annotations

import argparse
import array
import fcntl
import mmap
import os
import resource
import selectors
import socket
import struct
from collections.abc import Callable
from typing import Protocol

import trio

from primed.kernel import dmabuf, drm, heap, udmabuf

#: op, width, height, id (or count for HOLD)
REQUEST = struct.Struct("<IIIQ")
#: status, pitch, id, size
REPLY = struct.Struct("<IIQQ")
ALLOCATE, RELEASE, HOLD = 1, 2, 3
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
#: What the floor names each dma-buf: as long as the name primed gives the benchmark's
#: buffers (``primed:UID:ID:PID:bench``, 21 bytes with uid 0 and 3-digit ids).
_DMABUF_NAME = b"floor:0:123:4567:bench\0"
_SYNC_START = drm.dma_buf_sync.pack(drm.DMA_BUF_SYNC_START | drm.DMA_BUF_SYNC_RW)
_SYNC_END = drm.dma_buf_sync.pack(drm.DMA_BUF_SYNC_END | drm.DMA_BUF_SYNC_RW)


class Kernel(Protocol):
    """Where the floor's buffers come from: (ref, size, pitch), an fd per export, a free."""

    def allocate(self, width: int, height: int) -> tuple[int, int, int]: ...
    def export(self, ref: int) -> int: ...
    def free(self, ref: int) -> None: ...
    def close(self) -> None: ...


def _pages(width: int, height: int) -> int:
    return -(-width * 4 * height // mmap.PAGESIZE) * mmap.PAGESIZE


class MemfdKernel:
    def allocate(self, width: int, height: int) -> tuple[int, int, int]:
        size = _pages(width, height)
        fd = os.memfd_create("floor", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        return fd, size, width * 4

    def export(self, ref: int) -> int:
        # Reopened, as primed's MemfdBackend.export does (each delivery its own open
        # file description), not dup()ed: the same kernel work, about 4 us more
        # than a dup here, part of it paid by the receiver when it closes the fd.
        return os.open(f"/proc/self/fd/{ref}", os.O_RDWR | os.O_CLOEXEC)

    def free(self, ref: int) -> None:
        os.close(ref)

    def close(self) -> None:
        pass


class _DmabufKernel:
    """What the heap and udmabuf kernels share, as primed's DmabufFdBackend does: the
    buffer is its dma-buf fd, each export a dup of it (a dma-buf has one open file
    description), freeing closes it."""

    fd: int

    def export(self, ref: int) -> int:
        return os.dup(ref)

    def free(self, ref: int) -> None:
        os.close(ref)

    def close(self) -> None:
        os.close(self.fd)

    @staticmethod
    def _named(fd: int) -> int:
        """``fd``, named as primed names its dma-bufs; closed if naming fails."""
        try:
            fcntl.ioctl(fd, dmabuf.DMA_BUF_SET_NAME_B, _DMABUF_NAME)
        except BaseException:
            os.close(fd)
            raise
        return fd


class HeapKernel(_DmabufKernel):
    """A dma-buf heap's buffers: DMA_HEAP_IOCTL_ALLOC, then DMA_BUF_SET_NAME."""

    def __init__(self, name: str):
        self.fd = os.open(os.path.join(heap.HEAP_ROOT, name), os.O_RDONLY | os.O_CLOEXEC)

    def allocate(self, width: int, height: int) -> tuple[int, int, int]:
        size = _pages(width, height)
        data = heap.dma_heap_allocation_data
        arg = bytearray(data.pack(size, 0, os.O_RDWR | os.O_CLOEXEC, 0))
        fcntl.ioctl(self.fd, heap.DMA_HEAP_IOCTL_ALLOC, arg)
        return self._named(int(data.unpack(arg)[1])), size, width * 4


class UdmabufKernel(_DmabufKernel):
    """udmabuf's buffers: memfd_create, ftruncate, seals, UDMABUF_CREATE, the memfd
    closed (the udmabuf holds its pages), then DMA_BUF_SET_NAME."""

    def __init__(self) -> None:
        self.fd = os.open(udmabuf.UDMABUF_DEVICE, os.O_RDWR | os.O_CLOEXEC)

    def allocate(self, width: int, height: int) -> tuple[int, int, int]:
        size = _pages(width, height)
        memfd = os.memfd_create("floor", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(memfd, size)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, udmabuf.SEALS)
            arg = bytearray(
                udmabuf.udmabuf_create.pack(memfd, udmabuf.UDMABUF_FLAGS_CLOEXEC, 0, size)
            )
            fd = fcntl.ioctl(self.fd, udmabuf.UDMABUF_CREATE, arg, True)
        finally:
            os.close(memfd)
        return self._named(fd), size, width * 4


class DumbKernel:
    def __init__(self, card: str):
        self.fd = os.open(card, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(self.fd, drm.DRM_IOCTL_DROP_MASTER)
        except OSError:
            pass

    def allocate(self, width: int, height: int) -> tuple[int, int, int]:
        arg = bytearray(drm.drm_mode_create_dumb.pack(height, width, 32, 0, 0, 0, 0))
        fcntl.ioctl(self.fd, drm.DRM_IOCTL_MODE_CREATE_DUMB, arg)
        _, _, _, _, handle, pitch, size = drm.drm_mode_create_dumb.unpack(arg)
        return handle, size, pitch

    def export(self, ref: int) -> int:
        arg = bytearray(drm.drm_prime_handle.pack(ref, os.O_RDWR | os.O_CLOEXEC, -1))
        fcntl.ioctl(self.fd, drm.DRM_IOCTL_PRIME_HANDLE_TO_FD, arg)
        return int(drm.drm_prime_handle.unpack(arg)[2])

    def free(self, ref: int) -> None:
        fcntl.ioctl(self.fd, drm.DRM_IOCTL_MODE_DESTROY_DUMB, drm.drm_mode_destroy_dumb.pack(ref))

    def close(self) -> None:
        os.close(self.fd)


def open_kernel(backend: str, device: str | None = None, heap_name: str | None = None) -> Kernel:
    """The floor's kernel for ``backend`` (memfd, drm on ``device``, heap ``heap_name``,
    udmabuf); the caller closes it."""
    if backend == "memfd":
        return MemfdKernel()
    if backend == "drm" and device is not None:
        return DumbKernel(device)
    if backend == "heap" and heap_name is not None:
        return HeapKernel(heap_name)
    if backend == "udmabuf":
        return UdmabufKernel()
    raise ValueError(f"backend {backend} needs its node (device {device}, heap {heap_name})")


def importer(
    render: str | None, dmabuf_sync: bool = False
) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """What a client does with a received fd, and how to clean up after: with a
    render node, PRIME import and GEM_CLOSE; without one, map and unmap it, the
    access bracketed with DMA_BUF_IOCTL_SYNC when it is a dma-buf (``dmabuf_sync``:
    a heap's or udmabuf's), as primed's Buffer.map does."""
    if render is None and dmabuf_sync:

        def synced_map(fd: int, size: int) -> None:
            mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            fcntl.ioctl(fd, drm.DMA_BUF_IOCTL_SYNC, _SYNC_START)
            fcntl.ioctl(fd, drm.DMA_BUF_IOCTL_SYNC, _SYNC_END)
            mapped.close()

        return synced_map, lambda: None
    if render is None:

        def cpu_map(fd: int, size: int) -> None:
            mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE).close()

        return cpu_map, lambda: None
    node = os.open(render, os.O_RDWR | os.O_CLOEXEC)

    def prime_import(fd: int, size: int) -> None:
        arg = bytearray(drm.drm_prime_handle.pack(0, 0, fd))
        fcntl.ioctl(node, drm.DRM_IOCTL_PRIME_FD_TO_HANDLE, arg)
        handle = drm.drm_prime_handle.unpack(arg)[0]
        fcntl.ioctl(node, drm.DRM_IOCTL_GEM_CLOSE, drm.drm_gem_close.pack(handle, 0))

    return prime_import, lambda: os.close(node)


def in_process(kernel: Kernel, use: Callable[[int, int], None], width: int, height: int) -> None:
    """One allocate, export, import, close and free with no socket at all."""
    ref, size, _ = kernel.allocate(width, height)
    fd = kernel.export(ref)
    use(fd, size)
    os.close(fd)
    kernel.free(ref)


class _Conn:
    __slots__ = ("buffers", "next_id", "sock")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffers: dict[int, int] = {}
        self.next_id = 1


def _handle(conn: _Conn, kernel: Kernel) -> bool:
    """Serve one request; False at end of stream."""
    data = conn.sock.recv(REQUEST.size)
    if not data:
        return False
    op, width, height, ident = REQUEST.unpack(data)
    if op == ALLOCATE:
        ref, size, pitch = kernel.allocate(width, height)
        ident = conn.next_id
        conn.next_id += 1
        conn.buffers[ident] = ref
        fd = kernel.export(ref)
        try:
            conn.sock.sendmsg(
                [REPLY.pack(0, pitch, ident, size)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", (fd,)))],
            )
        finally:
            os.close(fd)
    elif op == RELEASE:
        kernel.free(conn.buffers.pop(ident))
        conn.sock.send(REPLY.pack(0, 0, ident, 0))
    elif op == HOLD:
        for _ in range(ident):
            conn.buffers[conn.next_id] = kernel.allocate(width, height)[0]
            conn.next_id += 1
        conn.sock.send(REPLY.pack(0, 0, 0, 0))
    return True


def _close(conn: _Conn, kernel: Kernel) -> None:
    for ref in conn.buffers.values():
        kernel.free(ref)
    conn.sock.close()


def serve_blocking(listener: socket.socket, kernel: Kernel) -> None:
    """One connection at a time, every call blocking."""
    while True:
        sock, _ = listener.accept()
        conn = _Conn(sock)
        try:
            while _handle(conn, kernel):
                pass
        except OSError:
            pass
        _close(conn, kernel)


def serve_epoll(listener: socket.socket, kernel: Kernel) -> None:
    """Every connection at once: one request per readable socket per turn of the loop."""
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                sock, _ = listener.accept()
                selector.register(sock, selectors.EVENT_READ, _Conn(sock))
                continue
            conn: _Conn = key.data
            try:
                alive = _handle(conn, kernel)
            except OSError:
                alive = False
            if not alive:
                selector.unregister(conn.sock)
                _close(conn, kernel)


def serve_trio(listener: socket.socket, kernel: Kernel) -> None:
    """Every connection at once, a trio task each: the floor's work under the event loop
    primed's daemon runs on, with the least of it. Each receive is tried first and waits
    for readiness (trio's wait_readable) only when there is nothing to read; no yield
    after a call that succeeded, no timeouts, no fairness. So what this costs beyond
    serve_epoll is trio's wake-up path, and what primed's daemon costs beyond this is
    primed's own. A reply is sent without waiting for room: a client that does not read
    would lose one, which the benchmark's clients (one request at a time) never do."""

    async def serve(conn: _Conn) -> None:
        fd = conn.sock.fileno()
        try:
            while True:
                try:
                    if not _handle(conn, kernel):
                        break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
        except OSError:
            pass
        _close(conn, kernel)

    async def accept() -> None:
        listener.setblocking(False)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(listener.fileno())
                    continue
                sock.setblocking(False)
                nursery.start_soon(serve, _Conn(sock))

    trio.run(accept)


class Client:
    """The floor's client: one blocking socket, one request at a time (or a window)."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.connect(path)

    def send_allocate(self, width: int, height: int) -> None:
        self.sock.send(REQUEST.pack(ALLOCATE, width, height, 0))

    def receive_allocated(self) -> tuple[int, int, int]:
        """(id, fd, size) of the next Allocate's answer."""
        data, ancdata, _, _ = self.sock.recvmsg(REPLY.size, _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
        _, _, ident, size = REPLY.unpack(data)
        return ident, int.from_bytes(ancdata[0][2][:4], "little"), size

    def allocate(self, width: int, height: int) -> tuple[int, int, int]:
        self.send_allocate(width, height)
        return self.receive_allocated()

    def send_release(self, ident: int) -> None:
        self.sock.send(REQUEST.pack(RELEASE, 0, 0, ident))

    def receive_released(self) -> None:
        self.sock.recv(REPLY.size)

    def release(self, ident: int) -> None:
        self.send_release(ident)
        self.receive_released()

    def hold(self, width: int, height: int, count: int) -> None:
        """Have the server keep ``count`` more buffers for this connection."""
        self.sock.send(REQUEST.pack(HOLD, width, height, count))
        self.sock.recv(REPLY.size)

    def close(self) -> None:
        self.sock.close()


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard one, as primed does."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--backend", choices=["memfd", "drm", "heap", "udmabuf"], default="memfd")
    parser.add_argument("--device", help="with --backend drm: the card node")
    parser.add_argument("--heap", help="with --backend heap: the heap's name (e.g. system)")
    parser.add_argument("--mode", choices=list(_MODES), default="blocking")
    args = parser.parse_args()
    raise_nofile()
    kernel = open_kernel(args.backend, args.device, args.heap)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(args.socket)
    listener.listen(512)
    _MODES[args.mode](listener, kernel)


_MODES = {"blocking": serve_blocking, "epoll": serve_epoll, "trio": serve_trio}


if __name__ == "__main__":
    main()
