"""Two unrelated processes share a DRM buffer, by token and by direct passing, on both drivers."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys

import pytest

import primed
from primed.kernel import drm
from tests.kernel.conftest import Nodes
from tests.support import Daemon, wait_for

PEER = [sys.executable, "-m", "tests.kernel.peer"]


def run_peer(*args: str, pass_fds: tuple[int, ...] = ()) -> dict[str, object]:
    done = subprocess.run(
        [*PEER, *args], pass_fds=pass_fds, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def painted(client: primed.Client, seed: int) -> tuple[primed.Buffer, str]:
    buf = client.allocate(256, 128, "XR24")
    pattern = random.Random(seed).randbytes(buf.size)
    with buf.map() as pixels:
        pixels[:] = pattern
    return buf, hashlib.sha256(pattern).hexdigest()


def test_token_shares_a_buffer_with_another_process(
    daemon: Daemon, driver: str, nodes: dict[str, Nodes]
) -> None:
    with primed.connect(daemon.socket) as owner:
        buf, expected = painted(owner, 10)
        token = owner.share(buf)
        args = ("--token", token, "--socket", daemon.socket, "--size", str(buf.size))
        seen = run_peer(*args, "--node", nodes[driver].render)
        assert seen["sha256"] == expected and seen["same_dmabuf"] is True
        # The opener imports the very buffer the owner holds: same pixels through its handle.
        seen = run_peer(*args, "--node", nodes[driver].card)
        assert seen["sha256"] == expected
        owner.revoke(token)
        assert run_peer(*args, "--node", nodes[driver].render) == {"error": "UNKNOWN_TOKEN"}
        owner.release(buf)


def test_direct_passing_to_another_process(
    daemon: Daemon, driver: str, nodes: dict[str, Nodes]
) -> None:
    with primed.connect(daemon.socket) as owner:
        buf, expected = painted(owner, 11)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, theirs:
            primed.send_buffer(ours, buf)
            seen = run_peer(
                "--channel", str(theirs.fileno()), "--node", nodes[driver].render,
                "--size", str(buf.size), pass_fds=(theirs.fileno(),),
            )  # fmt: skip
        assert seen["sha256"] == expected and seen["same_dmabuf"] is True
        owner.release(buf)


def test_opened_buffer_survives_its_owner(
    daemon: Daemon, driver: str, nodes: dict[str, Nodes]
) -> None:
    owner = primed.connect(daemon.socket)
    buf, expected = painted(owner, 12)
    token = owner.share(buf)
    with primed.connect(daemon.socket) as other, primed.Device(nodes[driver].render) as device:
        opened = other.open_shared(token)
        imported = device.import_buffer(opened)
        size = opened.size
        opened.close()
        buf.close()
        owner.close()  # the daemon frees its handle; the importer's handle keeps the memory
        exported = drm.handle_to_fd(device.fd, imported.handle)
        try:
            with primed.Mapping(exported, size, write=False, sync=True) as pixels:
                assert hashlib.sha256(pixels).hexdigest() == expected
        finally:
            os.close(exported)
        imported.close()
        # The daemon hears of the disconnect in its own time: wait until it has.
        wait_for(lambda: len(other.clients()) == 1, "the owner's disconnect", 60)
        with pytest.raises(primed.ServerError) as dead:
            other.open_shared(token)
        assert dead.value.code == primed.ErrorCode.UNKNOWN_TOKEN
