"""primed.kernel.heap, .udmabuf and .dmabuf against the kernel's uapi headers, compiled with gcc.

<linux/dma-heap.h>, <linux/udmabuf.h> and <linux/dma-buf.h> come with
linux-libc-dev (Debian 12's is 6.1; these three headers say the same in 6.12's
include/uapi, only their include guards and a ULL suffix differ). Every struct
size, field offset and number the three modules declare is printed by a C
program and compared. Without gcc or the headers this fails, as
test_drm_abi.py does.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from primed.kernel import dmabuf, heap, udmabuf

HEADERS = ("linux/dma-heap.h", "linux/udmabuf.h", "linux/dma-buf.h")

#: Each struct's fields in declaration order, as the kernel names them.
STRUCTS: dict[str, tuple[struct.Struct, tuple[str, ...]]] = {
    "dma_heap_allocation_data": (
        heap.dma_heap_allocation_data,
        ("len", "fd", "fd_flags", "heap_flags"),
    ),
    "udmabuf_create": (udmabuf.udmabuf_create, ("memfd", "flags", "offset", "size")),
}

NUMBERS: dict[str, int] = {
    "DMA_HEAP_IOCTL_ALLOC": heap.DMA_HEAP_IOCTL_ALLOC,
    "DMA_HEAP_VALID_FD_FLAGS": heap.DMA_HEAP_VALID_FD_FLAGS,
    "DMA_HEAP_VALID_HEAP_FLAGS": heap.DMA_HEAP_VALID_HEAP_FLAGS,
    "UDMABUF_CREATE": udmabuf.UDMABUF_CREATE,
    "UDMABUF_FLAGS_CLOEXEC": udmabuf.UDMABUF_FLAGS_CLOEXEC,
    "DMA_BUF_SET_NAME_B": dmabuf.DMA_BUF_SET_NAME_B,
    # The unsuffixed name is sized by a pointer: on this ABI it must be the _B one.
    "DMA_BUF_SET_NAME": dmabuf.DMA_BUF_SET_NAME_B,
    "DMA_BUF_NAME_LEN": dmabuf.DMA_BUF_NAME_LEN,
}


def python_numbers() -> set[str]:
    """Every ioctl-ish constant the three modules define, so that a new one cannot go unchecked."""
    names = set()
    for module in (heap, udmabuf, dmabuf):
        for name, value in vars(module).items():
            if name.startswith(("DMA_HEAP_", "UDMABUF_", "DMA_BUF_")) and isinstance(value, int):
                names.add(name)
    return names


def c_program() -> str:
    lines = [
        "#define _GNU_SOURCE",
        "#include <fcntl.h>",
        "#include <stddef.h>",
        "#include <stdio.h>",
    ]
    lines += [f"#include <{h}>" for h in HEADERS]
    lines.append("int main(void) {")
    for name, (_, fields) in STRUCTS.items():
        lines.append(f'    printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
        for field in fields:
            lines.append(
                f'    printf("offsetof {name}.{field} %zu\\n", offsetof(struct {name}, {field}));'
            )
    for name in NUMBERS:
        lines.append(f'    printf("value {name} %llu\\n", (unsigned long long)({name}));')
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is not installed (Debian: apt-get install gcc libc6-dev)", pytrace=False)
    for header in HEADERS:
        if not os.path.isfile(os.path.join("/usr/include", header)):
            pytest.fail(
                f"/usr/include/{header} is missing (apt-get install linux-libc-dev)", pytrace=False
            )
    work = tmp_path_factory.mktemp("alloc-abi")
    source, binary = work / "abi.c", work / "abi"
    source.write_text(c_program())
    built = subprocess.run(
        [gcc, "-std=c11", "-Wall", "-Werror", "-o", str(binary), str(source)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30, check=True)
    printed = {}
    for line in ran.stdout.splitlines():
        kind, name, number = line.split()
        printed[f"{kind} {name}"] = int(number)
    return printed


def test_every_number_is_checked() -> None:
    assert python_numbers() <= set(NUMBERS)


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_size_and_offsets(kernel: dict[str, int], name: str) -> None:
    layout, fields = STRUCTS[name]
    assert layout.size == kernel[f"sizeof {name}"] == 24
    offset = 0
    for field, code in zip(fields, layout.format.lstrip("="), strict=True):
        assert offset == kernel[f"offsetof {name}.{field}"], f"{name}.{field}"
        offset += struct.calcsize("=" + code)


@pytest.mark.parametrize("name", sorted(NUMBERS))
def test_number(kernel: dict[str, int], name: str) -> None:
    assert NUMBERS[name] == kernel[f"value {name}"], f"{name} differs from the kernel's"


def test_request_numbers_are_what_kernel_facts_say() -> None:
    # _IOWR('H', 0, 24) and _IOW('u', 0x42, 24), _IOW('b', 1, 8), written out.
    assert heap.DMA_HEAP_IOCTL_ALLOC == 0xC0184800
    assert udmabuf.UDMABUF_CREATE == 0x40187542
    assert dmabuf.DMA_BUF_SET_NAME_B == 0x40086201
