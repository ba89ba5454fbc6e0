"""A client's own DRM device, onto which it imports the buffers it received.

Theory of operation. The kernel gives one GEM handle per (DRM file, dma-buf):
importing the same dma-buf twice on one fd returns the same handle, and the
first GEM_CLOSE frees it for everyone on that fd. So a Device counts its own
references, keyed by the dma-buf's identity (the inode of its fd: every export
of one buffer is the same dma-buf), and calls GEM_CLOSE once, when the last
:class:`Import` of that buffer is closed. Closing the Device closes every handle
still open, then the fd. A handle holds the memory alive on its own: the fd it
came from may be closed at once.

A :class:`Framebuffer` (ADDFB2) belongs to the handle it was made from, not to
one Import. The kernel's framebuffer holds its own reference to the memory, so
a GEM_CLOSE would leave it alive (and on screen) until RMFB or the fd's close.
So a Device removes a handle's framebuffers (RMFB) before it closes that handle:
when the last Import of the buffer is closed, and when the Device is closed.
"""

from __future__ import annotations

import errno
import os
from types import TracebackType

from primed import formats
from primed.client.buffer import Buffer
from primed.errors import KernelError, NotImportable
from primed.kernel import drm
from primed.wire.schema import Backend


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
        """Drop this reference; the last one removes the buffer's framebuffers, then
        closes the GEM handle. Idempotent."""
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


class Framebuffer:
    """A KMS framebuffer over an imported buffer: ``id`` is what SETCRTC and planes take.

    ``close()`` (or the end of a ``with`` block) removes it with RMFB; closing
    the last Import of its buffer, or the Device, removes it too, first.
    """

    __slots__ = ("_key", "closed", "device", "fourcc", "height", "id", "width")

    def __init__(
        self, device: Device, key: tuple[int, int], fb_id: int, width: int, height: int, fourcc: int
    ):
        self.device = device
        self.id = fb_id
        self.width = width
        self.height = height
        self.fourcc = fourcc
        self._key = key
        self.closed = False

    def close(self) -> None:
        """RMFB (which takes it off the screen if it is shown). Idempotent."""
        if not self.closed:
            self.closed = True
            self.device._remove_framebuffer(self)

    def __enter__(self) -> Framebuffer:
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
            f"<Framebuffer {self.id} {self.width}x{self.height} {formats.fourcc_str(self.fourcc)}"
            f" on {self.device.path}{' closed' if self.closed else ''}>"
        )


class Device:
    """A DRM node opened by this process (a render node, or a card node without master)."""

    def __init__(self, path: str):
        self.path = path
        self._fd = drm.open_node(path)
        # (st_dev, st_ino) of the dma-buf -> [GEM handle, references]
        self._handles: dict[tuple[int, int], list[int]] = {}
        # the same key -> the framebuffers made from that handle, by id
        self._framebuffers: dict[tuple[int, int], dict[int, Framebuffer]] = {}
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

    def add_framebuffer(self, imported: Import, buffer: Buffer) -> Framebuffer:
        """ADDFB2: make ``buffer``, imported on this device as ``imported``, a framebuffer.

        ``buffer`` gives the size, format, modifier and each plane's offset and
        pitch; every plane uses the import's one handle, since primed keeps all
        planes in one dumb buffer. ``buffer`` may be closed already; if it is
        open, it must be the dma-buf that was imported (else ValueError).

        Needs a card node: the kernel refuses framebuffers on a render node
        (EACCES) and on a driver without KMS such as vgem (EOPNOTSUPP). Raises
        KernelError with the kernel's errno, ValueError for a closed Import or
        one from another Device.
        """
        if imported.device is not self or imported.closed:
            raise ValueError(f"{imported!r} is not an open import on {self.path}")
        if not buffer.closed:
            stat = os.fstat(buffer.fd)
            if (stat.st_dev, stat.st_ino) != imported._key:
                raise ValueError(f"{buffer!r} is not the dma-buf behind {imported!r}")
        planes = buffer.planes
        # LINEAR goes without DRM_MODE_FB_MODIFIERS, so that drivers without
        # modifier support take it too; the kernel reads no modifier as linear.
        explicit = buffer.modifier != formats.MOD_LINEAR
        what = (
            f"DRM_IOCTL_MODE_ADDFB2 ({buffer.width}x{buffer.height} {buffer.format}) on {self.path}"
        )
        try:
            fb_id = drm.addfb2(
                self.fd,
                buffer.width,
                buffer.height,
                buffer.fourcc,
                handles=[imported.handle] * len(planes),
                pitches=[p.pitch for p in planes],
                offsets=[p.offset for p in planes],
                modifiers=[buffer.modifier] * len(planes) if explicit else (),
                flags=drm.DRM_MODE_FB_MODIFIERS if explicit else 0,
            )
        except KernelError as e:
            if e.errno == errno.EACCES and os.path.basename(self.path).startswith("renderD"):
                what += " (a render node: framebuffers need the card node)"
            elif e.errno == errno.EOPNOTSUPP:
                what += f" (driver {self.driver.name} has no KMS)"
            raise KernelError(e.errno or errno.EIO, what) from None
        fb = Framebuffer(self, imported._key, fb_id, buffer.width, buffer.height, buffer.fourcc)
        self._framebuffers.setdefault(imported._key, {})[fb_id] = fb
        return fb

    def framebuffers(self) -> list[Framebuffer]:
        """The framebuffers this Device made and has not removed yet."""
        return [fb for fbs in self._framebuffers.values() for fb in fbs.values()]

    def _remove_framebuffer(self, fb: Framebuffer) -> None:
        fbs = self._framebuffers.get(fb._key, {})
        if fbs.pop(fb.id, None) is None:  # removed with its handle or its device
            return
        if not fbs:
            del self._framebuffers[fb._key]
        if self._fd >= 0:
            drm.rmfb(self._fd, fb.id)

    def _remove_framebuffers(self, fd: int, key: tuple[int, int]) -> list[KernelError]:
        errors = []
        for fb in self._framebuffers.pop(key, {}).values():
            fb.closed = True
            try:
                drm.rmfb(fd, fb.id)
            except KernelError as e:
                errors.append(e)
        return errors

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
                errors = self._remove_framebuffers(self._fd, key)
                drm.gem_close(self._fd, entry[0])
                if errors:
                    raise errors[0]

    def close(self) -> None:
        """RMFB every framebuffer, GEM_CLOSE every handle still imported, then close the
        node. Idempotent."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            errors = []
            for key in list(self._framebuffers):
                errors += self._remove_framebuffers(fd, key)
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
