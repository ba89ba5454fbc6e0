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

Each Import carries the layout it was imported with (a Buffer's own, or the
one given for a bare fd), so that it alone is enough for ADDFB2; Imports that
share a handle may carry different layouts. An Import or a Framebuffer keeps
its Device alive.

What the kernel holds for a Device (its fd, handles, framebuffer ids) is kept
apart, as plain numbers, in a :class:`_Holdings` that refers to no Python
object of the API. Its ``release`` is the Device's ``weakref.finalize``
backstop: a Device dropped without ``close()`` still has its framebuffers
removed, its handles closed and its fd closed when it is collected, and the
finalizer, holding only the _Holdings, does not keep the Device alive.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import weakref
from types import TracebackType

from primed import formats
from primed.client.buffer import Buffer, Plane
from primed.errors import KernelError, NotImportable
from primed.kernel import drm
from primed.wire.schema import Backend

#: (st_dev, st_ino) of a dma-buf: its identity, the same for every fd of it.
_Key = tuple[int, int]


@dataclasses.dataclass(frozen=True, slots=True)
class BufferLayout:
    """Where the pixels of an imported buffer lie: what ADDFB2 takes besides the handle.

    ``modifier`` DRM_FORMAT_MOD_INVALID means none given: the framebuffer is
    added without DRM_MODE_FB_MODIFIERS and the driver applies its implicit
    layout (linear for a dumb buffer). Any other value, LINEAR included, is
    passed to the kernel as the buffer's modifier, except LINEAR on a driver
    that takes no modifiers (see :meth:`Device.add_framebuffer`).
    """

    width: int
    height: int
    fourcc: int
    planes: tuple[Plane, ...]  #: offset and pitch of each plane, all in the one buffer
    modifier: int = drm.DRM_FORMAT_MOD_INVALID

    @property
    def format(self) -> str:
        """The fourcc as text, e.g. "NV12"."""
        return formats.fourcc_str(self.fourcc)

    @classmethod
    def of(cls, buffer: Buffer) -> BufferLayout:
        """The layout a Buffer was allocated with."""
        return cls(buffer.width, buffer.height, buffer.fourcc, buffer.planes, buffer.modifier)


class Import:
    """One reference to a GEM handle on a :class:`Device`; ``int(imp)`` is the handle.

    ``size`` is the dma-buf's size. ``layout`` is None for a bare fd imported
    without one; then ``width``, ``height``, ``fourcc``, ``format``,
    ``modifier`` and ``planes`` raise ValueError.
    """

    __slots__ = ("_key", "closed", "device", "handle", "layout", "size")

    def __init__(
        self, device: Device, key: _Key, handle: int, size: int, layout: BufferLayout | None
    ):
        self.device = device
        self.handle = handle
        self.size = size
        self.layout = layout
        self._key = key
        self.closed = False

    def _layout(self) -> BufferLayout:
        if self.layout is None:
            raise ValueError(
                f"{self!r} has no layout: it was imported from a bare fd; pass "
                "layout=BufferLayout(...) to import_buffer"
            )
        return self.layout

    @property
    def width(self) -> int:
        return self._layout().width

    @property
    def height(self) -> int:
        return self._layout().height

    @property
    def fourcc(self) -> int:
        return self._layout().fourcc

    @property
    def format(self) -> str:
        return self._layout().format

    @property
    def modifier(self) -> int:
        return self._layout().modifier

    @property
    def planes(self) -> tuple[Plane, ...]:
        return self._layout().planes

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
        shape = (
            f" {self.layout.width}x{self.layout.height} {self.layout.format}" if self.layout else ""
        )
        return (
            f"<Import handle={self.handle}{shape} on {self.device.path}"
            f"{' closed' if self.closed else ''}>"
        )


class Framebuffer:
    """A KMS framebuffer over an imported buffer: ``id`` is what SETCRTC and planes take.

    ``modifier`` is the one it was added with, DRM_FORMAT_MOD_INVALID if none
    (no DRM_MODE_FB_MODIFIERS). ``close()`` (or the end of a ``with`` block)
    removes it with RMFB; closing the last Import of its buffer, or the Device,
    removes it too, first.
    """

    __slots__ = ("_key", "closed", "device", "fourcc", "height", "id", "modifier", "width")

    def __init__(self, device: Device, key: _Key, fb_id: int, layout: BufferLayout, modifier: int):
        self.device = device
        self.id = fb_id
        self.width = layout.width
        self.height = layout.height
        self.fourcc = layout.fourcc
        self.modifier = modifier
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


class _Holdings:
    """What the kernel holds for one Device, as numbers only (see the module's docstring)."""

    __slots__ = ("fd", "framebuffers", "handles")

    def __init__(self, fd: int):
        self.fd = fd  #: -1 once released
        self.handles: dict[_Key, list[int]] = {}  #: dma-buf -> [GEM handle, references]
        self.framebuffers: dict[_Key, list[int]] = {}  #: dma-buf -> ids made from its handle

    def remove_framebuffers(self, key: _Key) -> list[KernelError]:
        """RMFB each framebuffer of one handle; the failures, each tried anyway."""
        errors = []
        for fb_id in self.framebuffers.pop(key, ()):
            try:
                drm.rmfb(self.fd, fb_id)
            except KernelError as e:
                errors.append(e)
        return errors

    def release(self) -> list[KernelError]:
        """RMFB every framebuffer, then GEM_CLOSE every handle, then close the fd.

        Once; returns the ioctls' failures (the fd is closed whatever happens).
        """
        if self.fd < 0:
            return []
        try:
            errors = []
            for key in list(self.framebuffers):
                errors += self.remove_framebuffers(key)
            for handle, _ in self.handles.values():
                try:
                    drm.gem_close(self.fd, handle)
                except KernelError as e:
                    errors.append(e)
            self.handles.clear()
            return errors
        finally:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _release_unreachable(held: _Holdings) -> None:
    """The finalizer: nobody is left to hear of a failure, and the fd closes anyway."""
    try:
        held.release()
    except OSError:
        pass


class Device:
    """A DRM node opened by this process (a render node, or a card node without master).

    ``close()`` (or the end of a ``with`` block) is the normal way to free what
    it holds; a Device dropped without it is released when it is collected.
    """

    def __init__(self, path: str):
        self.path = path
        fd = drm.open_node(path)
        try:
            self.driver = drm.get_version(fd)
            self._held = _Holdings(fd)
            self._finalizer = weakref.finalize(self, _release_unreachable, self._held)
        except BaseException:
            os.close(fd)
            raise
        # the Framebuffer objects of _held.framebuffers, by id, to mark them closed
        self._framebuffers: dict[int, Framebuffer] = {}
        # DRM_CAP_ADDFB2_MODIFIERS, asked at the first ADDFB2; None until then
        self._takes_modifiers: bool | None = None

    @property
    def fd(self) -> int:
        if self._held.fd < 0:
            raise ValueError("device is closed")
        return self._held.fd

    def import_buffer(self, buffer: Buffer | int, *, layout: BufferLayout | None = None) -> Import:
        """PRIME_FD_TO_HANDLE: a GEM handle for ``buffer`` (a Buffer or a dma-buf fd).

        The Import carries ``layout``, by default the Buffer's own; a bare fd
        has none unless one is given, and cannot become a framebuffer without
        it. The fd may be closed as soon as this returns.

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
            if layout is None:
                layout = BufferLayout.of(buffer)
        else:
            dmabuf = buffer
        stat = os.fstat(dmabuf)
        key = (stat.st_dev, stat.st_ino)
        # A dma-buf's inode has the buffer's size; a Buffer says the same.
        size = buffer.size if isinstance(buffer, Buffer) else stat.st_size
        handles = self._held.handles
        entry = handles.get(key)
        if entry is None:
            handle = drm.fd_to_handle(self.fd, dmabuf)
            entry = handles[key] = [handle, 0]
        entry[1] += 1
        return Import(self, key, entry[0], size, layout)

    def add_framebuffer(self, imported: Import) -> Framebuffer:
        """ADDFB2: make ``imported`` a framebuffer, with the layout it carries.

        Every plane uses the import's one handle, since primed keeps all planes
        in one dumb buffer. The modifier goes with DRM_MODE_FB_MODIFIERS unless
        it is DRM_FORMAT_MOD_INVALID (none given). A driver that says it takes
        no modifiers (DRM_CAP_ADDFB2_MODIFIERS 0: virtio-gpu on Linux 6.1)
        refuses that flag with EINVAL, LINEAR included, and reads no modifier
        as linear: there LINEAR goes without the flag (the Framebuffer's
        ``modifier`` then says DRM_FORMAT_MOD_INVALID), and any other modifier
        is refused.

        Needs a card node: the kernel refuses framebuffers on a render node
        (EACCES) and on a driver without KMS such as vgem (EOPNOTSUPP). Raises
        KernelError with the kernel's errno; ValueError for a closed Import, one
        from another Device, or one without a layout (a bare fd imported
        without ``layout=``).
        """
        if imported.device is not self or imported.closed:
            raise ValueError(f"{imported!r} is not an open import on {self.path}")
        if imported.layout is None:
            raise ValueError(
                f"{imported!r} has no layout, which ADDFB2 needs (size, format, planes): "
                "it was imported from a bare fd; pass layout=BufferLayout(...) to import_buffer"
            )
        layout = imported.layout
        modifier = layout.modifier
        if modifier == formats.MOD_LINEAR and not self._modifiers_taken():
            modifier = drm.DRM_FORMAT_MOD_INVALID
        explicit = modifier != drm.DRM_FORMAT_MOD_INVALID
        planes = layout.planes
        what = (
            f"DRM_IOCTL_MODE_ADDFB2 ({layout.width}x{layout.height} {layout.format}"
            f"{f' modifier {modifier:#x}' if explicit else ''}) on {self.path}"
        )
        try:
            fb_id = drm.addfb2(
                self.fd,
                layout.width,
                layout.height,
                layout.fourcc,
                handles=[imported.handle] * len(planes),
                pitches=[p.pitch for p in planes],
                offsets=[p.offset for p in planes],
                modifiers=[modifier] * len(planes) if explicit else (),
                flags=drm.DRM_MODE_FB_MODIFIERS if explicit else 0,
            )
        except KernelError as e:
            if e.errno == errno.EACCES and os.path.basename(self.path).startswith("renderD"):
                what += " (a render node: framebuffers need the card node)"
            elif e.errno == errno.EOPNOTSUPP:
                what += f" (driver {self.driver.name} has no KMS)"
            elif e.errno == errno.EINVAL and explicit and not self._modifiers_taken():
                what += f" (driver {self.driver.name} takes no modifiers)"
            raise KernelError(e.errno or errno.EIO, what) from None
        try:
            fb = Framebuffer(self, imported._key, fb_id, layout, modifier)
            self._held.framebuffers.setdefault(imported._key, []).append(fb_id)
            self._framebuffers[fb_id] = fb
        except BaseException:
            drm.rmfb(self.fd, fb_id)
            raise
        return fb

    def _modifiers_taken(self) -> bool:
        """DRM_CAP_ADDFB2_MODIFIERS, asked once. A driver that won't say (vgem: no KMS,
        EOPNOTSUPP) counts as taking them: its ADDFB2 fails anyway, and says why."""
        if self._takes_modifiers is None:
            try:
                self._takes_modifiers = drm.get_cap(self.fd, drm.DRM_CAP_ADDFB2_MODIFIERS) != 0
            except KernelError:
                self._takes_modifiers = True
        return self._takes_modifiers

    def framebuffers(self) -> list[Framebuffer]:
        """The framebuffers this Device made and has not removed yet."""
        return list(self._framebuffers.values())

    def _remove_framebuffer(self, fb: Framebuffer) -> None:
        if self._framebuffers.pop(fb.id, None) is not fb or self._held.fd < 0:
            return  # removed with its handle or its device
        ids = self._held.framebuffers[fb._key]
        ids.remove(fb.id)
        if not ids:
            del self._held.framebuffers[fb._key]
        drm.rmfb(self._held.fd, fb.id)

    def _forget_framebuffers(self, key: _Key | None = None) -> None:
        """Mark closed the Framebuffers the holdings no longer list (all, or one handle's)."""
        for fb_id, fb in list(self._framebuffers.items()):
            if key is None or fb._key == key:
                fb.closed = True
                del self._framebuffers[fb_id]

    def references(self, handle: int) -> int:
        """How many open Imports share GEM handle ``handle`` (0 if none)."""
        return sum(refs for h, refs in self._held.handles.values() if h == handle)

    def _unref(self, key: _Key) -> None:
        held = self._held
        entry = held.handles.get(key)
        if entry is None or held.fd < 0:  # the device was closed first, and closed the handle
            return
        entry[1] -= 1
        if entry[1] == 0:
            del held.handles[key]
            try:
                errors = held.remove_framebuffers(key)
            finally:
                self._forget_framebuffers(key)
                drm.gem_close(held.fd, entry[0])
            if errors:
                raise errors[0]

    def close(self) -> None:
        """RMFB every framebuffer, GEM_CLOSE every handle still imported, then close the
        node. Idempotent."""
        self._finalizer.detach()
        try:
            errors = self._held.release()
        finally:
            self._forget_framebuffers()
        if errors:
            raise errors[0]

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
