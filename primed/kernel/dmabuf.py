"""Ioctls and kernel views that work on any dma-buf, whoever exported it.

Structs and request numbers follow include/uapi/linux/dma-buf.h
(tests/host/test_alloc_abi.py compiles it and compares). A dma-buf has one
open file description, which every fd to it shares: a PRIME export, a dup and
a received SCM_RIGHTS copy all refer to it, so a name set through any of them
is seen through all.

:class:`Namer` is how the allocators name their buffers for their owners: a
refusal is counted and logged, rate-limited, never an allocation's failure.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable

from primed.errors import KernelError
from primed.kernel.drm import _iow

log = logging.getLogger("primed")

#: The longest name the kernel keeps, its terminating NUL included.
DMA_BUF_NAME_LEN = 32
# The argument is a pointer to the name; _B is the 64-bit pointer's size, which is
# what DMA_BUF_SET_NAME (sized by `const char *`) is on x86-64.
DMA_BUF_SET_NAME_B = _iow("b", 1, 8)


def set_name(fd: int, name: str) -> None:
    """DMA_BUF_SET_NAME: label the dma-buf behind ``fd`` (seen in fdinfo's ``name:`` line).

    ``name`` must encode to at most DMA_BUF_NAME_LEN - 1 bytes of UTF-8 with no
    NUL (ValueError otherwise, before the kernel is asked: it answers EINVAL).
    Raises KernelError with the kernel's errno, e.g. ENOTTY for a fd that is no
    dma-buf.
    """
    raw = name.encode()
    if b"\0" in raw or len(raw) >= DMA_BUF_NAME_LEN:
        raise ValueError(
            f"a dma-buf name is at most {DMA_BUF_NAME_LEN - 1} bytes, no NUL: {name!r}"
        )
    # fcntl.ioctl copies an immutable buffer and passes its address, which is
    # what the kernel reads the string from.
    try:
        fcntl.ioctl(fd, DMA_BUF_SET_NAME_B, raw + b"\0")
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, "DMA_BUF_SET_NAME") from None


class Namer:
    """Names one allocator's dma-bufs for their owners, counting what the kernel refuses.

    A name is diagnostics, not a contract: if the kernel refuses it (ENOTTY where
    it has no DMA_BUF_SET_NAME, EBUSY from older kernels that won't rename a buffer
    already attached to a device, ENOMEM), the buffer stays unnamed and is delivered
    all the same. Each refusal is counted by errno in ``failures``; the first of
    each errno is logged (a warning), later ones at most once every ``every``
    seconds, with how many there were since, so a kernel that refuses every name
    writes a line a minute, not one per buffer.
    """

    def __init__(self, what: str, every: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.what = what  #: the allocator, as log lines name it
        self.every = every
        self.clock = clock
        self.failures: collections.Counter[int] = collections.Counter()
        self._logged: dict[int, tuple[float, int]] = {}  # errno -> (when, count then)

    def name(self, fd: int, label: str) -> bool:
        """Name the dma-buf behind ``fd``; False (counted, maybe logged) if the kernel
        refused. ``label`` must fit (see :func:`set_name`): a ValueError is a bug."""
        try:
            set_name(fd, label)
        except KernelError as e:
            self.refused(e.errno or errno.EIO, label)
            return False
        return True

    def refused(self, err: int, label: str) -> None:
        """Count a name the kernel refused with ``err``; log it if it is time to."""
        self.failures[err] += 1
        count, now = self.failures[err], self.clock()
        last = self._logged.get(err)
        if last is None:
            log.warning(
                "%s: the kernel refused to name a buffer %r (%s); buffers go unnamed, "
                "delivered all the same (further refusals logged at most every %g s)",
                self.what, label, os.strerror(err), self.every,
            )  # fmt: skip
        elif now - last[0] >= self.every:
            log.warning(
                "%s: %d more buffer(s) unnamed (%s) since the last line; %d in all",
                self.what, count - last[1], os.strerror(err), count,
            )  # fmt: skip
        else:
            return
        self._logged[err] = (now, count)


@dataclasses.dataclass(frozen=True, slots=True)
class Info:
    """What /proc/self/fdinfo says about a dma-buf fd."""

    inode: int  #: the dma-buf's identity: equal for every fd to one buffer
    size: int  #: bytes
    count: int  #: references to its file (open fds and kernel holders such as mappings)
    exp_name: str  #: the exporter: "system" (a heap), "udmabuf", "drm" (vgem), "virtio_gpu"
    name: str | None  #: set with set_name; None if never set
    flags: int  #: the open file's flags (octal in fdinfo), e.g. O_RDWR | O_CLOEXEC


def info(fd: int) -> Info:
    """Parse /proc/self/fdinfo/FD of a dma-buf.

    Raises KernelError if the file cannot be read, ValueError if ``fd`` is not a
    dma-buf (its fdinfo has no ``exp_name:`` line).
    """
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"read /proc/self/fdinfo/{fd}") from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip("\t ")
    if "exp_name" not in fields:
        raise ValueError(f"fd {fd} is not a dma-buf")
    return Info(
        inode=int(fields["ino"]) if "ino" in fields else os.fstat(fd).st_ino,
        size=int(fields["size"]),
        count=int(fields["count"]),
        exp_name=fields["exp_name"],
        name=fields.get("name"),
        flags=int(fields["flags"], 8),
    )
