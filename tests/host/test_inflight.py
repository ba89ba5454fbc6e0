"""Fds in flight, against the kernel's own limit: a daemon of an unprivileged uid
(root and CAP_SYS_RESOURCE are exempt from it), an attacker uid that opens one shared
buffer over and over on many connections and never reads, and a victim uid.

The kernel charges every fd queued in a socket to the sender's user, up to its
RLIMIT_NOFILE; past that every sendmsg with fds fails with ETOOMANYREFS, for every
client. The daemon's budget keeps the attacker to its share, so the victim's
requests all succeed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability import record
from tests.support import (
    Daemon,
    can_connect,
    client_command,
    run_client,
    settled_fds,
    wait_for,
    wait_for_fds,
)

DAEMON_UID, ATTACKER_UID, VICTIM_UID = 64000, 64001, 64002
#: The daemon's RLIMIT_NOFILE: the kernel lets its user have this many fds in flight.
NOFILE = 1024
CONNECTIONS = 60
OPENS = 40  # per connection: about 22 answers of one fd each go before the room is full

_ATTACK = """
import os, socket, sys
import primed
from primed.wire import protocol
from primed.wire.protocol import Hello, OpenShared

path, connections, opens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.setgroups([]); os.setgid(int(sys.argv[4])); os.setuid(int(sys.argv[4]))
owner = primed.connect(path, name="owner")
token = bytes.fromhex(owner.share(owner.allocate(16, 16, "XR24")))
held = []
for _ in range(connections):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.sendmsg([protocol.encode(Hello(name="attacker"), 1)])
    for serial in range(2, 2 + opens):
        sock.sendmsg([protocol.encode(OpenShared(token), serial)])
    held.append(sock)
print("ready", flush=True)
sys.stdin.read()  # never read a reply; hold every connection until told to go
"""

_VICTIM = """
import os, sys
import primed
os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[2]))
with primed.connect(sys.argv[1], name="victim") as client:
    for _ in range(int(sys.argv[3])):
        client.release(*client.allocate_many(16, 16, "XR24", 5))
print("ok")
"""


_AS_DAEMON_UID = f"""
import os, resource, sys
import trio
from primed.cli import main
import primed.daemon.process, primed.kernel.backends
nofile, groups = int(sys.argv[1]), [int(g) for g in sys.argv[2].split(",") if g]
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
os.setgroups(groups)
os.setgid({DAEMON_UID})
os.setuid({DAEMON_UID})  # from root: every capability goes too
raise SystemExit(main(sys.argv[3:]))
"""


def start_unprivileged(
    directory: Path, *args: str, groups: tuple[int, ...] = (), timeout: float = 30.0
) -> Daemon:
    """``primed serve ARGS`` run as DAEMON_UID (with ``groups``) and RLIMIT_NOFILE NOFILE,
    on a socket in ``directory`` (made DAEMON_UID's) every uid may use, with a send
    timeout of 1 s (so that refusals come soon)."""
    assert os.getuid() == 0, "this test needs root, to run the daemon and clients as other uids"
    os.chown(directory, DAEMON_UID, DAEMON_UID)
    os.chmod(directory, 0o755)
    path = str(directory / "primed.sock")
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the Daemon closes it)
    # The interpreter may live where only root reads (and so may the modules it loads
    # later): it starts as root, loads what serving needs, then drops to DAEMON_UID.
    serve = ["serve", *args, "--socket", path, "--socket-mode", "666", "--send-timeout", "1"]
    argv = [sys.executable, "-c", _AS_DAEMON_UID, str(NOFILE), ",".join(map(str, groups)), *serve]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    daemon = Daemon(process, path, log)
    try:
        wait_for(lambda: can_connect(path) or process.poll() is not None, "the daemon", timeout)
        assert process.poll() is None, daemon.log()
    except BaseException:
        daemon.kill()
        raise
    return daemon


def attack_and_check(daemon: Daemon, tier: str, timeout: float = 30.0) -> None:
    """The attack (see the module's doc) while a victim uid works; asserts the victim
    was served throughout and the daemon's fds came back after the attacker left."""
    baseline = settled_fds(daemon.pid)
    attacker = subprocess.Popen(
        client_command(_ATTACK, daemon.socket, str(CONNECTIONS), str(OPENS), str(ATTACKER_UID)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert attacker.stdout is not None
        line = attacker.stdout.readline()
        assert line == "ready\n", f"{line!r}: {attacker.communicate(timeout=60)[1]}"
        # The victim keeps working while the attack builds up, until the attacker's
        # uid is at its share (its further opens wait, then are refused); then more.
        refused = f"refused: fds in flight per uid ({ATTACKER_UID})"
        deadline = time.monotonic() + timeout
        victim = ("5",)
        while refused not in daemon.log() and time.monotonic() < deadline:
            assert run_client(_VICTIM, daemon.socket, str(VICTIM_UID), *victim) == "ok\n"
        assert refused in daemon.log(), daemon.log()
        rounds = 20
        assert run_client(_VICTIM, daemon.socket, str(VICTIM_UID), str(rounds)) == "ok\n"
        assert "ETOOMANYREFS" not in daemon.log() and "Too many references" not in daemon.log()
        record(
            "test_an_attacker_uid_with_fds_unread_leaves_other_uids_served",
            tier,
            f"an attacker uid opened one shared buffer {CONNECTIONS * OPENS} times on "
            f"{CONNECTIONS} connections, reading nothing, against a daemon of RLIMIT_NOFILE "
            f"{NOFILE} (an unprivileged uid, so the kernel's limit on fds in flight applies)",
            "the attacker was held to its share of fds in flight; a victim uid's "
            f"{rounds} ALLOCATEs of 5 all succeeded; no ETOOMANYREFS",
            connections=CONNECTIONS,
            opens=CONNECTIONS * OPENS,
            nofile=NOFILE,
        )
    finally:
        attacker.kill()
        attacker.communicate(timeout=30)
    wait_for_fds(daemon.pid, baseline, timeout=timeout)  # held sockets close with the attacker


@pytest.fixture
def open_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="primed-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_an_attacker_uid_with_fds_unread_leaves_other_uids_served(open_dir: Path) -> None:
    daemon = start_unprivileged(open_dir, "--backend", "memfd")
    try:
        attack_and_check(daemon, "host")
    finally:
        daemon.stop(signal.SIGTERM)
