"""Fixtures of the kernel tier, which runs inside a VM with vgem and virtio-gpu loaded.

Without both drivers the whole tier fails at once: a DRM claim needs a DRM test,
so this tier never skips.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest

from primed.kernel import drm
from tests.support import Daemon, start_daemon

DRIVERS = ("vgem", "virtio_gpu")
#: Python starts slowly under software emulation: give a daemon this long to listen.
START_TIMEOUT = 120.0


def serve(path: str | os.PathLike[str], *args: str, nofile: int | None = None) -> Daemon:
    """start_daemon with the VM's patience."""
    return start_daemon(path, *args, nofile=nofile, timeout=START_TIMEOUT)


@dataclasses.dataclass(frozen=True)
class Nodes:
    card: str
    render: str


def _find_nodes() -> dict[str, Nodes]:
    found: dict[str, dict[bool, str]] = {}
    for node in drm.nodes():
        found.setdefault(node.driver, {})[node.primary] = node.path
    missing = [d for d in DRIVERS if set(found.get(d, {})) != {True, False}]
    if missing:
        pytest.exit(
            f"kernel tier: no card and render node for {', '.join(missing)} (found {found}); "
            "run it inside the VM: scripts/test-kernel",
            returncode=3,
        )
    return {d: Nodes(found[d][True], found[d][False]) for d in DRIVERS}


@pytest.fixture(scope="session")
def nodes() -> dict[str, Nodes]:
    return _find_nodes()


@pytest.fixture(scope="module", params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def daemon(
    driver: str, nodes: dict[str, Nodes], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """A daemon serving dumb buffers from ``driver``'s card node, shared by a module's tests."""
    running = serve(tmp_path_factory.mktemp(driver) / "primed.sock", "--device", nodes[driver].card)
    try:
        yield running
    finally:
        running.stop()
