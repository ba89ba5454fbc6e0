"""A buffer as a client holds it: its layout and the one fd that refers to it.

Ownership: a Buffer owns its fd and closes it exactly once, on ``close()``, at
the end of a ``with`` block, or (as a backstop) when it is garbage-collected.
The backstop is ``__del__``, not a ``weakref.finalize`` per buffer: a finalizer
object and its registry entry cost more than the rest of a Buffer to make, on
every allocation, and ``__del__`` runs at the same moment (when the last
reference goes, or when the cycle collector frees a cycle it is in).
Closing the fd does not free the memory while anything else refers to it: a
mapping made with :meth:`Buffer.map`, a GEM handle made from it, the daemon's
own reference, or a copy of the fd in another process. That is PRIME's
contract, and primed relies on it.
"""

from __future__ import annotations

import mmap
import os
from types import TracebackType
from typing import Any

from primed.errors import KernelError
from primed.formats import Plane as Plane  # noqa: PLC0414 (re-exported)
from primed.formats import fourcc_str
from primed.kernel import drm
from primed.wire.schema import Backend

_new = object.__new__
_mmap = mmap.mmap
_SHARED = mmap.MAP_SHARED
_READ = mmap.PROT_READ
_READ_WRITE = mmap.PROT_READ | mmap.PROT_WRITE
_DRM = Backend.DRM


class Buffer:
    """One allocated buffer: ``id``, ``width``, ``height``, ``format`` (fourcc text),
    ``fourcc``, ``modifier``, ``size``, ``planes`` and ``fd``.

    ``backend`` says whether ``fd`` is a dma-buf (DRM) or a sealed memfd;
    ``allocator`` names the daemon's allocator it came from (version 2; "" if the
    daemon did not say).
    """

    __slots__ = (
        "__weakref__",
        "_fd",
        "allocator",
        "backend",
        "fourcc",
        "height",
        "id",
        "modifier",
        "planes",
        "size",
        "width",
    )

    def __init__(
        self,
        fd: int,
        *,
        id: int,
        width: int,
        height: int,
        fourcc: int,
        modifier: int,
        size: int,
        planes: tuple[Plane, ...],
        backend: Backend,
        allocator: str = "",
    ):
        self._fd = fd
        self.id = id
        self.width = width
        self.height = height
        self.fourcc = fourcc
        self.modifier = modifier
        self.size = size
        self.planes = planes
        self.backend = backend
        self.allocator = allocator

    @classmethod
    def _adopt(
        cls,
        fd: int,
        id: int,
        width: int,
        height: int,
        fourcc: int,
        modifier: int,
        size: int,
        planes: tuple[Plane, ...],
        backend: Backend,
        allocator: str = "",
    ) -> Buffer:
        """As the constructor, by position: what the client's receive path calls."""
        buffer = _new(cls)
        buffer._fd = fd
        buffer.id = id
        buffer.width = width
        buffer.height = height
        buffer.fourcc = fourcc
        buffer.modifier = modifier
        buffer.size = size
        buffer.planes = planes
        buffer.backend = backend
        buffer.allocator = allocator
        return buffer

    @classmethod
    def _adopt_many(
        cls,
        fds: list[int],
        ids: tuple[int, ...],
        layouts: tuple[tuple[int, int, int, int, int, tuple[Plane, ...]], ...],
        backend: Backend,
        allocator: str,
    ) -> list[Buffer]:
        """A Buffer per fd, with the id and (width, height, fourcc, modifier, size, planes)
        at the same position: what the client's receive path makes of a many-buffer
        ALLOCATED. The loop sets the slots itself, with no call per buffer. If it fails
        part-way every fd is closed all the same."""
        made: list[Buffer] = []
        append = made.append
        try:
            for fd, ident, (width, height, fourcc, modifier, size, planes) in zip(
                fds, ids, layouts, strict=True
            ):
                buffer = _new(cls)
                buffer._fd = fd
                buffer.id = ident
                buffer.width = width
                buffer.height = height
                buffer.fourcc = fourcc
                buffer.modifier = modifier
                buffer.size = size
                buffer.planes = planes
                buffer.backend = backend
                buffer.allocator = allocator
                append(buffer)
        except BaseException:
            for buffer in made:
                buffer.close()
            for fd in fds[len(made) :]:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        return made

    def __del__(self, _close: Any = os.close) -> None:
        # The backstop for a buffer nobody closed. os.close is bound as a default so
        # that it is still there while the interpreter shuts down.
        fd = getattr(self, "_fd", -1)  # unset if __init__ was called with bad arguments
        if fd >= 0:
            self._fd = -1
            try:
                _close(fd)
            except OSError:
                pass

    @property
    def format(self) -> str:
        """The fourcc as text, e.g. "NV12"."""
        return fourcc_str(self.fourcc)

    @property
    def fd(self) -> int:
        """The dma-buf (or memfd) fd. Raises ValueError once the buffer is closed."""
        if self._fd < 0:
            raise ValueError("buffer is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the fd (once; later calls do nothing)."""
        fd = self._fd
        if fd >= 0:
            self._fd = -1
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership of the fd and return it; the caller must close it."""
        fd = self.fd
        self._fd = -1
        return fd

    def __enter__(self) -> Buffer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def map(self, *, write: bool = True) -> Mapping:
        """Map the pixels for CPU access; use as a context manager yielding a memoryview.

        For a dma-buf the access is bracketed with DMA_BUF_IOCTL_SYNC so that
        caches are coherent with the device. Raises KernelError; ValueError if the
        buffer is closed.
        """
        fd = self._fd
        if fd < 0:
            raise ValueError("buffer is closed")
        # Mapping(fd, self.size, write=write, sync=...) with no keyword parsing and no
        # __init__ frame: a map per round trip is the common use.
        mapping = _new(Mapping)
        mapping._source = fd
        mapping._size = self.size
        mapping._write = write
        mapping._sync = self.backend == _DRM
        mapping._fd = -1
        mapping._map = None
        mapping._view = None
        return mapping

    def describe(self) -> dict[str, object]:
        """The buffer as plain data (what ``primed alloc --json`` prints)."""
        return {
            "id": self.id,
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "modifier": self.modifier,
            "size": self.size,
            "planes": [{"offset": p.offset, "pitch": p.pitch} for p in self.planes],
        }

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<Buffer {self.id} {self.width}x{self.height} {self.format} {self.size}B {state}>"


class Mapping:
    """A CPU mapping of a buffer, open for the duration of a ``with`` block.

    The mapping holds its own references (the mmap, and a dup of the fd for the
    closing sync): the buffer may be closed while the block runs.
    """

    __slots__ = ("_fd", "_map", "_size", "_source", "_sync", "_view", "_write")

    def __init__(self, fd: int, size: int, *, write: bool, sync: bool):
        self._source = fd
        self._size = size
        self._write = write
        self._sync = sync
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None

    @property
    def _flags(self) -> int:
        return drm.DMA_BUF_SYNC_RW if self._write else drm.DMA_BUF_SYNC_READ

    def __enter__(self) -> memoryview:
        try:
            self._map = mapped = _mmap(
                self._source, self._size, _SHARED, _READ_WRITE if self._write else _READ
            )
            if self._sync:
                self._fd = os.dup(self._source)
                drm.sync_dmabuf(self._fd, drm.DMA_BUF_SYNC_START | self._flags)
        except BaseException as e:
            self._unmap()
            if isinstance(e, OSError) and not isinstance(e, KernelError):
                raise KernelError(e.errno or 0, "mmap") from None
            raise
        self._view = view = memoryview(mapped)
        return view

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        view, mapped = self._view, self._map
        if view is not None:
            view.release()
            self._view = None
        if self._fd < 0 and mapped is not None:  # memfd: no sync, only the unmap
            self._map = None
            mapped.close()
            return
        try:
            if self._fd >= 0:
                drm.sync_dmabuf(self._fd, drm.DMA_BUF_SYNC_END | self._flags)
        finally:
            self._unmap()

    def _unmap(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
