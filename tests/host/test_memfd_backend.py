"""MemfdBackend.export: every delivery gets its own open file description of the one
sealed memfd, so no holder's file status flags reach another holder; the seals, which
belong to the inode, still bind every holder."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
from collections.abc import Iterator

import pytest

from primed import formats
from primed.errors import KernelError
from primed.formats import Limits
from primed.kernel.allocation import Allocation
from primed.kernel.backends import MemfdBackend

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def allocation() -> Iterator[Allocation]:
    backend = MemfdBackend()
    made = backend.allocate(formats.lookup("XR24"), 64, 64, Limits())
    try:
        yield made
    finally:
        backend.free(made)


def test_each_export_has_its_own_file_description(allocation: Allocation) -> None:
    backend = MemfdBackend()
    first, second = backend.export(allocation), backend.export(allocation)
    try:
        assert os.fstat(first).st_ino == os.fstat(second).st_ino == os.fstat(allocation.ref).st_ino
        # A hostile holder sets O_APPEND on its fd: with a shared description every
        # other holder's pwrite would append, past the sealed end (EPERM).
        fcntl.fcntl(first, fcntl.F_SETFL, fcntl.fcntl(first, fcntl.F_GETFL) | os.O_APPEND)
        assert os.pwrite(second, b"pixels", 0) == 6
        assert os.pread(first, 6, 0) == b"pixels"
        assert fcntl.fcntl(first, fcntl.F_GETFL) & os.O_APPEND
        assert not fcntl.fcntl(second, fcntl.F_GETFL) & os.O_APPEND
        assert not fcntl.fcntl(allocation.ref, fcntl.F_GETFL) & os.O_APPEND
        assert fcntl.fcntl(second, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.get_blocking(second)  # O_RDWR and nothing else the holder did
        assert fcntl.fcntl(second, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    finally:
        os.close(first)
        os.close(second)


def test_the_seals_bind_every_export(allocation: Allocation) -> None:
    fd = MemfdBackend().export(allocation)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == SEALS
        for size in (allocation.size // 2, allocation.size * 2, 0):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", allocation.size)  # would grow it
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)  # F_SEAL_SEAL
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == SEALS
        assert os.fstat(fd).st_size == allocation.size
    finally:
        os.close(fd)


def test_an_export_that_fails_says_the_kernels_errno_and_leaks_nothing(
    allocation: Allocation,
) -> None:
    backend = MemfdBackend()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = open_fds()
    fillers: list[int] = []
    # Every fd below the limit in use: the reopen fails with EMFILE, as it would for
    # a daemon at RLIMIT_NOFILE.
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(before) + 8, hard))
    try:
        while True:
            try:
                fillers.append(os.dup(0))
            except OSError as e:
                assert e.errno == errno.EMFILE
                break
        with pytest.raises(KernelError) as failed:
            backend.export(allocation)
        assert failed.value.errno == errno.EMFILE
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert open_fds() == before
