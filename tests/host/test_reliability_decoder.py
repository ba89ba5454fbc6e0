"""The decoder under a coverage-guided fuzzer (tests/fuzz_decoder.py), its corpus replayed;
and sizes and formats at the edges, refused by the daemon before any allocation."""

from __future__ import annotations

from pathlib import Path

import pytest

import primed
from primed import formats
from primed.errors import ErrorCode, ServerError
from tests.fuzz_decoder import CORPUS, decode_case, fuzz
from tests.reliability import count, record
from tests.support import Daemon

CASES = sorted(CORPUS.glob("*.bin"))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_corpus_replays(path: Path) -> None:
    decode_case(path.read_bytes())


def test_coverage_guided_session() -> None:
    runs = count(20_000, 1_000_000)
    arcs, added = fuzz(runs, 0, save=False)
    record(
        "decoder under a coverage-guided fuzzer",
        "host",
        f"{runs:,} mutations of the corpus ({len(CASES)} kept inputs + golden vectors), "
        "guided by the line arcs of the decoder they reach (framing, codec, generated code)",
        f"every input decodes or raises RemoteProtocolError; {arcs} arcs reached",
        runs=runs,
        arcs=arcs,
        new_inputs=added,
    )


EDGES = [
    (0, 16, "XR24", ErrorCode.INVALID_ARGUMENT),
    (16, 0, "XR24", ErrorCode.INVALID_ARGUMENT),
    (16385, 16, "XR24", ErrorCode.LIMIT_EXCEEDED),
    (16, 16385, "XR24", ErrorCode.LIMIT_EXCEEDED),
    (2**30, 1, "XR24", ErrorCode.LIMIT_EXCEEDED),  # pitch 2**32: past 32 bits
    (2**32 - 1, 2**32 - 1, "XR24", ErrorCode.LIMIT_EXCEEDED),
    (1, 1, "NV12", None),  # odd sizes of subsampled formats: the daemon decides
]


def test_sizes_and_formats_at_the_edges(shared: Daemon) -> None:
    refused = 0
    with primed.connect(shared.socket) as client:
        for width, height in ((1, 1), (16384, 1), (1, 16384)):
            client.release(client.allocate(width, height, "R8"))
        for width, height, fmt, code in EDGES:
            try:
                client.release(client.allocate(width, height, fmt))
            except ServerError as e:
                assert code is None or e.code == code, (width, height, e)
                assert e.text
                refused += 1
            else:
                assert code is None, (width, height, "was allocated")
        known = set(formats.FORMATS)
        lacking = [
            formats.fourcc(text)
            for text in ("AB30", "XR12", "NV15", "Y210", "P016", "Q410", "YUV9", "C8  ")
        ] + [0, 1, 0xFFFFFFFF]
        for fourcc in lacking:
            assert fourcc not in known
            with pytest.raises(ServerError) as unsupported:
                client.allocate(16, 16, fourcc)
            assert unsupported.value.code == ErrorCode.UNSUPPORTED_FORMAT
            refused += 1
        assert client.query().used_buffers == 0
    record(
        "sizes and formats at the edges",
        "host",
        f"0, 1, 16384, 16385, a pitch past 32 bits, {len(lacking)} fourccs the table lacks",
        f"{refused} refusals, each with its code and a reason; nothing held afterwards",
        refused=refused,
    )
