"""The fast codec, derived from the construct declarations at import time. No I/O.

:func:`derive` reads a construct ``Struct`` (primed.wire.schema) and the
``WIRE`` mapping of the dataclass that stands for it, and returns a
:class:`Codec` whose ``take``, ``unpack`` and ``build`` pack and unpack exactly
what construct would build and parse, checking what it checks (every Const,
every Check rule, unknown Switch keys, exact lengths, trailing bytes) plus the
bounds that ``WIRE`` declares.

Those three functions are Python source that :func:`derive` writes from the
declaration, as construct's own ``compile()`` does, and compiles once: one
precomputed ``struct.Struct`` per head or record, the head's fields read by
position, Consts and Check rules inlined, variable parts taken by small
closures. Nothing about a message is looked up per call. ``Codec.source`` shows
the code; tracebacks show its lines.

What a body may be made of: fixed fields (named little-endian integers, Const
integers, Bytes of a constant length), then parts whose size a fixed field gives
(``Bytes(this.n)``, ``Array(this.n, integer)``, ``Array(this.n, Struct)``,
``Array(this.n, Switch(this.k, {...}, default=Error))``), nested fixed Structs,
``Check`` rules over the head's fields, and ``Terminated`` last. Anything else
raises TypeError at import time, as does a wire field that no dataclass field
accounts for, or a dataclass field that names no wire field: the fast path
cannot drift from the declaration unseen.

How a dataclass field stands for wire fields is said once per class, in its
``WIRE`` mapping of field name to one of the adapters below; a field it leaves
out is the wire field of the same name. The length or count field of a variable
part is the part's own (``this.n`` says which), and Const fields are the
declaration's: neither needs saying.
"""

from __future__ import annotations

import dataclasses
import enum
import linecache
import operator
import re
import struct
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

from construct import Array, Bytes, Check, Renamed, Struct, Switch, Terminated
from construct import Error as Refuse

from primed.errors import LocalProtocolError
from primed.wire import schema


class Malformed(Exception):  # an internal signal: decode() turns it into RemoteProtocolError
    """Raised inside the decoders with a reason; the caller adds the message name and serial."""


# The adapters: how one dataclass field stands for its wire fields.


@dataclasses.dataclass(frozen=True, slots=True)
class Rename:
    """The wire field ``wire``, under another name."""

    wire: str


@dataclasses.dataclass(frozen=True, slots=True)
class Enum:
    """A wire integer as a member of ``of``; other values are refused when decoded."""

    of: type[enum.IntEnum]


@dataclasses.dataclass(frozen=True, slots=True)
class Group:
    """A tuple of several wire fields, in this order."""

    fields: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Flag:
    """A bool: bit ``bit`` of the wire field ``field``, whose other bits must be 0."""

    field: str
    bit: int


@dataclasses.dataclass(frozen=True, slots=True)
class Slots:
    """A tuple of ``low`` to ``high`` per-slot values in numbered wire fields.

    ``count`` is the wire field holding how many slots are used; each slot ``i``
    is the wire fields ``{name}{i}`` for each of ``names`` (one name: the slot is
    an integer; several: a tuple of them). Unused slots must be 0.
    """

    count: str
    names: tuple[str, ...]
    low: int
    high: int


@dataclasses.dataclass(frozen=True, slots=True)
class Text:
    """A ``Bytes(this.n)`` tail as a str of UTF-8, at most ``limit`` bytes.

    With ``cut``, a longer text is shortened to the limit at a character boundary
    when encoded instead of refused.
    """

    limit: int
    cut: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Ints:
    """An ``Array(this.n, integer)`` tail as a tuple of at most ``limit`` integers."""

    limit: int


@dataclasses.dataclass(frozen=True, slots=True)
class Records:
    """An ``Array(this.n, ...)`` tail of records as a tuple of ``low`` to ``high`` objects.

    ``of`` is a class with a ``WIRE`` mapping, ``tuple`` (a record as the tuple of
    its non-Const fields), or, for an Array of a Switch, a mapping of each Switch
    key to such a class. ``part_of`` names the wire fields ``(index, total)`` of a
    part of a larger whole: index + count must not pass total.
    """

    of: Any
    low: int = 0
    high: int | None = None
    part_of: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """A nested fixed Struct as one object of class ``of``."""

    of: type


Adapter = Rename | Enum | Group | Flag | Slots | Text | Ints | Records | Record


# Small tools.


def _tuple_getter(positions: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """itemgetter that returns a tuple whatever the number of positions."""
    if len(positions) >= 2:
        return operator.itemgetter(*positions)
    if len(positions) == 1:
        only = positions[0]
        return lambda row: (row[only],)
    return lambda row: ()


def path_field(expr: Any) -> str:
    """The name of the field a construct expression such as ``this.count`` reads.

    Raises TypeError for anything that is not a plain field reference.
    """
    read: list[str] = []

    class Probe(dict[str, int]):
        def __getitem__(self, key: str) -> int:
            read.append(key)
            return 0x5EED

    if not callable(expr) or expr(Probe()) != 0x5EED or len(read) != 1:
        raise TypeError(f"{expr!r} is not a plain reference to one field")
    return read[0]


_FIELD = re.compile(r"this\['(\w+)'\]")


def _python(rule: Any, positions: dict[str, int], values: str) -> str:
    """A Check rule as a Python expression over the head's ``values``.

    construct's own compiler emits the same ``repr``, which is Python over ``this``;
    here each ``this['field']`` becomes ``values[position]``. Raises TypeError for a
    rule that reads anything but head fields.
    """
    text = repr(rule)

    def position(match: re.Match[str]) -> str:
        if match[1] not in positions:
            raise TypeError(f"{text} reads {match[1]}, which is not a head field")
        return f"{values}[{positions[match[1]]}]"

    python = _FIELD.sub(position, text)
    if "this" in python:
        raise TypeError(f"{text} is not a rule over head fields")
    return python


@dataclasses.dataclass(frozen=True, slots=True)
class _Tail:
    """One part of a body after its fixed head, as the declaration gives it."""

    name: str
    kind: str  # "bytes", "ints", "records", "switch", "nested"
    count: str | None  # the head field that gives its length or count
    code: str = ""  # "ints": the element's struct code
    element: Any = None  # "records", "nested": the Struct; "switch": {key: Struct}
    key: str | None = None  # "switch": the head field that selects the case


@dataclasses.dataclass(frozen=True, slots=True)
class _Shape:
    """A Struct split into its fixed head, its tails and its Check rules."""

    head: tuple[schema.Field, ...]
    tails: tuple[_Tail, ...]
    checks: tuple[Any, ...]
    terminated: bool


def _shape(declaration: Any) -> _Shape:
    if not isinstance(declaration, Struct):
        raise TypeError(f"{declaration!r} is not a Struct")
    head: list[schema.Field] = []
    tails: list[_Tail] = []
    checks: list[Any] = []
    terminated = False
    for sub in declaration.subcons:
        if terminated:
            raise TypeError("Terminated must come last")
        if sub is Terminated:
            terminated = True
            continue
        if isinstance(sub, Check):
            checks.append(sub.func)
            continue
        inner = sub.subcon if isinstance(sub, Renamed) else None
        try:
            field = schema.field(sub)
        except TypeError:
            field = None
        if field is not None:
            if tails:
                raise TypeError(f"fixed field {field.name} after a variable part")
            head.append(field)
        elif isinstance(inner, Bytes):
            tails.append(_Tail(sub.name, "bytes", path_field(inner.length)))
        elif isinstance(inner, Array):
            count, element = path_field(inner.count), inner.subcon
            if isinstance(element, Switch):
                if element.default is not Refuse:
                    raise TypeError(f"{sub.name}: a Switch must refuse unknown keys")
                cases = dict(element.cases)
                key = path_field(element.keyfunc)
                tails.append(_Tail(sub.name, "switch", count, element=cases, key=key))
            elif isinstance(element, Struct):
                tails.append(_Tail(sub.name, "records", count, element=element))
            else:
                code = schema.field("x" / element).code
                tails.append(_Tail(sub.name, "ints", count, code=code))
        elif isinstance(inner, Struct):
            tails.append(_Tail(sub.name, "nested", None, element=inner))
        else:
            raise TypeError(f"{sub!r} is not a construct the codec can derive")
    names = [f.name for f in head]
    for tail in tails:
        for ref in (tail.count, tail.key):
            if ref is not None and ref not in names:
                raise TypeError(f"{tail.name} refers to {ref}, which is not a head field")
    return _Shape(tuple(head), tuple(tails), tuple(checks), terminated)


# A derived codec.

Decoder = Callable[[Sequence[Any]], Any]
Encoder = Callable[[Any], tuple[Any, ...]]


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Codec:
    """The derived codec of one Struct and one class.

    ``take(data, offset)`` decodes one object starting at ``offset`` and returns
    it with the offset after it, raising :class:`Malformed`. ``build(obj)``
    encodes one object, raising LocalProtocolError, struct.error or
    UnicodeEncodeError for values that do not fit. ``size`` is the encoded size if
    every encoding has the same size, else None; then ``unpack(values)`` makes the
    object from the head's unpacked values (what ``struct.iter_unpack`` gives).
    """

    cls: Any
    declaration: Any
    packer: struct.Struct
    size: int | None
    take: Callable[[bytes, int], tuple[Any, int]]
    build: Callable[[Any], bytes]
    unpack: Callable[[tuple[Any, ...]], Any]
    source: str  #: the Python source of take, unpack and build, generated by derive


def derive(cls: Any, declaration: Any, *, body: bool = True) -> Codec:
    """Derive the codec that maps instances of ``cls`` to ``declaration``'s bytes and back.

    ``cls`` is a dataclass whose ``WIRE`` class attribute (if any) maps field names to
    adapters, or ``tuple`` (a record as its non-Const fields, in order). A ``body`` (a
    whole message body, not a record inside one) must end in ``Terminated``. Raises
    TypeError for a declaration the codec cannot derive, or a mapping that does not
    account for every wire field exactly once.
    """
    shape = _shape(declaration)
    if body != shape.terminated:
        raise TypeError(f"{declaration!r}: a body, and only a body, ends in Terminated")
    head, tails = shape.head, shape.tails
    nhead = len(head)
    packer = struct.Struct("<" + "".join(f.code for f in head))
    positions = {f.name: i for i, f in enumerate(head)}
    positions.update({t.name: nhead + k for k, t in enumerate(tails)})
    head_names = tuple(f.name for f in head)
    head_at = {name: i for i, name in enumerate(head_names)}  # what a Check rule may read
    what = getattr(cls, "__name__", repr(cls))
    claimed: dict[str, str] = {}

    def claim(wire: str, by: str) -> int:
        if wire not in positions:
            raise TypeError(f"{what}.{by}: no wire field {wire}")
        if wire in claimed:
            raise TypeError(f"{what}: {wire} stands for both {claimed[wire]} and {by}")
        claimed[wire] = by
        return positions[wire]

    const_at = tuple(i for i, f in enumerate(head) if f.const is not None)
    for i in const_at:
        claim(head[i].name, "a Const")
    for tail in tails:
        if tail.count is not None:
            claim(tail.count, f"the length of {tail.name}")

    if cls is tuple:
        if tails:
            raise TypeError("a record read as a tuple has no variable part")
        wanted: list[tuple[str, Any]] = [(n, None) for n in head_names if n not in claimed]
    else:
        mapping: dict[str, Adapter] = getattr(cls, "WIRE", {})
        names = [f.name for f in dataclasses.fields(cls)]
        for extra in sorted(set(mapping) - set(names)):
            raise TypeError(f"{what}.WIRE names {extra}, which is not a field")
        wanted = [(name, mapping.get(name)) for name in names]

    # Per dataclass field, in the class's order: the expression that reads it (from the
    # head's values ``v`` and the tails' values ``t0``, ``t1``...), and, per head field,
    # the expression that writes it (from ``obj``). Adapters that need more than an
    # expression are closures, named in ``env``, that the generated code calls.
    env: dict[str, Any] = {
        "cls": cls,
        "Malformed": Malformed,
        "Local": LocalProtocolError,
        "chain": chain,
    }
    reads: list[str] = []
    writes: dict[int, str] = {i: repr(head[i].const) for i in const_at}
    prelude: list[str] = []  # build's statements before the pack
    tail_at: dict[int, int] = {}  # tail number -> row position

    def bind(prefix: str, value: Any) -> str:
        name = f"{prefix}{len(env)}"
        env[name] = value
        return name

    def attr(name: str) -> str:
        return f"obj[{len(writes_by_field)}]" if cls is tuple else f"obj.{name}"

    writes_by_field: list[str] = []
    for name, adapter in wanted:
        if adapter is None or isinstance(adapter, Rename | Enum):
            wire = adapter.wire if isinstance(adapter, Rename) else name
            at = claim(wire, name)
            if at >= nhead:
                raise TypeError(f"{what}.{name}: {wire} is not a fixed field")
            length = head[at].length
            if isinstance(adapter, Enum):
                reads.append(f"{bind('enum', _enum_decoder(at, adapter.of))}(v)")
                writes[at] = attr(name)
            elif length is not None:  # Bytes of a fixed length: struct would pad or cut
                reads.append(f"v[{at}]")
                writes[at] = f"{bind('exact', _exact_bytes(what, name, length))}({attr(name)})"
            else:
                reads.append(f"v[{at}]")
                writes[at] = attr(name)
        elif isinstance(adapter, Group):
            ats = [claim(w, name) for w in adapter.fields]
            reads.append("(" + "".join(f"v[{at}], " for at in ats) + ")")
            group = bind("group", _group_encoder(name, len(ats)))
            prelude.append(f"{group}_ = {group}(obj)")
            writes.update({at: f"{group}_[{i}]" for i, at in enumerate(ats)})
        elif isinstance(adapter, Flag):
            at = claim(adapter.field, name)
            reads.append(f"{bind('flag', _flag_decoder(at, adapter.bit))}(v)")
            writes[at] = f"({adapter.bit} if {attr(name)} else 0)"
        elif isinstance(adapter, Slots):
            count_at = claim(adapter.count, name)
            slots = [
                tuple(claim(f"{n}{i}", name) for n in adapter.names) for i in range(adapter.high)
            ]
            reads.append(f"{bind('slots', _slots_decoder(count_at, slots, adapter.low))}(v)")
            # Inline, as this is the hot path of every buffer record.
            slotted = bind(
                "slots",
                tuple(
                    (0,) * (len(adapter.names) * (adapter.high - n))
                    for n in range(adapter.high + 1)
                ),
            )
            spread = "*value" if len(adapter.names) == 1 else "*chain(*value)"
            prelude += [
                f"value = {attr(name)}",
                "n = len(value)",
                f"if not {adapter.low} <= n <= {adapter.high}:",
                f"    raise Local(f'{what}.{name} has {adapter.low} to {adapter.high} entries, "
                "not {n}')",
                f"{slotted}_ = (n, {spread}, *{slotted}[n])",
            ]
            flat_slots = [count_at, *(a for slot in slots for a in slot)]
            writes.update({at: f"{slotted}_[{i}]" for i, at in enumerate(flat_slots)})
        elif isinstance(adapter, Text | Ints | Records | Record):
            at = claim(name, name)
            if at < nhead:
                raise TypeError(f"{what}.{name}: {name} is a fixed field, not a tail")
            k = at - nhead
            tail = tails[k]
            taker, builder = _tail_codec(cls, name, adapter, tail, positions)
            env[f"take{k}"], env[f"build{k}"] = taker, builder
            tail_at[k] = at
            reads.append(f"t{k}")
            prelude.append(f"r{k}, n{k} = build{k}(obj)")
            if tail.count is not None:
                writes[positions[tail.count]] = f"n{k}"
        else:
            raise TypeError(f"{what}.{name}: unknown adapter {adapter!r}")
        writes_by_field.append(name)
    for wire in positions:
        if wire not in claimed:
            raise TypeError(f"{what}: nothing stands for wire field {wire}")
    if sorted(writes) != list(range(nhead)):  # every head field has exactly one source
        raise TypeError(f"{what}: the head's sources do not add up")  # pragma: no cover

    checks = shape.checks
    hsize = packer.size
    const_want = tuple(head[i].const for i in const_at)

    def refuse_head(values: tuple[Any, ...]) -> None:
        """Raise Malformed for the Const or Check that ``values`` break, if any."""
        wrong = [head[i].name for i, w in zip(const_at, const_want, strict=True) if values[i] != w]
        if wrong:
            raise Malformed(f"field {', '.join(wrong)} must be {const_want[0]}")
        context = dict(zip(head_names, values, strict=True))
        for rule in checks:
            if not rule(context):
                raise Malformed(f"values break the rule {rule!r}")

    def check_build(values: tuple[Any, ...]) -> None:
        context = dict(zip(head_names, values, strict=True))
        for rule in checks:
            if not rule(context):
                raise LocalProtocolError(f"{what}: values break the rule {rule!r}")

    def short(data: bytes, offset: int) -> Malformed:
        return Malformed(f"{len(data) - offset} bytes are shorter than a {hsize}-byte head")

    env.update(
        unpack_from=packer.unpack_from,
        pack=packer.pack,
        refuse_head=refuse_head,
        check_build=check_build,
        short=short,
    )
    made = f"({''.join(r + ', ' for r in reads)})" if cls is tuple else f"cls({', '.join(reads)})"
    verify = []
    if const_at:
        tests = " or ".join(f"v[{i}] != {head[i].const!r}" for i in const_at)
        verify.append(f"    if {tests}:\n        refuse_head(v)")
    for rule in checks:
        verify.append(f"    if not {_python(rule, head_at, 'v')}:\n        refuse_head(v)")
    lines = [
        "def take(data, offset):",
        f"    end = offset + {hsize}",
        "    if len(data) < end:",
        "        raise short(data, offset)",
        "    v = unpack_from(data, offset)" if hsize else "    v = ()",
        *verify,
        *(f"    t{k}, end = take{k}(data, end, v)" for k in sorted(tail_at)),
        f"    return {made}, end",
        "",
        "def unpack(v):",
        *(
            ["    raise TypeError('a record of variable size is taken, not unpacked')"]
            if tails
            else [*verify, f"    return {made}"]
        ),
        "",
        "def build(obj):",
    ]
    if cls is tuple:
        lines += [
            f"    if type(obj) is not tuple or len(obj) != {len(writes_by_field)}:",
            f"        raise Local(f'{{obj!r}} is not a tuple of {len(writes_by_field)} values')",
        ]
    lines += [f"    {statement}" for statement in prelude]
    values = "".join(f"{writes[i]}, " for i in range(nhead))
    joined = "".join(f" + r{k}" for k in sorted(tail_at))  # the tails in the body's order
    if checks:
        lines.append(f"    values = ({values})")
        for rule in checks:
            lines += [
                f"    if not {_python(rule, head_at, 'values')}:",
                "        check_build(values)",
            ]
        lines.append(f"    return pack(*values){joined}")
    else:
        lines.append(f"    return pack({values}){joined}")
    source = "\n".join(lines) + "\n"
    filename = f"<primed.wire.codec: {what}>"
    exec(compile(source, filename, "exec"), env)  # our own source, generated above
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    size = hsize if not tails else None
    return Codec(cls, declaration, packer, size, env["take"], env["build"], env["unpack"], source)


TailTaker = Callable[[bytes, int, tuple[Any, ...]], tuple[Any, int]]
TailBuilder = Callable[[Any], tuple[bytes, int]]


def _exact_bytes(what: str, name: str, length: int) -> Callable[[Any], bytes]:
    def encode(value: Any) -> bytes:
        if not isinstance(value, bytes) or len(value) != length:
            raise LocalProtocolError(f"{what}.{name} must be {length} bytes")
        return value

    return encode


def _enum_decoder(at: int, of: type[enum.IntEnum]) -> Decoder:
    members = {int(m): m for m in of}

    def decode(row: Sequence[Any]) -> Any:
        member = members.get(row[at])
        if member is None:
            raise Malformed(f"unknown {of.__name__.lower()} {row[at]}")
        return member

    return decode


def _group_encoder(name: str, size: int) -> Encoder:
    get = operator.attrgetter(name)

    def encode(obj: Any) -> tuple[Any, ...]:
        value = tuple(get(obj))
        if len(value) != size:
            raise LocalProtocolError(f"{name} has {size} parts, not {len(value)}")
        return value

    return encode


def _flag_decoder(at: int, bit: int) -> Decoder:
    def decode(row: Sequence[Any]) -> bool:
        flags = row[at]
        if flags & ~bit:
            raise Malformed(f"unknown flags {flags:#x}")
        return bool(flags & bit)

    return decode


def _each(getters: tuple[Decoder, ...]) -> Decoder:
    """A getter of one tuple per slot, each made by one of ``getters``."""
    return lambda row: tuple([get(row) for get in getters])


def _slots_decoder(count_at: int, slots: list[tuple[int, ...]], low: int) -> Decoder:
    high, width = len(slots), len(slots[0])
    used: list[Callable[[Sequence[Any]], Any]] = []
    unused = []
    for n in range(high + 1):
        if width == 1:
            used.append(_tuple_getter([slot[0] for slot in slots[:n]]))
        else:
            used.append(_each(tuple(_tuple_getter(slot) for slot in slots[:n])))
        unused.append(_tuple_getter([at for slot in slots[n:] for at in slot]))
    zeros = [(0,) * (width * (high - n)) for n in range(high + 1)]

    def decode(row: Sequence[Any]) -> tuple[Any, ...]:
        n = row[count_at]
        if not low <= n <= high or unused[n](row) != zeros[n]:
            raise Malformed(f"bad count {n} of {low} to {high} slots, or a used slot past it")
        return used[n](row)  # type: ignore[no-any-return]

    return decode


def _tail_codec(
    cls: Any, name: str, adapter: Adapter, tail: _Tail, positions: dict[str, int]
) -> tuple[TailTaker, TailBuilder]:
    """The taker and builder of one tail, ``tail``, for the field ``name``."""
    what = f"{cls.__name__}.{name}"
    get = operator.attrgetter(name)
    count_at = positions[tail.count] if tail.count is not None else 0
    if isinstance(adapter, Text) and tail.kind == "bytes":
        return _text_codec(what, get, count_at, adapter)
    if isinstance(adapter, Ints) and tail.kind == "ints":
        return _ints_codec(what, get, count_at, adapter.limit, tail.code)
    if isinstance(adapter, Record) and tail.kind == "nested":
        return _nested_codec(what, get, derive(adapter.of, tail.element, body=False))
    if isinstance(adapter, Records) and tail.kind in ("records", "switch"):
        if tail.kind == "records":
            codecs = {None: derive(adapter.of, tail.element, body=False)}
            key_at, key_get = None, None
        else:
            if not isinstance(adapter.of, dict) or set(adapter.of) != set(tail.element):
                raise TypeError(f"{what}: Records must map the Switch's keys {set(tail.element)}")
            codecs = {k: derive(adapter.of[k], tail.element[k], body=False) for k in tail.element}
            key_at, key_get = positions[tail.key or ""], operator.attrgetter(tail.key or "")
        part = None
        if adapter.part_of is not None:
            index, total = adapter.part_of
            part = (positions[index], positions[total], operator.attrgetter(index, total))
        return _records_codec(what, get, count_at, adapter, codecs, key_at, key_get, part)
    raise TypeError(f"{what}: {type(adapter).__name__} does not fit a {tail.kind} tail")


def _text_codec(what: str, get: Any, count_at: int, adapter: Text) -> tuple[TailTaker, TailBuilder]:
    limit, cut = adapter.limit, adapter.cut

    def take(data: bytes, offset: int, values: tuple[Any, ...]) -> tuple[Any, int]:
        n = values[count_at]
        end = offset + n
        if n > limit or end > len(data):
            raise Malformed(f"{what} of {n} bytes: over {limit} or past the end")
        try:
            return data[offset:end].decode("utf-8"), end
        except UnicodeDecodeError:
            raise Malformed(f"{what} is not UTF-8") from None

    def build(obj: Any) -> tuple[bytes, int]:
        raw: bytes = get(obj).encode("utf-8")
        if len(raw) > limit:
            if not cut:
                raise LocalProtocolError(f"{what} is {len(raw)} bytes, over the limit of {limit}")
            raw = raw[:limit].decode("utf-8", "ignore").encode("utf-8")
        return raw, len(raw)

    return take, build


def _ints_codec(
    what: str, get: Any, count_at: int, limit: int, code: str
) -> tuple[TailTaker, TailBuilder]:
    size = struct.calcsize("<" + code)

    def take(data: bytes, offset: int, values: tuple[Any, ...]) -> tuple[Any, int]:
        n = values[count_at]
        end = offset + size * n
        if n > limit or end > len(data):
            raise Malformed(f"{what}: {n} values, over {limit} or past the end")
        return struct.unpack_from(f"<{n}{code}", data, offset), end

    def build(obj: Any) -> tuple[bytes, int]:
        items = get(obj)
        n = len(items)
        if n > limit:
            raise LocalProtocolError(f"{what}: {n} values, over the limit of {limit}")
        return struct.pack(f"<{n}{code}", *items), n

    return take, build


def _nested_codec(what: str, get: Any, codec: Codec) -> tuple[TailTaker, TailBuilder]:
    if codec.size is None:
        raise TypeError(f"{what}: a nested Struct must have a fixed size")
    size, unpack_from, unpack, cls = codec.size, codec.packer.unpack_from, codec.unpack, codec.cls

    def take(data: bytes, offset: int, values: tuple[Any, ...]) -> tuple[Any, int]:
        if offset + size > len(data):
            raise Malformed(f"{what} cut short")
        return unpack(unpack_from(data, offset)), offset + size

    build_one = codec.build

    def build(obj: Any) -> tuple[bytes, int]:
        item = get(obj)
        if not isinstance(item, cls):
            raise LocalProtocolError(f"{what} is not a {cls.__name__}: {item!r}")
        return build_one(item), 0

    return take, build


def _records_codec(
    what: str,
    get: Any,
    count_at: int,
    adapter: Records,
    codecs: dict[Any, Codec],
    key_at: int | None,
    key_get: Any,
    part: tuple[int, int, Any] | None,
) -> tuple[TailTaker, TailBuilder]:
    low, high = adapter.low, adapter.high

    def take(data: bytes, offset: int, values: tuple[Any, ...]) -> tuple[Any, int]:
        n = values[count_at]
        if n < low or (high is not None and n > high):
            raise Malformed(f"{what}: {n} records, not {low} to {high}")
        if part is not None and values[part[0]] + n > values[part[1]]:
            raise Malformed(f"{what}: part of {n} at {values[part[0]]} of {values[part[1]]}")
        codec = codecs.get(None if key_at is None else values[key_at])
        if codec is None:
            if not n:
                return (), offset  # as construct: a Switch of no elements is not evaluated
            raise Malformed(f"{what}: unknown kind {values[key_at or 0]}")
        if codec.size is not None:
            end = offset + codec.size * n
            if end > len(data):
                raise Malformed(f"{what}: {n} records cut short")
            unpack = codec.unpack
            return tuple(map(unpack, codec.packer.iter_unpack(data[offset:end]))), end
        items = []
        take_one = codec.take
        for _ in range(n):
            item, offset = take_one(data, offset)
            items.append(item)
        return tuple(items), offset

    if key_get is None and part is not None:  # one kind of record, part of a whole: ALLOCATED
        (only,) = codecs.values()
        only_cls, build_only = only.cls, only.build
        part_get, top = part[2], high if high is not None else float("inf")

        def build_part(obj: Any) -> tuple[bytes, int]:
            items = get(obj)
            n = len(items)
            index, total = part_get(obj)
            if not low <= n <= top or index + n > total:
                raise LocalProtocolError(f"{what}: part of {n} at {index} of {total}")
            raws = [build_only(item) for item in items if isinstance(item, only_cls)]
            if len(raws) != n:
                raise LocalProtocolError(f"{what}: each record must be a {only_cls.__name__}")
            return b"".join(raws), n

        return take, build_part

    def build(obj: Any) -> tuple[bytes, int]:
        items = get(obj)
        n = len(items)
        if n < low or (high is not None and n > high):
            raise LocalProtocolError(f"{what}: {n} records, not {low} to {high}")
        if part is not None:
            index, total = part[2](obj)
            if index + n > total:
                raise LocalProtocolError(f"{what}: part of {n} at {index} of {total}")
        codec = codecs.get(None if key_get is None else key_get(obj))
        if codec is None:
            if not n:
                return b"", 0
            raise LocalProtocolError(f"{what}: unknown kind {key_get(obj)!r}")
        cls, build_one = codec.cls, codec.build
        raws = [build_one(item) for item in items if isinstance(item, cls)]
        if len(raws) != n:
            raise LocalProtocolError(f"{what}: each record must be a {cls.__name__}")
        return b"".join(raws), n

    return take, build
