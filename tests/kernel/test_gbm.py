"""Mesa's GBM imports primed's buffers: a consumer nobody here wrote, through
Debian 12's libgbm1 (Mesa 22.3), called as any compositor or media stack calls it:
``gbm_create_device`` on a DRM node, ``gbm_bo_import(GBM_BO_IMPORT_FD_MODIFIER)``
with the layout primed announced, and what the bo says about itself afterwards.

What Mesa does here (seen with strace in the VM, both kernels): on virtio-gpu's
nodes it loads virtio_gpu_dri.so (virgl), which finds no 3D support under QEMU
without virgl, then zink, then kms_swrast; on vgem's there is no vgem_dri.so
("MESA-LOADER: failed to open vgem"), so zink, then kms_swrast. GBM's backend is
"drm" on every card and render node of both drivers, and kms_swrast imports with
PRIME_FD_TO_HANDLE. It reports one plane for every format (its images of planar
formats have no per-plane view), and no modifier (DRM_FORMAT_MOD_INVALID:
kms_swrast has none to give). It frees an import with DESTROY_DUMB, which a render
node refuses (EACCES), so there the GEM handle outlives ``gbm_bo_destroy`` until
the fd is closed: the tests below check each of these as the kernel shows it.

Sources: buffers a daemon serves, one daemon per allocator: dumb buffers of
virtio-gpu's and vgem's card nodes (both kernels), and on 6.12 the system heap's
(``primed serve --heap system``) and udmabuf's (``--udmabuf``), so that GBM takes
each allocator's buffers as primed delivers them (see ``source``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator

import pytest

import primed
from primed import formats
from primed.client.buffer import Buffer
from primed.errors import KernelError
from primed.kernel import drm
from tests.kernel import gbm
from tests.kernel.conftest import Nodes, serve
from tests.kernel.test_allocators import HAS_ALLOCATORS

#: What gbm_bo_get_modifier answers for every import here: kms_swrast knows none.
DRM_FORMAT_MOD_INVALID = drm.DRM_FORMAT_MOD_INVALID
#: primed's formats Mesa 22.3 has no DRI format for: gbm_bo_import fails with ENOSYS.
GBM_LACKS = frozenset({"BG16", "BG24", "RG24", "NV21", "NV61", "VYUY", "YVYU"})
#: Even sizes (the 4:2:0 formats need them), not a power of two, so that a pitch the
#: kernel pads shows.
WIDTH, HEIGHT = 150, 100

DUMB_SOURCES = ("virtio_gpu", "vgem")
#: Buffers not made by a DRM driver: only 6.12 has them.
ALLOCATOR_SOURCES = ("heap", "udmabuf") if HAS_ALLOCATORS else ()
#: What ``primed serve`` is told to serve each source's buffers with.
SERVE_ARGS = {"heap": ("--heap", "system"), "udmabuf": ("--udmabuf",)}
#: Which source's buffers each driver imports (the kernel's rule: virtio-gpu takes
#: only its own; vgem takes any).
IMPORTS = {"virtio_gpu": {"virtio_gpu"}, "vgem": {*DUMB_SOURCES, *ALLOCATOR_SOURCES}}

#: ``allocate(width, height, code)``: a context manager giving a Buffer, gone after it.
Allocate = Callable[[int, int, str], contextlib.AbstractContextManager[Buffer]]


@contextlib.contextmanager
def _from_daemon(client: primed.Client, width: int, height: int, code: str) -> Iterator[Buffer]:
    buf = client.allocate(width, height, code)
    try:
        yield buf
    finally:
        client.release(buf)


@pytest.fixture(scope="module", params=DUMB_SOURCES + ALLOCATOR_SOURCES)
def source(
    request: pytest.FixtureRequest,
    nodes: dict[str, Nodes],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Allocate]]:
    """(name, allocate) for one source of buffers: a daemon serving that allocator
    alone (a driver's card node, the system heap, udmabuf), and a client of it."""
    name = str(request.param)
    args = ("--device", nodes[name].card) if name in DUMB_SOURCES else SERVE_ARGS[name]
    with contextlib.ExitStack() as stack:
        daemon = serve(tmp_path_factory.mktemp(name) / "primed.sock", *args)
        stack.callback(daemon.stop)
        client = stack.enter_context(primed.connect(daemon.socket))
        yield name, lambda w, h, code: _from_daemon(client, w, h, code)


@pytest.fixture(scope="module")
def devices(nodes: dict[str, Nodes]) -> Iterator[dict[str, tuple[int, gbm.Device]]]:
    """A GBM device on each of the four nodes, by path: (our fd of the node, device).

    Made once a module: creating one loads Mesa's driver, which under TCG is slow.
    """
    made: dict[str, tuple[int, gbm.Device]] = {}
    try:
        for node in nodes.values():
            for path in (node.card, node.render):
                fd = drm.open_node(path)
                try:
                    made[path] = fd, gbm.Device(fd)
                except BaseException:
                    os.close(fd)
                    raise
        yield made
    finally:
        for fd, device in made.values():
            device.close()
            os.close(fd)


def every_node(nodes: dict[str, Nodes]) -> Iterator[tuple[str, str, bool]]:
    """(driver, path, is a card node) for the four nodes."""
    for driver, node in sorted(nodes.items()):
        yield driver, node.card, True
        yield driver, node.render, False


def import_as_announced(device: gbm.Device, buf: Buffer, usage: int) -> gbm.Bo:
    """gbm_bo_import with exactly what primed said of ``buf``: one fd per plane."""
    count = len(buf.planes)
    return device.import_fd_modifier(
        buf.width,
        buf.height,
        buf.fourcc,
        [buf.fd] * count,
        [p.pitch for p in buf.planes],
        [p.offset for p in buf.planes],
        buf.modifier,
        usage,
    )


def same_dmabuf(a: int, b: int) -> bool:
    return os.fstat(a).st_ino == os.fstat(b).st_ino


def test_gbm_opens_every_node(
    nodes: dict[str, Nodes], devices: dict[str, tuple[int, gbm.Device]]
) -> None:
    xrgb = formats.fourcc("XR24")
    for _, path, _ in every_node(nodes):
        fd, device = devices[path]
        assert device.backend_name == "drm", path
        assert device.fd == fd
        assert device.is_format_supported(xrgb, gbm.GBM_BO_USE_RENDERING), path
        # kms_swrast answers no modifier query: GBM cannot say how many planes.
        assert device.plane_count(xrgb, formats.MOD_LINEAR) == -1, path


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_gbm_gives_back_what_it_took(source: tuple[str, Allocate], nodes: dict[str, Nodes]) -> None:
    """A device made and destroyed around an import leaves no fd and no handle behind
    (Mesa works on a dup of the node's fd: it must close it)."""
    name, allocate = source
    driver = "vgem"  # takes every source's buffers
    with allocate(64, 64, "XR24") as buf:
        before = open_fds()
        fd = drm.open_node(nodes[driver].card)
        try:
            device = gbm.Device(fd)
            try:
                with import_as_announced(device, buf, gbm.GBM_BO_USE_RENDERING) as bo:
                    handle = bo.plane(0).handle
                    assert len(open_fds() - before) >= 2  # our node fd and Mesa's dup of it
            finally:
                device.close()
            with pytest.raises(KernelError) as closed:
                drm.handle_to_fd(fd, handle)
            assert closed.value.errno == errno.ENOENT, name
        finally:
            os.close(fd)
        assert open_fds() == before


def test_gbm_imports_what_primed_announced(
    source: tuple[str, Allocate],
    nodes: dict[str, Nodes],
    devices: dict[str, tuple[int, gbm.Device]],
) -> None:
    """Every format from this source on every node. Where the kernel takes the
    source's buffers, GBM imports each format or refuses (ENOSYS) exactly those
    Mesa lacks; what it reports matches primed's layout; the bo's handle and fd are
    the very buffer. Where the kernel refuses them (virtio-gpu: ENODEV), GBM does
    too."""
    name, allocate = source
    wrong: list[str] = []
    for driver, path, card in every_node(nodes):
        fd, device = devices[path]
        for fmt in sorted(formats.FORMATS.values(), key=lambda f: f.code):
            with allocate(WIDTH, HEIGHT, fmt.code) as buf:
                assert buf.modifier == formats.MOD_LINEAR
                seen = f"{name} {fmt.code} on {path}"
                if name not in IMPORTS[driver]:
                    wrong += refused(fd, device, buf, seen, kernel=errno.ENODEV)
                elif fmt.code in GBM_LACKS:
                    wrong += refused(fd, device, buf, seen, kernel=None)
                else:
                    wrong += imported(fd, device, buf, seen, card)
    assert not wrong, "\n".join(wrong)


def refused(fd: int, device: gbm.Device, buf: Buffer, seen: str, kernel: int | None) -> list[str]:
    """What is wrong with GBM's refusal of ``buf``: it must fail with ENOSYS, Mesa's
    errno for any image it could not make, whatever the kernel said underneath;
    ``kernel``, if given, is the errno the kernel's own import on ``fd`` must give."""
    wrong = []
    if kernel is not None:
        try:
            handle = drm.fd_to_handle(fd, buf.fd)
        except KernelError as e:
            if e.errno != kernel:
                wrong.append(f"{seen}: the kernel refused with {e}, not {errno.errorcode[kernel]}")
        else:
            drm.gem_close(fd, handle)
            wrong.append(f"{seen}: the kernel imported it")
    for usage in (gbm.GBM_BO_USE_RENDERING, gbm.GBM_BO_USE_SCANOUT):
        try:
            import_as_announced(device, buf, usage).close()
        except OSError as e:
            if e.errno != errno.ENOSYS:
                wrong.append(f"{seen}: GBM refused with {e}, not ENOSYS")
        else:
            wrong.append(f"{seen}: GBM imported it (usage {usage:#x})")
    return wrong


def imported(fd: int, device: gbm.Device, buf: Buffer, seen: str, card: bool) -> list[str]:
    """What is wrong with GBM's import of ``buf`` on ``fd``, destroyed before returning."""
    wrong = []
    with import_as_announced(device, buf, gbm.GBM_BO_USE_RENDERING) as bo:
        told = (bo.width, bo.height, bo.format, bo.modifier, bo.plane_count)
        want = (buf.width, buf.height, buf.fourcc, DRM_FORMAT_MOD_INVALID, 1)
        plane, first = bo.plane(0), buf.planes[0]
        if told != want or (plane.stride, plane.offset) != (first.pitch, first.offset):
            wrong.append(f"{seen}: GBM says {told} {plane}, primed {want} {first}")
        # The handle is GBM's import on the node (on a dup of our fd, which shares
        # its handles): exporting it again gives primed's dma-buf.
        again = drm.handle_to_fd(fd, plane.handle)
        try:
            if not same_dmabuf(again, buf.fd):
                wrong.append(f"{seen}: handle {plane.handle} is another buffer")
        finally:
            os.close(again)
        exported = bo.export_fd()
        try:
            if not same_dmabuf(exported, buf.fd):
                wrong.append(f"{seen}: gbm_bo_get_fd gave another buffer")
        finally:
            os.close(exported)
    # kms_swrast frees with DESTROY_DUMB: a card node takes it, a render node
    # refuses (EACCES) and the handle stays open, ours to close.
    try:
        os.close(drm.handle_to_fd(fd, plane.handle))
    except KernelError as e:
        if not card or e.errno != errno.ENOENT:
            wrong.append(f"{seen}: after gbm_bo_destroy, {e}")
    else:
        drm.gem_close(fd, plane.handle)
        if card:
            wrong.append(f"{seen}: handle {plane.handle} open after gbm_bo_destroy")
    return wrong
