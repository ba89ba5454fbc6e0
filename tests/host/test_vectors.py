"""The golden vectors in protocol/vectors: decode, encode and the construct schema all agree.

vectors.json is read here on its own terms (not through make_vectors.py), so a
vector that drifted from what its JSON says fails even if both were regenerated.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from primed.wire import protocol, schema
from primed.wire.protocol import (
    LIST_BUFFERS,
    LIST_CLIENTS,
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
    Revoke,
    Revoked,
    Share,
    Shared,
    Statistics,
    Stats,
    Welcome,
)
from primed.wire.schema import Backend, Kind, Opcode

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "protocol" / "vectors"
INDEX: list[dict[str, Any]] = json.loads((FOLDER / "vectors.json").read_text("utf-8"))["vectors"]
COMPILED = schema.MESSAGE.compile()

each_vector = pytest.mark.parametrize("entry", INDEX, ids=[e["name"] for e in INDEX])


def _buffer(fields: dict[str, Any]) -> BufferInfo:
    return BufferInfo(
        fields["id"],
        fields["width"],
        fields["height"],
        fields["fourcc"],
        fields["modifier"],
        fields["size"],
        tuple((offset, pitch) for offset, pitch in fields["planes"]),
    )


def _format(fields: dict[str, Any]) -> FormatInfo:
    return FormatInfo(fields["fourcc"], tuple(fields["cpp"]), fields["hsub"], fields["vsub"])


def _record(cls: type[ClientEntry | BufferEntry], fields: dict[str, Any]) -> Any:
    """A LISTED entry from its JSON record, which names every field and nothing else."""
    assert set(fields) == {field.name for field in dataclasses.fields(cls)}
    return cls(**fields)


def _entries(what: int, records: list[dict[str, Any]]) -> Any:
    cls = {LIST_CLIENTS: ClientEntry, LIST_BUFFERS: BufferEntry}[what]
    return tuple(_record(cls, r) for r in records)


def _allocator(fields: dict[str, Any]) -> AllocatorInfo:
    major, minor, patch = fields["driver_version"]
    return AllocatorInfo(
        fields["name"],
        Kind(fields["kind"]),
        fields["usage"],
        fields["driver"],
        (major, minor, patch),
        fields["node"],
    )


def _device(fields: dict[str, Any]) -> DeviceImports:
    return DeviceImports(fields["node"], fields["driver"], tuple(fields["imports"]))


def _token(text: str) -> bytes:
    assert text == text.lower()  # one spelling only: lower-case hex, as documented
    return bytes.fromhex(text)


def message_of(entry: dict[str, Any]) -> Message:
    """The message a vector's JSON describes."""
    f = entry["fields"]
    message: Message
    match Opcode(entry["opcode"]):
        case Opcode.HELLO:
            message = Hello(f["min_version"], f["max_version"], f["name"])
        case Opcode.ALLOCATE:
            message = Allocate(f["width"], f["height"], f["fourcc"], f["count"], f["flags"])
        case Opcode.ALLOCATE_FROM:
            message = AllocateFrom(
                f["width"], f["height"], f["fourcc"], f["count"], f["usage"], f["name"], f["device"]
            )
        case Opcode.RELEASE:
            message = Release(tuple(f["ids"]))
        case Opcode.ERROR:
            message = Error(f["code"], f["errno"], f["text"])
        case Opcode.WELCOME:
            major, minor, patch = f["driver_version"]
            message = Welcome(
                f["version"],
                Backend(f["backend"]),
                f["max_width"],
                f["max_height"],
                f["max_size"],
                f["max_count"],
                f["driver"],
                (major, minor, patch),
                f["node"],
                tuple(_allocator(a) for a in f["allocators"]),
            )
        case Opcode.ALLOCATED:
            buffers = tuple(_buffer(b) for b in f["buffers"])
            message = Allocated(f["total"], f["index"], buffers, f["allocator"])
        case Opcode.RELEASED:
            message = Released(f["count"])
        case Opcode.SHARE:
            message = Share(f["id"], f["once"], tuple(f["uids"]))
        case Opcode.OPEN_SHARED:
            message = OpenShared(_token(f["token"]))
        case Opcode.REVOKE:
            message = Revoke(_token(f["token"]))
        case Opcode.QUERY:
            message = Query()
        case Opcode.SHARED:
            message = Shared(_token(f["token"]))
        case Opcode.REVOKED:
            message = Revoked()
        case Opcode.QUERIED:
            major, minor, patch = f["driver_version"]
            message = Queried(
                Backend(f["backend"]),
                f["driver"],
                (major, minor, patch),
                f["node"],
                f["max_width"],
                f["max_height"],
                f["max_count"],
                f["max_size"],
                tuple(_format(r) for r in f["formats"]),
                tuple(f["modifiers"]),
                f["quota_buffers"],
                f["quota_bytes"],
                f["used_buffers"],
                f["used_bytes"],
                tuple(_device(d) for d in f["devices"]),
            )
        case Opcode.LIST:
            message = List(f["what"], f["start"])
        case Opcode.STATS:
            message = Stats()
        case Opcode.OPEN_BUFFER:
            message = OpenBuffer(f["client"], f["id"])
        case Opcode.LISTED:
            message = Listed(f["what"], f["next"], _entries(f["what"], f["entries"]))
        case Opcode.STATISTICS:
            message = Statistics(
                f["uptime_ms"],
                f["clients"],
                f["buffers"],
                f["held_bytes"],
                f["tokens"],
                tuple((kind, key, count) for kind, key, count in f["counters"]),
            )
        case Opcode.BUFFER:
            message = Passed(Backend(f["backend"]), _buffer(f["buffer"]))
    assert set(f) == {field.name for field in dataclasses.fields(message)}
    return message


def test_index_describes_its_keys() -> None:
    index = json.loads((FOLDER / "vectors.json").read_text("utf-8"))
    assert list(index) == ["description", "protocol_version", "vectors"]
    assert index["protocol_version"] == schema.VERSION
    described = set(re.findall(r"\b[a-z_]+\b", index["description"]))
    assert {"protocol_version", "vectors"} <= described
    assert set(INDEX[0]) <= described  # every key of an entry, "name" among them


def test_index_matches_the_folder() -> None:
    files = {e["file"] for e in INDEX}
    assert len(files) == len(INDEX)
    assert files == {p.name for p in FOLDER.glob("*.bin")}
    for entry in INDEX:
        assert entry["file"] == f"{entry['name']}.bin"


def test_vectors_cover_the_protocol() -> None:
    assert {e["opcode"] for e in INDEX} == set(Opcode)
    messages = [message_of(e) for e in INDEX]
    hellos = [m for m in messages if isinstance(m, Hello)]
    errors = [m for m in messages if isinstance(m, Error)]
    parts = [m for m in messages if isinstance(m, Allocated)]
    assert any(not m.name for m in hellos)
    assert any(m.errno and not m.text.isascii() for m in errors)
    assert any(m.index and len(m.buffers) > 1 for m in parts)
    plane_counts = {len(b.planes) for m in parts for b in m.buffers}
    assert {1, 2, 3} <= plane_counts
    shares = [m for m in messages if isinstance(m, Share)]
    assert any(m.once and len(m.uids) > 1 for m in shares)
    assert any(not m.once and not m.uids for m in shares)
    queried = [m for m in messages if isinstance(m, Queried)]
    assert {m.backend for m in queried} == set(Backend)
    assert any(m.quota_buffers and m.quota_bytes and m.used_buffers for m in queried)
    assert any(not m.quota_buffers and not m.quota_bytes for m in queried)
    assert {len(f.cpp) for m in queried for f in m.formats} >= {1, 2, 3}
    assert all(m.modifiers == (0,) for m in queried)
    # Version 2: an allocator list, an allocator named and chosen by usage, the matrix.
    welcomes = [m for m in messages if isinstance(m, Welcome)]
    assert any(not m.allocators for m in welcomes) and any(m.version == 1 for m in welcomes)
    assert {a.kind for m in welcomes for a in m.allocators} == set(Kind)
    assert any(m.allocator for m in parts)
    chosen = [m for m in messages if isinstance(m, AllocateFrom)]
    assert any(m.name and not m.usage for m in chosen)
    assert any(not m.name and m.usage and m.device for m in chosen)
    rows = [d for m in queried for d in m.devices]
    assert any(0 in d.imports for d in rows) and any(any(d.imports) for d in rows)
    # A token travels as it was handed out: the one SHARED gives is the one opened and revoked.
    tokens = {m.token for m in messages if isinstance(m, Shared | OpenShared | Revoke)}
    assert len(tokens) == 1
    assert all(len(t) == schema.TOKEN_SIZE for t in tokens)

    lists = [m for m in messages if isinstance(m, List)]
    assert {m.what for m in lists} == {LIST_CLIENTS, LIST_BUFFERS}
    assert any(m.start for m in lists)
    pages = [m for m in messages if isinstance(m, Listed)]
    names = [e.name for m in pages for e in m.entries if isinstance(e, ClientEntry)]
    assert "" in names
    assert any(not name.isascii() for name in names)
    assert any(m.what == LIST_BUFFERS and m.next and m.entries for m in pages)
    assert any(not m.next for m in pages)
    statistics = [m for m in messages if isinstance(m, Statistics)]
    counters = {(kind, key) for m in statistics for kind, key, _ in m.counters}
    assert sum(kind == 1 for kind, _ in counters) > 1
    assert sum(kind == 2 for kind, _ in counters) > 1
    assert {(3, 1), (3, 2)} <= counters


def test_listed_entries_are_in_order() -> None:
    # Clients by number; buffers by their owner's number, then in the order allocated.
    for message in (message_of(e) for e in INDEX):
        if isinstance(message, Listed):
            keys = [
                e.number if isinstance(e, ClientEntry) else (e.client, e.id)
                for e in message.entries
            ]
            assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_directions() -> None:
    peers = [e for e in INDEX if e["direction"] == "peer"]
    assert peers
    assert all((e["serial"], e["nfds"]) == (0, 1) for e in peers)
    tables: dict[str, set[int]] = {
        "request": set(protocol.REQUESTS),
        "reply": set(protocol.REPLIES),
        "peer": set(protocol.PEER),
    }
    for entry in INDEX:
        assert entry["opcode"] in tables[entry["direction"]], entry["name"]


@each_vector
def test_decode(entry: dict[str, Any]) -> None:
    data = (FOLDER / entry["file"]).read_bytes()
    assert len(data) == entry["length"]
    serial, message = protocol.decode(data, entry["nfds"], entry["direction"])
    assert serial == entry["serial"]
    assert message == message_of(entry)
    assert (message.OPCODE, message.OPCODE.name) == (entry["opcode"], entry["message"])
    assert message.nfds == entry["nfds"]


@each_vector
def test_encode(entry: dict[str, Any]) -> None:
    data = (FOLDER / entry["file"]).read_bytes()
    assert protocol.encode(message_of(entry), entry["serial"]) == data


@pytest.mark.parametrize("parser", [schema.MESSAGE, COMPILED], ids=["plain", "compiled"])
@each_vector
def test_schema_parses_and_rebuilds(entry: dict[str, Any], parser: Any) -> None:
    data = (FOLDER / entry["file"]).read_bytes()
    parsed = parser.parse(data)
    header = parsed.header
    assert (header.opcode, header.nfds, header.size, header.serial) == (
        entry["opcode"],
        entry["nfds"],
        len(data) - protocol.HEADER_SIZE,
        entry["serial"],
    )
    assert parser.build(parsed) == data


@each_vector
def test_documented(entry: dict[str, Any]) -> None:
    assert f"`{entry['file']}`" in (ROOT / "protocol" / "PROTOCOL.md").read_text("utf-8")


_DUMP = re.compile(r"`(\w+\.bin)` \((\d+) bytes")
_HEX = re.compile(r"[0-9a-f]{2}")


def _dumps() -> dict[str, tuple[int, bytes]]:
    """PROTOCOL.md's byte-by-byte examples: file -> (length said, bytes shown).

    An example is a paragraph that names the file and its length, then an indented block
    whose lines start with the bytes in hex, then say what they are.
    """
    lines = (ROOT / "protocol" / "PROTOCOL.md").read_text("utf-8").splitlines()
    found = {}
    for number, line in enumerate(lines):
        if not (start := _DUMP.search(line)):
            continue
        rows = itertools.dropwhile(lambda row: not row.startswith("    "), lines[number + 1 :])
        shown = bytearray()
        for row in itertools.takewhile(lambda row: row.startswith("    "), rows):
            for word in row.split():
                if not _HEX.fullmatch(word):
                    break
                shown.append(int(word, 16))
        found[start[1]] = (int(start[2]), bytes(shown))
    return found


def test_byte_by_byte_examples() -> None:
    dumps = _dumps()
    assert len(dumps) >= 4
    for file, (length, shown) in dumps.items():
        data = (FOLDER / file).read_bytes()
        assert (length, shown) == (len(data), data), file


def test_make_vectors_check() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protocol" / "make_vectors.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
