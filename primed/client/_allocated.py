"""ALLOCATED replies of many buffers, decoded straight into what the client's Buffers hold.

The general decoder (:func:`primed.wire.protocol.decode`) makes a BufferInfo per
buffer, each through the derived codec's record and slot checks, and the client
then makes a Buffer from each: about 4 us per buffer, most of a 253-buffer
ALLOCATE's client time. The buffers of one ALLOCATE almost always share every
field but their id (one size, one format, one layout), so here a reply is
unpacked as two columns: the ids, and each record's other bytes. When those
bytes are the same in every record, the layout is decoded and checked once and
shared by every buffer; when not, once per distinct layout.

:func:`many` accepts exactly the ALLOCATED datagrams that decode() accepts and
gives the same values; for anything else it returns None and the caller hands
the datagram, untouched, to the general path, which says what is wrong. The
layout is primed.wire's one declaration, read when this module is imported: the
header, ALLOCATED's head and BUFFER as primed.wire.schema declares them, ALLOCATED's
bounds and BufferInfo's plane slots as primed.wire.messages maps them. A declaration
that no longer has the shape read here fails the import (TypeError), as the wire's
own fast paths do. No I/O.
"""

from __future__ import annotations

import dataclasses
import struct

from construct import Array, Terminated

from primed.formats import Plane
from primed.wire import schema
from primed.wire.codec import Records, Slots, path_field
from primed.wire.messages import Allocated, BufferInfo
from primed.wire.schema import Opcode

#: What one buffer of a reply becomes, besides its id and fd: (width, height, fourcc,
#: modifier, size, planes), in Buffer's order.
Layout = tuple[int, int, int, int, int, tuple[Plane, ...]]
#: serial, total, index, allocator, the ids, and each buffer's Layout (one per id).
Many = tuple[int, int, int, int, tuple[int, ...], tuple[Layout, ...]]

_HEADER = schema.fixed(schema.HEADER)
_HEAD = schema.fixed(schema.ALLOCATED_HEAD)
_BUFFER = schema.fixed(schema.BUFFER)


def _shape_error(what: str) -> TypeError:
    return TypeError(f"ALLOCATED's {what} no longer has the shape the client's fast path reads")


# The body: the head's fields, then an Array of BUFFER counted by the head's "count",
# then Terminated: nothing else.
_BODY = list(schema.BODIES[Opcode.ALLOCATED].subcons)
_ARRAY = getattr(_BODY[-2], "subcon", None) if len(_BODY) >= 2 else None
if (
    _BODY[:-2] != list(schema.ALLOCATED_HEAD.subcons)
    or _BODY[-1] is not Terminated
    or not isinstance(_ARRAY, Array)
    or _ARRAY.subcon is not schema.BUFFER
    or path_field(_ARRAY.count) != "count"
):
    raise _shape_error("body")
_RECORDS = Allocated.WIRE.get("buffers")
if (
    set(Allocated.WIRE) != {"buffers"}
    or not isinstance(_RECORDS, Records)
    or _RECORDS.of is not BufferInfo
    or _RECORDS.high is None
    or _RECORDS.part_of != ("index", "total")
):
    raise _shape_error("buffers")
_SLOTS = BufferInfo.WIRE.get("planes")
if set(BufferInfo.WIRE) != {"planes"} or not isinstance(_SLOTS, Slots):
    raise _shape_error("planes")
#: Every other BufferInfo field is the wire field of its name (no adapter).
_PLAIN = tuple(f.name for f in dataclasses.fields(BufferInfo) if f.name != "planes")
if not set(_PLAIN) <= set(_BUFFER.names) or "id" not in _PLAIN:
    raise _shape_error("BUFFER")

# The header and the head as one struct, read by the fields' positions.
_FRONT = struct.Struct(_HEADER.packer.format + _HEAD.packer.format[1:])
_FRONT_NAMES = _HEADER.names + _HEAD.names
_OPCODE, _NFDS, _SIZE, _SERIAL, _TOTAL, _INDEX, _COUNT, _ALLOCATOR = (
    _FRONT_NAMES.index(name)
    for name in ("opcode", "nfds", "size", "serial", "total", "index", "count", "allocator")
)
if len(_FRONT_NAMES) != len(set(_FRONT_NAMES)):
    raise _shape_error("head")
#: The head's Consts, as positions in the joined struct and the values they must hold.
_CONSTS = tuple((len(_HEADER.names) + at, value) for at, value in _HEAD.consts)
if _HEADER.consts:
    raise _shape_error("header")
_FRONT_SIZE = _FRONT.size
_RECORD = _BUFFER.size
_LOW, _HIGH = _RECORDS.low, _RECORDS.high
_ALLOCATED = int(Opcode.ALLOCATED)
if _BUFFER.consts:  # a BUFFER Const would be one more rule per record, not read here
    raise _shape_error("BUFFER")

# One record's fields by position: the plain ones in Buffer's order, and the slots.
_AT = {name: i for i, name in enumerate(_BUFFER.names)}
_LAYOUT_NAMES = ("width", "height", "fourcc", "modifier", "size")
if set(_PLAIN) != {"id", *_LAYOUT_NAMES}:
    raise _shape_error("BufferInfo")  # a field a Buffer would not hold
_LAYOUT_AT = tuple(_AT[name] for name in _LAYOUT_NAMES)
_NPLANES_AT = _AT[_SLOTS.count]
_FEWEST_PLANES, _MOST_PLANES = _SLOTS.low, _SLOTS.high
_PLANE_AT = tuple(tuple(_AT[f"{name}{i}"] for name in _SLOTS.names) for i in range(_SLOTS.high))
if _SLOTS.names != ("offset", "pitch") or len(set(_AT)) != len(_BUFFER.names):
    raise _shape_error("planes")  # a plane is Plane(offset, pitch)

# A record split around its id: the bytes before it, the id, the bytes after it (as
# struct codes; the bytes are compared, not decoded, so "s" strings).
_ID_AT = _AT["id"]
_CODES = [schema.field(sub).code for sub in schema.BUFFER.subcons]  # one code per field, in order
_BEFORE = struct.calcsize("<" + "".join(_CODES[:_ID_AT]))
_AFTER = _RECORD - _BEFORE - struct.calcsize("<" + _CODES[_ID_AT])
_SPLIT = (f"{_BEFORE}s" if _BEFORE else "") + _CODES[_ID_AT] + (f"{_AFTER}s" if _AFTER else "")
_PER = 1 + (_BEFORE > 0) + (_AFTER > 0)  # values per record in the split unpack
_ID_COLUMN = 1 if _BEFORE else 0
_REST_COLUMNS = tuple(k for k in range(_PER) if k != _ID_COLUMN)
if struct.calcsize("<" + _SPLIT) != _RECORD:
    raise _shape_error("BUFFER")  # pragma: no cover (the sizes add up by construction)
_unpack_record = _BUFFER.packer.unpack_from
#: The split unpack of ``count`` records, by count (at most _HIGH of them, made once).
_SPLITS: dict[int, struct.Struct] = {}


def _split(count: int) -> struct.Struct:
    packer = _SPLITS.get(count)
    if packer is None:
        packer = _SPLITS[count] = struct.Struct("<" + _SPLIT * count)
    return packer


def _layout(data: bytes, offset: int) -> Layout | None:
    """The Layout of the record at ``offset``; None if its plane slots are unsound
    (a count outside the slots' bounds, or a used field past it)."""
    row = _unpack_record(data, offset)
    n = row[_NPLANES_AT]
    if not _FEWEST_PLANES <= n <= _MOST_PLANES:
        return None
    for unused in _PLANE_AT[n:]:
        for at in unused:
            if row[at]:
                return None
    planes = tuple([Plane(row[o], row[p]) for o, p in _PLANE_AT[:n]])
    width, height, fourcc, modifier, size = (row[at] for at in _LAYOUT_AT)
    return width, height, fourcc, modifier, size, planes


def many(data: bytes, nfds: int) -> Many | None:
    """An ALLOCATED that came with ``nfds`` fds, as ``(serial, total, index, allocator,
    ids, layouts)`` with one Layout per id, when decode() would accept ``data``; else
    None (nothing else is done: the caller decodes it in full)."""
    if len(data) < _FRONT_SIZE:
        return None
    front = _FRONT.unpack_from(data)
    count = front[_COUNT]
    if (
        front[_OPCODE] != _ALLOCATED
        or front[_NFDS] != nfds
        or count != nfds
        or not _LOW <= count <= _HIGH
        or len(data) != _FRONT_SIZE + _RECORD * count
        or front[_SIZE] != len(data) - _HEADER.size
        or front[_INDEX] + count > front[_TOTAL]
    ):
        return None
    for at, value in _CONSTS:
        if front[at] != value:
            return None
    values = _split(count).unpack_from(data, _FRONT_SIZE)
    ids = values[_ID_COLUMN::_PER]
    if all(
        (column := values[k::_PER]).count(column[0]) == count for k in _REST_COLUMNS
    ):  # the common reply: one layout for every buffer
        layout = _layout(data, _FRONT_SIZE)
        if layout is None:
            return None
        layouts: tuple[Layout, ...] = (layout,) * count
    else:
        seen: dict[tuple[bytes, ...], Layout] = {}
        each = []
        for i in range(count):
            key = tuple([values[i * _PER + k] for k in _REST_COLUMNS])
            found = seen.get(key)
            if found is None:
                found = _layout(data, _FRONT_SIZE + i * _RECORD)
                if found is None:
                    return None
                seen[key] = found
            each.append(found)
        layouts = tuple(each)
    return front[_SERIAL], front[_TOTAL], front[_INDEX], front[_ALLOCATOR], ids, layouts
