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
import subprocess
import sys
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
