"""The resource model in the daemon's core: connection shares and bounds, the buffer
bound, compact tokens, LIST cursors, reload re-applying access, rate-limited logs.

The backend here is a bookkeeping one (no fd, no memory behind a buffer) where a
test needs 100,000 buffers; the memfd one where fds matter (tests/host/test_core.py).
"""

from __future__ import annotations

import gc
import logging
import random
import time
import tracemalloc
from collections.abc import Iterator

import pytest

from primed import formats
from primed.daemon import core as core_module
from primed.daemon.core import (
    LIST_PAGE_CLIENTS,
    SERVED_PAGE_BUFFERS,
    Answer,
    Core,
    Delivery,
)
from primed.daemon.policy import Bounds, Peer, Policy, Quotas
from primed.daemon.sessions import Ordered, Session
from primed.errors import ErrorCode
from primed.formats import Format, Limits
from primed.kernel.allocation import Allocation, Owner, planes_of
from primed.kernel.drm import Version
from primed.wire import protocol
from primed.wire.protocol import (
    Allocate,
    BufferEntry,
    ClientEntry,
    Error,
    Hello,
    List,
    Listed,
    Query,
    Release,
    Released,
    Reply,
    Request,
    Share,
    Shared,
    Welcome,
)
from primed.wire.schema import Backend

XR24 = formats.fourcc("XR24")
ADMIN_GID = 4343
ROOMY = Bounds(connections=1 << 20, buffers=1 << 20, tokens=1 << 20)


class Ledgered:
    """A backend that only keeps books: each buffer is an Allocation with no fd behind it.
    Exports are never made here (no test carries a delivery's fds)."""

    kind = Backend.MEMFD
    driver = Version("ledger", 1, 0, 0, "", "bookkeeping only")
    node = ""

    def __init__(self) -> None:
        self.live = 0

    def allocate(
        self, fmt: Format, width: int, height: int, limits: Limits, owner: Owner | None = None
    ) -> Allocation:
        layout = formats.plan(fmt, width, height, limits)
        self.live += 1
        return Allocation(width, height, fmt.fourcc, layout.size, planes_of(layout), -1)

    def export(self, allocation: Allocation) -> int:
        raise AssertionError("this backend makes no fds")

    def free(self, allocation: Allocation) -> None:
        self.live -= 1

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_core(policy: Policy | None = None, clock: Clock | None = None) -> Core:
    return Core(Ledgered(), Limits(), policy or Policy(bounds=ROOMY), clock or Clock())


def join(core: Core, uid: int, groups: frozenset[int] = frozenset()) -> Session:
    peer = Peer(4000 + uid, uid, uid, groups)
    assert core.refusal(peer) is None
    session = core.connect(peer)
    assert isinstance(ask(core, session, Hello(name="limits")), Welcome)
    return session


def ask(core: Core, session: Session, request: Request) -> Reply:
    outcome = core.handle(session, 5, request)
    assert isinstance(outcome, Answer), outcome
    return outcome.reply


def allocate(core: Core, session: Session, count: int) -> list[int]:
    """Allocate ``count`` 1x1 buffers (as parts of one request each 1024); their ids."""
    ids: list[int] = []
    while count:
        step = min(count, 1024)
        outcome = core.handle(session, 9, Allocate(1, 1, XR24, count=step))
        assert isinstance(outcome, Delivery), outcome
        while not outcome.ready:
            outcome.prepare()
        ids += outcome._ids  # type: ignore[attr-defined]
        count -= step
    return ids


@pytest.fixture
def core() -> Iterator[Core]:
    made = make_core()
    yield made
    for session in list(made.sessions):
        made.disconnect(session)
    assert made.backend.live == 0  # type: ignore[attr-defined]


# --- connections ---------------------------------------------------------------------------


def test_a_connection_over_the_uid_share_or_the_bound_is_refused_naming_it() -> None:
    quotas = Quotas(connections_per_uid=3)
    core = make_core(Policy(admin_gid=ADMIN_GID, quotas=quotas, bounds=Bounds(connections=6)))
    attacker = Peer(1, 5000, 5000)
    for _ in range(3):  # not HELLO'd: a connection counts from connect on
        assert core.refusal(attacker) is None
        core.connect(attacker)
    refusal = core.refusal(attacker)
    assert refusal == Answer(
        0, Error(ErrorCode.LIMIT_EXCEEDED, 0, "connections per uid (3): 3 open"), drop=True
    )
    victim = Peer(2, 5001, 5001)
    assert core.refusal(victim) is None
    core.connect(victim)
    admin = Peer(3, 5002, 5002, frozenset({ADMIN_GID}))
    core.connect(admin)
    core.connect(admin)  # four of uid 5002: an admin holds no share ...
    assert core.refusal(admin) == Answer(  # ... but meets the bound like everyone
        0, Error(ErrorCode.LIMIT_EXCEEDED, 0, "connections (daemon-wide, 6): 6 open"), drop=True
    )
    assert core.stats["refused"] == 2
    gone = next(s for s in core.sessions if s.uid == 5000)
    core.disconnect(gone)
    assert core.refusal(attacker) is None


def test_allocate_over_the_daemon_wide_buffer_bound_names_it() -> None:
    core = make_core(Policy(admin_gid=ADMIN_GID, bounds=Bounds(buffers=10)))
    admin = join(core, 5002, frozenset({ADMIN_GID}))
    allocate(core, admin, 8)
    other = join(core, 5003)
    reply = core.handle(other, 9, Allocate(1, 1, XR24, count=3))
    assert reply == Answer(
        9, Error(ErrorCode.QUOTA_EXCEEDED, 0, "bound: 10 buffers daemon-wide; 8 held, 3 more asked")
    )
    allocate(core, other, 2)
    assert core.live_buffers == 10
    refused = core.handle(admin, 9, Allocate(1, 1, XR24))  # the bound holds for admins
    assert isinstance(refused, Answer) and isinstance(refused.reply, Error)
    assert refused.reply.code == ErrorCode.QUOTA_EXCEEDED


def test_uids_that_fill_a_bound_leave_every_other_uid_its_floor() -> None:
    # The default quotas give each uid an eighth of each bound: eight uids at their
    # shares fill it. Past it, each uid still gets a 64th of the bound, from a headroom
    # of an eighth: a ninth uid is served, and eight more after it.
    quotas, bounds = Quotas.for_nofile(2048), Bounds.for_nofile(2048)
    core = make_core(Policy(quotas=quotas, bounds=bounds))
    share, floor, headroom = (
        quotas.connections_per_uid,
        bounds.connections // 64,
        bounds.connections // 8,
    )
    assert (share, bounds.connections, floor, headroom) == (60, 480, 7, 60)
    full = f"connections (daemon-wide, {bounds.connections}): %d open"
    attackers = [Peer(1, 5000 + n, 5000 + n) for n in range(8)]
    for peer in attackers:
        for _ in range(share):
            assert core.refusal(peer) is None
            core.connect(peer)
    assert core.refusal(attackers[0]) is not None  # its share
    for n in range(9):  # eight more uids get their floors; the ninth finds the headroom gone
        peer = Peer(2, 6000 + n, 6000 + n)
        for _ in range(floor):
            if core.ledger.accounts + 1 > bounds.connections + headroom:
                break
            assert core.refusal(peer) is None
            core.connect(peer)
        refusal = core.refusal(peer)
        assert refusal is not None and isinstance(refusal.reply, Error)
        assert refusal.reply.text == full % core.ledger.accounts
    assert core.ledger.accounts == bounds.connections + headroom
    for session in [s for s in core.sessions if s.uid == 5000]:
        core.disconnect(session)
    assert core.refusal(attackers[0]) is None  # under the bound again: its share


def test_uids_that_fill_the_buffer_bound_leave_others_a_floor() -> None:
    quotas, bounds = Quotas.for_nofile(2048), Bounds.for_nofile(2048)
    core = make_core(Policy(quotas=quotas, bounds=bounds))
    share, floor = quotas.buffers_per_uid, bounds.buffers // 64
    assert (share * 8, floor) == (bounds.buffers, 15)
    for n in range(8):
        allocate(core, join(core, 5000 + n), share)
    victim = join(core, 6000)
    allocate(core, victim, floor)
    reply = core.handle(victim, 9, Allocate(1, 1, XR24))
    text = (
        f"bound: {bounds.buffers} buffers daemon-wide; {bounds.buffers + floor} held, 1 more asked"
    )
    assert reply == Answer(9, Error(ErrorCode.QUOTA_EXCEEDED, 0, text))


# --- tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize(("buffers", "each"), [(10, 10), (100, 1)])
def test_a_token_costs_under_300_bytes_with_a_64_uid_list_and_the_memory_returns(
    buffers: int, each: int
) -> None:
    # 10,000 tokens from 100 sessions, each sharing its buffers (10 tokens on each of
    # 10, or one on each of 100) with one 64-uid list of its own: the lists are shared
    # by the tokens that name them. (Every token with a list of its own: about 570 B.)
    core = make_core()
    sessions = [join(core, 10_000 + n) for n in range(100)]
    for session in sessions:
        allocate(core, session, buffers)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n, session in enumerate(sessions):
            uids = tuple(range(20_000 + 64 * n, 20_000 + 64 * (n + 1)))
            for ident in range(1, buffers + 1):
                for _ in range(each):
                    assert isinstance(ask(core, session, Share(ident, uids=uids)), Shared)
        during = tracemalloc.get_traced_memory()[0]
        per_token = (during - before) / 10_000
        print(f"\nbytes per live token (64-uid lists, {each} per buffer): {per_token:.0f}")
        assert len(core.tokens) == 10_000
        assert per_token < 300
        some = next(iter(core.tokens._live.values()))
        assert some.admits(19_999) is False
        assert some.admits(20_000 + 64 * (some.owner.uid - 10_000) + 63)
        for session in sessions:
            core.disconnect(session)
        del some, session
        sessions.clear()  # what this test holds on to is not the daemon's
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    print(f"left after the sessions went: {after - before} bytes")
    assert len(core.tokens) == 0 and core.ledger.total.tokens == 0
    # The tokens' memory came back (what stays is a few tables' slack, not per token).
    assert after - before < 50_000


def test_the_uid_list_of_a_token_is_a_set() -> None:
    core = make_core()
    owner, friend, stranger = join(core, 5000), join(core, 5001), join(core, 5002)
    allocate(core, owner, 1)
    shared = ask(core, owner, Share(1, uids=(5003, 5001, 5001, 7)))
    assert isinstance(shared, Shared)
    entry = core.tokens.get(shared.token)
    assert entry is not None
    assert entry.admits(friend.uid) and not entry.admits(stranger.uid)
    assert entry.admits(7) and entry.admits(5003) and not entry.admits(0)


# --- LIST ----------------------------------------------------------------------------------


def listing(core: Core, session: Session, what: int) -> list[tuple[int, int]]:
    """A whole listing, page by page: (client, id) of buffers or (number, 0) of clients."""
    rows: list[tuple[int, int]] = []
    start = 0
    while True:
        page = ask(core, session, List(what, start))
        assert isinstance(page, Listed) and page.what == what
        for entry in page.entries:
            if isinstance(entry, BufferEntry):
                rows.append((entry.client, entry.id))
            else:
                assert isinstance(entry, ClientEntry)
                rows.append((entry.number, 0))
        if not page.next:
            return rows
        start = page.next


def test_a_listing_stays_consistent_while_buffers_come_and_go(core: Core) -> None:
    # Between pages, buffers are released and allocated at random, before and after
    # the cursor: each buffer present throughout the listing appears exactly once.
    root = join(core, 0)
    others = [join(core, 6000 + n) for n in range(4)]
    rng = random.Random(11)
    for session in (root, *others):
        allocate(core, session, 1500)
    throughout = {(s.number, i) for s in core.sessions for i in s.buffers}
    seen: list[tuple[int, int]] = []
    start = 0
    while True:
        page = ask(core, root, List(protocol.LIST_BUFFERS, start))
        assert isinstance(page, Listed)
        seen += [(e.client, e.id) for e in page.entries]  # type: ignore[union-attr]
        if not page.next:
            break
        start = page.next
        for session in others:  # some go, some come
            ids = rng.sample(sorted(session.buffers), 40)
            assert ask(core, session, Release(tuple(ids))) == Released(40)
            throughout -= {(session.number, i) for i in ids}
            allocate(core, session, 30)
    assert len(seen) == len(set(seen)), "an entry appeared twice"
    assert throughout <= set(seen), "an entry present throughout was skipped"
    # In the order the buffers were allocated: each owner's ids ascend.
    for session in (root, *others):
        ids = [i for c, i in seen if c == session.number]
        assert ids == sorted(ids)


def test_a_client_listing_is_by_number_and_stays_consistent(core: Core) -> None:
    root = join(core, 0)
    crowd = [join(core, 7000 + n) for n in range(3 * LIST_PAGE_CLIENTS)]
    first = ask(core, root, List(protocol.LIST_CLIENTS))
    assert isinstance(first, Listed) and len(first.entries) == LIST_PAGE_CLIENTS
    # Half the crowd goes, new clients come: the next page goes on from the cursor.
    for session in crowd[::2]:
        core.disconnect(session)
    newcomers = [join(core, 8000 + n) for n in range(10)]
    rest = listing(core, root, protocol.LIST_CLIENTS)
    assert [n for n, _ in rest] == sorted(s.number for s in core.sessions)
    page = ask(core, root, List(protocol.LIST_CLIENTS, first.next))
    assert isinstance(page, Listed)
    numbers = [e.number for e in page.entries]  # type: ignore[union-attr]
    assert numbers[0] >= first.next and numbers == sorted(numbers)
    assert newcomers[-1].number not in numbers  # a page holds at most a page
    # A plain client sees itself alone, whatever the cursor.
    me = crowd[1]
    assert listing(core, me, protocol.LIST_CLIENTS) == [(me.number, 0)]
    late = ask(core, me, List(protocol.LIST_CLIENTS, me.number + 1))
    assert late == Listed(protocol.LIST_CLIENTS, 0, ())


def test_a_plain_client_pages_through_its_own_buffers(core: Core) -> None:
    me, other = join(core, 5000), join(core, 5001)
    allocate(core, other, 700)
    ids = allocate(core, me, 2 * SERVED_PAGE_BUFFERS + 5)
    assert ask(core, me, Release(tuple(ids[:10]))) == Released(10)
    assert listing(core, me, protocol.LIST_BUFFERS) == [(me.number, i) for i in ids[10:]]


def test_one_list_does_about_a_page_of_work_at_100000_buffers(core: Core) -> None:
    root = join(core, 0)
    holders = [join(core, 9000 + n) for n in range(10)]
    for session in holders:
        allocate(core, session, 10_000)
    # Holes everywhere: every other buffer of every other holder released.
    for session in holders[::2]:
        ids = sorted(session.buffers)[::2]
        for at in range(0, len(ids), 1000):
            ask(core, session, Release(tuple(ids[at : at + 1000])))
    live = core.live_buffers
    assert live == 75_000
    for session in holders[::2]:
        allocate(core, session, 5_000)
    assert core.live_buffers == 100_000
    listed = core._buffers
    pages = 0
    worst = 0
    start = 0
    elapsed = encoding = 0.0
    while True:
        before = listed.touched
        began = time.perf_counter()
        page = ask(core, root, List(protocol.LIST_BUFFERS, start))
        elapsed += time.perf_counter() - began
        worst = max(worst, listed.touched - before)
        began = time.perf_counter()
        protocol.encode(page, 5)  # the transport's part of the work
        encoding += time.perf_counter() - began
        assert isinstance(page, Listed)
        pages += 1
        if not page.next:
            break
        start = page.next
    assert pages == -(-100_000 // SERVED_PAGE_BUFFERS)
    # A page looks at its entries, the one after, and at most one block it starts in.
    assert worst <= SERVED_PAGE_BUFFERS + 1 + 256
    print(
        f"\nLIST at 100,000 buffers: {elapsed / pages * 1e3:.2f} ms per page in the core, "
        f"{encoding / pages * 1e3:.2f} ms to encode it; at most {worst} entries looked "
        f"at per page of {SERVED_PAGE_BUFFERS}"
    )


def test_listing_keys_are_renumbered_when_they_run_out(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_module, "MAX_LISTING_KEY", 50)
    root = join(core, 0)
    for _ in range(10):  # 100 buffers allocated, 20 stay
        ids = allocate(core, root, 10)
        ask(core, root, Release(tuple(ids[:8])))
    assert core._last_key <= 50
    assert listing(core, root, protocol.LIST_BUFFERS) == [
        (root.number, i) for i in sorted(root.buffers)
    ]


def test_ordered_pages_from_any_key() -> None:
    ordered: Ordered[str] = Ordered()
    for key in range(1, 2000, 3):
        ordered.add(key, str(key))
    for key in range(1, 1000, 6):
        ordered.pop(key)
    keys = list(ordered)
    assert len(ordered) == len(keys) and keys == sorted(keys)
    for start in (0, 1, 2, 5, 700, 1998, 5000):
        rows, following = ordered.page(start, 10)
        want = [k for k in keys if k >= start]
        assert [k for k, _ in rows] == want[:10]
        assert following == (want[10] if len(want) > 10 else 0)
    with pytest.raises(ValueError, match="added after"):
        ordered.add(5, "back in time")
    assert 4 in ordered and 1 not in ordered and ordered.get(1) is None


# --- reload and the log --------------------------------------------------------------------


def test_reload_returns_the_sessions_now_refused_and_logs_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    core = make_core(clock=clock)
    kept, dropped = join(core, 5000), [join(core, 5001) for _ in range(8)]
    with caplog.at_level(logging.INFO, "primed"):
        refused = core.configure(Limits(), Policy(allowed_uids=frozenset({5000}), bounds=ROOMY))
    assert set(refused) == set(dropped) and kept not in refused
    lines = [r.getMessage() for r in caplog.records if "no longer allowed" in r.getMessage()]
    assert lines[0] == f"reload: {dropped[0]} is no longer allowed; disconnecting it"
    assert len(lines) == core.logs.burst  # rate-limited per uid like every such line


def test_refusals_at_connect_are_rate_limited_per_uid(caplog: pytest.LogCaptureFixture) -> None:
    # A refused uid reconnecting in a loop: a burst of lines, then silence, then one
    # line saying how many were held back. Another uid is logged meanwhile.
    clock = Clock()
    core = make_core(Policy(allowed_uids=frozenset({5000}), bounds=ROOMY), clock)
    refused, other = Peer(1, 6666, 6666), Peer(2, 7777, 7777)
    with caplog.at_level(logging.INFO, "primed"):
        for _ in range(3000):
            answer = core.refusal(refused)
            assert answer is not None and isinstance(answer.reply, Error)
            assert answer.reply.code == ErrorCode.PERMISSION_DENIED
        assert core.refusal(other) is not None
        clock.now += core.logs.interval
        core.refusal(refused)
    lines = [r.getMessage() for r in caplog.records]
    mine = [line for line in lines if "uid 6666" in line]
    assert len(mine) == core.logs.burst + 1
    assert mine[-1].endswith(f"({3000 - core.logs.burst} similar line(s) held back)")
    assert sum("uid 7777" in line for line in lines) == 1
    assert core.stats["refused"] == 3002  # counted, every one


def test_bad_messages_and_repeated_errors_are_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    core = make_core(Policy(quotas=Quotas(buffers_per_uid=1), bounds=ROOMY), clock)
    with caplog.at_level(logging.INFO, "primed"):
        for _ in range(200):
            session = join(core, 5000)
            answer = core.receive(session, b"\x01", 0)
            assert isinstance(answer, Answer) and answer.drop
            core.disconnect(session)
        holder = join(core, 5001)
        allocate(core, holder, 1)
        for _ in range(100):
            reply = core.handle(holder, 9, Allocate(1, 1, XR24))
            assert isinstance(reply, Answer) and isinstance(reply.reply, Error)
            assert reply.reply.code == ErrorCode.QUOTA_EXCEEDED
            data = bytearray(protocol.encode(Query(), 44))
            data[0:2] = (0x7777).to_bytes(2, "little")
            unknown = core.receive(holder, bytes(data), 0)
            assert isinstance(unknown, Answer) and not unknown.drop
    lines = [r.getMessage() for r in caplog.records]
    burst = core.logs.burst
    assert sum("bad message" in line for line in lines) == burst
    assert sum("refused: quota" in line for line in lines) == burst
    assert sum("unknown opcode 0x7777" in line for line in lines) == burst
    # Connecting in a loop is a uid's to provoke too: its lines are limited, more roomily.
    assert sum("uid 5000) connected" in line for line in lines) == core.connection_logs.burst
    clock.now += core.logs.interval
    with caplog.at_level(logging.INFO, "primed"):
        core.handle(holder, 9, Allocate(1, 1, XR24))
    assert caplog.records[-1].getMessage().endswith(f"({100 - burst} similar line(s) held back)")


def test_a_ledgered_allocation_is_what_the_listing_shows(core: Core) -> None:
    me = join(core, 5000)
    (ident,) = allocate(core, me, 1)
    page = ask(core, me, List(protocol.LIST_BUFFERS))
    assert isinstance(page, Listed)
    (entry,) = page.entries
    assert isinstance(entry, BufferEntry) and (entry.client, entry.id) == (me.number, ident)
    shared = ask(core, me, Share(ident))
    assert isinstance(shared, Shared)
    again = ask(core, me, List(protocol.LIST_BUFFERS))
    assert isinstance(again, Listed) and again.entries[0].tokens == 1  # type: ignore[union-attr]
