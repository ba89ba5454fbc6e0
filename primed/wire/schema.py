"""The wire format, declared with construct: the normative schema of every message.

protocol/PROTOCOL.md describes the same bytes in prose. Both directions are
little-endian. Each message is one SOCK_SEQPACKET datagram: a 12-byte header,
then a body whose layout the opcode selects. Every body is a fixed head, then
(for some messages) an array of fixed records or length-prefixed strings, and
nothing after that.

This module holds declarations only, and it is the only place a layout is
written. The hot path (:mod:`primed.wire.codec`) is derived from these very
declarations at import time: ``struct`` formats for the fixed heads and records,
which head field counts which tail, the Const checks, the Check rules. construct
itself costs more per message than the kernel's whole round trip; the tests check
that both agree byte for byte.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from typing import Any

from construct import (
    Array,
    Bytes,
    Check,
    Const,
    Int8ul,
    Int16ul,
    Int32sl,
    Int32ul,
    Int64ul,
    Struct,
    Switch,
    Terminated,
    this,
)
from construct import Error as Refuse

#: The newest protocol version this side speaks (PROTOCOL.md: "Versions").
VERSION = 2
#: The oldest: a version-1 client is served as it always was.
MIN_VERSION = 1
#: The largest datagram either side sends or accepts, header included.
MAX_MESSAGE = 65536
#: SCM_MAX_FD: the kernel passes at most this many fds in one message.
MAX_FDS = 253
#: Longest client name, driver name and node path, in bytes of UTF-8.
MAX_NAME = 255
#: Longest Error text, in bytes of UTF-8.
MAX_TEXT = 1024
#: Most buffer ids one Release may carry.
MAX_RELEASE = 4096
#: Most uids a SHARE may name.
MAX_UIDS = 64
#: Bytes in a share token: 128 random bits.
TOKEN_SIZE = 16


class Opcode(enum.IntEnum):
    """Message types. Requests are below 0x8000, replies at 0x8000 and above."""

    #: Client -> server, first message: the versions the client speaks, its name.
    HELLO = 0x0001
    #: Client -> server: allocate ``count`` buffers of one size and format.
    ALLOCATE = 0x0002
    #: Client -> server: give up the daemon's reference to some buffers.
    RELEASE = 0x0003
    #: Client -> server: make a token that lets other clients open one of our buffers.
    SHARE = 0x0004
    #: Client -> server: receive the buffer a token names (an ALLOCATED of one, id 0).
    OPEN_SHARED = 0x0005
    #: Client -> server: make one of our tokens stop working.
    REVOKE = 0x0006
    #: Client -> server: what the server offers (formats, modifiers, limits, our quota use).
    QUERY = 0x0007
    #: Client -> server: one page of the live clients or buffers this client may see.
    LIST = 0x0008
    #: Client -> server: the daemon's counters.
    STATS = 0x0009
    #: Client -> server, root or the admin group only: receive any client's buffer by id.
    OPEN_BUFFER = 0x000A
    #: Client -> server, version 2: ALLOCATE from a named allocator, or one fit for a usage.
    ALLOCATE_FROM = 0x000B
    #: Peer -> peer, never to or from the daemon: one buffer passed directly. Carries one fd.
    BUFFER = 0x0100
    #: Server -> client: a request failed. Carries no fds.
    ERROR = 0x8000
    #: Server -> client: answer to HELLO: chosen version, backend, device, limits.
    WELCOME = 0x8001
    #: Server -> client: answer to ALLOCATE, possibly in parts. Carries one fd per buffer.
    ALLOCATED = 0x8002
    #: Server -> client: answer to RELEASE.
    RELEASED = 0x8003
    #: Server -> client: answer to SHARE: the token.
    SHARED = 0x8004
    #: Server -> client: answer to REVOKE.
    REVOKED = 0x8005
    #: Server -> client: answer to QUERY.
    QUERIED = 0x8006
    #: Server -> client: answer to LIST.
    LISTED = 0x8007
    #: Server -> client: answer to STATS.
    STATISTICS = 0x8008


class Backend(enum.IntEnum):
    """Where the server's buffers come from."""

    #: DRM dumb buffers exported as dma-buf fds.
    DRM = 1
    #: Sealed memfds: CPU-only sharing, no GEM handle can be made from them.
    MEMFD = 2


class Kind(enum.IntEnum):
    """What an allocator is (WELCOME's allocator list, version 2)."""

    #: Dumb buffers of a DRM card node, exported with PRIME: dma-bufs that can be scanned out.
    DUMB = 1
    #: A dma-buf heap (/dev/dma_heap/NAME): dma-bufs of plain memory.
    HEAP = 2
    #: udmabuf (/dev/udmabuf): dma-bufs made of sealed memfds' pages.
    UDMABUF = 3
    #: Sealed memfds: CPU-only, no dma-buf.
    MEMFD = 4


HEADER = Struct(
    "opcode" / Int16ul,
    "nfds" / Int16ul,  # number of fds attached to this datagram
    "size" / Int32ul,  # bytes of body after the header
    "serial" / Int32ul,  # request id; a reply repeats its request's
)

HELLO_HEAD = Struct(
    "min_version" / Int16ul,
    "max_version" / Int16ul,
    "flags" / Const(0, Int32ul),
    "name_len" / Int16ul,
    "reserved" / Const(0, Int16ul),
)
ALLOCATE_HEAD = Struct(
    "width" / Int32ul,
    "height" / Int32ul,
    "fourcc" / Int32ul,
    "count" / Int32ul,
    "flags" / Int32ul,
)
RELEASE_HEAD = Struct(
    "count" / Int32ul,
    "reserved" / Const(0, Int32ul),
)
ERROR_HEAD = Struct(
    "code" / Int32ul,
    "errno" / Int32sl,
    "text_len" / Int16ul,
    "reserved" / Const(0, Int16ul),
)
WELCOME_HEAD = Struct(
    "version" / Int16ul,
    "backend" / Int16ul,
    "nallocators" / Int16ul,  # version 2: the allocator list; always 0 in version 1
    "reserved" / Const(0, Int16ul),
    "max_width" / Int32ul,
    "max_height" / Int32ul,
    "max_size" / Int64ul,
    "max_count" / Int32ul,
    "driver_major" / Int32ul,
    "driver_minor" / Int32ul,
    "driver_patch" / Int32ul,
    "driver_len" / Int16ul,
    "node_len" / Int16ul,
)
# One allocator of WELCOME's list (version 2). The first is the default: the one a
# version-1 client, and ALLOCATE in any version, allocates from.
ALLOCATOR = Struct(
    "kind" / Int16ul,  # a Kind
    "usage" / Int16ul,  # the USAGE_ bits its buffers serve
    "driver_major" / Int32ul,
    "driver_minor" / Int32ul,
    "driver_patch" / Int32ul,
    "name_len" / Int16ul,
    "driver_len" / Int16ul,
    "node_len" / Int16ul,
    "reserved" / Const(0, Int16ul),
    "name" / Bytes(this.name_len),
    "driver" / Bytes(this.driver_len),
    "node" / Bytes(this.node_len),
)
ALLOCATED_HEAD = Struct(
    "total" / Int32ul,  # buffers in the whole reply
    "index" / Int32ul,  # position of this part's first buffer in the whole
    "count" / Int32ul,  # buffers (and fds) in this part
    "allocator" / Int16ul,  # version 2: its position in WELCOME's list; always 0 in version 1
    "reserved" / Const(0, Int16ul),
)
ALLOCATE_FROM_HEAD = Struct(
    "width" / Int32ul,
    "height" / Int32ul,
    "fourcc" / Int32ul,
    "count" / Int32ul,
    "usage" / Int32ul,  # USAGE_ bits the allocator must serve
    "name_len" / Int16ul,  # 0: the daemon chooses
    "device_len" / Int16ul,  # 0: no import asked for; else a render node, as QUERIED names it
)
# One buffer of an ALLOCATED reply; its fd is the one at the same position.
BUFFER = Struct(
    "id" / Int64ul,
    "width" / Int32ul,
    "height" / Int32ul,
    "fourcc" / Int32ul,
    "nplanes" / Int32ul,
    "modifier" / Int64ul,
    "size" / Int64ul,
    "offset0" / Int32ul,
    "pitch0" / Int32ul,
    "offset1" / Int32ul,
    "pitch1" / Int32ul,
    "offset2" / Int32ul,
    "pitch2" / Int32ul,
    "offset3" / Int32ul,
    "pitch3" / Int32ul,
)
RELEASED_HEAD = Struct(
    "count" / Int32ul,
    "reserved" / Const(0, Int32ul),
)
SHARE_HEAD = Struct(
    "id" / Int64ul,
    "flags" / Int32ul,  # bit 0: the token works once
    "nuids" / Int32ul,  # 0: any client may open it; else only these uids
)
TOKEN_HEAD = Struct("token" / Bytes(TOKEN_SIZE))  # OPEN_SHARED, REVOKE, SHARED
EMPTY_HEAD = Struct()  # QUERY, REVOKED
QUERIED_HEAD = Struct(
    "backend" / Int16ul,
    "nformats" / Int16ul,
    "nmodifiers" / Int16ul,
    "ndevices" / Int16ul,  # version 2: the import matrix's rows; always 0 in version 1
    "driver_major" / Int32ul,
    "driver_minor" / Int32ul,
    "driver_patch" / Int32ul,
    "max_width" / Int32ul,
    "max_height" / Int32ul,
    "max_count" / Int32ul,
    "max_size" / Int64ul,
    "quota_buffers" / Int64ul,  # the tightest of the client's and its uid's quotas; 0: none
    "quota_bytes" / Int64ul,
    "used_buffers" / Int64ul,  # what this client holds now
    "used_bytes" / Int64ul,
    "driver_len" / Int16ul,
    "node_len" / Int16ul,
)
# One format of a QUERIED reply: its plane layout rule (see primed/formats.py).
FORMAT = Struct(
    "fourcc" / Int32ul,
    "nplanes" / Int8ul,
    "hsub" / Int8ul,
    "vsub" / Int8ul,
    "reserved" / Const(0, Int8ul),
    "cpp0" / Int8ul,
    "cpp1" / Int8ul,
    "cpp2" / Int8ul,
    "cpp3" / Int8ul,
)
# One row of QUERIED's import matrix (version 2): a DRM render node, and what importing a
# buffer of each allocator (in WELCOME's order) on it gave: 0, or the kernel's errno.
DEVICE = Struct(
    "node_len" / Int16ul,
    "driver_len" / Int16ul,
    "nimports" / Int16ul,
    "reserved" / Const(0, Int16ul),
    "node" / Bytes(this.node_len),
    "driver" / Bytes(this.driver_len),
    "imports" / Array(this.nimports, Int32ul),
)
LIST_HEAD = Struct(
    "what" / Int16ul,  # 1: clients, 2: buffers
    "reserved" / Const(0, Int16ul),
    "start" / Int32ul,  # 0, then the previous page's "next"
)
OPEN_BUFFER_HEAD = Struct(
    "client" / Int32ul,  # the owner's client number, as LIST shows it
    "reserved" / Const(0, Int32ul),
    "id" / Int64ul,
)
LISTED_HEAD = Struct(
    "what" / Int16ul,
    "count" / Int16ul,  # entries in this page
    "next" / Int32ul,  # where the next page starts; 0: this was the last
)
CLIENT_ENTRY = Struct(
    "number" / Int32ul,
    "pid" / Int32sl,
    "uid" / Int32ul,
    "gid" / Int32ul,
    "since_ms" / Int64ul,  # connect time, milliseconds since the Unix epoch
    "buffers" / Int32ul,
    "name_len" / Int16ul,  # the name's bytes follow the entry
    "reserved" / Const(0, Int16ul),
    "bytes" / Int64ul,
)
BUFFER_ENTRY = Struct(
    "client" / Int32ul,  # the owner's client number
    "tokens" / Int32ul,  # live share tokens
    "id" / Int64ul,
    "width" / Int32ul,
    "height" / Int32ul,
    "fourcc" / Int32ul,
    "reserved" / Const(0, Int32ul),
    "size" / Int64ul,
    "age_ms" / Int64ul,
)
STATISTICS_HEAD = Struct(
    "uptime_ms" / Int64ul,
    "clients" / Int32ul,
    "buffers" / Int32ul,
    "bytes" / Int64ul,
    "tokens" / Int32ul,
    "ncounters" / Int32ul,
)
# One counter of STATISTICS: requests by opcode (kind 1), errors by code (kind 2),
# and events (kind 3: 1 bad messages, 2 refused connections).
COUNTER = Struct(
    "kind" / Int16ul,
    "key" / Int16ul,
    "reserved" / Const(0, Int32ul),
    "count" / Int64ul,
)
# A buffer passed from peer to peer (BUFFER): where its fd came from, and its layout.
PASSED_HEAD = Struct(
    "backend" / Int16ul,
    "reserved" / Const(0, Int16ul),
)

#: Each opcode's whole body.
BODIES: dict[Opcode, Any] = {
    Opcode.HELLO: Struct(*HELLO_HEAD.subcons, "name" / Bytes(this.name_len), Terminated),
    Opcode.ALLOCATE: Struct(*ALLOCATE_HEAD.subcons, Terminated),
    Opcode.RELEASE: Struct(*RELEASE_HEAD.subcons, "ids" / Array(this.count, Int64ul), Terminated),
    Opcode.ERROR: Struct(*ERROR_HEAD.subcons, "text" / Bytes(this.text_len), Terminated),
    Opcode.WELCOME: Struct(
        *WELCOME_HEAD.subcons,
        "driver" / Bytes(this.driver_len),
        "node" / Bytes(this.node_len),
        "allocators" / Array(this.nallocators, ALLOCATOR),
        Terminated,
    ),
    Opcode.ALLOCATE_FROM: Struct(
        *ALLOCATE_FROM_HEAD.subcons,
        "name" / Bytes(this.name_len),
        "device" / Bytes(this.device_len),
        Terminated,
    ),
    Opcode.ALLOCATED: Struct(
        *ALLOCATED_HEAD.subcons, "buffers" / Array(this.count, BUFFER), Terminated
    ),
    Opcode.RELEASED: Struct(*RELEASED_HEAD.subcons, Terminated),
    Opcode.SHARE: Struct(*SHARE_HEAD.subcons, "uids" / Array(this.nuids, Int32ul), Terminated),
    Opcode.OPEN_SHARED: Struct(*TOKEN_HEAD.subcons, Terminated),
    Opcode.REVOKE: Struct(*TOKEN_HEAD.subcons, Terminated),
    Opcode.QUERY: Struct(Terminated),
    Opcode.SHARED: Struct(*TOKEN_HEAD.subcons, Terminated),
    Opcode.REVOKED: Struct(Terminated),
    Opcode.QUERIED: Struct(
        *QUERIED_HEAD.subcons,
        "formats" / Array(this.nformats, FORMAT),
        "modifiers" / Array(this.nmodifiers, Int64ul),
        "driver" / Bytes(this.driver_len),
        "node" / Bytes(this.node_len),
        "devices" / Array(this.ndevices, DEVICE),
        Terminated,
    ),
    Opcode.LIST: Struct(*LIST_HEAD.subcons, Terminated),
    Opcode.STATS: Struct(Terminated),
    Opcode.OPEN_BUFFER: Struct(*OPEN_BUFFER_HEAD.subcons, Terminated),
    Opcode.LISTED: Struct(
        *LISTED_HEAD.subcons,
        Check((this.what == 1) | (this.what == 2)),  # a page of no entries has a kind too
        "entries"
        / Array(
            this.count,
            Switch(
                this.what,
                {1: Struct(*CLIENT_ENTRY.subcons, "name" / Bytes(this.name_len)), 2: BUFFER_ENTRY},
                default=Refuse,
            ),
        ),
        Terminated,
    ),
    Opcode.STATISTICS: Struct(
        *STATISTICS_HEAD.subcons, "counters" / Array(this.ncounters, COUNTER), Terminated
    ),
    Opcode.BUFFER: Struct(*PASSED_HEAD.subcons, "buffer" / BUFFER, Terminated),
}

#: A whole datagram. Unknown opcodes fail to parse.
MESSAGE = Struct(
    "header" / HEADER,
    "body" / Switch(this.header.opcode, {int(k): v for k, v in BODIES.items()}, default=Refuse),
)


@dataclasses.dataclass(frozen=True, slots=True)
class Field:
    """One fixed-size field of a Struct: its name, ``struct`` code and required value."""

    name: str
    code: str  # a ``struct`` format code without the byte-order prefix, e.g. "I" or "16s"
    const: int | None  # the value a Const field must hold; None: any
    length: int | None  # for Bytes: the byte count; None: an integer


def field(sub: Any) -> Field:
    """Describe one subcon of a Struct as a fixed-size field.

    Only named little-endian FormatFields (optionally wrapped in Const) and Bytes
    of a constant length are fixed fields: anything else raises TypeError.
    """
    name, inner, const = sub.name, getattr(sub, "subcon", sub), None  # unnamed: no subcon
    if isinstance(inner, Const):
        const, inner = inner.value, inner.subcon
    fmtstr, length = getattr(inner, "fmtstr", None), None
    if isinstance(inner, Bytes) and isinstance(inner.length, int):
        fmtstr, length = f"<{inner.length}s", inner.length
    if not name or not fmtstr or fmtstr[0] != "<":
        raise TypeError(f"{name!r} is not a named little-endian integer field")
    return Field(name, fmtstr[1:], const, length)


@dataclasses.dataclass(frozen=True, slots=True)
class Fixed:
    """A construct Struct of plain integer fields, as one ``struct.Struct``."""

    packer: struct.Struct
    names: tuple[str, ...]
    consts: tuple[tuple[int, int], ...]  # (field position, required value)

    @property
    def size(self) -> int:
        return self.packer.size


def fixed(declaration: Any) -> Fixed:
    """Derive the ``struct`` format of a construct Struct of fixed-size fields.

    Raises TypeError (see :func:`field`) for any subcon that is not a fixed field,
    so the schema can't drift from the fast path unseen.
    """
    fields = [field(sub) for sub in declaration.subcons]
    return Fixed(
        struct.Struct("<" + "".join(f.code for f in fields)),
        tuple(f.name for f in fields),
        tuple((i, f.const) for i, f in enumerate(fields) if f.const is not None),
    )
