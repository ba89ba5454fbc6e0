"""Bad input against a live daemon: fuzzed datagrams beside a client that must never fail.

The fuzzer's seed is printed on failure (it is the test's parameter); every datagram
must get an Error or a sound reply, or end only its own connection. Afterwards the
daemon holds exactly the fds it held before, and its registry is empty.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from primed.errors import LocalProtocolError
from primed.wire.protocol import List, OpenBuffer, Query, Request, encode
from tests.host.conftest import StartDaemon
from tests.host.test_protocol import (
    allocates,
    hellos,
    open_shareds,
    releases,
    revokes,
    shares,
    u8,
    u32,
    u64,
)
from tests.reliability import (
    WELL_BEHAVED,
    Fuzzer,
    count,
    fd_sources,
    record,
    settled_registry,
)
from tests.support import client_command, settled_fds, wait_for_fds

requests = st.one_of(
    hellos, allocates, releases, shares, open_shareds, revokes,
    st.builds(Query), st.builds(List, u32, u32), st.builds(OpenBuffer, u64, u64),
)  # fmt: skip


def _encode(request: Request, serial: int) -> bytes:
    try:
        return encode(request, serial)
    except LocalProtocolError:  # a field the wire can't carry: send its mutation instead
        return encode(Query(), serial)[:-1] + b"\0"


encoded = st.builds(_encode, requests, u32)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(encoded))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        edit = draw(st.integers(0, 2))
        if edit == 0 and data:
            data[at] = draw(u8)
        elif edit == 1:
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


datagrams = st.one_of(
    encoded.map(lambda d: ("hypothesis schema", d)),
    _mutated().map(lambda d: ("hypothesis mutation", d)),
    st.binary(max_size=200).map(lambda d: ("hypothesis bytes", d or b"\0")),
)

MESSAGES = count(100_000, 1_000_000)  # the reduced count is what CI must reach
SEED = int(os.environ.get("PRIMED_FUZZ_SEED", "0")) or random.randrange(1, 2**32)


def test_fuzzer_against_a_live_daemon(spawn: StartDaemon) -> None:
    daemon = spawn("--max-count", "8", "--max-size", str(16 << 20))
    settled_registry(daemon.socket)
    baseline = settled_fds(daemon.pid)
    good = subprocess.Popen(
        client_command(WELL_BEHAVED, daemon.socket),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    fuzzer = Fuzzer(daemon.socket, SEED, fd_sources())
    started = time.monotonic()
    try:
        fuzzer.run(MESSAGES)
    except BaseException as e:
        e.add_note(f"fuzzer seed {SEED} (set PRIMED_FUZZ_SEED to replay)")
        raise
    finally:
        out, err = good.communicate("stop\n", timeout=120)
    elapsed = time.monotonic() - started
    assert good.returncode == 0, f"the well-behaved client failed:\n{err}"
    rounds = json.loads(out)["rounds"]
    assert rounds > 0
    assert daemon.process.poll() is None
    settled_registry(daemon.socket)
    wait_for_fds(daemon.pid, baseline, timeout=30)
    sent = sum(fuzzer.sent.values())
    assert sent == MESSAGES
    print(f"\nfuzzed {sent} datagrams in {elapsed:.1f} s (seed {SEED}): {dict(fuzzer.sent)}")
    print(f"outcomes: {dict(fuzzer.outcomes)}; well-behaved rounds: {rounds}")
    record(
        "fuzzer against a live daemon",
        "host",
        f"{sent:,} fuzzed datagrams (seed {SEED}: schema requests, mutated golden vectors, "
        "unknown opcodes, wrong lengths and fd counts, fds attached) beside a well-behaved "
        f"client that did {rounds:,} rounds (allocate, paint, share, open, query, release)",
        "every datagram answered with an Error or a sound reply to its serial, or only its "
        "own connection dropped; every well-behaved reply right; daemon fds and registry "
        "back at baseline",
        messages=sent,
        rounds=rounds,
        outcomes=dict(fuzzer.outcomes),
        seconds=round(elapsed, 1),
    )


def test_hypothesis_requests_against_a_live_daemon(spawn: StartDaemon) -> None:
    daemon = spawn("--max-count", "8", "--max-size", str(16 << 20))
    settled_registry(daemon.socket)
    baseline = settled_fds(daemon.pid)
    fuzzer = Fuzzer(daemon.socket, 1)
    examples = count(300, 5000)
    sent = 0

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(datagrams)
    def one(datagram: tuple[str, bytes]) -> None:
        nonlocal sent
        fuzzer.send(*datagram)
        sent += 1

    try:
        one()
    finally:
        fuzzer.close()
    settled_registry(daemon.socket)
    wait_for_fds(daemon.pid, baseline, timeout=30)
    record(
        "hypothesis-driven requests against a live daemon",
        "host",
        f"{sent:,} datagrams from hypothesis strategies over the schema: requests, "
        "mutated requests, raw bytes",
        "an Error, a sound reply or a dropped connection for each; fds and registry at baseline",
        messages=sent,
    )
