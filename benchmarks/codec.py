"""The codec alone: encode + decode of each message kind, against plain ``struct``.

The messages are the golden vectors (protocol/vectors/), one of each kind, so
every kind the protocol has is measured. The floor packs and unpacks the floor's
own fixed message (benchmarks/floor.py): what a codec with no validation costs.
"""

from __future__ import annotations

import json
import timeit
from pathlib import Path
from typing import Any

from benchmarks import floor
from primed.wire import protocol

VECTORS = Path(__file__).resolve().parent.parent / "protocol" / "vectors"
#: The messages of one allocate + release round trip.
ROUND_TRIP = ("ALLOCATE", "ALLOCATED", "RELEASE", "RELEASED")


def _best_us(call: Any, iterations: int) -> float:
    return min(timeit.repeat(call, number=iterations, repeat=5)) / iterations * 1e6


def measure(iterations: int) -> list[dict[str, Any]]:
    """For each message kind: encode, decode and both, in microseconds, and the floor's."""
    index = json.loads((VECTORS / "vectors.json").read_text())["vectors"]
    seen = set()
    rows = []
    request = floor.REQUEST
    packed = request.pack(floor.ALLOCATE, 64, 64, 1)
    floor_us = _best_us(lambda: request.unpack(request.pack(*request.unpack(packed))), iterations)
    for entry in index:
        if entry["message"] in seen:
            continue
        seen.add(entry["message"])
        data = (VECTORS / entry["file"]).read_bytes()
        kind, nfds = entry["direction"], entry["nfds"]
        serial, message = protocol.decode(data, nfds, kind)
        encode_us = _best_us(lambda: protocol.encode(message, serial), iterations)  # noqa: B023
        decode_us = _best_us(lambda: protocol.decode(data, nfds, kind), iterations)  # noqa: B023
        rows.append(
            {
                "message": entry["message"],
                "vector": entry["name"],
                "bytes": len(data),
                "encode_us": encode_us,
                "decode_us": decode_us,
                "total_us": encode_us + decode_us,
                "floor_us": floor_us,
            }
        )
    return rows


def round_trip_us(rows: list[dict[str, Any]]) -> float:
    """Codec time in one allocate + release round trip (each message encoded and decoded once)."""
    by_message = {row["message"]: row["total_us"] for row in rows}
    return float(sum(by_message.get(name, float("nan")) for name in ROUND_TRIP))
