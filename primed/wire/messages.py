"""primed's messages as Python objects: frozen dataclasses, one per opcode.

Each class says once, in its ``WIRE`` mapping, how a field that is not simply
the wire field of the same name stands for the wire (see primed.wire.codec);
the layout itself is the construct declaration in primed.wire.schema, and the
codec of every class is derived from both when this module is imported.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from primed.wire import codec, schema
from primed.wire.codec import Enum, Flag, Group, Ints, Record, Records, Rename, Slots, Text
from primed.wire.schema import (
    MAX_FDS,
    MAX_NAME,
    MAX_RELEASE,
    MAX_TEXT,
    MAX_UIDS,
    Backend,
    Kind,
    Opcode,
)

#: SHARE flag: the token works for one OPEN_SHARED only.
SHARE_ONCE = 1
#: LIST's ``what``.
LIST_CLIENTS = 1
LIST_BUFFERS = 2
#: Usage bits (version 2): what an allocator's buffers serve, and what ALLOCATE_FROM asks.
#: A card node's dumb buffer, which KMS can scan out.
USAGE_SCANOUT = 1
#: Mapped and touched by the CPU.
USAGE_CPU = 2
#: Every usage bit defined.
USAGES = USAGE_SCANOUT | USAGE_CPU

_NAME = Text(MAX_NAME)
_VERSION = Group(("driver_major", "driver_minor", "driver_patch"))


class Message:
    """Base of every message. ``nfds`` is how many fds travel with it."""

    __slots__ = ()
    OPCODE: ClassVar[Opcode]
    #: How fields that are not simply the wire field of their name map to the wire.
    WIRE: ClassVar[dict[str, codec.Adapter]] = {}
    #: The codec derived from the schema and WIRE (set when this module is imported).
    CODEC: ClassVar[codec.Codec]

    @property
    def nfds(self) -> int:
        return 0


class Request(Message):
    __slots__ = ()


class Reply(Message):
    __slots__ = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Hello(Request):
    """The client's first message: the range of versions it speaks and its name."""

    OPCODE: ClassVar[Opcode] = Opcode.HELLO
    WIRE: ClassVar[dict[str, codec.Adapter]] = {"name": _NAME}
    min_version: int = schema.MIN_VERSION
    max_version: int = schema.VERSION
    name: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Allocate(Request):
    """Allocate ``count`` buffers of ``width`` x ``height`` in format ``fourcc``."""

    OPCODE: ClassVar[Opcode] = Opcode.ALLOCATE
    width: int
    height: int
    fourcc: int
    count: int = 1
    flags: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class AllocateFrom(Request):
    """Version 2: ALLOCATE from the allocator called ``name``, or (``name`` empty) from
    the first allocator whose buffers serve every ``usage`` bit and, if ``device`` (a
    render node, as QUERIED's import matrix names it) is given, import on it."""

    OPCODE: ClassVar[Opcode] = Opcode.ALLOCATE_FROM
    WIRE: ClassVar[dict[str, codec.Adapter]] = {"name": _NAME, "device": _NAME}
    width: int
    height: int
    fourcc: int
    count: int = 1
    usage: int = 0
    name: str = ""
    device: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Release(Request):
    """Drop the daemon's reference to the buffers with these ids."""

    OPCODE: ClassVar[Opcode] = Opcode.RELEASE
    WIRE: ClassVar[dict[str, codec.Adapter]] = {"ids": Ints(MAX_RELEASE)}
    ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Error(Reply):
    """A request failed. ``errno`` is the kernel's, or 0.

    A ``text`` longer than MAX_TEXT bytes is cut at a character when encoded: the
    server must always be able to say why.
    """

    OPCODE: ClassVar[Opcode] = Opcode.ERROR
    WIRE: ClassVar[dict[str, codec.Adapter]] = {"text": Text(MAX_TEXT, cut=True)}
    code: int
    errno: int
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class AllocatorInfo:
    """One allocator a version-2 daemon serves, as WELCOME lists it."""

    WIRE: ClassVar[dict[str, codec.Adapter]] = {
        "kind": Enum(Kind),
        "name": _NAME,
        "driver": _NAME,
        "driver_version": _VERSION,
        "node": _NAME,
    }
    name: str  #: e.g. "card0", "heap:system", "udmabuf", "memfd"
    kind: Kind
    usage: int  #: the USAGE_ bits its buffers serve
    driver: str
    driver_version: tuple[int, int, int]
    node: str  #: the device node it allocates from; "" for memfd

    @property
    def backend(self) -> Backend:
        """What its buffers' fds are: a sealed memfd, or a dma-buf."""
        return Backend.MEMFD if self.kind == Kind.MEMFD else Backend.DRM


@dataclasses.dataclass(frozen=True, slots=True)
class Welcome(Reply):
    """The server's answer to Hello: the version it chose, its backend, device and limits
    (those of its default allocator), and in version 2 every allocator it serves, the
    default first."""

    OPCODE: ClassVar[Opcode] = Opcode.WELCOME
    WIRE: ClassVar[dict[str, codec.Adapter]] = {
        "backend": Enum(Backend),
        "driver": _NAME,
        "driver_version": _VERSION,
        "node": _NAME,
        "allocators": Records(AllocatorInfo, 0, 2**16 - 1),
    }
    version: int
    backend: Backend
    max_width: int
    max_height: int
    max_size: int
    max_count: int
    driver: str = ""
    driver_version: tuple[int, int, int] = (0, 0, 0)
    node: str = ""
    allocators: tuple[AllocatorInfo, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class BufferInfo:
    """One buffer's identity and layout, as an ALLOCATED reply describes it."""

    WIRE: ClassVar[dict[str, codec.Adapter]] = {
        "planes": Slots("nplanes", ("offset", "pitch"), 1, 4)
    }
    id: int
    width: int
    height: int
    fourcc: int
    modifier: int
    size: int
    planes: tuple[tuple[int, int], ...]  #: (offset, pitch) of each plane


@dataclasses.dataclass(frozen=True, slots=True)
class Allocated(Reply):
    """Part of the answer to Allocate: buffers ``index`` .. ``index + len(buffers)`` of
    ``total``, each with its fd attached in the same order. ``allocator`` is the
    position in WELCOME's list of the allocator they come from (version 2; 0 in 1)."""

    OPCODE: ClassVar[Opcode] = Opcode.ALLOCATED
    WIRE: ClassVar[dict[str, codec.Adapter]] = {
        "buffers": Records(BufferInfo, 1, MAX_FDS, part_of=("index", "total"))
    }
    total: int
    index: int
    buffers: tuple[BufferInfo, ...]
    allocator: int = 0

    @property
    def nfds(self) -> int:
        return len(self.buffers)


@dataclasses.dataclass(frozen=True, slots=True)
class Released(Reply):
    """The answer to Release: how many buffers the daemon let go of."""

    OPCODE: ClassVar[Opcode] = Opcode.RELEASED
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class Share(Request):
    """Make a token for buffer ``id``; ``uids`` (if any) limits who may open it."""

    OPCODE: ClassVar[Opcode] = Opcode.SHARE
    WIRE: ClassVar[dict[str, codec.Adapter]] = {
        "once": Flag("flags", SHARE_ONCE),
        "uids": Ints(MAX_UIDS),
    }
    id: int
    once: bool = False
    uids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class OpenShared(Request):
    """Receive the buffer ``token`` names: an Allocated of one buffer, with id 0."""

    OPCODE: ClassVar[Opcode] = Opcode.OPEN_SHARED
    token: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Revoke(Request):
    """Make ``token`` (one of this client's) stop working."""

    OPCODE: ClassVar[Opcode] = Opcode.REVOKE
    token: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Shared(Reply):
    """The answer to Share."""

    OPCODE: ClassVar[Opcode] = Opcode.SHARED
    token: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Query(Request):
    """Ask what the server offers."""

    OPCODE: ClassVar[Opcode] = Opcode.QUERY


@dataclasses.dataclass(frozen=True, slots=True)
class Revoked(Reply):
    """The answer to Revoke."""

    OPCODE: ClassVar[Opcode] = Opcode.REVOKED


@dataclasses.dataclass(frozen=True, slots=True)
class FormatInfo:
    """A format as QUERIED describes it: bytes per pixel of each plane, chroma subsampling."""

    WIRE: ClassVar[dict[str, codec.Adapter]] = {"cpp": Slots("nplanes", ("cpp",), 1, 4)}
    fourcc: int
    cpp: tuple[int, ...]
    hsub: int = 1
    vsub: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceImports:
    """One row of the import matrix (QUERIED, version 2): a DRM render node, and for each
    allocator in WELCOME's order what importing one of its buffers there gave: 0 (it
    imported), or the kernel's errno."""

    WIRE: ClassVar[dict[str, codec.Adapter]] = {
        "node": _NAME,
        "driver": _NAME,
        "imports": Ints(2**16 - 1),
    }
    node: str
    driver: str
    imports: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Queried(Reply):
    """The answer to Query: backend, device, formats, modifiers, limits, quota and use;
    in version 2 also the import matrix, one row per render node."""

    OPCODE: ClassVar[Opcode] = Opcode.QUERIED
    WIRE: ClassVar[dict[str, codec.Adapter]] = {
        "backend": Enum(Backend),
        "driver": _NAME,
        "driver_version": _VERSION,
        "node": _NAME,
        "formats": Records(FormatInfo),
        "modifiers": Ints(2**16 - 1),  # as many as the u16 count holds
        "devices": Records(DeviceImports, 0, 2**16 - 1),
    }
    backend: Backend
    driver: str
    driver_version: tuple[int, int, int]
    node: str
    max_width: int
    max_height: int
    max_count: int
    max_size: int
    formats: tuple[FormatInfo, ...]
    modifiers: tuple[int, ...]
    quota_buffers: int  #: 0: no quota
    quota_bytes: int  #: 0: no quota
    used_buffers: int
    used_bytes: int
    devices: tuple[DeviceImports, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class List(Request):
    """One page of the clients (``what`` 1) or buffers (2) this client may see."""

    OPCODE: ClassVar[Opcode] = Opcode.LIST
    what: int
    start: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Stats(Request):
    """Ask for the daemon's counters."""

    OPCODE: ClassVar[Opcode] = Opcode.STATS


@dataclasses.dataclass(frozen=True, slots=True)
class OpenBuffer(Request):
    """Receive buffer ``id`` of client ``client`` (root or the admin group only)."""

    OPCODE: ClassVar[Opcode] = Opcode.OPEN_BUFFER
    client: int
    id: int


@dataclasses.dataclass(frozen=True, slots=True)
class ClientEntry:
    """A connected client, as LIST shows it."""

    WIRE: ClassVar[dict[str, codec.Adapter]] = {"held_bytes": Rename("bytes"), "name": _NAME}
    number: int
    pid: int
    uid: int
    gid: int
    since_ms: int
    buffers: int
    held_bytes: int
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class BufferEntry:
    """A live buffer, as LIST shows it."""

    client: int
    id: int
    width: int
    height: int
    fourcc: int
    size: int
    age_ms: int
    tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class Listed(Reply):
    """One page of a LIST: ``entries``, and where the next page starts (0: none)."""

    OPCODE: ClassVar[Opcode] = Opcode.LISTED
    WIRE: ClassVar[dict[str, codec.Adapter]] = {
        "entries": Records({LIST_CLIENTS: ClientEntry, LIST_BUFFERS: BufferEntry})
    }
    what: int
    next: int
    entries: tuple[ClientEntry, ...] | tuple[BufferEntry, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Statistics(Reply):
    """The answer to Stats. ``counters`` maps (kind, key) to a count: kind 1 requests
    by opcode, 2 errors by code, 3 events (1 bad messages, 2 refused connections)."""

    OPCODE: ClassVar[Opcode] = Opcode.STATISTICS
    WIRE: ClassVar[dict[str, codec.Adapter]] = {
        "held_bytes": Rename("bytes"),
        "counters": Records(tuple),
    }
    uptime_ms: int
    clients: int
    buffers: int
    held_bytes: int
    tokens: int
    counters: tuple[tuple[int, int, int], ...]  #: (kind, key, count)


@dataclasses.dataclass(frozen=True, slots=True)
class Passed(Message):
    """One buffer sent from peer to peer (primed.send_buffer), its fd attached."""

    OPCODE: ClassVar[Opcode] = Opcode.BUFFER
    WIRE: ClassVar[dict[str, codec.Adapter]] = {
        "backend": Enum(Backend),
        "buffer": Record(BufferInfo),
    }
    backend: Backend
    buffer: BufferInfo

    @property
    def nfds(self) -> int:
        return 1


REQUESTS: dict[int, type[Request]] = {
    c.OPCODE: c
    for c in (
        Hello, Allocate, Release, Share, OpenShared, Revoke, Query, List, Stats, OpenBuffer,
        AllocateFrom,
    )
}  # fmt: skip
REPLIES: dict[int, type[Reply]] = {
    c.OPCODE: c
    for c in (
        Error, Welcome, Allocated, Released, Shared, Revoked, Queried, Listed, Statistics,
    )
}  # fmt: skip
PEER: dict[int, type[Message]] = {Passed.OPCODE: Passed}

for _table in (REQUESTS, REPLIES, PEER):
    for _opcode, _cls in _table.items():
        _cls.CODEC = codec.derive(_cls, schema.BODIES[Opcode(_opcode)])
