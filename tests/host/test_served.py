"""Opening the allocators a daemon serves, and the import matrix, on a host with no DRM node,
no dma-buf heap and no udmabuf (the kernel tier's test_multi.py measures a real matrix)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from primed.errors import KernelError, NoDevice
from primed.kernel import served
from primed.kernel.allocation import ImportMatrix
from primed.wire.schema import Kind


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_memfd_alone_is_one_allocator() -> None:
    allocators = served.open_allocators(memfd=True)
    try:
        assert [(s.name, s.kind) for s in allocators.served] == [("memfd", Kind.MEMFD)]
        assert served.probe_imports(allocators, root="/nonexistent") == ImportMatrix(())
    finally:
        allocators.close()


def test_a_missing_heap_names_its_node() -> None:
    # A heap no kernel has, so that a host with dma-buf heaps gives the same answer.
    before = open_fds()
    with pytest.raises(NoDevice) as missing:
        served.open_allocators(heaps=["primed-none"], memfd=True)
    assert missing.value.errno == errno.ENOENT
    assert "open /dev/dma_heap/primed-none (" in str(missing.value)
    assert open_fds() == before


def test_a_card_node_that_wont_open_is_named(tmp_path: Path) -> None:
    before = open_fds()
    with pytest.raises(KernelError) as failed:
        served.open_allocators([str(tmp_path / "card0")])
    assert failed.value.errno == errno.ENOENT and str(tmp_path / "card0") in str(failed.value)
    assert open_fds() == before
