"""One daemon serving several allocators, on whichever kernel the VM booted.

On 6.1: virtio-gpu's and vgem's card nodes. On 6.12 also the system heap and
udmabuf (6.1 has neither: asking for them stops the start, naming the node).
From each allocator a buffer is allocated by name, painted, shared by token
with another process, and imported there on each render node: where the
import matrix the daemon measured at start says it imports, the pixels come
through; where it says an errno, the import fails with that errno. The matrix
itself is checked against what the drivers are known to do: virtio-gpu imports
only its own buffers (ENODEV for the rest), vgem every dma-buf.

    PRIMED_VM_KERNEL=$(scripts/kernel) scripts/vm -- \\
        .venv/bin/python -m pytest tests/kernel/test_multi.py -q
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import primed
from primed.wire.schema import Kind
from tests.kernel.conftest import Nodes, serve
from tests.support import Daemon

_release = re.match(r"(\d+)\.(\d+)", os.uname().release)
assert _release is not None, os.uname().release
#: Debian 12's 6.12 has the system heap and udmabuf built in; its 6.1 neither.
HAS_ALLOCATORS = (int(_release[1]), int(_release[2])) >= (6, 12)
PEER = [sys.executable, "-m", "tests.kernel.peer"]
#: The allocators the daemon serves, in its order, by what each is.
EXTRA = ("heap:system", "udmabuf") if HAS_ALLOCATORS else ()


def run_peer(*args: str) -> dict[str, object]:
    done = subprocess.run([*PEER, *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def multi(nodes: dict[str, Nodes], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    extra = ["--heap", "system", "--udmabuf"] if HAS_ALLOCATORS else []
    running = serve(
        tmp_path_factory.mktemp("multi") / "primed.sock",
        "--device", nodes["virtio_gpu"].card,
        "--device", nodes["vgem"].card,
        *extra,
    )  # fmt: skip
    try:
        yield running
    finally:
        running.stop()


def names(nodes: dict[str, Nodes]) -> list[str]:
    return [os.path.basename(nodes[d].card) for d in ("virtio_gpu", "vgem")] + list(EXTRA)


def test_the_daemon_lists_its_allocators_and_the_matrix(
    multi: Daemon, nodes: dict[str, Nodes]
) -> None:
    with primed.connect(multi.socket) as client:
        listed = client.allocators
        assert [a.name for a in listed] == names(nodes)
        assert [a.kind for a in listed] == [Kind.DUMB, Kind.DUMB] + (
            [Kind.HEAP, Kind.UDMABUF] if HAS_ALLOCATORS else []
        )
        assert [a.driver for a in listed[:2]] == ["virtio_gpu", "vgem"]
        assert client.info.node == nodes["virtio_gpu"].card  # the first is the default
        rows = {row.node: row for row in client.query().devices}
    assert set(rows) == {nodes["virtio_gpu"].render, nodes["vgem"].render}
    others = len(listed) - 1
    # virtio-gpu imports only what it made; vgem every dma-buf.
    assert rows[nodes["virtio_gpu"].render].imports == (0,) + (errno.ENODEV,) * others
    assert rows[nodes["vgem"].render].imports == (0,) * len(listed)
    assert rows[nodes["vgem"].render].driver == "vgem"
    info = json.loads(
        subprocess.run(
            [sys.executable, "-m", "primed", "info", "--json", "--socket", multi.socket],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout
    )  # fmt: skip
    by_node = {row["node"]: row["imports"] for row in info["imports"]}
    card0 = names(nodes)[0]
    assert by_node[nodes["virtio_gpu"].render][card0] == "ok"
    assert set(list(by_node[nodes["virtio_gpu"].render].values())[1:]) == {"ENODEV"}


@pytest.mark.parametrize("which", range(2 + len(EXTRA)), ids=["virtio_gpu", "vgem", *EXTRA])
def test_each_allocator_shares_by_token_and_imports_where_the_matrix_says(
    multi: Daemon, nodes: dict[str, Nodes], which: int
) -> None:
    name = names(nodes)[which]
    with primed.connect(multi.socket, name="owner") as owner:
        rows = owner.query().devices
        buf = owner.allocate(256, 64, "XR24", allocator=name)
        assert buf.allocator == name and buf.backend == primed.Backend.DRM
        pattern = random.Random(which).randbytes(buf.size)
        with buf.map() as pixels:
            pixels[:] = pattern
        token = owner.share(buf)
        tried = 0
        for row in rows:
            args = ("--token", token, "--socket", multi.socket, "--size", str(buf.size))
            seen = run_peer(*args, "--node", row.node)
            if row.imports[which] == 0:
                assert seen["sha256"] == hashlib.sha256(pattern).hexdigest(), (name, row.node)
                assert seen["same_dmabuf"] is True
            else:
                assert seen == {"errno": row.imports[which]}, (name, row.node)
            tried += 1
        assert tried == 2
        owner.release(buf)


def test_the_daemon_chooses_an_allocator_the_device_imports(
    multi: Daemon, nodes: dict[str, Nodes]
) -> None:
    with primed.connect(multi.socket) as client:
        scanout = client.allocate(64, 64, "XR24", usage=primed.USAGE_SCANOUT)
        for_virtio = client.allocate(64, 64, "XR24", device=nodes["virtio_gpu"].render)
        assert scanout.allocator == for_virtio.allocator == names(nodes)[0]
        with pytest.raises(primed.ServerError) as refused:
            client.allocate(64, 64, "XR24", allocator="card-none")
        assert refused.value.code == primed.ErrorCode.NO_ALLOCATOR
        if HAS_ALLOCATORS:  # named, but virtio-gpu refuses heap buffers
            with pytest.raises(primed.ServerError) as refused:
                client.allocate(
                    64, 64, "XR24", allocator="heap:system", device=nodes["virtio_gpu"].render
                )
            assert refused.value.code == primed.ErrorCode.NO_ALLOCATOR
        # One quota ledger, whatever the allocator: the client holds both.
        assert client.query().used_buffers == 2
        client.release(scanout, for_virtio)


def test_a_version_1_client_gets_the_default_allocator(
    multi: Daemon, nodes: dict[str, Nodes]
) -> None:
    with primed.connect(multi.socket, max_version=1) as old:
        assert (old.info.version, old.allocators) == (1, ())
        assert (old.info.driver, old.info.node) == ("virtio_gpu", nodes["virtio_gpu"].card)
        buf = old.allocate(64, 64, "XR24")
        with primed.Device(nodes["virtio_gpu"].render) as device, device.import_buffer(buf):
            pass  # virtio-gpu imports it: it is its own dumb buffer
        old.release(buf)


#: Allocators this kernel lacks, and the node the refusal must name.
MISSING = (
    [(["--heap", "cma"], "/dev/dma_heap/cma")]
    if HAS_ALLOCATORS
    else [(["--heap", "system"], "/dev/dma_heap/system"), (["--udmabuf"], "/dev/udmabuf")]
)


@pytest.mark.parametrize(("flag", "node"), MISSING, ids=[node for _, node in MISSING])
def test_an_allocator_the_kernel_lacks_stops_the_start(
    tmp_path: Path, flag: list[str], node: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "primed", "serve", *flag, "--socket", str(tmp_path / "x.sock")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"primed serve: open {node} (" in done.stderr
    assert not (tmp_path / "x.sock").exists()


def test_no_render_node_imports_a_memfd(nodes: dict[str, Nodes], tmp_path: Path) -> None:
    daemon = serve(tmp_path / "memfd.sock", "--backend", "memfd")
    try:
        with primed.connect(daemon.socket) as client:
            rows = {row.node: row.imports for row in client.query().devices}
    finally:
        daemon.stop()
    # A memfd is no dma-buf: PRIME_FD_TO_HANDLE says EINVAL on every driver.
    assert rows == {nodes[d].render: (errno.EINVAL,) for d in ("virtio_gpu", "vgem")}


def test_quotas_list_stats_and_dump_are_the_same_for_every_allocator(
    nodes: dict[str, Nodes], tmp_path: Path
) -> None:
    """One quota ledger, one LIST, one STATS and `primed dump` across allocators."""
    every = names(nodes)
    config = tmp_path / "primed.toml"
    config.write_text(f"[quotas]\nbuffers_per_client = {len(every)}\n")
    extra = ["--heap", "system", "--udmabuf"] if HAS_ALLOCATORS else []
    daemon = serve(
        tmp_path / "quota.sock", "--config", str(config),
        "--device", nodes["virtio_gpu"].card, "--device", nodes["vgem"].card, *extra,
    )  # fmt: skip
    try:
        with primed.connect(daemon.socket, name="lister") as client:
            bufs = [client.allocate(8, 4, "XR24", allocator=name) for name in every]
            assert [b.allocator for b in bufs] == every
            # The quota counts the client's buffers, whichever allocator made them.
            for name in every:
                with pytest.raises(primed.ServerError) as refused:
                    client.allocate(8, 4, "XR24", allocator=name)
                assert refused.value.code == primed.ErrorCode.QUOTA_EXCEEDED, name
            listed = client.buffers()  # (the only client)
            assert sorted((e.id, e.size) for e in listed) == sorted((b.id, b.size) for b in bufs)
            stats = client.stats()
            assert (stats.buffers, stats.held_bytes) == (len(every), sum(b.size for b in bufs))
            for i, buf in enumerate(bufs):
                drawn = random.Random(i).randbytes(buf.size)
                with buf.map() as pixels:
                    pixels[:] = drawn
                out = tmp_path / f"{i}.png"
                done = subprocess.run(
                    [sys.executable, "-m", "primed", "dump", "-", "--png", str(out),
                     "--socket", daemon.socket],
                    input=client.share(buf), capture_output=True, text=True, timeout=120,
                    check=False,
                )  # fmt: skip
                assert done.returncode == 0, (every[i], done.stderr)
                width, height, rows = read_rgb_png(out.read_bytes())
                assert (width, height) == (8, 4)
                pitch = buf.planes[0].pitch
                for y in range(4):
                    # XR24 in memory is B, G, R, X: the PNG holds R, G, B.
                    line = drawn[y * pitch : y * pitch + 32]
                    want = b"".join(bytes((px[2], px[1], px[0])) for px in _pixels(line))
                    assert rows[y] == want, (every[i], y)
            client.release(*bufs)
    finally:
        daemon.stop()


def _pixels(line: bytes) -> list[bytes]:
    return [line[x : x + 4] for x in range(0, len(line), 4)]


def read_rgb_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows) of an 8-bit RGB PNG as primed.cli.png writes it (filter 0)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, {}
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks[data[at + 4 : at + 8]] = data[at + 8 : at + 8 + length]
        at += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    assert all(raw[y * stride] == 0 for y in range(height))
    return width, height, [raw[y * stride + 1 : (y + 1) * stride] for y in range(height)]
