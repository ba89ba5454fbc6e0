"""The DRM path on a real kernel: vgem and virtio-gpu, daemon and clients as processes."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import primed
from primed import formats
from primed.kernel import drm
from tests.kernel.conftest import DRIVERS, Nodes, serve
from tests.support import Daemon, wait_for

PEER = [sys.executable, "-m", "tests.kernel.peer"]


def peer(fd: int, node: str, size: int, write_seed: int | None = None) -> dict[str, object]:
    """Run tests/kernel/peer.py in a new process that inherits ``fd``."""
    args = [*PEER, "--fd", str(fd), "--node", node, "--size", str(size)]
    if write_seed is not None:
        args += ["--write-seed", str(write_seed)]
    done = subprocess.run(
        args, pass_fds=(fd,), capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def sha256(data: memoryview | bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    raise AssertionError("no Shmem line in /proc/meminfo")


def test_both_drivers_have_card_and_render_nodes(nodes: dict[str, Nodes]) -> None:
    for driver in DRIVERS:
        assert os.path.basename(nodes[driver].card).startswith("card")
        assert os.path.basename(nodes[driver].render).startswith("renderD")


def test_dumb_buffers_only_on_card_nodes(nodes: dict[str, Nodes], driver: str) -> None:
    # Why the daemon exists: the kernel refuses dumb buffers on render nodes.
    fd = drm.open_node(nodes[driver].render)
    try:
        with pytest.raises(primed.KernelError) as refused:
            drm.create_dumb(fd, 64, 64, 32)
        assert refused.value.errno == errno.EACCES
    finally:
        os.close(fd)


def test_daemon_reports_its_device(daemon: Daemon, driver: str, nodes: dict[str, Nodes]) -> None:
    with primed.connect(daemon.socket) as client:
        info = client.info
    assert info.backend == primed.Backend.DRM
    assert info.driver == driver
    assert info.node == nodes[driver].card
    assert info.driver_version[0] >= 0


def test_daemon_drops_master(daemon: Daemon, driver: str, nodes: dict[str, Nodes]) -> None:
    # The daemon opened the card node first, so it was master; had it kept it,
    # nobody else could become master (SET_MASTER fails with EBUSY).
    fd = os.open(nodes[driver].card, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, drm.DRM_IOCTL_SET_MASTER)
        drm.drop_master(fd)
    finally:
        os.close(fd)


def test_serve_picks_a_dumb_capable_card_node(tmp_path: Path, nodes: dict[str, Nodes]) -> None:
    running = serve(tmp_path / "picked.sock")
    try:
        with primed.connect(running.socket) as client:
            assert client.info.node in {nodes[d].card for d in DRIVERS}
    finally:
        log = running.stop()
    assert "picked /dev/dri/card" in log


@pytest.mark.parametrize("code", sorted(f.code for f in formats.FORMATS.values()))
def test_every_format_allocates_imports_and_maps(
    daemon: Daemon, driver: str, nodes: dict[str, Nodes], code: str
) -> None:
    fmt = formats.lookup(code)
    width, height = 66, 42
    with primed.connect(daemon.socket) as client, primed.Device(nodes[driver].render) as device:
        buf = client.allocate(width, height, code)
        assert (buf.width, buf.height, buf.format, buf.modifier) == (width, height, code, 0)
        assert len(buf.planes) == fmt.planes
        expected = formats.layout(fmt, width, height, pitch0=buf.planes[0].pitch)
        assert tuple((p.offset, p.pitch) for p in buf.planes) == tuple(
            (p.offset, p.pitch) for p in expected.planes
        )
        assert buf.size >= expected.size
        assert buf.size == os.lseek(buf.fd, 0, os.SEEK_END)  # the dma-buf's own size
        with device.import_buffer(buf) as imported:
            assert imported.handle > 0
            assert (imported.width, imported.height, imported.format) == (width, height, code)
            assert (imported.modifier, imported.planes) == (formats.MOD_LINEAR, buf.planes)
        copy = os.dup(buf.fd)
        try:
            bare = device.import_buffer(copy)
        finally:
            os.close(copy)  # the handle needs no fd
        with bare:
            assert bare.layout is None
            assert bare.size == buf.size  # the dma-buf's inode has the buffer's size
        with buf.map() as pixels:
            pixels[expected.size - 1] = 0xA5
        with buf.map(write=False) as pixels:
            assert pixels[expected.size - 1] == 0xA5
        client.release(buf)


def test_import_matrix(daemon: Daemon, driver: str, nodes: dict[str, Nodes]) -> None:
    # A virtio-gpu buffer imports on every node of both drivers; a vgem buffer
    # only on vgem's, and virtio-gpu refuses it with ENODEV.
    with primed.connect(daemon.socket) as client:
        buf = client.allocate(128, 128, "XR24")
        for target in DRIVERS:
            for path in (nodes[target].card, nodes[target].render):
                with primed.Device(path) as device:
                    if driver == "vgem" and target == "virtio_gpu":
                        with pytest.raises(primed.KernelError) as refused:
                            device.import_buffer(buf)
                        assert refused.value.errno == errno.ENODEV
                    else:
                        with device.import_buffer(buf) as imported:
                            assert imported.handle > 0


def test_import_counts_references(daemon: Daemon, driver: str, nodes: dict[str, Nodes]) -> None:
    with primed.connect(daemon.socket) as client, primed.Device(nodes[driver].render) as device:
        buf = client.allocate(64, 64, "XR24")
        first = device.import_buffer(buf)
        second = device.import_buffer(buf.fd)  # the same dma-buf, as a bare fd
        assert first.handle == second.handle
        assert device.references(first.handle) == 2
        first.close()
        first.close()  # idempotent: must not drop the second reference
        assert device.references(second.handle) == 1
        os.close(drm.handle_to_fd(device.fd, second.handle))  # still a live handle
        second.close()
        assert device.references(second.handle) == 0
        with pytest.raises(primed.KernelError) as gone:
            drm.handle_to_fd(device.fd, second.handle)
        assert gone.value.errno == errno.ENOENT


def test_pixels_shared_between_processes(
    daemon: Daemon, driver: str, nodes: dict[str, Nodes]
) -> None:
    with primed.connect(daemon.socket) as client:
        buf = client.allocate(320, 240, "XR24")
        pattern = random.Random(1).randbytes(buf.size)
        with buf.map() as pixels:
            pixels[:] = pattern
        seen = peer(buf.fd, nodes[driver].render, buf.size, write_seed=2)
        assert seen["sha256"] == sha256(pattern)
        assert seen["same_dmabuf"] is True
        with buf.map(write=False) as pixels:
            assert sha256(pixels) == sha256(random.Random(2).randbytes(buf.size))
        if driver == "virtio_gpu":  # cross-device: the vgem render node reads it too
            rewritten = sha256(random.Random(2).randbytes(buf.size))
            assert peer(buf.fd, nodes["vgem"].render, buf.size)["sha256"] == rewritten
        else:
            assert peer(buf.fd, nodes["virtio_gpu"].render, buf.size) == {"errno": errno.ENODEV}


def test_buffers_outlive_release_and_the_daemon(
    tmp_path: Path, driver: str, nodes: dict[str, Nodes]
) -> None:
    running = serve(tmp_path / "outlive.sock", "--device", nodes[driver].card)
    with primed.Device(nodes[driver].render) as device:
        try:
            with primed.connect(running.socket) as client:
                buf = client.allocate(256, 256, "AR24")
                pattern = random.Random(3).randbytes(buf.size)
                with buf.map() as pixels:
                    pixels[:] = pattern
                imported = device.import_buffer(buf)
                size = buf.size
                client.release(buf)  # closes our fd too: only the GEM handle is left
            assert buf.closed
        finally:
            running.stop()
        exported = drm.handle_to_fd(device.fd, imported.handle)
        try:
            with primed.Mapping(exported, size, write=False, sync=True) as pixels:
                assert sha256(pixels) == sha256(pattern)
        finally:
            os.close(exported)
        imported.close()


@pytest.mark.parametrize("how", ["release", "disconnect"])
def test_vgem_memory_returns_after_cleanup(
    tmp_path: Path, nodes: dict[str, Nodes], how: str
) -> None:
    # vgem buffers are shmem: /proc/meminfo's Shmem counts their pages until the
    # last reference (daemon handle, client fd, mapping) is gone.
    running = serve(tmp_path / "shmem.sock", "--device", nodes["vgem"].card)
    try:
        baseline = shmem_kib()
        client = primed.connect(running.socket)
        bufs = client.allocate_many(2048, 2048, "XR24", 4)  # 64 MiB
        for buf in bufs:
            with buf.map() as pixels:
                pixels[::4096] = b"\x01" * len(pixels[::4096])  # touch every page
        grown = shmem_kib() - baseline
        assert grown >= 60 * 1024, f"Shmem grew by {grown} kB only"
        if how == "release":
            client.release(*bufs, close=False)
            # The client still holds the fds: the memory must stay.
            assert shmem_kib() - baseline >= 60 * 1024
            for buf in bufs:
                buf.close()
            client.close()
        else:
            for buf in bufs:
                buf.close()
            # The daemon still holds the handles: the memory must stay.
            assert shmem_kib() - baseline >= 60 * 1024
            client.close()
        wait_for(
            lambda: shmem_kib() - baseline < 4 * 1024, "Shmem to fall back to its baseline", 60
        )
    finally:
        running.stop()


def test_kernel_errno_travels_back(tmp_path: Path, nodes: dict[str, Nodes], driver: str) -> None:
    # With a tiny RLIMIT_NOFILE the daemon's PRIME export fails with EMFILE.
    running = serve(tmp_path / "emfile.sock", "--device", nodes[driver].card, nofile=24)
    try:
        with primed.connect(running.socket) as client:
            with pytest.raises(primed.ServerError) as failed:
                client.allocate_many(64, 64, "XR24", 40)
            assert failed.value.code == primed.ErrorCode.KERNEL
            assert failed.value.errno == errno.EMFILE
            # Nothing was kept: the same client can still allocate a few.
            assert len(client.allocate_many(64, 64, "XR24", 4)) == 4
    finally:
        running.stop()


def test_memfd_buffers_are_not_importable(tmp_path: Path, nodes: dict[str, Nodes]) -> None:
    running = serve(tmp_path / "memfd.sock", "--backend", "memfd")
    try:
        with (
            primed.connect(running.socket) as client,
            primed.Device(nodes["vgem"].render) as device,
        ):
            buf = client.allocate(64, 64, "XR24")
            with pytest.raises(primed.NotImportable, match="memfd"):
                device.import_buffer(buf)
    finally:
        running.stop()


def test_cli_alloc_imports_on_a_render_node(
    daemon: Daemon, driver: str, nodes: dict[str, Nodes]
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "primed", "alloc", "1920x1080", "--format", "NV12", "--count", "3",
         "--import", nodes[driver].render, "--json", "--socket", daemon.socket],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    buffers = json.loads(done.stdout)["buffers"]
    assert [b["id"] for b in buffers] == [1, 2, 3]
    for b in buffers:
        assert b["format"] == "NV12" and b["handle"] > 0 and len(b["planes"]) == 2
        assert b["planes"][1]["offset"] >= 1080 * b["planes"][0]["pitch"]
