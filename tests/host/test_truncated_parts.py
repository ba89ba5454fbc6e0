"""A multi-part ALLOCATED whose first part's fds are cut off (MSG_CTRUNC, the client
at its RLIMIT_NOFILE): the call raises Truncated, its other parts are drained, its
buffers stay the client's in the daemon, and the connection goes on. Both clients.

Each runs in a client process of its own, as its RLIMIT_NOFILE is lowered."""

from __future__ import annotations

import json

import pytest

from tests.host.conftest import StartDaemon
from tests.support import run_client

# Lowers its fd limit to leave room for 3 fds, asks for 300 buffers (two parts: 253
# fds, then 47), and reports what it saw as JSON on stdout.
COMMON = """
import json, os, resource, sys
import primed

def squeeze():
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 4, hard))
    return soft, hard

def fds():
    return len(os.listdir("/proc/self/fd"))
"""

BLOCKING = (
    COMMON
    + """
with primed.connect(sys.argv[1]) as client:
    before = fds()
    limits = squeeze()
    try:
        client.allocate_many(16, 16, "XR24", 300)
        seen = {"raised": None}
    except primed.Truncated as e:
        seen = {"raised": "Truncated", "why": str(e)}
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    held = sorted(b.id for b in client.buffers())  # the second part is drained first
    seen["fds_left"] = fds() - before
    seen["held"] = held
    seen["released"] = sum(client.release(*held[i : i + 100]) for i in range(0, len(held), 100))
    buf = client.allocate(16, 16)
    seen["after"] = buf.width
    client.release(buf)
    seen["left"] = len(client.buffers())
print(json.dumps(seen))
"""
)

TRIO = (
    COMMON
    + """
import trio

async def main():
    async with primed.connect_async(sys.argv[1]) as client:
        before = fds()
        limits = squeeze()
        try:
            await client.allocate_many(16, 16, "XR24", 300)
            seen = {"raised": None}
        except primed.Truncated as e:
            seen = {"raised": "Truncated", "why": str(e)}
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        held = sorted(b.id for b in await client.buffers())
        seen["fds_left"] = fds() - before
        seen["held"] = held
        seen["released"] = 0
        for i in range(0, len(held), 100):
            seen["released"] += await client.release(*held[i : i + 100])
        buf = await client.allocate(16, 16)
        seen["after"] = buf.width
        await client.release(buf)
        seen["left"] = len(await client.buffers())
    print(json.dumps(seen))

trio.run(main)
"""
)


@pytest.mark.parametrize("code", [BLOCKING, TRIO], ids=["blocking", "trio"])
def test_cut_first_part_of_a_multi_part_allocation(spawn: StartDaemon, code: str) -> None:
    daemon = spawn()
    seen = json.loads(run_client(code, daemon.socket, timeout=60))
    assert seen["raised"] == "Truncated" and "MSG_CTRUNC" in seen["why"], seen
    assert seen["fds_left"] == 0, seen  # what arrived of either part was closed
    assert seen["held"] == list(range(1, 301)), seen  # still the client's in the daemon
    assert seen["released"] == 300, seen
    assert seen["after"] == 16 and seen["left"] == 0, seen
