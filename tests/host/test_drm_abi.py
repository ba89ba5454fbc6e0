"""primed.kernel.drm and the format table against the kernel's own uapi headers, compiled with gcc.

Every struct, ioctl number and constant primed.kernel.drm defines is printed by a C
program built against drm.h, drm_mode.h, drm_fourcc.h and linux/dma-buf.h, and
compared with the Python value. Without gcc or the headers this fails: the
claim that primed speaks the kernel's ABI needs this check.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess

import pytest

from primed import formats
from primed.kernel import drm

# Where the uapi DRM headers live: the kernel's headers_install layout (e.g.
# Fedora's kernel-headers), or libdrm's copy of them (Debian and Ubuntu ship it in
# libdrm-dev; their linux-libc-dev leaves the drm directory out).
HEADER_DIRS = ("/usr/include/drm", "/usr/include/libdrm")
DRM_HEADERS = ("drm.h", "drm_mode.h", "drm_fourcc.h")
DMA_BUF_HEADER = "/usr/include/linux/dma-buf.h"

# Names in primed.kernel.drm that are not part of the uapi headers.
NOT_UAPI = {"DRM_MAJOR"}  # a device number; the kernel keeps it out of include/uapi

REQUIRED_NUMBERS = {
    "DRM_IOCTL_VERSION",
    "DRM_IOCTL_GEM_CLOSE",
    "DRM_IOCTL_GET_CAP",
    "DRM_IOCTL_SET_MASTER",
    "DRM_IOCTL_DROP_MASTER",
    "DRM_IOCTL_PRIME_HANDLE_TO_FD",
    "DRM_IOCTL_PRIME_FD_TO_HANDLE",
    "DRM_IOCTL_MODE_CREATE_DUMB",
    "DRM_IOCTL_MODE_MAP_DUMB",
    "DRM_IOCTL_MODE_DESTROY_DUMB",
    "DRM_IOCTL_MODE_GETRESOURCES",
    "DRM_IOCTL_MODE_GETCRTC",
    "DRM_IOCTL_MODE_SETCRTC",
    "DRM_IOCTL_MODE_GETENCODER",
    "DRM_IOCTL_MODE_GETCONNECTOR",
    "DRM_IOCTL_MODE_RMFB",
    "DRM_IOCTL_MODE_ADDFB2",
    "DRM_IOCTL_MODE_GETFB2",
    "DMA_BUF_IOCTL_SYNC",
    "DRM_CAP_DUMB_BUFFER",
    "DRM_CAP_PRIME",
    "DRM_CAP_ADDFB2_MODIFIERS",
    "DRM_PRIME_CAP_IMPORT",
    "DRM_PRIME_CAP_EXPORT",
    "DMA_BUF_SYNC_READ",
    "DMA_BUF_SYNC_WRITE",
    "DMA_BUF_SYNC_RW",
    "DMA_BUF_SYNC_START",
    "DMA_BUF_SYNC_END",
    "DRM_MODE_FB_MODIFIERS",
    "DRM_MODE_TYPE_PREFERRED",
    "DRM_FORMAT_MOD_INVALID",
}

MODEINFO = (
    "clock",
    "hdisplay",
    "hsync_start",
    "hsync_end",
    "htotal",
    "hskew",
    "vdisplay",
    "vsync_start",
    "vsync_end",
    "vtotal",
    "vscan",
    "vrefresh",
    "flags",
    "type",
    "name",
)

# Each struct's fields in declaration order, as the kernel names them; None marks
# padding that primed.kernel.drm declares as pad bytes ("x"). An array is one field per
# element ("handles[1]"), except a char array, which is one "s" item.
FIELDS: dict[str, tuple[str | None, ...]] = {
    "drm_version": (
        "version_major",
        "version_minor",
        "version_patchlevel",
        None,
        "name_len",
        "name",
        "date_len",
        "date",
        "desc_len",
        "desc",
    ),
    "drm_gem_close": ("handle", "pad"),
    "drm_get_cap": ("capability", "value"),
    "drm_prime_handle": ("handle", "flags", "fd"),
    "drm_mode_create_dumb": ("height", "width", "bpp", "flags", "handle", "pitch", "size"),
    "drm_mode_map_dumb": ("handle", "pad", "offset"),
    "drm_mode_destroy_dumb": ("handle",),
    "dma_buf_sync": ("flags",),
    "drm_mode_fb_cmd2": (
        "fb_id",
        "width",
        "height",
        "pixel_format",
        "flags",
        *(f"{array}[{i}]" for array in ("handles", "pitches", "offsets") for i in range(4)),
        None,
        *(f"modifier[{i}]" for i in range(4)),
    ),
    "drm_mode_card_res": (
        "fb_id_ptr",
        "crtc_id_ptr",
        "connector_id_ptr",
        "encoder_id_ptr",
        "count_fbs",
        "count_crtcs",
        "count_connectors",
        "count_encoders",
        "min_width",
        "max_width",
        "min_height",
        "max_height",
    ),
    "drm_mode_modeinfo": MODEINFO,
    "drm_mode_get_connector": (
        "encoders_ptr",
        "modes_ptr",
        "props_ptr",
        "prop_values_ptr",
        "count_modes",
        "count_props",
        "count_encoders",
        "encoder_id",
        "connector_id",
        "connector_type",
        "connector_type_id",
        "connection",
        "mm_width",
        "mm_height",
        "subpixel",
        "pad",
    ),
    "drm_mode_get_encoder": (
        "encoder_id",
        "encoder_type",
        "crtc_id",
        "possible_crtcs",
        "possible_clones",
    ),
    "drm_mode_crtc": (
        "set_connectors_ptr",
        "count_connectors",
        "crtc_id",
        "fb_id",
        "x",
        "y",
        "gamma_size",
        "mode_valid",
        *(f"mode.{field}" for field in MODEINFO),
    ),
}


def python_structs() -> dict[str, struct.Struct]:
    return {name: value for name, value in vars(drm).items() if isinstance(value, struct.Struct)}


def python_numbers() -> dict[str, int]:
    return {
        name: value
        for name, value in vars(drm).items()
        if re.fullmatch(r"(DRM|DMA_BUF)_[A-Z0-9_]+", name)
        and isinstance(value, int)
        and name not in NOT_UAPI
    }


def field_offsets(layout: struct.Struct) -> list[tuple[bool, int]]:
    """(is_padding, offset) of each item of a ``struct`` format such as "=iii4xQQ"."""
    fmt = layout.format
    order, body = fmt[0], fmt[1:]
    items = []
    done = ""
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", body):
        if code in "xs":
            items.append((code == "x", struct.calcsize(order + done)))
            done += f"{count}{code}"
            continue
        for _ in range(int(count or 1)):
            items.append((False, struct.calcsize(order + done)))
            done += code
    return items


def find_headers() -> str:
    for directory in HEADER_DIRS:
        if all(os.path.isfile(os.path.join(directory, h)) for h in DRM_HEADERS):
            return directory
    pytest.fail(
        f"the kernel's DRM uapi headers ({', '.join(DRM_HEADERS)}) are in none of "
        f"{', '.join(HEADER_DIRS)}: install them (Debian: apt-get install libdrm-dev)",
        pytrace=False,
    )


def c_program() -> str:
    lines = [
        "#define _GNU_SOURCE",
        "#include <fcntl.h>",
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <drm.h>",
        "#include <drm_mode.h>",
        "#include <drm_fourcc.h>",
        "#include <linux/dma-buf.h>",
        "int main(void) {",
    ]
    for name in sorted(python_structs()):
        lines.append(f'    printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
        for field in FIELDS.get(name, ()):
            if field is not None:
                lines.append(
                    f'    printf("offsetof {name}.{field} %zu\\n", '
                    f"offsetof(struct {name}, {field}));"
                )
    for name in sorted(python_numbers()):
        lines.append(f'    printf("value {name} %llu\\n", (unsigned long long)({name}));')
    for fmt in formats.FORMATS.values():
        lines.append(
            f'    printf("format {fmt.name} %llu\\n", (unsigned long long)DRM_FORMAT_{fmt.name});'
        )
    lines.append('    printf("value DRM_FORMAT_MOD_LINEAR %llu\\n", DRM_FORMAT_MOD_LINEAR);')
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """What the compiled program printed: "sizeof NAME", "offsetof NAME.FIELD",
    "value NAME" and "format NAME" to their numbers."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is not installed (Debian: apt-get install gcc libc6-dev)", pytrace=False)
    if not os.path.isfile(DMA_BUF_HEADER):
        pytest.fail(
            f"{DMA_BUF_HEADER} is missing (Debian: apt-get install linux-libc-dev)", pytrace=False
        )
    headers = find_headers()
    work = tmp_path_factory.mktemp("abi")
    source, binary = work / "abi.c", work / "abi"
    source.write_text(c_program())
    built = subprocess.run(
        [gcc, "-std=c11", "-Wall", "-Werror", "-I", headers, "-o", str(binary), str(source)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, f"gcc failed against {headers}:\n{built.stderr}"
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30, check=True)
    printed = {}
    for line in ran.stdout.splitlines():
        kind, name, number = line.split()
        printed[f"{kind} {name}"] = int(number)
    return printed


def test_every_name_is_covered() -> None:
    assert set(python_numbers()) >= REQUIRED_NUMBERS
    assert set(python_structs()) == set(FIELDS)


def test_program_printed_everything(kernel: dict[str, int]) -> None:
    expected = (
        {f"sizeof {name}" for name in python_structs()}
        | {f"value {name}" for name in python_numbers()}
        | {f"format {f.name}" for f in formats.FORMATS.values()}
    )
    assert expected <= set(kernel)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_struct_size(kernel: dict[str, int], name: str) -> None:
    assert python_structs()[name].size == kernel[f"sizeof {name}"]


def test_create_dumb_is_32_bytes(kernel: dict[str, int]) -> None:
    # The size is part of the ioctl number: a 28-byte struct gives a wrong request.
    assert drm.drm_mode_create_dumb.size == kernel["sizeof drm_mode_create_dumb"] == 32


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_struct_field_offsets(kernel: dict[str, int], name: str) -> None:
    items = field_offsets(python_structs()[name])
    fields = FIELDS[name]
    assert len(items) == len(fields), f"{name}: {len(items)} items in Python, {len(fields)} in C"
    for field, (padding, offset) in zip(fields, items, strict=True):
        assert padding == (field is None)
        if field is not None:
            assert offset == kernel[f"offsetof {name}.{field}"], f"{name}.{field}"


@pytest.mark.parametrize("name", sorted(python_numbers()))
def test_number(kernel: dict[str, int], name: str) -> None:
    assert python_numbers()[name] == kernel[f"value {name}"], f"{name} differs from the kernel's"


def test_linear_modifier(kernel: dict[str, int]) -> None:
    assert kernel["value DRM_FORMAT_MOD_LINEAR"] == formats.MOD_LINEAR


def test_invalid_modifier_is_not_linear(kernel: dict[str, int]) -> None:
    # "No modifier given" must never be mistaken for LINEAR (0), which is a real one.
    assert kernel["value DRM_FORMAT_MOD_INVALID"] == drm.DRM_FORMAT_MOD_INVALID
    assert drm.DRM_FORMAT_MOD_INVALID == (1 << 56) - 1 != formats.MOD_LINEAR


@pytest.mark.parametrize("code", sorted(f.code for f in formats.FORMATS.values()))
def test_fourcc_matches_drm_fourcc_h(kernel: dict[str, int], code: str) -> None:
    fmt = formats.lookup(code)
    assert fmt.fourcc == kernel[f"format {fmt.name}"], f"{code} is not DRM_FORMAT_{fmt.name}"
