"""Ioctls and kernel views that work on any dma-buf, whoever exported it.

Structs and request numbers follow include/uapi/linux/dma-buf.h
(tests/host/test_alloc_abi.py compiles it and compares). A dma-buf has one
open file description, which every fd to it shares: a PRIME export, a dup and
a received SCM_RIGHTS copy all refer to it, so a name set through any of them
is seen through all.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os

from primed.errors import KernelError
from primed.kernel.drm import _iow

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
