"""primed.wire.protocol against its schema: round trips, byte-for-byte agreement, refusals."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import struct
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import construct
import pytest
from hypothesis import given
from hypothesis import strategies as st

from primed.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from primed.wire import codec, protocol, schema
from primed.wire.protocol import (
    HEADER_SIZE,
    LIST_BUFFERS,
    LIST_CLIENTS,
    Allocate,
    Allocated,
    BufferEntry,
    BufferInfo,
    ClientEntry,
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
    UnknownOpcode,
    Welcome,
)
from primed.wire.schema import (
    MAX_FDS,
    MAX_MESSAGE,
    MAX_NAME,
    MAX_RELEASE,
    MAX_TEXT,
    MAX_UIDS,
    TOKEN_SIZE,
    Backend,
    Opcode,
)

Kind = Literal["request", "reply", "peer"]
KINDS: tuple[Kind, ...] = ("request", "reply", "peer")
#: The opcodes each kind of receiver knows.
TABLES: dict[Kind, Mapping[int, type[Message]]] = {
    "request": protocol.REQUESTS,
    "reply": protocol.REPLIES,
    "peer": protocol.PEER,
}

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "protocol" / "vectors"
VECTORS: list[tuple[str, bytes, int, Kind]] = [
    (e["name"], (FOLDER / e["file"]).read_bytes(), e["nfds"], e["direction"])
    for e in json.loads((FOLDER / "vectors.json").read_text("utf-8"))["vectors"]
]
COMPILED = schema.MESSAGE.compile()
# Written out here rather than taken from the schema, so that a change there shows up here.
_HEADER = struct.Struct("<HHII")
RECORD = 72
FORMAT_RECORD = 12
QUERIED_HEAD_SIZE = 76
LISTED_HEAD_SIZE = 8
CLIENT_ENTRY = 40  # then the client's name
BUFFER_ENTRY = 48
STATISTICS_HEAD_SIZE = 32
COUNTER = 16
BAD_UTF8 = [b"\xff", b"\xc3", b"a\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]

each_vector = pytest.mark.parametrize(
    ("data", "nfds", "kind"), [v[1:] for v in VECTORS], ids=[v[0] for v in VECTORS]
)


# Strategies: every field over its whole range, strings up to their byte limit.

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
kinds: st.SearchStrategy[Kind] = st.sampled_from(KINDS)


def utf8(limit: int) -> st.SearchStrategy[str]:
    """Text of at most ``limit`` bytes of UTF-8, often right at the limit."""
    return st.text(max_size=limit).map(lambda s: s.encode()[:limit].decode("utf-8", "ignore"))


hellos = st.builds(Hello, u16, u16, utf8(MAX_NAME))
allocates = st.builds(Allocate, u32, u32, u32, u32, u32)
releases = st.builds(Release, st.lists(u64, max_size=64).map(tuple))
errors = st.builds(Error, u32, i32, utf8(MAX_TEXT))
welcomes = st.builds(
    Welcome,
    u16,
    st.sampled_from(Backend),
    u32,
    u32,
    u64,
    u32,
    utf8(MAX_NAME),
    st.tuples(u32, u32, u32),
    utf8(MAX_NAME),
)
planes = st.lists(st.tuples(u32, u32), min_size=1, max_size=4).map(tuple)
buffers = st.builds(BufferInfo, u64, u32, u32, u32, u64, u64, planes)


@st.composite
def allocateds(draw: st.DrawFn) -> Allocated:
    part = tuple(draw(st.lists(buffers, min_size=1, max_size=8)))
    index = draw(st.integers(0, 2**32 - 1 - len(part)))
    return Allocated(draw(st.integers(index + len(part), 2**32 - 1)), index, part)


releaseds = st.builds(Released, u32)
tokens = st.binary(min_size=TOKEN_SIZE, max_size=TOKEN_SIZE)
shares = st.builds(Share, u64, st.booleans(), st.lists(u32, max_size=MAX_UIDS).map(tuple))
open_shareds = st.builds(OpenShared, tokens)
revokes = st.builds(Revoke, tokens)
shareds = st.builds(Shared, tokens)
format_infos = st.builds(FormatInfo, u32, st.lists(u8, min_size=1, max_size=4).map(tuple), u8, u8)
querieds = st.builds(
    Queried,
    st.sampled_from(Backend),
    utf8(MAX_NAME),
    st.tuples(u32, u32, u32),
    utf8(MAX_NAME),
    u32,
    u32,
    u32,
    u64,
    st.lists(format_infos, max_size=32).map(tuple),
    st.lists(u64, max_size=8).map(tuple),
    u64,
    u64,
    u64,
    u64,
)
lists = st.builds(List, u16, u32)
open_buffers = st.builds(OpenBuffer, u32, u64)
client_entries = st.builds(ClientEntry, u32, i32, u32, u32, u64, u32, u64, utf8(MAX_NAME))
buffer_entries = st.builds(BufferEntry, u32, u64, u32, u32, u32, u64, u64, u32)
listeds = st.builds(
    Listed, st.just(LIST_CLIENTS), u32, st.lists(client_entries, max_size=8).map(tuple)
) | st.builds(Listed, st.just(LIST_BUFFERS), u32, st.lists(buffer_entries, max_size=8).map(tuple))
statisticses = st.builds(
    Statistics, u64, u32, u32, u64, u32, st.lists(st.tuples(u16, u16, u64), max_size=32).map(tuple)
)
passeds = st.builds(Passed, st.sampled_from(Backend), buffers)
messages = st.one_of(
    hellos,
    allocates,
    releases,
    errors,
    welcomes,
    allocateds(),
    releaseds,
    shares,
    open_shareds,
    revokes,
    st.just(Query()),
    shareds,
    st.just(Revoked()),
    querieds,
    lists,
    st.just(Stats()),
    open_buffers,
    listeds,
    statisticses,
    passeds,
)


def kind_of(message: Message) -> Kind:
    if isinstance(message, Request):
        return "request"
    return "reply" if isinstance(message, Reply) else "peer"


# The construct schema's view of a message: derived from the declaration and each class's
# WIRE mapping, read here on their own terms (not through primed.wire.codec), so that the
# codec's reading of them is checked against construct's. The golden vectors
# (test_vectors.py) stay the independent check of both.

_THIS = re.compile(r"this\['(\w+)'\]")
ALL_CLASSES: dict[int, type[Message]] = {**protocol.REQUESTS, **protocol.REPLIES, **protocol.PEER}


def _field_of(expr: Any) -> str:
    """The field a construct expression such as ``this.count`` reads."""
    found = _THIS.fullmatch(repr(expr))
    assert found, expr
    return found[1]


def _sub(declaration: Any, name: str) -> Any:
    return next(sub.subcon for sub in declaration.subcons if sub.name == name)


def _length_of(declaration: Any, name: str) -> str:
    """The field that gives the length (of Bytes) or count (of an Array) of tail ``name``."""
    tail = _sub(declaration, name)
    return _field_of(tail.length if isinstance(tail, construct.Bytes) else tail.count)


def _element(declaration: Any, name: str, fields: Mapping[str, Any]) -> Any:
    """The Struct of each record of tail ``name``; a Switch's case is chosen from ``fields``."""
    inner = _sub(declaration, name)
    inner = inner.subcon if isinstance(inner, construct.Array) else inner
    if isinstance(inner, construct.Switch):
        return inner.cases[fields[_field_of(inner.keyfunc)]]
    return inner


def _non_const(declaration: Any) -> list[str]:
    return [s.name for s in declaration.subcons if not isinstance(s.subcon, construct.Const)]


def to_fields(obj: Any, declaration: Any) -> dict[str, Any]:
    """What ``declaration.build`` takes to make the bytes of ``obj``."""
    if isinstance(obj, tuple):  # a record as its non-Const fields
        return dict(zip(_non_const(declaration), obj, strict=True))
    mapping = getattr(type(obj), "WIRE", {})
    out: dict[str, Any] = {}
    for field in dataclasses.fields(obj):
        name, value = field.name, getattr(obj, field.name)
        match mapping.get(name):
            case None:
                out[name] = value
            case codec.Rename(wire):
                out[wire] = value
            case codec.Enum():
                out[name] = int(value)
            case codec.Group(wires):
                out.update(zip(wires, value, strict=True))
            case codec.Flag(wire, bit):
                out[wire] = bit if value else 0
            case codec.Slots(count, names, _, high):
                out[count] = len(value)
                for i in range(high):
                    parts = value[i] if i < len(value) else (0,) * len(names)
                    parts = parts if len(names) > 1 else (parts,) if i < len(value) else (0,)
                    out.update({f"{n}{i}": part for n, part in zip(names, parts, strict=True)})
            case codec.Text(limit, cut):
                raw = value.encode()
                if cut:
                    raw = raw[:limit].decode("utf-8", "ignore").encode()
                out[name], out[_length_of(declaration, name)] = raw, len(raw)
            case codec.Ints():
                out[name], out[_length_of(declaration, name)] = list(value), len(value)
            case codec.Records():
                element = _element(declaration, name, out)
                out[name] = [to_fields(item, element) for item in value]
                out[_length_of(declaration, name)] = len(value)
            case codec.Record():
                out[name] = to_fields(value, _element(declaration, name, out))
    return out


def from_fields(fields: Any, cls: Any, declaration: Any) -> Any:
    """The object of class ``cls`` that ``declaration.parse`` returned ``fields`` for."""
    if cls is tuple:
        return tuple(fields[name] for name in _non_const(declaration))
    mapping = getattr(cls, "WIRE", {})
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        name = field.name
        match mapping.get(name):
            case None:
                values[name] = fields[name]
            case codec.Rename(wire):
                values[name] = fields[wire]
            case codec.Enum(of):
                values[name] = of(fields[name])
            case codec.Group(wires):
                values[name] = tuple(fields[wire] for wire in wires)
            case codec.Flag(wire, bit):
                values[name] = bool(fields[wire] & bit)
            case codec.Slots(count, names, _, _):
                slots = [tuple(fields[f"{n}{i}"] for n in names) for i in range(fields[count])]
                values[name] = tuple(slot if len(names) > 1 else slot[0] for slot in slots)
            case codec.Text():
                values[name] = fields[name].decode()
            case codec.Ints():
                values[name] = tuple(fields[name])
            case codec.Records(of):
                element = _element(declaration, name, fields)
                kind = (
                    of[fields[_field_of(_sub(declaration, name).subcon.keyfunc)]]
                    if isinstance(of, dict)
                    else of
                )
                values[name] = tuple(from_fields(r, kind, element) for r in fields[name])
            case codec.Record(of):
                values[name] = from_fields(fields[name], of, _element(declaration, name, fields))
    return cls(**values)


def layout(message: Message, serial: int) -> dict[str, Any]:
    """What schema.MESSAGE.build takes to make ``message``'s datagram."""
    body = to_fields(message, schema.BODIES[message.OPCODE])
    size = len(schema.BODIES[message.OPCODE].build(body))
    header = {"opcode": message.OPCODE, "nfds": message.nfds, "size": size, "serial": serial}
    return {"header": header, "body": body}


def parsed(result: Any) -> tuple[int, int, Message]:
    """``(serial, nfds, message)`` from what schema.MESSAGE.parse returned."""
    opcode = result.header.opcode
    message = from_fields(result.body, ALL_CLASSES[opcode], schema.BODIES[Opcode(opcode)])
    return result.header.serial, result.header.nfds, message


# Helpers for hand-made datagrams.


def datagram(opcode: int, body: bytes, *, nfds: int = 0, serial: int = 7) -> bytes:
    return _HEADER.pack(opcode, nfds, len(body), serial) + body


def reheader(data: bytes, *, nfds: int | None = None, size: int | None = None) -> bytes:
    """``data`` with its header's nfds or size replaced."""
    opcode, old_nfds, old_size, serial = _HEADER.unpack_from(data)
    return (
        _HEADER.pack(
            opcode,
            old_nfds if nfds is None else nfds,
            old_size if size is None else size,
            serial,
        )
        + data[HEADER_SIZE:]
    )


def refused(data: bytes, nfds: int, kind: Kind) -> RemoteProtocolError:
    """Assert that ``data`` is refused as malformed (not as an unknown opcode)."""
    with pytest.raises(RemoteProtocolError) as caught:
        protocol.decode(data, nfds, kind)
    error = caught.value
    assert error.code == ErrorCode.BAD_MESSAGE, error
    if len(data) >= HEADER_SIZE:
        assert error.serial == _HEADER.unpack_from(data)[3]
    return error


def refused_cheaply(data: bytes, nfds: int, kind: Kind) -> None:
    """refused(), having allocated no more than a little memory on the way."""
    tracemalloc.start()
    try:
        refused(data, nfds, kind)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def decodes_or_refuses(data: bytes, nfds: int, kind: Kind) -> None:
    """decode() returns a message or raises RemoteProtocolError, and nothing else.

    A datagram it accepts is exactly the one encode() makes of the result: the
    encoding is canonical, so no two datagrams mean the same message.
    """
    try:
        serial, message = protocol.decode(data, nfds, kind)
    except RemoteProtocolError:
        return
    assert message.nfds == nfds
    assert protocol.encode(message, serial) == data


# Round trips and agreement with the schema.


@given(messages, u32)
def test_round_trip(message: Message, serial: int) -> None:
    data = protocol.encode(message, serial)
    assert protocol.decode(data, message.nfds, kind_of(message)) == (serial, message)


@given(messages, u32)
def test_fast_path_is_the_schema(message: Message, serial: int) -> None:
    data = protocol.encode(message, serial)
    fields = layout(message, serial)
    assert schema.MESSAGE.build(fields) == data
    assert COMPILED.build(fields) == data
    assert parsed(schema.MESSAGE.parse(data)) == (serial, message.nfds, message)
    assert parsed(COMPILED.parse(data)) == (serial, message.nfds, message)


@pytest.mark.parametrize(
    "name",
    [
        "HEADER",
        "HELLO_HEAD",
        "ALLOCATE_HEAD",
        "RELEASE_HEAD",
        "ERROR_HEAD",
        "WELCOME_HEAD",
        "ALLOCATED_HEAD",
        "BUFFER",
        "RELEASED_HEAD",
        "SHARE_HEAD",
        "TOKEN_HEAD",
        "EMPTY_HEAD",
        "QUERIED_HEAD",
        "FORMAT",
        "LIST_HEAD",
        "OPEN_BUFFER_HEAD",
        "LISTED_HEAD",
        "CLIENT_ENTRY",
        "BUFFER_ENTRY",
        "STATISTICS_HEAD",
        "COUNTER",
        "PASSED_HEAD",
    ],
)
def test_fixed_is_the_declaration(name: str) -> None:
    head = getattr(schema, name)
    fixed = schema.fixed(head)
    assert fixed.size == head.sizeof()
    assert fixed.names == tuple(sub.name for sub in head.subcons)
    values: list[Any] = [
        bytes(range(1, sub.subcon.length + 1))
        if isinstance(sub.subcon, construct.Bytes)
        else position + 1
        for position, sub in enumerate(head.subcons)
    ]
    for position, required in fixed.consts:
        values[position] = required
    data = fixed.packer.pack(*values)
    assert data == head.build(dict(zip(fixed.names, values, strict=True)))
    assert fixed.packer.unpack(data) == tuple(values)


@pytest.mark.parametrize(
    "declaration",
    [
        pytest.param(schema.BODIES[Opcode.HELLO], id="a length-prefixed string"),
        pytest.param(construct.Struct("n" / construct.Int32ub), id="big-endian"),
        pytest.param(construct.Struct("b" / construct.Bytes(lambda _: 4)), id="computed Bytes"),
        pytest.param(construct.Struct(construct.Int32ul), id="unnamed"),
        pytest.param(construct.Struct("r" / schema.BUFFER), id="a nested record"),
    ],
)
def test_fixed_refuses_what_is_not_a_fixed_field(declaration: Any) -> None:
    with pytest.raises(TypeError):
        schema.fixed(declaration)


# The codec is derived from the declaration, or refuses to be.


@dataclasses.dataclass(frozen=True, slots=True)
class _Pair:
    a: int
    b: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Named:
    WIRE: ClassVar[dict[str, codec.Adapter]] = {"name": codec.Text(4)}
    a: int
    name: str


_C = construct
_PAIR = _C.Struct("a" / _C.Int32ul, "r" / _C.Const(0, _C.Int8ul), "b" / _C.Int16ul, _C.Terminated)
_NAMED = _C.Struct("a" / _C.Int8ul, "n" / _C.Int8ul, "name" / _C.Bytes(_C.this.n), _C.Terminated)


def test_a_derived_codec_is_the_declaration() -> None:
    pair = codec.derive(_Pair, _PAIR)
    data = _PAIR.build({"a": 2**32 - 1, "b": 7})
    assert pair.build(_Pair(2**32 - 1, 7)) == data
    assert pair.take(data, 0) == (_Pair(2**32 - 1, 7), 7)
    assert pair.take(b"xx" + data, 2) == (_Pair(2**32 - 1, 7), 9)
    with pytest.raises(codec.Malformed):
        pair.take(data[:4] + b"\x01" + data[5:], 0)  # the Const
    with pytest.raises(codec.Malformed):
        pair.take(data[:-1], 0)
    named = codec.derive(_Named, _NAMED)
    data = _NAMED.build({"a": 1, "n": 3, "name": b"abc"})
    assert named.build(_Named(1, "abc")) == data
    assert named.take(data, 0) == (_Named(1, "abc"), len(data))
    with pytest.raises(LocalProtocolError):
        named.build(_Named(1, "abcde"))  # over the Text's limit of 4 bytes
    for bad in (data[:-1], data[:1] + b"\x05" + data[2:] + b"xx", data[:2] + b"\xff\xfe\xfd"):
        with pytest.raises(codec.Malformed):
            named.take(bad, 0)
    assert "def take" in named.source and "def build" in named.source


@dataclasses.dataclass(frozen=True, slots=True)
class _Misnamed:
    WIRE: ClassVar[dict[str, codec.Adapter]] = {"zz": codec.Rename("a")}
    a: int
    b: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Twice:
    WIRE: ClassVar[dict[str, codec.Adapter]] = {"a": codec.Rename("b")}
    a: int
    b: int


@dataclasses.dataclass(frozen=True, slots=True)
class _TextOnFixed:
    WIRE: ClassVar[dict[str, codec.Adapter]] = {"a": codec.Text(4)}
    a: int
    b: int


@dataclasses.dataclass(frozen=True, slots=True)
class _IntsOnBytes:
    WIRE: ClassVar[dict[str, codec.Adapter]] = {"name": codec.Ints(4)}
    a: int
    name: tuple[int, ...]


_AB = ("a" / _C.Int32ul, "b" / _C.Int16ul)


@pytest.mark.parametrize(
    ("cls", "declaration"),
    [
        pytest.param(_Pair, _C.Struct("a" / _C.Int32ul, _C.Terminated), id="no wire field b"),
        pytest.param(_Pair, _C.Struct(*_AB, "c" / _C.Int8ul, _C.Terminated), id="c unaccounted"),
        pytest.param(_Pair, _C.Struct(*_AB), id="a body without Terminated"),
        pytest.param(_Pair, _C.Struct(_C.Terminated, *_AB), id="Terminated not last"),
        pytest.param(_Pair, _C.Struct("a" / _C.Int32ub, "b" / _C.Int16ul, _C.Terminated), id="BE"),
        pytest.param(_Pair, _C.Struct(*_AB, _C.Int8ul, _C.Terminated), id="an unnamed field"),
        pytest.param(
            _Named,
            _C.Struct("a" / _C.Int8ul, "name" / _C.Bytes(lambda _: 4), _C.Terminated),
            id="computed Bytes",
        ),
        pytest.param(
            _Named,
            _C.Struct("a" / _C.Int8ul, "name" / _C.PascalString(_C.Int8ul, "utf8"), _C.Terminated),
            id="a construct the codec does not know",
        ),
        pytest.param(
            _Named,
            _C.Struct(
                "n" / _C.Int8ul, "name" / _C.Bytes(_C.this.n), "a" / _C.Int8ul, _C.Terminated
            ),
            id="a fixed field after a variable part",
        ),
        pytest.param(
            _Named,
            _C.Struct("a" / _C.Int8ul, "name" / _C.Bytes(_C.this.n), _C.Terminated),
            id="a length that is no head field",
        ),
        pytest.param(
            _Pair, _C.Struct(*_AB, _C.Check(_C.this.z == 1), _C.Terminated), id="a rule on no field"
        ),
        pytest.param(
            _Named,
            _C.Struct(*_NAMED.subcons[:3], _C.Check(_C.this.name == b"x"), _C.Terminated),
            id="a rule that reads a variable part",
        ),
        pytest.param(_Misnamed, _C.Struct(*_AB, _C.Terminated), id="WIRE names no field"),
        pytest.param(_Twice, _C.Struct(*_AB, _C.Terminated), id="b stands for a and b"),
        pytest.param(_TextOnFixed, _C.Struct(*_AB, _C.Terminated), id="Text on a fixed field"),
        pytest.param(_IntsOnBytes, _NAMED, id="Ints on Bytes"),
        pytest.param(
            Listed,
            _C.Struct(
                *schema.LISTED_HEAD.subcons,
                "entries"
                / _C.Array(
                    _C.this.count,
                    _C.Switch(_C.this.what, {1: schema.BUFFER_ENTRY, 2: schema.BUFFER_ENTRY}),
                ),
                _C.Terminated,
            ),
            id="a Switch that does not refuse unknown keys",
        ),
    ],
)
def test_derive_refuses_what_it_cannot_derive(cls: Any, declaration: Any) -> None:
    with pytest.raises(TypeError):
        codec.derive(cls, declaration)


def test_every_message_has_the_codec_of_its_declaration() -> None:
    for opcode, cls in ALL_CLASSES.items():
        assert cls.CODEC.declaration is schema.BODIES[Opcode(opcode)]
        assert cls.CODEC.cls is cls
        assert dataclasses.is_dataclass(cls)
        assert getattr(cls, "__dataclass_params__").frozen  # noqa: B009 -- not in the stubs
        assert "__slots__" in vars(cls)


def test_codec_sizes_are_the_declarations() -> None:
    fixed_ones = 0
    for cls in ALL_CLASSES.values():
        # Terminated has no size to construct; what comes before it does, if it is fixed.
        parts = construct.Struct(
            *(sub for sub in cls.CODEC.declaration.subcons if sub is not construct.Terminated)
        )
        try:
            expected = parts.sizeof()
        except construct.SizeofError:  # a variable part
            expected = None
        if cls.CODEC.size is not None:
            assert cls.CODEC.size == cls.CODEC.packer.size == expected
            fixed_ones += 1
        elif expected is not None:  # a fixed record nested after the head: taken as a part
            assert cls is Passed and expected == 4 + RECORD
    assert fixed_ones == 10  # ALLOCATE, RELEASED, LIST, OPEN_BUFFER, 3 of a token, 3 empty
    assert codec.derive(BufferInfo, schema.BUFFER, body=False).size == RECORD


def test_the_wire_package_does_no_io() -> None:
    # Sans-I/O: bytes in, messages out. No event loop, no sockets, no os.
    folder = ROOT / "primed" / "wire"
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in {"trio", "socket", "os"}, (path.name, name)


def test_sizes_that_clients_hard_code() -> None:
    assert HEADER_SIZE == _HEADER.size == 12
    assert schema.BUFFER.sizeof() == RECORD
    assert schema.FORMAT.sizeof() == FORMAT_RECORD
    assert schema.fixed(schema.WELCOME_HEAD).size == 44
    assert schema.fixed(schema.QUERIED_HEAD).size == QUERIED_HEAD_SIZE
    assert schema.fixed(schema.SHARE_HEAD).size == 16
    assert schema.fixed(schema.TOKEN_HEAD).size == TOKEN_SIZE == 16
    assert schema.fixed(schema.EMPTY_HEAD).size == 0
    assert schema.fixed(schema.PASSED_HEAD).size + RECORD == 76
    assert schema.fixed(schema.LIST_HEAD).size == 8
    assert schema.fixed(schema.OPEN_BUFFER_HEAD).size == 16
    assert schema.fixed(schema.LISTED_HEAD).size == LISTED_HEAD_SIZE
    assert schema.fixed(schema.CLIENT_ENTRY).size == CLIENT_ENTRY
    assert schema.fixed(schema.BUFFER_ENTRY).size == BUFFER_ENTRY
    assert schema.fixed(schema.STATISTICS_HEAD).size == STATISTICS_HEAD_SIZE
    assert schema.fixed(schema.COUNTER).size == COUNTER


def test_opcode_ranges() -> None:
    assert all(op < 0x8000 for op in protocol.REQUESTS)
    assert all(op >= 0x8000 for op in protocol.REPLIES)
    assert all(op < 0x8000 for op in protocol.PEER)
    tables = (set(protocol.REQUESTS), set(protocol.REPLIES), set(protocol.PEER))
    assert sum(len(t) for t in tables) == len(set.union(*tables)) == len(Opcode)
    assert set.union(*tables) == set(Opcode)


#: A counter of each kind, at the top of every field.
_COUNTERS = ((1, 2**16 - 1, 2**64 - 1), (2, 2**16 - 1, 2**64 - 1), (3, 2**16 - 1, 2**64 - 1))


def _full_page(what: int, count: int) -> Listed:
    """A LISTED of ``count`` entries, each as long as it can be, every field at its top."""
    if what == LIST_CLIENTS:
        client = ClientEntry(
            2**32 - 1, -(2**31), 2**32 - 1, 2**32 - 1, 2**64 - 1, 2**32 - 1, 2**64 - 1,
            "é" * 127 + "n",
        )  # fmt: skip
        return Listed(what, 2**32 - 1, (client,) * count)
    entry = BufferEntry(
        2**32 - 1, 2**64 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1, 2**64 - 1, 2**64 - 1, 2**32 - 1
    )
    return Listed(what, 2**32 - 1, (entry,) * count)


def test_a_full_page_fits_one_datagram() -> None:
    from primed.daemon.server import LIST_PAGE_BUFFERS, LIST_PAGE_CLIENTS

    assert (LIST_PAGE_CLIENTS, LIST_PAGE_BUFFERS) == (200, 1000)  # as PROTOCOL.md says
    clients = protocol.encode(_full_page(LIST_CLIENTS, LIST_PAGE_CLIENTS), 1)
    assert len(clients) == HEADER_SIZE + LISTED_HEAD_SIZE + 200 * (CLIENT_ENTRY + MAX_NAME)
    buffers = protocol.encode(_full_page(LIST_BUFFERS, LIST_PAGE_BUFFERS), 1)
    assert len(buffers) == HEADER_SIZE + LISTED_HEAD_SIZE + 1000 * BUFFER_ENTRY
    assert max(len(clients), len(buffers)) <= MAX_MESSAGE
    # The daemon counts at most every request opcode and every error code, and 2 events.
    counters = len(protocol.REQUESTS) + len(ErrorCode) + 2
    statistics = Statistics(0, 0, 0, 0, 0, ((1, 1, 1),) * counters)
    assert len(protocol.encode(statistics, 1)) < 1024


def test_limits_at_the_boundary_round_trip() -> None:
    record = BufferInfo(1, 64, 64, 1, 0, 4096, ((0, 256),))
    for message in (
        Hello(1, 1, "n" * MAX_NAME),
        Release(tuple(range(MAX_RELEASE))),
        Error(1, 0, "t" * MAX_TEXT),
        Welcome(1, Backend.DRM, 1, 1, 1, 1, "d" * MAX_NAME, (1, 2, 3), "n" * MAX_NAME),
        Allocated(MAX_FDS, 0, (record,) * MAX_FDS),
        Share(2**64 - 1, True, tuple(range(2**32 - MAX_UIDS, 2**32))),
        Queried(
            Backend.MEMFD,
            "d" * MAX_NAME,
            (2**32 - 1,) * 3,
            "n" * MAX_NAME,
            *(2**32 - 1,) * 3,
            2**64 - 1,
            (FormatInfo(2**32 - 1, (255,) * 4, 255, 255),) * 1024,
            (2**64 - 1,) * 1024,
            *(2**64 - 1,) * 4,
        ),
        Passed(Backend.MEMFD, BufferInfo(2**64 - 1, 1, 1, 1, 2**64 - 1, 1, ((1, 2),) * 4)),
        List(2**16 - 1, 2**32 - 1),
        OpenBuffer(2**32 - 1, 2**64 - 1),
        _full_page(LIST_CLIENTS, 200),
        _full_page(LIST_BUFFERS, 1000),
        Statistics(2**64 - 1, 2**32 - 1, 2**32 - 1, 2**64 - 1, 2**32 - 1, _COUNTERS * 100),
    ):
        data = protocol.encode(message, 3)
        assert len(data) <= schema.MAX_MESSAGE
        assert protocol.decode(data, message.nfds, kind_of(message)) == (3, message)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(Allocate(1, 1, 1, 1, 0xFFFFFFFF), id="ALLOCATE flags"),
        pytest.param(Share(0, uids=(0, 0, 2**32 - 1)), id="SHARE id 0, uids repeated"),
        pytest.param(OpenShared(bytes(TOKEN_SIZE)), id="a token of zeros"),
        pytest.param(
            Passed(Backend.MEMFD, BufferInfo(0, 0, 0, 0, 2**64 - 1, 0, ((0, 0),))),
            id="BUFFER of zeros, unknown modifier",
        ),
        pytest.param(List(0), id="LIST of kind 0 (INVALID_ARGUMENT is the daemon's to say)"),
        pytest.param(List(3, 2**32 - 1), id="LIST of kind 3, start past any end"),
        pytest.param(OpenBuffer(0, 0), id="OPEN_BUFFER of client 0, id 0"),
        pytest.param(Listed(LIST_CLIENTS, 7, ()), id="an empty page that says more follow"),
        pytest.param(
            Listed(LIST_BUFFERS, 0, (BufferEntry(2, 9, 0, 0, 0, 0, 0, 0),) * 2),
            id="LISTED buffers repeated, of sizes 0",
        ),
        pytest.param(
            Statistics(0, 0, 0, 0, 0, ((4, 1, 1), (0, 0, 0), (3, 99, 5), (1, 2, 1), (1, 2, 1))),
            id="STATISTICS of unknown kinds and keys, out of order, repeated",
        ),
    ],
)
def test_values_are_the_receivers_to_judge(message: Message) -> None:
    assert protocol.decode(protocol.encode(message, 1), message.nfds, kind_of(message)) == (
        1,
        message,
    )


# Malformed input: every refusal is a RemoteProtocolError with code BAD_MESSAGE.


@each_vector
def test_every_truncation_is_refused(data: bytes, nfds: int, kind: Kind) -> None:
    for end in range(len(data)):
        refused(data[:end], nfds, kind)
        with pytest.raises(construct.ConstructError):
            schema.MESSAGE.parse(data[:end])
        if end >= HEADER_SIZE:
            refused(reheader(data[:end], size=end - HEADER_SIZE), nfds, kind)


@given(st.sampled_from(VECTORS), st.binary(min_size=1, max_size=64))
def test_any_appended_bytes_are_refused(vector: tuple[str, bytes, int, Kind], extra: bytes) -> None:
    _, data, nfds, kind = vector
    longer = data + extra
    refused(longer, nfds, kind)
    refused(reheader(longer, size=len(longer) - HEADER_SIZE), nfds, kind)
    with pytest.raises(construct.ConstructError):
        schema.MESSAGE.parse(longer)


@each_vector
def test_fds_must_match_the_header_and_the_message(data: bytes, nfds: int, kind: Kind) -> None:
    for arrived in {0, 1, nfds - 1, nfds + 1, MAX_FDS, MAX_FDS + 1} - {nfds, -1}:
        refused(data, arrived, kind)
        refused(reheader(data, nfds=arrived), arrived, kind)


def _const_fields(body: Any) -> list[tuple[int, int]]:
    """(offset, size) of each Const field of a body's fixed head."""
    found, offset = [], 0
    for sub in body.subcons:
        try:
            schema.field(sub)
        except TypeError:
            break  # the head ends where the first variable part (or rule) begins
        if isinstance(sub.subcon, construct.Const):
            found.append((offset, sub.sizeof()))
        offset += sub.sizeof()
    return found


@each_vector
def test_nonzero_reserved_fields_are_refused(data: bytes, nfds: int, kind: Kind) -> None:
    body = schema.BODIES[Opcode(_HEADER.unpack_from(data)[0])]
    for offset, size in _const_fields(body):
        for value in (1, 1 << (8 * size - 1)):
            start = HEADER_SIZE + offset
            bad = data[:start] + value.to_bytes(size, "little") + data[start + size :]
            refused(bad, nfds, kind)
            with pytest.raises(construct.ConstError):
                schema.MESSAGE.parse(bad)


def _vectors_of(*opcodes: Opcode) -> pytest.MarkDecorator:
    """Parametrize a test with the vectors of these opcodes as (data, nfds, kind)."""
    chosen = [v for v in VECTORS if _HEADER.unpack_from(v[1])[0] in opcodes]
    return pytest.mark.parametrize(
        ("data", "nfds", "kind"), [v[1:] for v in chosen], ids=[v[0] for v in chosen]
    )


def _put(data: bytes, at: int, fmt: str, *values: int) -> bytes:
    """``data`` with ``values`` packed at offset ``at``."""
    out = bytearray(data)
    struct.pack_into(fmt, out, at, *values)
    return bytes(out)


def _records(data: bytes, nfds: int) -> list[int]:
    """Datagram offsets of the buffer records of an ALLOCATED or BUFFER vector."""
    if _HEADER.unpack_from(data)[0] == Opcode.BUFFER:
        return [HEADER_SIZE + schema.PASSED_HEAD.sizeof()]
    first = HEADER_SIZE + schema.ALLOCATED_HEAD.sizeof()
    return [first + k * RECORD for k in range(nfds)]


@_vectors_of(Opcode.ALLOCATED, Opcode.BUFFER)
def test_plane_slots_past_nplanes_must_be_zero(data: bytes, nfds: int, kind: Kind) -> None:
    for record in _records(data, nfds):
        nplanes = struct.unpack_from("<I", data, record + 20)[0]
        for bad_count in (0, 5, 0xFFFFFFFF):
            refused(_put(data, record + 20, "<I", bad_count), nfds, kind)
        for slot in range(2 * nplanes, 8):
            refused(_put(data, record + 40 + 4 * slot, "<I", 1), nfds, kind)


def _format_records(data: bytes) -> list[int]:
    """Datagram offsets of the format records of a QUERIED vector."""
    nformats = struct.unpack_from("<H", data, HEADER_SIZE + 2)[0]
    first = HEADER_SIZE + QUERIED_HEAD_SIZE
    return [first + k * FORMAT_RECORD for k in range(nformats)]


@_vectors_of(Opcode.QUERIED)
def test_format_records_are_checked(data: bytes, nfds: int, kind: Kind) -> None:
    assert _format_records(data)
    for record in _format_records(data):
        nplanes = data[record + 4]
        for bad_count in (0, 5, 0xFF):
            refused(_put(data, record + 4, "<B", bad_count), nfds, kind)
        for slot in range(nplanes, 4):  # cpp of a plane the format does not have
            refused(_put(data, record + 8 + slot, "<B", 1), nfds, kind)
        for value in (1, 0x80):  # the reserved byte
            bad = _put(data, record + 7, "<B", value)
            refused(bad, nfds, kind)
            with pytest.raises(construct.ConstError):
                schema.MESSAGE.parse(bad)


@_vectors_of(Opcode.QUERIED)
def test_queried_counts_must_match_the_body(data: bytes, nfds: int, kind: Kind) -> None:
    nformats, nmodifiers = struct.unpack_from("<HH", data, HEADER_SIZE + 2)
    driver_len, node_len = struct.unpack_from("<HH", data, HEADER_SIZE + QUERIED_HEAD_SIZE - 4)
    for field, value in ((2, nformats), (4, nmodifiers)):
        for wrong in {0, value - 1, value + 1, 0xFFFF} - {value, -1}:
            refused(_put(data, HEADER_SIZE + field, "<H", wrong), nfds, kind)
    for field, value in ((QUERIED_HEAD_SIZE - 4, driver_len), (QUERIED_HEAD_SIZE - 2, node_len)):
        for wrong in {0, value + 1, MAX_NAME + 1, 0xFFFF} - {value}:
            refused(_put(data, HEADER_SIZE + field, "<H", wrong), nfds, kind)


@pytest.mark.parametrize("flags", [2, 3, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF])
def test_share_flags_other_than_once_are_refused(flags: int) -> None:
    body = struct.pack("<QII", 1, flags, 0)
    refused(datagram(Opcode.SHARE, body), 0, "request")
    for known in (0, 1):
        data = datagram(Opcode.SHARE, struct.pack("<QII", 1, known, 0))
        assert protocol.decode(data, 0, "request") == (7, Share(1, once=bool(known)))


@pytest.mark.parametrize("opcode", [Opcode.OPEN_SHARED, Opcode.REVOKE, Opcode.SHARED])
@pytest.mark.parametrize("length", [0, 1, TOKEN_SIZE - 1, TOKEN_SIZE + 1, 2 * TOKEN_SIZE])
def test_tokens_have_16_bytes(opcode: Opcode, length: int) -> None:
    kind: Kind = "reply" if opcode == Opcode.SHARED else "request"
    refused(datagram(opcode, bytes(range(length))), 0, kind)
    with pytest.raises(construct.ConstructError):
        schema.MESSAGE.parse(datagram(opcode, bytes(range(length))))


@pytest.mark.parametrize(
    ("opcode", "kind"),
    [(Opcode.QUERY, "request"), (Opcode.REVOKED, "reply"), (Opcode.STATS, "request")],
)
@pytest.mark.parametrize("body", [b"\x00", bytes(4), bytes(TOKEN_SIZE)])
def test_empty_bodies_must_be_empty(opcode: Opcode, kind: Kind, body: bytes) -> None:
    refused(datagram(opcode, body), 0, kind)
    with pytest.raises(construct.ConstructError):
        schema.MESSAGE.parse(datagram(opcode, body))


@pytest.mark.parametrize(("opcode", "size"), [(Opcode.LIST, 8), (Opcode.OPEN_BUFFER, 16)])
@pytest.mark.parametrize("change", [-8, -1, 1, 8])
def test_fixed_requests_have_their_size(opcode: Opcode, size: int, change: int) -> None:
    assert protocol.decode(datagram(opcode, bytes(size)), 0, "request")  # zeros are well-formed
    data = datagram(opcode, bytes(size + change))
    refused(data, 0, "request")
    with pytest.raises(construct.ConstructError):
        schema.MESSAGE.parse(data)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opcode", list(Opcode), ids=[op.name for op in Opcode])
def test_each_opcode_is_known_to_one_kind(opcode: Opcode, kind: Kind) -> None:
    table = TABLES[kind]
    data = datagram(opcode, b"", serial=9)
    if opcode in table:  # known: the empty body is judged, well-formed or not
        try:
            _, message = protocol.decode(data, 0, kind)
        except UnknownOpcode:
            pytest.fail(f"{opcode.name} is unknown as a {kind}")
        except RemoteProtocolError:
            return
        assert type(message) is table[opcode]
    else:
        with pytest.raises(UnknownOpcode) as unknown:
            protocol.decode(data, 0, kind)
        assert (unknown.value.opcode, unknown.value.serial) == (opcode, 9)


@given(u16, u32, st.binary(max_size=64), kinds)
def test_unknown_opcodes(opcode: int, serial: int, body: bytes, kind: Kind) -> None:
    if opcode in TABLES[kind]:
        opcode ^= 0x8000  # the same opcode sent the wrong way
    with pytest.raises(UnknownOpcode) as caught:
        protocol.decode(datagram(opcode, body, serial=serial), 0, kind)
    assert caught.value.code == ErrorCode.UNKNOWN_OPCODE
    assert (caught.value.opcode, caught.value.serial) == (opcode, serial)
    if opcode not in set(Opcode):
        with pytest.raises(construct.ConstructError):
            schema.MESSAGE.parse(datagram(opcode, body, serial=serial))


@each_vector
def test_messages_sent_the_wrong_way_are_unknown(data: bytes, nfds: int, kind: Kind) -> None:
    for other in set(KINDS) - {kind}:
        with pytest.raises(UnknownOpcode):
            protocol.decode(data, nfds, other)


def test_counts_over_the_caps_are_refused_cheaply() -> None:
    ids = struct.pack(f"<{MAX_RELEASE + 1}Q", *range(MAX_RELEASE + 1))
    refused_cheaply(
        datagram(Opcode.RELEASE, struct.pack("<II", MAX_RELEASE + 1, 0) + ids), 0, "request"
    )
    refused_cheaply(datagram(Opcode.RELEASE, struct.pack("<II", 2**32 - 1, 0) + ids), 0, "request")

    record = protocol.encode(Allocated(1, 0, (BufferInfo(1, 1, 1, 1, 0, 1, ((0, 4),)),)), 1)[
        -RECORD:
    ]
    for count in (MAX_FDS + 1, 2**32 - 1):
        body = struct.pack("<IIII", count, 0, count, 0) + record * (MAX_FDS + 1)
        for arrived in (MAX_FDS + 1, count % 2**16):
            refused_cheaply(datagram(Opcode.ALLOCATED, body, nfds=arrived), arrived, "reply")

    refused_cheaply(
        datagram(Opcode.HELLO, struct.pack("<HHIHH", 1, 1, 0, 256, 0) + b"n" * 256), 0, "request"
    )
    refused_cheaply(datagram(Opcode.HELLO, struct.pack("<HHIHH", 1, 1, 0, 0xFFFF, 0)), 0, "request")
    refused_cheaply(
        datagram(Opcode.ERROR, struct.pack("<IiHH", 1, 0, 1025, 0) + b"t" * 1025), 0, "reply"
    )
    welcome = protocol.encode(Welcome(1, Backend.DRM, 1, 1, 1, 1, "d", (0, 0, 0), "n"), 1)
    head = bytearray(welcome[HEADER_SIZE:-2])
    for field in (40, 42):
        long = bytearray(head)
        struct.pack_into("<HH", long, 40, 1, 1)
        struct.pack_into("<H", long, field, 256)
        refused_cheaply(datagram(Opcode.WELCOME, bytes(long) + b"x" * 257), 0, "reply")

    uids = struct.pack(f"<{MAX_UIDS + 1}I", *range(MAX_UIDS + 1))
    for nuids in (MAX_UIDS + 1, 2**32 - 1):
        body = struct.pack("<QII", 1, 0, nuids) + uids
        refused_cheaply(datagram(Opcode.SHARE, body), 0, "request")

    queried = bytearray(protocol.encode(_queried(), 1)[HEADER_SIZE:])
    for field in (2, 4):  # nformats, nmodifiers: the body is far shorter than they say
        many = bytearray(queried)
        struct.pack_into("<H", many, field, 0xFFFF)
        refused_cheaply(datagram(Opcode.QUERIED, bytes(many)), 0, "reply")
    for field in (QUERIED_HEAD_SIZE - 4, QUERIED_HEAD_SIZE - 2):  # driver_len, node_len
        long = bytearray(queried[:QUERIED_HEAD_SIZE])
        struct.pack_into("<HHH", long, 2, 0, 0, 0)
        struct.pack_into("<HH", long, QUERIED_HEAD_SIZE - 4, 1, 1)
        struct.pack_into("<H", long, field, MAX_NAME + 1)
        refused_cheaply(datagram(Opcode.QUERIED, bytes(long) + b"x" * (MAX_NAME + 2)), 0, "reply")

    for message in (
        Listed(LIST_CLIENTS, 0, (ClientEntry(1, 1, 1, 1, 1, 1, 1, "n" * MAX_NAME),) * 2),
        Listed(LIST_BUFFERS, 0, (BufferEntry(1, 1, 1, 1, 1, 1, 1, 1),) * 2),
    ):
        page = protocol.encode(message, 1)[HEADER_SIZE:]  # count 2, body of 2: say 0xFFFF
        refused_cheaply(datagram(Opcode.LISTED, _put(page, 2, "<H", 0xFFFF)), 0, "reply")
    statistics = protocol.encode(Statistics(1, 1, 1, 1, 1, ((1, 1, 1),) * 2), 1)[HEADER_SIZE:]
    for ncounters in (3, 2**32 - 1):
        body = _put(statistics, STATISTICS_HEAD_SIZE - 4, "<I", ncounters)
        refused_cheaply(datagram(Opcode.STATISTICS, body), 0, "reply")


def _queried(**changes: Any) -> Queried:
    """A small QUERIED reply, with ``changes``."""
    message = Queried(
        Backend.DRM,
        "driver",
        (1, 2, 3),
        "node",
        1,
        1,
        1,
        1,
        (FormatInfo(1, (1, 2), 2, 2),),
        (0,),
        0,
        0,
        0,
        0,
    )
    return dataclasses.replace(message, **changes)


@pytest.mark.parametrize(
    "cut",
    range(1, FORMAT_RECORD + 8),
    ids=[f"{n} bytes short" for n in range(1, FORMAT_RECORD + 8)],
)
def test_queried_cut_inside_its_arrays_is_refused(cut: int) -> None:
    # Strings empty, so that the cut falls in the format records or the modifiers.
    data = protocol.encode(_queried(driver="", node=""), 1)[:-cut]
    refused(reheader(data, size=len(data) - HEADER_SIZE), 0, "reply")


@pytest.mark.parametrize(
    ("total", "index", "count"),
    [(0, 0, 0), (1, 0, 0), (1, 1, 1), (2, 1, 2), (2**32 - 1, 2**32 - 1, 1), (5, 2**32 - 2, 3)],
)
def test_allocated_parts_must_lie_within_the_whole(total: int, index: int, count: int) -> None:
    record = protocol.encode(Allocated(1, 0, (BufferInfo(1, 1, 1, 1, 0, 1, ((0, 4),)),)), 1)[
        -RECORD:
    ]
    body = struct.pack("<IIII", total, index, count, 0) + record * count
    refused(datagram(Opcode.ALLOCATED, body, nfds=count), count, "reply")


@pytest.mark.parametrize("backend", [0, 3, 0xFFFF])
@pytest.mark.parametrize(
    ("message", "at"),
    [
        pytest.param(Welcome(1, Backend.DRM, 1, 1, 1, 1), 2, id="WELCOME"),
        pytest.param(_queried(), 0, id="QUERIED"),
        pytest.param(Passed(Backend.DRM, BufferInfo(1, 1, 1, 1, 0, 1, ((0, 4),))), 0, id="BUFFER"),
    ],
)
def test_unknown_backend_is_refused(backend: int, message: Message, at: int) -> None:
    data = _put(protocol.encode(message, 1), HEADER_SIZE + at, "<H", backend)
    refused(data, message.nfds, kind_of(message))


@pytest.mark.parametrize("bad", BAD_UTF8, ids=[b.hex() for b in BAD_UTF8])
def test_strings_must_be_utf8(bad: bytes) -> None:
    filler = "x" * len(bad)
    cases: list[tuple[Message, int]] = [
        (Hello(1, 1, filler), 0),
        (Error(1, 0, filler), 0),
        (Welcome(1, Backend.DRM, 1, 1, 1, 1, filler, (0, 0, 0), "node"), 4),
        (Welcome(1, Backend.DRM, 1, 1, 1, 1, "driver", (0, 0, 0), filler), 0),
        (_queried(driver=filler), 4),
        (_queried(node=filler), 0),
        (Listed(LIST_CLIENTS, 0, (_client(1, filler), _client(2, ""))), CLIENT_ENTRY),
    ]
    for message, after in cases:
        data = protocol.encode(message, 1)
        start = len(data) - after - len(bad)
        refused(data[:start] + bad + data[start + len(bad) :], 0, kind_of(message))


# LISTED and STATISTICS: kinds, entries and counters.


def _client(number: int = 1, name: str = "n") -> ClientEntry:
    return ClientEntry(number, 100, 1000, 1000, 1_767_225_600_000, 1, 4096, name)


_ENTRY = BufferEntry(1, 1, 64, 64, 0x34325258, 16384, 5, 0)


def _listed(what: int) -> pytest.MarkDecorator:
    """Parametrize a test with the LISTED vectors of kind ``what`` as (data, nfds, kind)."""
    chosen = [
        v
        for v in VECTORS
        if _HEADER.unpack_from(v[1])[0] == Opcode.LISTED
        and struct.unpack_from("<H", v[1], HEADER_SIZE)[0] == what
    ]
    assert chosen
    return pytest.mark.parametrize(
        ("data", "nfds", "kind"), [v[1:] for v in chosen], ids=[v[0] for v in chosen]
    )


def _client_entries(data: bytes) -> list[int]:
    """Datagram offsets of the client entries of a LISTED of clients."""
    count = struct.unpack_from("<H", data, HEADER_SIZE + 2)[0]
    found, at = [], HEADER_SIZE + LISTED_HEAD_SIZE
    for _ in range(count):
        found.append(at)
        at += CLIENT_ENTRY + struct.unpack_from("<H", data, at + 28)[0]
    assert at == len(data)
    return found


def refused_by_all(data: bytes, nfds: int, kind: Kind) -> None:
    """refused(), and the schema, plain and compiled, refuses it too.

    Compiled construct unpacks fixed fields with ``struct`` directly, so a body cut short
    fails there with struct.error rather than a ConstructError.
    """
    refused(data, nfds, kind)
    with pytest.raises(construct.ConstructError):
        schema.MESSAGE.parse(data)
    with pytest.raises((construct.ConstructError, struct.error)):
        COMPILED.parse(data)


@pytest.mark.parametrize("what", [0, 3, 0x8001, 0xFFFF])
def test_listed_of_unknown_kind_is_refused(what: int) -> None:
    bodies = [
        struct.pack("<HHI", what, 0, 0),  # no entries: the kind is still checked
        struct.pack("<HHI", what, 1, 0)
        + protocol.encode(Listed(LIST_BUFFERS, 0, (_ENTRY,)), 1)[HEADER_SIZE + LISTED_HEAD_SIZE :],
        struct.pack("<HHI", what, 1, 0)
        + protocol.encode(Listed(LIST_CLIENTS, 0, (_client(),)), 1)[
            HEADER_SIZE + LISTED_HEAD_SIZE :
        ],
    ]
    for body in bodies:
        refused_by_all(datagram(Opcode.LISTED, body), 0, "reply")
    for _, data, nfds, kind in VECTORS:
        if _HEADER.unpack_from(data)[0] == Opcode.LISTED:
            refused_by_all(_put(data, HEADER_SIZE, "<H", what), nfds, kind)


@_listed(LIST_CLIENTS)
def test_client_entries_are_checked(data: bytes, nfds: int, kind: Kind) -> None:
    entries = _client_entries(data)
    count = len(entries)
    for wrong in {0, count - 1, count + 1, 0xFFFF} - {count, -1}:
        refused(_put(data, HEADER_SIZE + 2, "<H", wrong), nfds, kind)
    refused_by_all(_put(data, HEADER_SIZE, "<H", LIST_BUFFERS), nfds, kind)
    for at in entries:
        for value in (1, 0x8000):  # the reserved field after name_len
            bad = _put(data, at + 30, "<H", value)
            refused(bad, nfds, kind)
            with pytest.raises(construct.ConstError):
                schema.MESSAGE.parse(bad)
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        for wrong in {0, name_len - 1, name_len + 1, MAX_NAME + 1, 0xFFFF} - {name_len, -1}:
            refused(_put(data, at + 28, "<H", wrong), nfds, kind)


@pytest.mark.parametrize("name_len", [MAX_NAME + 1, 0x8000, 0xFFFF])
def test_client_names_over_255_bytes_are_refused(name_len: int) -> None:
    record = protocol.encode(Listed(LIST_CLIENTS, 0, (_client(name=""),)), 1)[
        HEADER_SIZE + LISTED_HEAD_SIZE :
    ]
    record = _put(record, 28, "<H", name_len)
    body = struct.pack("<HHI", LIST_CLIENTS, 1, 0) + record + b"n" * name_len
    refused_cheaply(datagram(Opcode.LISTED, body), 0, "reply")


@pytest.mark.parametrize(
    "cut", range(1, CLIENT_ENTRY + 6), ids=[f"{n} bytes short" for n in range(1, CLIENT_ENTRY + 6)]
)
def test_client_entry_cut_short_is_refused(cut: int) -> None:
    # The last entry has no name: the cut falls in its record, then in the name before it.
    data = protocol.encode(Listed(LIST_CLIENTS, 0, (_client(1, "first"), _client(2, ""))), 1)
    short = data[:-cut]
    refused_by_all(reheader(short, size=len(short) - HEADER_SIZE), 0, "reply")


@_listed(LIST_BUFFERS)
def test_buffer_entries_are_checked(data: bytes, nfds: int, kind: Kind) -> None:
    count = struct.unpack_from("<H", data, HEADER_SIZE + 2)[0]
    assert len(data) == HEADER_SIZE + LISTED_HEAD_SIZE + count * BUFFER_ENTRY
    for wrong in {0, count - 1, count + 1, 0xFFFF} - {count, -1}:
        refused(_put(data, HEADER_SIZE + 2, "<H", wrong), nfds, kind)
    refused_by_all(_put(data, HEADER_SIZE, "<H", LIST_CLIENTS), nfds, kind)
    for k in range(count):
        at = HEADER_SIZE + LISTED_HEAD_SIZE + k * BUFFER_ENTRY
        for value in (1, 0x80000000):  # the reserved field after fourcc
            bad = _put(data, at + 28, "<I", value)
            refused(bad, nfds, kind)
            with pytest.raises(construct.ConstError):
                schema.MESSAGE.parse(bad)


@_vectors_of(Opcode.STATISTICS)
def test_statistics_counters_are_checked(data: bytes, nfds: int, kind: Kind) -> None:
    ncounters = struct.unpack_from("<I", data, HEADER_SIZE + STATISTICS_HEAD_SIZE - 4)[0]
    assert len(data) == HEADER_SIZE + STATISTICS_HEAD_SIZE + ncounters * COUNTER
    for wrong in {0, ncounters - 1, ncounters + 1, 2**32 - 1} - {ncounters, -1}:
        refused(_put(data, HEADER_SIZE + STATISTICS_HEAD_SIZE - 4, "<I", wrong), nfds, kind)
    for k in range(ncounters):
        at = HEADER_SIZE + STATISTICS_HEAD_SIZE + k * COUNTER
        for value in (1, 0x80000000):  # the reserved field after kind and key
            bad = _put(data, at + 4, "<I", value)
            refused(bad, nfds, kind)
            with pytest.raises(construct.ConstError):
                schema.MESSAGE.parse(bad)


@pytest.mark.parametrize(
    "cut", range(1, COUNTER + 2), ids=[f"{n} bytes short" for n in range(1, COUNTER + 2)]
)
def test_statistics_counters_cut_short_are_refused(cut: int) -> None:
    data = protocol.encode(Statistics(1, 1, 1, 1, 1, ((1, 1, 5), (3, 2, 0))), 1)[:-cut]
    refused_by_all(reheader(data, size=len(data) - HEADER_SIZE), 0, "reply")


# Whatever arrives, decode() answers with a message or a RemoteProtocolError.


@given(st.binary(max_size=256), st.integers(0, MAX_FDS + 1), kinds)
def test_arbitrary_bytes(data: bytes, nfds: int, kind: Kind) -> None:
    decodes_or_refuses(data, nfds, kind)


@given(st.sampled_from(Opcode) | u16, st.integers(0, 8), u32, st.binary(max_size=512), kinds)
def test_arbitrary_bodies(opcode: int, nfds: int, serial: int, body: bytes, kind: Kind) -> None:
    decodes_or_refuses(datagram(opcode, body, nfds=nfds, serial=serial), nfds, kind)


@given(messages, u32, st.data())
def test_mutated_messages(message: Message, serial: int, data: st.DataObject) -> None:
    raw = bytearray(protocol.encode(message, serial))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        at = data.draw(st.integers(0, len(raw)))
        if action == "set" and at < len(raw):
            raw[at] = data.draw(st.integers(0, 255))
        elif action == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[at : at + data.draw(st.integers(1, 8))]
    if len(raw) >= HEADER_SIZE and data.draw(st.booleans()):
        raw = bytearray(reheader(bytes(raw), size=len(raw) - HEADER_SIZE))
    nfds = data.draw(st.sampled_from([message.nfds, 0, 1]))
    decodes_or_refuses(bytes(raw), nfds, data.draw(kinds))


# What this side may not send: LocalProtocolError, before anything reaches the wire.

_ONE = BufferInfo(1, 1, 1, 1, 0, 4096, ((0, 64),))
_WELCOME = (1, Backend.DRM, 1, 1, 1, 1)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(Allocate(2**32, 1, 1), id="width 2**32"),
        pytest.param(Allocate(-1, 1, 1), id="negative width"),
        pytest.param(Allocate(1, 1, 1, count=2**32), id="count 2**32"),
        pytest.param(Hello(2**16, 1), id="version 2**16"),
        pytest.param(Hello(name="n" * (MAX_NAME + 1)), id="name of 256 bytes"),
        pytest.param(Hello(name="é" * 128), id="name of 128 characters, 256 bytes"),
        pytest.param(Hello(name="\ud800"), id="name with a lone surrogate"),
        pytest.param(Release(tuple(range(MAX_RELEASE + 1))), id="too many ids"),
        pytest.param(Release((2**64,)), id="id 2**64"),
        pytest.param(Error(2**32, 0, ""), id="code 2**32"),
        pytest.param(Error(1, 2**31, ""), id="errno 2**31"),
        pytest.param(Error(1, -(2**31) - 1, ""), id="errno below -2**31"),
        pytest.param(Error(1, 0, "\udcff"), id="text with a lone surrogate"),
        pytest.param(Welcome(*_WELCOME, driver="d" * (MAX_NAME + 1)), id="driver of 256 bytes"),
        pytest.param(Welcome(*_WELCOME, node="n" * (MAX_NAME + 1)), id="node of 256 bytes"),
        pytest.param(Welcome(1, Backend.DRM, 1, 1, 2**64, 1), id="max_size 2**64"),
        pytest.param(Welcome(*_WELCOME, driver_version=(2**32, 0, 0)), id="driver major 2**32"),
        pytest.param(Allocated(1, 0, ()), id="empty part"),
        pytest.param(Allocated(1, 1, (_ONE,)), id="part past the total"),
        pytest.param(Allocated(2**32, 0, (_ONE,)), id="total 2**32"),
        pytest.param(Allocated(MAX_FDS + 1, 0, (_ONE,) * (MAX_FDS + 1)), id="too many fds"),
        pytest.param(Allocated(1, 0, (BufferInfo(1, 1, 1, 1, 0, 1, ()),)), id="no planes"),
        pytest.param(
            Allocated(1, 0, (BufferInfo(1, 1, 1, 1, 0, 1, ((0, 4),) * 5),)), id="5 planes"
        ),
        pytest.param(
            Allocated(1, 0, (BufferInfo(2**64, 1, 1, 1, 0, 1, ((0, 4),)),)), id="id 2**64"
        ),
        pytest.param(Released(-1), id="negative count"),
        pytest.param(Share(1, uids=tuple(range(MAX_UIDS + 1))), id="SHARE with 65 uids"),
        pytest.param(Share(1, uids=(2**32,)), id="uid 2**32"),
        pytest.param(Share(1, uids=(-1,)), id="negative uid"),
        pytest.param(Share(2**64), id="SHARE id 2**64"),
        *(
            pytest.param(cls(bytes(length)), id=f"{cls.__name__} token of {length} bytes")
            for cls in (OpenShared, Revoke, Shared)
            for length in (0, TOKEN_SIZE - 1, TOKEN_SIZE + 1)
        ),
        pytest.param(_queried(formats=(FormatInfo(1, ()),)), id="format of no planes"),
        pytest.param(_queried(formats=(FormatInfo(1, (1,) * 5),)), id="format of 5 planes"),
        pytest.param(_queried(formats=(FormatInfo(1, (256,)),)), id="cpp 256"),
        pytest.param(_queried(formats=(FormatInfo(1, (1,), 256, 1),)), id="hsub 256"),
        pytest.param(_queried(formats=(FormatInfo(2**32, (1,)),)), id="format fourcc 2**32"),
        pytest.param(_queried(modifiers=(2**64,)), id="modifier 2**64"),
        pytest.param(_queried(modifiers=(0,) * 8200), id="QUERIED over 65536 bytes"),
        pytest.param(_queried(driver="d" * (MAX_NAME + 1)), id="QUERIED driver of 256 bytes"),
        pytest.param(_queried(node="n" * (MAX_NAME + 1)), id="QUERIED node of 256 bytes"),
        pytest.param(_queried(quota_bytes=2**64), id="quota_bytes 2**64"),
        pytest.param(_queried(used_buffers=-1), id="negative used_buffers"),
        pytest.param(Passed(Backend.DRM, BufferInfo(1, 1, 1, 1, 0, 1, ())), id="BUFFER no planes"),
        pytest.param(
            Passed(Backend.DRM, BufferInfo(2**64, 1, 1, 1, 0, 1, ((0, 4),))), id="BUFFER id 2**64"
        ),
        pytest.param(List(2**16), id="LIST kind 2**16"),
        pytest.param(List(LIST_BUFFERS, -1), id="LIST negative start"),
        pytest.param(OpenBuffer(2**32, 1), id="OPEN_BUFFER client 2**32"),
        pytest.param(OpenBuffer(1, 2**64), id="OPEN_BUFFER id 2**64"),
        *(
            pytest.param(Listed(what, 0, ()), id=f"LISTED of kind {what}, no entries")
            for what in (0, 3, 2**16 - 1)
        ),
        pytest.param(Listed(3, 0, (_ENTRY,)), id="LISTED of kind 3"),
        pytest.param(Listed(LIST_CLIENTS, 0, (_ENTRY,)), id="a buffer in a page of clients"),
        pytest.param(Listed(LIST_BUFFERS, 0, (_client(),)), id="a client in a page of buffers"),
        pytest.param(Listed(LIST_CLIENTS, 2**32, ()), id="LISTED next 2**32"),
        pytest.param(
            Listed(LIST_CLIENTS, 0, (_client(name="n" * (MAX_NAME + 1)),)),
            id="LISTED name of 256 bytes",
        ),
        pytest.param(
            Listed(LIST_CLIENTS, 0, (_client(name="\ud800"),)), id="LISTED name, lone surrogate"
        ),
        pytest.param(
            Listed(LIST_CLIENTS, 0, (dataclasses.replace(_client(), pid=2**31),)), id="pid 2**31"
        ),
        pytest.param(
            Listed(LIST_BUFFERS, 0, (dataclasses.replace(_ENTRY, age_ms=-1),)), id="age_ms -1"
        ),
        pytest.param(Listed(LIST_BUFFERS, 0, (_ENTRY,) * 1400), id="LISTED over 65536 bytes"),
        pytest.param(Statistics(-1, 0, 0, 0, 0, ()), id="negative uptime"),
        pytest.param(Statistics(0, 0, 0, 0, 0, ((2**16, 1, 1),)), id="counter kind 2**16"),
        pytest.param(Statistics(0, 0, 0, 0, 0, ((1, 1, 2**64),)), id="count 2**64"),
        pytest.param(Statistics(0, 0, 0, 0, 0, ((1, 1, 1),) * 4100), id="STATISTICS too large"),
    ],
)
def test_what_does_not_fit_is_a_local_error(message: Message) -> None:
    with pytest.raises(LocalProtocolError):
        protocol.encode(message, 1)


@pytest.mark.parametrize("serial", [-1, 2**32])
def test_serial_must_fit(serial: int) -> None:
    with pytest.raises(LocalProtocolError):
        protocol.encode(Released(0), serial)


def test_long_error_text_is_cut_at_a_character() -> None:
    # The server must always be able to say why; a long reason is shortened, not refused.
    for text, kept in (("é" * 600, "é" * 512), ("x" + "é" * 600, "x" + "é" * 511)):
        data = protocol.encode(Error(ErrorCode.INTERNAL, 0, text), 1)
        assert protocol.decode(data, 0, "reply") == (1, Error(ErrorCode.INTERNAL, 0, kept))


wide = st.one_of(u16, u32, u64, i32, st.integers())
loose_text = st.lists(st.characters() | st.sampled_from(["\ud800", "\udfff"]), max_size=300).map(
    "".join
)
loose_buffers = st.builds(
    BufferInfo,
    wide,
    wide,
    wide,
    wide,
    wide,
    wide,
    st.lists(st.tuples(wide, wide), max_size=5).map(tuple),
)
loose_messages = st.one_of(
    st.builds(Hello, wide, wide, loose_text),
    st.builds(Allocate, wide, wide, wide, wide, wide),
    st.builds(Release, st.lists(wide, max_size=8).map(tuple)),
    st.builds(Error, wide, wide, loose_text),
    st.builds(
        Welcome,
        wide,
        st.sampled_from(Backend),
        wide,
        wide,
        wide,
        wide,
        loose_text,
        st.tuples(wide, wide, wide),
        loose_text,
    ),
    st.builds(Allocated, wide, wide, st.lists(loose_buffers, max_size=4).map(tuple)),
    st.builds(Released, wide),
    st.builds(Share, wide, st.booleans(), st.lists(wide, max_size=MAX_UIDS + 2).map(tuple)),
    *(
        st.builds(
            cls,
            st.binary(max_size=TOKEN_SIZE + 2)
            | st.binary(min_size=TOKEN_SIZE, max_size=TOKEN_SIZE),
        )
        for cls in (OpenShared, Revoke, Shared)
    ),
    st.just(Query()),
    st.just(Revoked()),
    st.builds(
        Queried,
        st.sampled_from(Backend),
        loose_text,
        st.tuples(wide, wide, wide),
        loose_text,
        wide,
        wide,
        wide,
        wide,
        st.lists(
            st.builds(FormatInfo, wide, st.lists(wide, max_size=5).map(tuple), wide, wide),
            max_size=4,
        ).map(tuple),
        st.lists(wide, max_size=4).map(tuple),
        wide,
        wide,
        wide,
        wide,
    ),
    st.builds(List, wide, wide),
    st.just(Stats()),
    st.builds(OpenBuffer, wide, wide),
    st.builds(
        Listed,
        st.sampled_from([LIST_CLIENTS, LIST_BUFFERS]) | wide,
        wide,
        st.lists(
            st.builds(ClientEntry, wide, wide, wide, wide, wide, wide, wide, loose_text)
            | st.builds(BufferEntry, wide, wide, wide, wide, wide, wide, wide, wide),
            max_size=4,
        ).map(tuple),
    ),
    st.builds(
        Statistics,
        wide,
        wide,
        wide,
        wide,
        wide,
        st.lists(st.tuples(wide, wide, wide), max_size=4).map(tuple),
    ),
    st.builds(Passed, st.sampled_from(Backend), loose_buffers),
)


@given(loose_messages, wide)
def test_encode_refuses_or_round_trips(message: Message, serial: int) -> None:
    try:
        data = protocol.encode(message, serial)
    except LocalProtocolError:
        return
    if isinstance(message, Error):
        cut = message.text.encode()[:MAX_TEXT].decode("utf-8", "ignore")
        message = dataclasses.replace(message, text=cut)
    assert protocol.decode(data, message.nfds, kind_of(message)) == (serial, message)
