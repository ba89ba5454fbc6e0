"""The allocators a daemon serves, opened, and the import matrix measured on them.

:func:`open_allocators` opens every allocator a configuration names (card nodes'
dumb buffers, dma-buf heaps, udmabuf, memfd) as one
:class:`~primed.kernel.allocation.Allocators`, or raises NoDevice naming the node
the kernel lacks, having closed what it had opened. :func:`probe_imports` then
tries, for each allocator and each DRM render node of the machine, importing a
small buffer there (PRIME_FD_TO_HANDLE, then GEM_CLOSE) and records what the
kernel said: the daemon's core only carries that table (QUERIED, version 2).

Ownership in the probe: each allocator's test buffer is made once, exported
once per render node, and freed in a ``finally``; each exported fd is closed
and each handle closed right after the import that made it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from primed.errors import KernelError
from primed.formats import FORMATS, Limits, fourcc
from primed.kernel import drm
from primed.kernel.allocation import (
    Allocators,
    BufferSource,
    DeviceRow,
    ImportMatrix,
    Served,
    name_for,
)
from primed.kernel.backends import DumbBackend, MemfdBackend
from primed.kernel.heap import HeapBackend
from primed.kernel.udmabuf import UdmabufBackend
from primed.wire.schema import Kind

#: The test buffer of the import matrix: one page of XRGB8888.
PROBE_WIDTH, PROBE_HEIGHT = 32, 32


def open_allocators(
    devices: Sequence[str] = (),
    heaps: Sequence[str] = (),
    udmabuf: bool = False,
    memfd: bool = False,
) -> Allocators:
    """The allocators named, opened, in this order: each card node in ``devices``
    (named for its node: ``card0``), each heap in ``heaps`` (``heap:system``),
    udmabuf, memfd. The first is the default.

    Raises NoDevice naming the heap or udmabuf node the kernel lacks, KernelError
    naming a node that can't be opened (a card node that does not exist: ENOENT),
    ValueError if none is named or two share a name; whatever was opened is closed
    first.
    """
    opened: list[Served] = []

    def add(kind: Kind, source: BufferSource) -> None:
        opened.append(Served(name_for(kind, source.node), kind, source))

    try:
        for path in devices:
            add(Kind.DUMB, DumbBackend(path))
        for heap in heaps:
            add(Kind.HEAP, HeapBackend(heap))
        if udmabuf:
            add(Kind.UDMABUF, UdmabufBackend())
        if memfd:
            add(Kind.MEMFD, MemfdBackend())
        return Allocators(opened)
    except BaseException:
        for served in opened:
            served.source.close()
        raise


def _import(node_fd: int, dmabuf: int) -> int:
    """0 if ``dmabuf`` imports on ``node_fd`` (the handle is closed at once), else the errno."""
    try:
        handle = drm.fd_to_handle(node_fd, dmabuf)
    except KernelError as e:
        return e.errno or errno.EIO
    drm.gem_close(node_fd, handle)
    return 0


def probe_imports(allocators: Allocators, root: str = "/dev/dri") -> ImportMatrix:
    """For each render node under ``root`` (those that can be opened), what importing a
    buffer of each allocator gave: 0, or the kernel's errno (virtio-gpu refuses every
    buffer it did not make with ENODEV; a memfd is no dma-buf: EINVAL). An allocator
    that can't make the test buffer gets that errno on every node."""
    fmt = FORMATS[fourcc("XR24")]
    nodes = [n for n in drm.nodes(root) if not n.primary]
    results: list[list[int]] = [[] for _ in nodes]
    fds: list[int] = []
    try:
        for node in nodes:
            fds.append(drm.open_node(node.path))
        for served in allocators.served:
            source = served.source
            try:
                allocation = source.allocate(fmt, PROBE_WIDTH, PROBE_HEIGHT, Limits())
            except KernelError as e:
                for row in results:
                    row.append(e.errno or errno.EIO)
                continue
            try:
                for row, node_fd in zip(results, fds, strict=True):
                    try:
                        exported = source.export(allocation)
                    except KernelError as e:
                        row.append(e.errno or errno.EIO)
                        continue
                    try:
                        row.append(_import(node_fd, exported))
                    finally:
                        os.close(exported)
            finally:
                source.free(allocation)
    finally:
        for fd in fds:
            os.close(fd)
    return ImportMatrix(
        tuple(
            DeviceRow(node.path, node.driver, tuple(row))
            for node, row in zip(nodes, results, strict=True)
        )
    )
