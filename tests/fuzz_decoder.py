"""A coverage-guided fuzzer for the decoder alone, and the corpus it keeps.

Inputs that reach a line pair (arc) of the decoder never reached before (in
primed/wire/protocol.py, which frames datagrams, primed/wire/codec.py, and the
take/unpack functions it generates for each message) are kept in
tests/corpus/decoder/ (named by their digest: a leading byte gives the fd count
and one the kind), and mutated further. The tests replay the corpus and run a
short session; ``python -m tests.fuzz_decoder --runs N`` grows it.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from primed.errors import RemoteProtocolError
from primed.wire import codec, protocol
from tests.reliability import REQUEST_VECTORS, VECTORS, mutate

CORPUS = Path(__file__).parent / "corpus" / "decoder"
KINDS = ("request", "reply", "peer")
#: Where decoding happens: the framing, the codec, and the code the codec generates.
_TARGETS = frozenset({protocol.__file__, codec.__file__})
_GENERATED = "<primed.wire.codec"


def decode_case(case: bytes) -> None:
    """Decode one corpus entry: byte 0 the fd count, byte 1 the kind, then the datagram.

    Anything but success or RemoteProtocolError propagates (a crash)."""
    nfds, kind = (case[0] if case else 0), KINDS[(case[1] if len(case) > 1 else 0) % 3]
    try:
        protocol.decode(case[2:], nfds, kind)  # type: ignore[arg-type]
    except RemoteProtocolError:
        pass


def _arcs(case: bytes) -> frozenset[tuple[str, int, int]]:
    seen: set[tuple[str, int, int]] = set()
    last = [0]

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            seen.add((frame.f_code.co_filename, last[0], frame.f_lineno))
            last[0] = frame.f_lineno
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        name = frame.f_code.co_filename
        return local if name in _TARGETS or name.startswith(_GENERATED) else None

    sys.settrace(tracer)
    try:
        decode_case(case)
    finally:
        sys.settrace(None)
    return frozenset(seen)


def seeds() -> list[bytes]:
    cases = [p.read_bytes() for p in sorted(CORPUS.glob("*.bin"))] if CORPUS.exists() else []
    for data in REQUEST_VECTORS:
        cases.append(bytes([0, 0]) + data)
    for path in sorted(VECTORS.glob("*.bin")):
        cases.append(bytes([1, 1]) + path.read_bytes())
    return cases


def fuzz(runs: int, seed: int, save: bool) -> tuple[int, int]:
    """Run ``runs`` mutations; returns (arcs covered, new corpus entries)."""
    rng = random.Random(seed)
    pool = seeds()
    covered: set[tuple[str, int, int]] = set()
    for case in pool:
        covered |= _arcs(case)
    added = 0
    for _ in range(runs):
        parent = rng.choice(pool)
        child = parent[:2] + mutate(rng, parent[2:])
        if rng.random() < 0.1:
            child = bytes([rng.randrange(256), rng.randrange(3)]) + child[2:]
        new = _arcs(child) - covered
        if new:
            covered |= new
            pool.append(child)
            added += 1
            if save:
                CORPUS.mkdir(parents=True, exist_ok=True)
                (CORPUS / f"{hashlib.sha1(child).hexdigest()[:16]}.bin").write_bytes(child)
    return len(covered), added


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    arcs, added = fuzz(args.runs, args.seed or random.randrange(2**32), save=True)
    print(f"{arcs} arcs covered; {added} inputs added to {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
