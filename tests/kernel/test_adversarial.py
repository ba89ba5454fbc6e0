"""The adversarial suite's fd paths on vgem, in the VM: dumb buffers exported as
dma-bufs to connections that never read them, and connections that never say HELLO,
each against a victim uid that keeps working (see tests/host/test_adversarial.py and
tests/adversary.py), with no config file and with the shipped systemd/primed.toml."""

from __future__ import annotations

import platform
from collections.abc import Iterator

import pytest

from tests import adversary
from tests.adversary import ATTACKERS, Verdict, attacker
from tests.kernel.conftest import START_TIMEOUT, Nodes
from tests.reliability import count, record_attack
from tests.support import Daemon

KERNEL = f"Linux {platform.release()}"
ROUNDS = count(40, 200)
NOFILE = 1024


@pytest.fixture(params=adversary.CONFIGS)
def config(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def vgem(config: str, nodes: dict[str, Nodes]) -> Iterator[Daemon]:
    """A daemon on vgem's card node, in ``config``, with RLIMIT_NOFILE 1024 (half the host
    tier's: under software emulation each attack connection costs more)."""
    with adversary.open_folder() as folder:
        daemon = adversary.serve_as(
            folder, "--device", nodes["vgem"].card, *adversary.config_args(config, folder),
            nofile=NOFILE, timeout=START_TIMEOUT,
        )  # fmt: skip
        try:
            yield daemon
        finally:
            daemon.stop()


def report(attack: str, config: str, counts: str, verdict: Verdict, found: dict[str, object],
           **extra: object) -> None:  # fmt: skip
    record_attack(
        f"{attack} (vgem)", "vm", config, f"{KERNEL}: {counts}", str(found["victim"]),
        verdict.result(), **adversary.figures(found), **extra,
    )  # fmt: skip
    verdict.assert_passed()


IN_FLIGHT = count(60, 200)  # x ~21 fds queued each, past NOFILE


def test_fds_in_flight_on_vgem(vgem: Daemon, config: str) -> None:
    # Connections that ask for one shared dumb buffer 64 times each and never read: the
    # dma-buf fds queued in their sockets count against the daemon's RLIMIT_NOFILE; the
    # victim's allocations (exported dma-bufs too) and opens must keep working.
    verdict = Verdict()
    found = adversary.run_attack(
        vgem, verdict,
        lambda _: [attacker("in_flight", vgem.socket, connections=IN_FLIGHT, opens=64)],
        ROUNDS, leave_wait=120.0,
    )  # fmt: skip
    hellos = found["ready"][0]["hellos"]
    verdict.check(
        set(hellos) <= {"Welcome", "error LIMIT_EXCEEDED"},
        f"the attacker's connections got {hellos}",
    )
    report(
        "fds in flight: OPEN_SHARED never read", config,
        f"{IN_FLIGHT} connections x 64 OPEN_SHARED of one dumb buffer, never read; daemon "
        f"RLIMIT_NOFILE {NOFILE}",
        verdict, found, attacker=hellos, drained=found["end"][0]["drained"]["seen"],
    )  # fmt: skip


UIDS = count(4, 8)  # at 253 each, past the bound of 512 fds in flight


def test_fds_in_flight_of_many_uids_on_vgem(vgem: Daemon, config: str) -> None:
    # Uids that never read, each at its share of fds in flight, fill the daemon's bound
    # between them: a uid that reads keeps being served (its floor, past the bound).
    verdict = Verdict()
    found = adversary.run_attack(
        vgem, verdict,
        lambda _: [
            attacker("in_flight", vgem.socket, uid=ATTACKERS + n, connections=6, opens=64)
            for n in range(UIDS)
        ],
        ROUNDS, leave_wait=120.0,
    )  # fmt: skip
    hellos = adversary.hellos_of(found)
    verdict.check(set(hellos) == {"Welcome"}, f"the attackers' connections got {hellos}")
    report(
        "fds in flight: many uids fill the bound", config,
        f"{UIDS} uids x 6 connections x 64 OPEN_SHARED of one dumb buffer, never read; "
        f"daemon RLIMIT_NOFILE {NOFILE}",
        verdict, found, attacker=hellos,
    )  # fmt: skip


IDLE = 1100  # past NOFILE
HELLO_WAIT = 60.0


def test_idle_connections_on_vgem(vgem: Daemon, config: str) -> None:
    # Connections that never say HELLO, past the daemon's NOFILE fds: each must be told
    # (LIMIT_EXCEEDED past the uid's share, BAD_STATE at the HELLO deadline) and hung up
    # on, while the victim's new connections and dumb buffers are served.
    verdict = Verdict()
    found = adversary.run_attack(
        vgem, verdict,
        lambda _: [attacker("idle", vgem.socket, connections=IDLE, wait=HELLO_WAIT)],
        ROUNDS, leave_wait=HELLO_WAIT,
    )  # fmt: skip
    ready, seen = found["ready"][0], found["end"][0]["ended"]["seen"]
    made = ready["made"]
    told = sum(
        n for k, n in seen.items() if k.startswith(("error BAD_STATE", "error LIMIT_EXCEEDED"))
    )
    verdict.check(
        seen["still open"] == 0 and told == made,
        f"of {made} idle connections {told} were told BAD_STATE or LIMIT_EXCEEDED and "
        f"{seen['still open']} still open {HELLO_WAIT:g} s after the victim's phase",
    )
    report(
        "idle connections, no HELLO", config,
        f"{made} connections opened of {IDLE} tried ({ready['stopped'] or 'none refused'}); "
        f"daemon RLIMIT_NOFILE {NOFILE}",
        verdict, found, ended=seen,
    )  # fmt: skip
