"""An attacker uid against a victim uid, one shared resource at a time, on the memfd
backend, with no config file and with the shipped systemd/primed.toml.

Each test asserts that every victim request succeeded, that the victim's p99 under
attack stayed within 10x its own baseline p99 + 20 ms (measured just before, in the
same run), that the daemon's fds came back to their baseline and its VmRSS to within
16 MiB of it once the attacker left, and the attack's own effect (see tests/adversary.py
for the cast). Each records its row for RELIABILITY.md before it asserts, so a failed
attack is reported with its figures.
"""

from __future__ import annotations

import re
import resource
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import adversary
from tests.adversary import ATTACKER, ATTACKERS, VICTIM, Verdict, Worker, attacker
from tests.reliability import count, record_attack
from tests.support import Daemon, cpu_seconds


@pytest.fixture(params=adversary.CONFIGS)
def config(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def folder() -> Iterator[Path]:
    with adversary.open_folder() as made:
        yield made


Serve = Callable[..., Daemon]


@pytest.fixture
def serve(folder: Path, config: str) -> Iterator[Serve]:
    """``serve(*args, nofile=..., access=...)``: a memfd daemon of its own uid, in
    ``config``; it must stop cleanly."""
    started: list[Daemon] = []

    def start(*args: str, nofile: int = 2048, access: str = "") -> Daemon:
        where = adversary.config_args(config, folder, access)
        daemon = adversary.serve_as(folder, "--backend", "memfd", *where, *args, nofile=nofile)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


ROUNDS = count(adversary.ROUNDS_REDUCED, adversary.ROUNDS_FULL)


def report(attack: str, config: str, counts: str, verdict: Verdict, found: dict[str, Any],
           **extra: object) -> None:  # fmt: skip
    record_attack(
        attack, "host", config, counts, found["victim"], verdict.result(),
        **adversary.figures(found), **extra,
    )  # fmt: skip
    verdict.assert_passed()


# --- fds in flight --------------------------------------------------------------------------

IN_FLIGHT = count(120, 400)


def test_fds_in_flight(serve: Serve, config: str) -> None:
    # The kernel charges every fd queued in a socket to the sender's user, up to its
    # RLIMIT_NOFILE (2048 here); connections that ask for a shared buffer 64 times and
    # never read must not make the victim's ALLOCATE and OPEN_SHARED fail (ETOOMANYREFS),
    # nor spend a ONCE token whose open failed.
    daemon = serve()
    verdict = Verdict()
    found = adversary.run_attack(
        daemon, verdict,
        lambda _: [attacker("in_flight", daemon.socket, connections=IN_FLIGHT, opens=64)],
        ROUNDS,
    )  # fmt: skip
    hellos = found["ready"][0]["hellos"]
    drained = found["end"][0]["drained"]
    verdict.check(
        set(hellos) <= {"Welcome", "error LIMIT_EXCEEDED"},
        f"the attacker's connections got {hellos}",
    )
    report(
        "fds in flight: OPEN_SHARED never read", config,
        f"{IN_FLIGHT} connections x 64 OPEN_SHARED of one buffer, never read; daemon "
        "RLIMIT_NOFILE 2048",
        verdict, found, attacker=dict(hellos), drained=drained["seen"],
    )  # fmt: skip


UIDS = 8


def test_fds_in_flight_of_many_uids(serve: Serve, config: str) -> None:
    # Eight uids that never read, each at its share of fds in flight, fill the daemon's
    # bound between them; a uid that reads must still be served (its floor, past it).
    daemon = serve()
    verdict = Verdict()
    found = adversary.run_attack(
        daemon, verdict,
        lambda _: [
            attacker("in_flight", daemon.socket, uid=ATTACKERS + n, connections=8, opens=64)
            for n in range(UIDS)
        ],
        ROUNDS,
    )  # fmt: skip
    hellos = adversary.hellos_of(found)
    verdict.check(set(hellos) == {"Welcome"}, f"the attackers' connections got {hellos}")
    report(
        "fds in flight: eight uids fill the bound", config,
        f"{UIDS} uids x 8 connections x 64 OPEN_SHARED of one buffer, never read; daemon "
        "RLIMIT_NOFILE 2048 (bound 1024 fds in flight, 253 per uid)",
        verdict, found, attacker=hellos,
    )  # fmt: skip


# --- event-loop time ------------------------------------------------------------------------

CHURN, CHURN_BATCH = 4, 240


def test_costly_requests_from_many_connections(serve: Serve, config: str) -> None:
    # Connections of one uid that each always have an ALLOCATE of a batch of buffers
    # (or its RELEASE) in flight: the daemon makes a batch a slice of the loop at a
    # time, and the uid gets its share of the loop, so the victim's requests don't
    # queue behind theirs. The batches fit the uid's quota (960 buffers at 16,384 fds):
    # the attack is on the loop, not on the quota.
    daemon = serve(nofile=16384)
    verdict = Verdict()
    found = adversary.run_attack(
        daemon, verdict,
        lambda _: [attacker("churn", daemon.socket, connections=CHURN, count=CHURN_BATCH)],
        ROUNDS,
    )  # fmt: skip
    hellos, seen = found["ready"][0]["hellos"], found["end"][0]["seen"]
    verdict.check(hellos == {"Welcome": CHURN}, f"the attacker's connections got {hellos}")
    verdict.check(seen.get("batches", 0) > 0, f"the attacker's batches: {seen}")
    report(
        "event loop: costly requests on many connections", config,
        f"{CHURN} connections each with an ALLOCATE of {CHURN_BATCH} 1x1 (or their RELEASE) "
        "always in flight; daemon RLIMIT_NOFILE 16384",
        verdict, found, attacker=dict(seen),
    )  # fmt: skip


# --- connections ------------------------------------------------------------------------------

IDLE = 2200  # past the daemon's 2048 fds: the attack is to use them all up
HELLO_WAIT = 30.0


def test_idle_connections_without_hello(serve: Serve, config: str) -> None:
    # Connections that never send HELLO: those past the uid's share get LIMIT_EXCEEDED,
    # the others BAD_STATE at the HELLO deadline, each then a hang-up; the victim's new
    # connections are served throughout.
    daemon = serve()
    verdict = Verdict()
    found = adversary.run_attack(
        daemon, verdict,
        lambda _: [attacker("idle", daemon.socket, connections=IDLE, wait=HELLO_WAIT)],
        ROUNDS, leave_wait=HELLO_WAIT,
    )  # fmt: skip
    ready, end = found["ready"][0], found["end"][0]
    seen = end["ended"]["seen"]
    made = ready["made"]
    told = sum(
        n for k, n in seen.items() if k.startswith(("error BAD_STATE", "error LIMIT_EXCEEDED"))
    )
    verdict.check(
        seen["still open"] == 0 and seen["hung up"] == made,
        f"of {made} idle connections {seen['still open']} were still open "
        f"{HELLO_WAIT:g} s after the victim's phase",
    )
    verdict.check(
        told == made, f"{told} of {made} idle connections were told BAD_STATE or LIMIT_EXCEEDED"
    )
    report(
        "idle connections, no HELLO", config,
        f"{made} connections opened of {IDLE} tried ({ready['stopped'] or 'none refused'}); "
        "daemon RLIMIT_NOFILE 2048",
        verdict, found, ended=seen, texts=end["ended"]["texts"],
    )  # fmt: skip


# --- tokens -------------------------------------------------------------------------------

TOKEN_CONNECTIONS = count(20, 100)


def test_token_memory(serve: Serve, config: str) -> None:
    # Tokens naming 64 uids, 1,024 per connection on many connections: a cap per uid must
    # stop the attacker with an error naming it, and a token must stay compact.
    daemon = serve()
    verdict = Verdict()
    found = adversary.run_attack(
        daemon, verdict,
        lambda _: [attacker("tokens", daemon.socket, connections=TOKEN_CONNECTIONS,
                            per_connection=1024)],
        ROUNDS,
    )  # fmt: skip
    ready = found["ready"][0]
    tokens, stops = ready["tokens"], ready["stops"]
    verdict.check(
        any(("LIMIT_EXCEEDED" in k or "QUOTA_EXCEEDED" in k) and "token" in k for k in stops),
        f"the attacker made {tokens:,} tokens and never got an error naming a token limit "
        f"({stops or 'no error'})",
    )
    grown = found["rss_kib"][1] - found["rss_kib"][0]
    verdict.check(
        grown * 1024 <= tokens * 300 + adversary.RSS_MARGIN_KIB * 1024,
        f"daemon VmRSS grew {grown / 1024:.0f} MiB for {tokens:,} tokens "
        f"({grown * 1024 / max(tokens, 1):.0f} B each; under 300 B asked)",
    )
    report(
        "token memory, 64-uid lists", config,
        f"{TOKEN_CONNECTIONS} connections x up to 1,024 tokens of 64 uids each: "
        f"{tokens:,} made",
        verdict, found, stops=stops,
    )  # fmt: skip


# --- CPU: stalled clients ------------------------------------------------------------------

STALL_UIDS = count(4, 10)
STALL_EACH = count(75, 100)
QUIET = float(count(2, 5))
CPU_BOUND = 0.05


def test_stalled_clients_cost_no_cpu(serve: Serve, config: str) -> None:
    # Clients with replies unread and an OPEN_SHARED held back, from several uids; they
    # never read (the send timeout is 120 s, so they stay): waiting for them must cost
    # the daemon under 5% of a core, and the victim is served at its usual pace.
    daemon = serve("--send-timeout", "120", nofile=8192)
    verdict = Verdict()
    cpu: dict[str, float] = {}

    def start(_: Worker) -> list[Worker]:
        return [
            attacker("stall", daemon.socket, uid=ATTACKERS + n, connections=STALL_EACH)
            for n in range(STALL_UIDS)
        ]

    def quiet() -> None:  # the victim is idle here: what the stalled clients cost alone
        time.sleep(1.0)
        used, since = cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(QUIET)
        cpu["quiet"] = (cpu_seconds(daemon.pid) - used) / (time.monotonic() - since)

    found = adversary.run_attack(daemon, verdict, start, ROUNDS, before=quiet)
    stalled = sum(r["hellos"].get("Welcome", 0) for r in found["ready"])
    hellos: dict[str, int] = {}
    for r in found["ready"]:
        for k, n in r["hellos"].items():
            hellos[k] = hellos.get(k, 0) + n
    verdict.check(
        cpu["quiet"] < CPU_BOUND,
        f"{stalled} stalled clients cost the daemon {cpu['quiet']:.0%} of a core "
        f"(bound {CPU_BOUND:.0%})",
    )
    report(
        "stalled clients (CPU)", config,
        f"{STALL_UIDS} uids x {STALL_EACH} connections, each with 40 replies unread and an "
        f"OPEN_SHARED held back; {stalled} admitted",
        verdict, found, **{"daemon CPU, victim idle": f"{cpu['quiet']:.1%}"}, hellos=hellos,
    )  # fmt: skip


# --- event loop: LISTs ---------------------------------------------------------------------

LISTED = count(5_000, 18_900)


def test_lists_in_flight(serve: Serve, config: str) -> None:
    # One connection holding as many buffers as it may keeps 16 LISTs of them in flight:
    # no LIST may hold the event loop long enough to show in the victim's p99.
    # A memfd buffer is an fd of the daemon's: as many as this process may give it.
    daemon = serve(nofile=min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    verdict = Verdict()
    found = adversary.run_attack(
        daemon, verdict,
        lambda _: [attacker("list", daemon.socket, buffers=LISTED, in_flight=16)],
        ROUNDS,
    )  # fmt: skip
    ready, end = found["ready"][0], found["end"][0]
    verdict.check(end["lists"] > 0, "the attacker's LISTs were never answered")
    report(
        "LISTs in flight at many buffers", config,
        f"one connection held {ready['held']:,} of {LISTED:,} 1x1 buffers asked "
        f"({ready['stopped'] or 'all made'}), then kept 16 LISTs in flight: "
        f"{end['lists']:,} answered",
        verdict, found,
    )  # fmt: skip


# --- daemon fds: many tiny buffers -----------------------------------------------------------


def test_tiny_allocations(serve: Serve, config: str) -> None:
    # 1x1 buffers from 16 connections until refused: on memfd each is an fd of the
    # daemon's (2048 here); the attacker must meet a quota (QUOTA_EXCEEDED or
    # LIMIT_EXCEEDED), never the daemon's EMFILE, and the victim allocates on.
    daemon = serve()
    verdict = Verdict()
    found = adversary.run_attack(
        daemon, verdict,
        lambda _: [attacker("tiny", daemon.socket, connections=16, limit=4096)],
        ROUNDS,
    )  # fmt: skip
    ready = found["ready"][0]
    stops = ready["stops"]
    verdict.check(
        bool(stops)
        and all(
            k.removeprefix("connect: ").startswith(("QUOTA_EXCEEDED", "LIMIT_EXCEEDED"))
            for k in stops
        ),
        f"the attacker held {ready['held']:,} buffers and was stopped by {stops or 'nothing'}",
    )
    report(
        "many 1x1 allocations (daemon fds)", config,
        f"16 connections allocated 1x1 buffers, 64 a request, until refused: "
        f"{ready['held']:,} held; daemon RLIMIT_NOFILE 2048",
        verdict, found, stops=stops,
    )  # fmt: skip


# --- memfd: a holder's file flags --------------------------------------------------------------

FLAGGED = count(16, 64)


def test_holder_file_flags(serve: Serve, config: str) -> None:
    # The victim shares buffers with the attacker, which sets O_APPEND and O_NONBLOCK on
    # the fds it got; the victim's own fds keep their flags and pwrite at offset 0.
    daemon = serve()
    verdict = Verdict()
    kept: dict[str, Any] = {}

    def start(worker: Worker) -> list[Worker]:
        tokens = worker.ask(op="share_out", n=FLAGGED, uid=ATTACKER)["tokens"]
        return [attacker("flags", daemon.socket, tokens=tokens)]

    def check(worker: Worker) -> None:
        kept.update(worker.ask(op="check_kept", phase="owner's fds"))

    found = adversary.run_attack(daemon, verdict, start, ROUNDS, after=check)
    flagged = found["ready"][0]["flagged"]
    verdict.check(flagged == FLAGGED, f"the attacker set O_APPEND on {flagged} of {FLAGGED}")
    verdict.check(
        kept["rounds"] == FLAGGED and not kept["failed"],
        f"the owner's fds: {list(kept['errors'])[:3]} ({kept['failed']} problems)",
    )
    report(
        "memfd holder's fcntl flags", config,
        f"{FLAGGED} buffers the victim shared with the attacker, which set O_APPEND and "
        "O_NONBLOCK on its fds",
        verdict, found, **{"owner's fds checked": kept["rounds"],
                           "owner's problems": kept["failed"]},
    )  # fmt: skip


# --- reload removes a uid ------------------------------------------------------------------------

HOLDERS = count(20, 50)  # within the uid's share of connections (60 at 2048 fds)


def test_reload_removes_a_uid(serve: Serve, config: str, folder: Path) -> None:
    # The attacker's uid is allowed, its connections each hold a buffer; the file then
    # drops it and SIGHUP reloads: each connection gets PERMISSION_DENIED (serial 0) and
    # is hung up on, the log says so, the victim is served throughout.
    daemon = serve(access=f"allowed_uids = [0, {VICTIM}, {ATTACKER}]")
    verdict = Verdict()
    logged = [0]

    def reload() -> None:
        adversary.config_args(config, folder, f"allowed_uids = [0, {VICTIM}]")
        time.sleep(0.2)  # into the victim's phase
        logged[0] = len(daemon.log())
        daemon.process.send_signal(signal.SIGHUP)

    found = adversary.run_attack(
        daemon, verdict,
        lambda _: [attacker("hold", daemon.socket, connections=HOLDERS, wait=20.0)],
        ROUNDS, during=reload,
    )  # fmt: skip
    told = found["end"][0]["told"]["seen"]
    denied = told.get("error PERMISSION_DENIED (serial 0)", 0)
    verdict.check(
        denied == HOLDERS and told["hung up"] == HOLDERS and not told["still open"],
        f"of {HOLDERS} connections of the removed uid: {denied} told PERMISSION_DENIED, "
        f"{told['still open']} still open 20 s after the reload",
    )
    # Not the "disconnected" lines: those come whoever hung up.
    said = [
        line for line in daemon.log()[logged[0] :].splitlines()
        if f"uid {ATTACKER}" in line
        and any(w in line for w in ("PERMISSION_DENIED", "not allowed", "refused"))
    ]  # fmt: skip
    verdict.check(bool(said), "no log line after the reload says a session was refused")
    report(
        "reload removes a uid", config,
        f"{HOLDERS} connections of the attacker's uid, each holding a buffer, when a "
        "reload dropped that uid",
        verdict, found, told=told, **{"log lines on it": len(said)},
    )  # fmt: skip


# --- logs: a refused uid in a loop ---------------------------------------------------------

LOOP_SECONDS = float(count(3, 10))
#: A second try this long after the loop began, once the log limiter's window (10 s) is over.
AGAIN = 12.0
MAX_LINES = 20
HELD_BACK = re.compile(r"\((\d+) similar line\(s\) held back\)")


def test_refused_uid_reconnecting(serve: Serve, config: str) -> None:
    # A refused uid reconnecting as fast as it can: the log holds back its lines and
    # says how many; the victim is served throughout.
    daemon = serve(access=f"allowed_uids = [0, {VICTIM}]")
    verdict = Verdict()
    found = adversary.run_attack(
        daemon, verdict,
        lambda _: [attacker("refused", daemon.socket, seconds=LOOP_SECONDS, again=AGAIN,
                            max=100_000)],
        ROUNDS,
    )  # fmt: skip
    end = found["end"][0]
    attempts = end["attempts"]
    lines = [
        line for line in daemon.log().splitlines()
        if "refused" in line and f"uid {ATTACKER}" in line
    ]  # fmt: skip
    held = sum(int(m.group(1)) for line in lines if (m := HELD_BACK.search(line)))
    verdict.check(
        set(end["seen"]) == {f"PERMISSION_DENIED uid {ATTACKER} is not allowed to use this daemon"},
        f"the attacker's attempts got {end['seen']}",
    )
    verdict.check(
        len(lines) <= MAX_LINES,
        f"{len(lines):,} log lines for {attempts:,} refusals (bound {MAX_LINES})",
    )
    verdict.check(
        len(lines) + held == attempts,
        f"{len(lines):,} lines written + {held:,} said held back != {attempts:,} refusals",
    )
    report(
        "refused uid reconnecting in a loop (log)", config,
        f"{attempts:,} connection attempts by a refused uid in {LOOP_SECONDS:g} s, one more "
        f"{AGAIN:g} s after the start",
        verdict, found, **{"log lines": len(lines), "said held back": held},
    )  # fmt: skip
