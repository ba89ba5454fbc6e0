"""Every dma-buf the daemon delivers is named for its owner (DMA_BUF_SET_NAME), on
whichever kernel the VM booted: dumb buffers of virtio-gpu's and vgem's card nodes (6.1
and 6.12), and on 6.12 the system heap's and udmabuf's buffers too.

The owner is a process of its own uid (4321, switched to from root) that calls itself
something spoofing, ``evil:0:1:root``. For each allocator it allocates a buffer, reads
the ``name:`` line of its own fd's fdinfo, shares the buffer and closes its fd. Then
this process (root, another client) opens each token: its fd's fdinfo says the same
name, the owner's, with the uid the kernel told the daemon, the buffer's id and the
owner's pid, and the owner's own name cut and scrubbed, never in the uid's place.

    PRIMED_VM_KERNEL=$(scripts/kernel) scripts/vm -- env PYTHONPATH=$PWD \\
        .venv/bin/python -m pytest tests/kernel/test_names.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import primed
from primed.kernel import dmabuf
from tests.kernel.conftest import Nodes, serve
from tests.kernel.test_multi import HAS_ALLOCATORS
from tests.support import Daemon

OWNER_UID = 4321
SPOOF = "evil:0:1:root"
#: The exporter fdinfo names for each allocator's buffers.
EXPORTERS = {
    "virtio_gpu": "virtio_gpu",
    "vgem": "drm",
    "heap:system": "system",
    "udmabuf": "udmabuf",
}

# The owner: allocates a buffer from each allocator named in argv[4:], reports what its
# own fd's fdinfo says and a token for it, closes its fd (the daemon still holds the
# buffer), and keeps its connection until its stdin closes.
OWNER = """
import json, os, sys
import primed
from primed.kernel import dmabuf
# Imports first: this Python's files may be readable by root alone.
os.setgroups([]); os.setgid(int(sys.argv[1])); os.setuid(int(sys.argv[1]))
with primed.connect(sys.argv[2], name=sys.argv[3]) as client:
    told = {"pid": os.getpid(), "buffers": {}}
    for allocator in sys.argv[4:]:
        buf = client.allocate(64, 64, "XR24", allocator=allocator)
        seen = dmabuf.info(buf.fd)
        token = client.share(buf)
        told["buffers"][allocator] = {
            "id": buf.id, "name": seen.name, "exp_name": seen.exp_name, "token": token,
        }
        buf.close()
    print(json.dumps(told), flush=True)
    sys.stdin.read()
"""


def allocators(nodes: dict[str, Nodes]) -> dict[str, str]:
    """The daemon's allocator names (``card0``, ``heap:system``, ...) -> what each is."""
    named = {os.path.basename(nodes[d].card): d for d in ("virtio_gpu", "vgem")}
    if HAS_ALLOCATORS:
        named.update({"heap:system": "heap:system", "udmabuf": "udmabuf"})
    return named


@pytest.fixture(scope="module")
def daemon(nodes: dict[str, Nodes]) -> Iterator[Daemon]:
    """One daemon serving every allocator this kernel has, on a socket any uid may use."""
    folder = Path(tempfile.mkdtemp(prefix="primed-names-", dir="/tmp"))
    os.chmod(folder, 0o755)
    extra = ["--heap", "system", "--udmabuf"] if HAS_ALLOCATORS else []
    try:
        running = serve(
            folder / "primed.sock",
            "--device", nodes["virtio_gpu"].card,
            "--device", nodes["vgem"].card,
            *extra,
            "--socket-mode", "666",
        )  # fmt: skip
        try:
            yield running
        finally:
            running.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def owner(daemon: Daemon, nodes: dict[str, Nodes]) -> Iterator[dict[str, object]]:
    """What the owner process told: its pid and, for each allocator, its buffer."""
    process = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(OWNER_UID), daemon.socket, SPOOF, *allocators(nodes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            process.kill()
            _, err = process.communicate()
            raise AssertionError(f"the owner told nothing:\n{err}\n{daemon.log()}")
        yield json.loads(line)
        _, err = process.communicate(input="", timeout=120)
        assert process.returncode == 0, err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def expected(pid: int, ident: int) -> str:
    # The uid, id and pid are the daemon's; the owner's name follows, ':' made '_',
    # cut to the kernel's 31 bytes (the VM's pids are short enough to leave it room).
    label = f"primed:{OWNER_UID}:{ident}:{pid}:evil_0_1_root"[: dmabuf.DMA_BUF_NAME_LEN - 1]
    assert label.count(":") == 4, label
    return label


def test_the_owners_fd_carries_its_name(owner: dict[str, object], nodes: dict[str, Nodes]) -> None:
    pid, buffers = owner["pid"], owner["buffers"]
    assert isinstance(pid, int) and isinstance(buffers, dict)
    assert sorted(buffers) == sorted(allocators(nodes))
    for allocator, what in allocators(nodes).items():
        seen = buffers[allocator]
        assert seen["exp_name"] == EXPORTERS[what], (allocator, seen)
        assert seen["name"] == expected(pid, seen["id"]), (allocator, seen)
    # One client, one count of ids: 1, 2, ... in the order allocated.
    assert sorted(b["id"] for b in buffers.values()) == list(range(1, len(buffers) + 1))


def test_another_client_sees_the_owners_name(
    owner: dict[str, object], daemon: Daemon, nodes: dict[str, Nodes]
) -> None:
    """Opened by token in another process of another uid, after the owner closed its fd:
    the buffer the daemon keeps carries the name, not only the fd first delivered."""
    pid, buffers = owner["pid"], owner["buffers"]
    assert isinstance(pid, int) and isinstance(buffers, dict)
    with primed.connect(daemon.socket, name="opener:0:0:0") as client:
        for allocator, what in allocators(nodes).items():
            seen = buffers[allocator]
            with client.open_shared(seen["token"]) as buf:
                info = dmabuf.info(buf.fd)
                assert info.exp_name == EXPORTERS[what], allocator
                assert info.name == expected(pid, seen["id"]), (allocator, info)
