"""Write the golden vectors: one datagram per file in vectors/, each described in vectors.json.

Usage: ``python protocol/make_vectors.py [--check]``. With ``--check`` nothing is
written; the exit status is 1 if the files on disk differ from what would be.
Every vector is built with primed.wire.protocol.encode, so the files are exactly what
the daemon and its clients put on the wire.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import re
import sys
from pathlib import Path

from primed import formats
from primed.errors import ErrorCode
from primed.wire.protocol import (
    LIST_BUFFERS,
    LIST_CLIENTS,
    USAGE_CPU,
    USAGE_SCANOUT,
    Allocate,
    Allocated,
    AllocateFrom,
    AllocatorInfo,
    BufferEntry,
    BufferInfo,
    ClientEntry,
    DeviceImports,
    Error,
    FormatInfo,
    Hello,
    List,
    Listed,
    Message,
    OpenBuffer,
    OpenShared,
    Passed,
    Queried,
    Query,
    Release,
    Released,
    Reply,
    Request,
    Revoke,
    Revoked,
    Share,
    Shared,
    Statistics,
    Stats,
    Welcome,
    encode,
)
from primed.wire.schema import VERSION, Backend, Kind, Opcode

OUT = Path(__file__).resolve().parent / "vectors"
INDEX = "vectors.json"
PAGE = 4096
# An array of integers, as json.dumps(indent=...) spreads it over lines (a JSON string can hold
# no raw newline, so no text inside a string can match).
_NUMBERS = re.compile(r"\[\n\s*(-?\d+(?:,\n\s*-?\d+)*)\n\s*\]")


#: vectors.json's own description of its keys.
DESCRIPTION = (
    "Golden vectors of the primed wire protocol. protocol_version: the protocol version "
    "they are of. vectors: one entry per datagram, each with name (the vector's name; its "
    "bytes are in name.bin), file (that file), direction (request, reply or peer), opcode "
    "and message (its name), serial, nfds (the fds that travel with it), length (in bytes), "
    "about, and fields (the decoded values, named as protocol/PROTOCOL.md's Golden vectors "
    "section says)."
)


@dataclasses.dataclass(frozen=True)
class Vector:
    name: str
    serial: int
    message: Message
    about: str


def _buffer(ident: int, width: int, height: int, code: str) -> BufferInfo:
    """A buffer laid out as the daemon lays it out, its size rounded up to a page."""
    fmt = formats.lookup(code)
    lay = formats.layout(fmt, width, height)
    return BufferInfo(
        ident,
        width,
        height,
        fmt.fourcc,
        formats.MOD_LINEAR,
        -(-lay.size // PAGE) * PAGE,
        tuple((plane.offset, plane.pitch) for plane in lay.planes),
    )


def _format(code: str) -> FormatInfo:
    """A format as QUERIED describes it, from the daemon's format table."""
    fmt = formats.lookup(code)
    return FormatInfo(fmt.fourcc, fmt.cpp, fmt.hsub, fmt.vsub)


# A token as SHARED hands it out. The daemon draws each one from the OS's random source; this
# one is fixed so that the vectors are.
TOKEN = bytes.fromhex("5c1e9a0f3b7d24e8a6c90b15f2d8437e")
# What a client holds after allocated_xr24, allocated_nv12 and allocated_yu12.
HELD = (_buffer(1, 1366, 768, "XR24"), _buffer(2, 1920, 1080, "NV12"), _buffer(3, 640, 480, "YU12"))
QUERY_FORMATS = tuple(_format(code) for code in ("XR24", "NV12", "YU12", "P010"))
HELD_BYTES = sum(b.size for b in HELD)
# When the listed clients connected: milliseconds since the Unix epoch (2026-01-01 00:00:00 UTC,
# and a minute later).
SINCE = (1_767_225_600_000, 1_767_225_660_000)

# What a version-2 daemon serving every kind of allocator lists in its WELCOME: two card
# nodes, the system heap, udmabuf and memfd, the first the default.
ALLOCATORS = (
    AllocatorInfo(
        "card0", Kind.DUMB, USAGE_SCANOUT | USAGE_CPU, "virtio_gpu", (0, 1, 0), "/dev/dri/card0"
    ),
    AllocatorInfo(
        "card1", Kind.DUMB, USAGE_SCANOUT | USAGE_CPU, "vgem", (1, 0, 0), "/dev/dri/card1"
    ),
    AllocatorInfo(
        "heap:system", Kind.HEAP, USAGE_CPU, "dma-heap/system", (0, 0, 0), "/dev/dma_heap/system"
    ),
    AllocatorInfo("udmabuf", Kind.UDMABUF, USAGE_CPU, "udmabuf", (0, 0, 0), "/dev/udmabuf"),
    AllocatorInfo("memfd", Kind.MEMFD, USAGE_CPU, "memfd", (0, 0, 0), ""),
)
# The import matrix that daemon recorded: virtio-gpu imports only its own buffers (ENODEV for
# the rest), vgem every dma-buf; a memfd is no dma-buf (EINVAL) on either.
MATRIX = (
    DeviceImports("/dev/dri/renderD128", "virtio_gpu", (0, 19, 19, 19, 22)),
    DeviceImports("/dev/dri/renderD129", "vgem", (0, 0, 0, 0, 22)),
)

VECTORS = (
    Vector("hello", 1, Hello(1, 1, "kmscube"), "handshake, version 1 only"),
    Vector("hello_empty_name", 1, Hello(1, 1, ""), "handshake without a name"),
    Vector(
        "hello_version_range",
        1,
        Hello(1, 3, "capture-vidéo"),
        "versions 1 to 3 offered; a name with non-ASCII UTF-8",
    ),
    Vector(
        "allocate_xr24",
        2,
        Allocate(1366, 768, formats.fourcc("XR24")),
        "one XRGB8888 buffer, 1366x768",
    ),
    Vector(
        "allocate_nv12_count256",
        3,
        Allocate(64, 64, formats.fourcc("NV12"), count=256),
        "256 NV12 buffers: answered in two ALLOCATED parts (253 + 3)",
    ),
    Vector(
        "release",
        0x04030201,
        Release((1, 254, 256)),
        "three ids; the serial's four bytes differ to show the byte order",
    ),
    Vector("release_empty", 6, Release(()), "no ids: valid, answered with RELEASED count 0"),
    Vector(
        "welcome_drm",
        1,
        Welcome(
            1,
            Backend.DRM,
            16384,
            16384,
            1 << 30,
            1024,
            "virtio_gpu",
            (0, 1, 0),
            "/dev/dri/card0",
        ),
        "DRM backend on virtio_gpu 0.1.0, default limits",
    ),
    Vector(
        "welcome_memfd",
        1,
        Welcome(1, Backend.MEMFD, 16384, 16384, 1 << 30, 1024, "memfd", (0, 0, 0), ""),
        "memfd backend: no node path",
    ),
    Vector(
        "allocated_xr24",
        2,
        Allocated(1, 0, (_buffer(1, 1366, 768, "XR24"),)),
        "one XRGB8888 buffer; pitch 5504 > 1366 * 4: rows are padded",
    ),
    Vector(
        "allocated_nv12",
        7,
        Allocated(1, 0, (_buffer(2, 1920, 1080, "NV12"),)),
        "one NV12 buffer: Y plane, then the interleaved UV plane at half height",
    ),
    Vector(
        "allocated_yu12",
        8,
        Allocated(1, 0, (_buffer(3, 640, 480, "YU12"),)),
        "one YUV420 buffer: Y, U and V planes, chroma pitches half of plane 0's",
    ),
    Vector(
        "allocated_nv12_part2",
        3,
        Allocated(256, 253, tuple(_buffer(i, 64, 64, "NV12") for i in range(254, 257))),
        "last part of the answer to allocate_nv12_count256: positions 253..255, ids 254..256",
    ),
    Vector(
        "error_bad_message",
        0,
        Error(ErrorCode.BAD_MESSAGE, 0, "datagram of 3 bytes is shorter than a header"),
        "serial 0: the header could not be read; the server then closes the connection",
    ),
    Vector(
        "error_unknown_opcode",
        9,
        Error(ErrorCode.UNKNOWN_OPCODE, 0, "unknown opcode 0x0042"),
        "the connection stays open",
    ),
    Vector(
        "error_kernel",
        4,
        Error(ErrorCode.KERNEL, 12, "Cannot allocate memory — mémoire épuisée (メモリ不足)"),
        "errno 12 (ENOMEM); text in UTF-8 with two- and three-byte sequences",
    ),
    Vector("released", 5, Released(3), "answer to release"),
    Vector(
        "share",
        10,
        Share(1, once=True, uids=(1000, 1001)),
        "buffer 1, once, for uids 1000 and 1001 only",
    ),
    Vector("share_any", 11, Share(2), "buffer 2, for any client, as often as asked"),
    Vector("shared", 10, Shared(TOKEN), "answer to share: the 16-byte token"),
    Vector("open_shared", 12, OpenShared(TOKEN), "open the buffer that token names"),
    Vector("revoke", 13, Revoke(TOKEN), "make that token stop working"),
    Vector("revoked", 13, Revoked(), "answer to revoke: an empty body"),
    Vector("query", 14, Query(), "what does the server offer? an empty body"),
    Vector(
        "queried_drm",
        14,
        Queried(
            Backend.DRM,
            "virtio_gpu",
            (0, 1, 0),
            "/dev/dri/card0",
            16384,
            16384,
            1024,
            1 << 30,
            QUERY_FORMATS,
            (formats.MOD_LINEAR,),
            64,
            256 << 20,
            len(HELD),
            HELD_BYTES,
        ),
        "answer to query: four of the formats, LINEAR only, quotas of 64 buffers and 256 MiB, "
        "three buffers held (those of allocated_xr24, allocated_nv12, allocated_yu12)",
    ),
    Vector(
        "queried_memfd",
        2,
        Queried(
            Backend.MEMFD,
            "memfd",
            (0, 0, 0),
            "",
            16384,
            16384,
            1024,
            1 << 30,
            QUERY_FORMATS,
            (formats.MOD_LINEAR,),
            0,
            0,
            0,
            0,
        ),
        "memfd backend: no node path, no quota, nothing held yet",
    ),
    Vector(
        "list_clients", 15, List(LIST_CLIENTS), "the first page of the clients this one may see"
    ),
    Vector(
        "list_buffers_page2",
        16,
        List(LIST_BUFFERS, 1000),
        "the second page of buffers: start is the first page's next (pages of 1000 buffers)",
    ),
    Vector("stats", 17, Stats(), "the daemon's counters: an empty body"),
    Vector(
        "open_buffer",
        18,
        OpenBuffer(1, 2),
        "root or the admin group: buffer 2 of client 1 (answered like open_shared: an ALLOCATED "
        "of one buffer, id 0)",
    ),
    Vector(
        "listed_clients",
        15,
        Listed(
            LIST_CLIENTS,
            0,
            (
                ClientEntry(1, 2817, 1000, 1000, SINCE[0], len(HELD), HELD_BYTES, "capture-vidéo"),
                ClientEntry(2, 2903, 0, 0, SINCE[1], 0, 0, ""),
            ),
        ),
        "answer to list_clients, as root (client 2, no name) sees it: client 1 holds the three "
        "buffers of allocated_xr24, allocated_nv12 and allocated_yu12; next 0: the last page",
    ),
    Vector(
        "listed_buffers",
        19,
        Listed(
            LIST_BUFFERS,
            3,
            tuple(
                BufferEntry(1, b.id, b.width, b.height, b.fourcc, b.size, age, tokens)
                for b, age, tokens in zip(HELD, (61_234, 60_875, 60_012), (0, 2, 0), strict=True)
            ),
        ),
        "a first page of three buffers, client 1's in the order allocated (buffer 2 has two live "
        "tokens); next 3: more follow from position 3. A page may hold fewer than the most (this "
        "daemon's are full but the last): only next 0 ends a listing",
    ),
    Vector(
        "statistics",
        17,
        Statistics(
            3_600_000,
            2,
            len(HELD),
            HELD_BYTES,
            2,
            (
                (1, Opcode.HELLO, 2),
                (1, Opcode.ALLOCATE, 3),
                (1, Opcode.SHARE, 2),
                (1, Opcode.LIST, 2),
                (1, Opcode.STATS, 1),
                (2, ErrorCode.UNKNOWN_OPCODE, 1),
                (2, ErrorCode.PERMISSION_DENIED, 1),
                (3, 1, 0),
                (3, 2, 1),
            ),
        ),
        "answer to stats after an hour: requests by opcode (this STATS included), ERROR replies "
        "by code (the PERMISSION_DENIED of the one refused connection), and the two events, "
        "no malformed message and one refused connection",
    ),
    Vector("hello_v2", 1, Hello(1, 2, "camera"), "handshake offering versions 1 and 2"),
    Vector(
        "welcome_v2",
        1,
        Welcome(
            2,
            Backend.DRM,
            16384,
            16384,
            1 << 30,
            1024,
            "virtio_gpu",
            (0, 1, 0),
            "/dev/dri/card0",
            ALLOCATORS,
        ),
        "version 2 chosen: the default allocator in the head as in version 1, then the five "
        "allocators served: two card nodes' dumb buffers, the system heap, udmabuf, memfd",
    ),
    Vector(
        "allocate_from_named",
        20,
        AllocateFrom(1920, 1080, formats.fourcc("NV12"), name="heap:system"),
        "one NV12 buffer from the allocator named heap:system",
    ),
    Vector(
        "allocate_from_usage",
        21,
        AllocateFrom(640, 480, formats.fourcc("XR24"), 2, USAGE_CPU, device="/dev/dri/renderD128"),
        "two XRGB8888 buffers the CPU maps and that import on /dev/dri/renderD128: the daemon "
        "chooses (with welcome_v2 and queried_v2: card0, the one allocator virtio_gpu imports)",
    ),
    Vector(
        "allocated_heap",
        20,
        Allocated(1, 0, (_buffer(4, 1920, 1080, "NV12"),), allocator=2),
        "answer to allocate_from_named: allocator 2 of welcome_v2's list, heap:system",
    ),
    Vector(
        "queried_v2",
        22,
        Queried(
            Backend.DRM,
            "virtio_gpu",
            (0, 1, 0),
            "/dev/dri/card0",
            16384,
            16384,
            1024,
            1 << 30,
            QUERY_FORMATS,
            (formats.MOD_LINEAR,),
            0,
            0,
            0,
            0,
            MATRIX,
        ),
        "answer to query in version 2: the import matrix, one row per render node, one result "
        "per allocator of welcome_v2's list (0: imported; 19 ENODEV; 22 EINVAL)",
    ),
    Vector(
        "error_no_allocator",
        20,
        Error(
            ErrorCode.NO_ALLOCATOR,
            0,
            "no allocator named 'heap:cma' (served: card0, card1, heap:system, udmabuf, memfd)",
        ),
        "ALLOCATE_FROM naming an allocator the daemon does not serve",
    ),
    Vector(
        "buffer_passed",
        0,
        Passed(Backend.DRM, _buffer(2, 1920, 1080, "NV12")),
        "peer to peer: the NV12 buffer of allocated_nv12, its dma-buf fd attached",
    ),
)


def _json(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_json(item) for item in value]
    if isinstance(value, enum.IntEnum):
        return int(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


def _direction(message: Message) -> str:
    if isinstance(message, Request):
        return "request"
    return "reply" if isinstance(message, Reply) else "peer"


def render() -> dict[str, bytes]:
    """Every file of the vectors folder by name, as it should be."""
    files = {}
    entries = []
    for vector in VECTORS:
        data = encode(vector.message, vector.serial)
        file = f"{vector.name}.bin"
        files[file] = data
        entries.append(
            {
                "name": vector.name,
                "file": file,
                "direction": _direction(vector.message),
                "opcode": int(vector.message.OPCODE),
                "message": vector.message.OPCODE.name,
                "serial": vector.serial,
                "nfds": vector.message.nfds,
                "length": len(data),
                "about": vector.about,
                "fields": _json(vector.message),
            }
        )
    index = {"description": DESCRIPTION, "protocol_version": VERSION, "vectors": entries}
    text = json.dumps(index, indent=2, ensure_ascii=False)
    text = _NUMBERS.sub(lambda m: "[" + ", ".join(m[1].replace(",", " ").split()) + "]", text)
    files[INDEX] = (text + "\n").encode("utf-8")
    return files


def _stale(expected: dict[str, bytes]) -> list[Path]:
    return sorted(p for p in OUT.glob("*.bin") if p.name not in expected)


def check(expected: dict[str, bytes]) -> list[str]:
    """Names of the files that are missing, different, or not expected at all."""
    wrong = [
        name
        for name, data in expected.items()
        if not (OUT / name).is_file() or (OUT / name).read_bytes() != data
    ]
    return sorted(wrong + [p.name for p in _stale(expected)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the files differ"
    )
    args = parser.parse_args(argv)
    expected = render()
    if args.check:
        wrong = check(expected)
        for name in wrong:
            print(f"out of date: {OUT.name}/{name}", file=sys.stderr)
        return 1 if wrong else 0
    OUT.mkdir(exist_ok=True)
    for path in _stale(expected):
        path.unlink()
    for name, data in expected.items():
        (OUT / name).write_bytes(data)
    print(f"wrote {len(expected)} files to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
