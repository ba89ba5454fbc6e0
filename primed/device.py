"""A client's own DRM device, onto which it imports the buffers it received.

Theory of operation. The kernel gives one GEM handle per (DRM file, dma-buf):
importing the same dma-buf twice on one fd returns the same handle, and the
first GEM_CLOSE frees it for everyone on that fd. So a Device counts its own
references, keyed by the dma-buf's identity (the inode of its fd: every export
of one buffer is the same dma-buf), and calls GEM_CLOSE once, when the last
:class:`Import` of that buffer is closed. Closing the Device closes every handle
still open, then the fd. A handle holds the memory alive on its own: the fd it
came from may be closed at once.
"""

from __future__ import annotations

import os
from types import TracebackType

from primed import drm
from primed.buffer import Buffer
from primed.errors import KernelError, NotImportable
from primed.schema import Backend


class Import:
    """One reference to a GEM handle on a :class:`Device`; ``int(imp)`` is the handle."""

    __slots__ = ("_key", "closed", "device", "handle")

    def __init__(self, device: Device, key: tuple[int, int], handle: int):
        self.device = device
        self.handle = handle
        self._key = key
        self.closed = False

    def __int__(self) -> int:
        return self.handle

    def __index__(self) -> int:
        return self.handle

    def close(self) -> None:
        """Drop this reference; the last one closes the GEM handle. Idempotent."""
        if not self.closed:
            self.closed = True
            self.device._unref(self._key)

    def __enter__(self) -> Import:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Import handle={self.handle} on {self.device.path}{' closed' if self.closed else ''}>"
        )


class Device:
    """A DRM node opened by this process (a render node, or a card node without master)."""

    def __init__(self, path: str):
        self.path = path
        self._fd = drm.open_node(path)
        # (st_dev, st_ino) of the dma-buf -> [GEM handle, references]
        self._handles: dict[tuple[int, int], list[int]] = {}
        try:
            self.driver = drm.get_version(self._fd)
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError("device is closed")
        return self._fd

    def import_buffer(self, buffer: Buffer | int) -> Import:
        """PRIME_FD_TO_HANDLE: a GEM handle for ``buffer`` (a Buffer or a dma-buf fd).

        Raises NotImportable for a memfd buffer, and KernelError with the
        kernel's errno when the driver refuses the import (e.g. ENODEV when the
        buffer belongs to a device this one can't import from).
        """
        if isinstance(buffer, Buffer):
            if buffer.backend != Backend.DRM:
                raise NotImportable(
                    f"buffer {buffer.id} is a memfd (CPU-only) buffer: only buffers from a "
                    "daemon with a DRM backend can become GEM handles"
                )
            dmabuf = buffer.fd
        else:
            dmabuf = buffer
        stat = os.fstat(dmabuf)
        key = (stat.st_dev, stat.st_ino)
        entry = self._handles.get(key)
        if entry is None:
            handle = drm.fd_to_handle(self.fd, dmabuf)
            entry = self._handles[key] = [handle, 0]
        entry[1] += 1
        return Import(self, key, entry[0])

    def references(self, handle: int) -> int:
        """How many open Imports share GEM handle ``handle`` (0 if none)."""
        return sum(refs for h, refs in self._handles.values() if h == handle)

    def _unref(self, key: tuple[int, int]) -> None:
        entry = self._handles.get(key)
        if entry is None:  # the device was closed first, and closed the handle
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._handles[key]
            if self._fd >= 0:
                drm.gem_close(self._fd, entry[0])

    def close(self) -> None:
        """GEM_CLOSE every handle still imported, then close the node. Idempotent."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            errors = []
            for handle, _ in self._handles.values():
                try:
                    drm.gem_close(fd, handle)
                except KernelError as e:
                    errors.append(e)
            self._handles.clear()
            if errors:
                raise errors[0]
        finally:
            os.close(fd)

    def __enter__(self) -> Device:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Device {self.path} ({self.driver.name})>"
