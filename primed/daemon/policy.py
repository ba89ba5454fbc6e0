"""Who may connect, and how much each client and each uid may hold. No I/O here.

A :class:`Policy` is the rules, as the configuration states them; it is
replaced whole on reload. A :class:`Ledger` is what clients hold right now; it
lives as long as the daemon and checks each request against the policy in
force. Usage is charged when buffers become a client's and refunded when they
stop being its (release or disconnect), so a reload never loses count.
"""

from __future__ import annotations

import dataclasses

from primed.errors import PrimedError


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    """A connecting process, as SO_PEERCRED (and SO_PEERGROUPS) saw it at connect time."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()  #: supplementary groups, where the kernel tells them

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


#: fds one part of a reply carries at most (SCM_MAX_FD); a uid's share of fds in flight
#: is never below it, or an ALLOCATE of that many could never be sent.
_PART_FDS = 253
#: Buffers daemon-wide when each is a GEM handle, not an fd (the DRM backend): the
#: byte bound is what holds memory; this keeps the registry's size in reason.
HANDLE_BUFFERS = 1 << 20
#: Assumed when the memory size is unknown (``memory`` 0): what a per-uid byte quota is cut from.
_ASSUMED_MEMORY = 8 << 30


def over_bound(bound: int, total: int, asked: int, mine: int) -> bool:
    """Whether ``asked`` more of a resource would pass its daemon-wide ``bound``
    (``total`` held by all, ``mine`` by the asking uid).

    Eight uids at their shares (an eighth of the bound each) fill a bound, and
    uids that hold on (never read, never release) can keep it full. So past the
    bound a uid that holds little still gets up to its floor, a 64th of the bound,
    from a headroom of an eighth of it: eight more uids get their floors before the
    headroom is gone too. The bounds leave room below RLIMIT_NOFILE for it.
    """
    if total + asked <= bound:
        return False
    return mine + asked > max(1, bound // 64) or total + asked > bound + bound // 8


@dataclasses.dataclass(frozen=True, slots=True)
class Bounds:
    """Daemon-wide bounds, whatever the quotas say (admins included); derived from the
    daemon's RLIMIT_NOFILE (:meth:`for_nofile`), never switched off.

    The fds the daemon holds are its ``connections`` (one each), its buffers (one
    each on the memfd backend) and ``fd_reserve`` (the listener, logs, fds being
    exported): together they stay within RLIMIT_NOFILE. Fds in flight (sent, not
    read yet) are counted by the kernel apart from open fds, against the same limit.
    """

    # The defaults are for code that builds a Policy itself (``primed serve`` always
    # uses for_nofile's): connections and buffers as for 8192 fds, roomy enough for the
    # largest single request (max_count, 1024 buffers) with others about.
    connections: int = 1920
    buffers: int = 3840
    tokens: int = 65536
    fds_in_flight: int = 512
    #: fds never handed to clients' needs: logs, the listener, exports under way
    fd_reserve: int = 64
    #: bytes all clients hold together; 0: not bounded (the memory size was unknown)
    bytes: int = 0

    @classmethod
    def for_nofile(cls, nofile: int, memory: int = 0, fd_each: bool = True) -> Bounds:
        """The bounds for a daemon that may hold ``nofile`` fds, on a machine of
        ``memory`` bytes (0: unknown, no daemon-wide byte bound). ``fd_each``: each
        buffer holds one of the daemon's fds (memfd), so buffers share the fd budget;
        otherwise (a dumb buffer is a GEM handle) they are bounded by
        :data:`HANDLE_BUFFERS` and the byte bound."""
        reserve = min(max(64, nofile // 16), nofile // 2)
        usable = nofile - reserve
        return cls(
            connections=max(4, usable // 4),
            buffers=max(8, usable // 2) if fd_each else HANDLE_BUFFERS,
            tokens=65536,
            fds_in_flight=max(2 * _PART_FDS, nofile // 2),
            fd_reserve=reserve,
            bytes=memory // 2,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Quotas:
    """How much may be held at once; 0 means no quota.

    The defaults a daemon uses are :meth:`for_nofile`'s, not these zeros: a
    configuration file sets 0 only to switch one quota off.
    """

    buffers_per_client: int = 0
    bytes_per_client: int = 0
    buffers_per_uid: int = 0
    bytes_per_uid: int = 0
    connections_per_uid: int = 0
    tokens_per_uid: int = 0
    tokens_per_buffer: int = 0
    #: fds sent to the uid's connections and not read yet (the kernel charges them to us)
    fds_in_flight_per_uid: int = 0

    @classmethod
    def for_nofile(cls, nofile: int, memory: int = 0, fd_each: bool = True) -> Quotas:
        """The default quotas of a daemon that may hold ``nofile`` fds, on a machine of
        ``memory`` bytes (0: unknown; 8 GiB is assumed).

        Each uid gets an eighth of each daemon-wide bound: no one user can take the
        daemon's fds (a memfd buffer holds one, a connection one), and eight users at
        their caps still leave the reserve. Bytes: an eighth of the memory per uid.
        A client may hold all of its uid's share.
        """
        bounds = Bounds.for_nofile(nofile, memory, fd_each)
        buffers = max(8, bounds.buffers // 8)
        nbytes = (memory or _ASSUMED_MEMORY) // 8
        return cls(
            buffers_per_client=buffers,
            bytes_per_client=nbytes,
            buffers_per_uid=buffers,
            bytes_per_uid=nbytes,
            connections_per_uid=max(4, bounds.connections // 8),
            tokens_per_uid=bounds.tokens // 16,
            tokens_per_buffer=1024,
            fds_in_flight_per_uid=max(_PART_FDS, bounds.fds_in_flight // 8),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """Access rules and quotas.

    With no ``allowed_uids`` and no ``allowed_gids`` anyone who can open the
    socket is served. Otherwise a peer is served if its uid is allowed, or its
    primary or a supplementary group is. Members of ``admin_gid`` are always
    served and hold no quota (the per-request limits and the daemon-wide ``bounds``
    still apply to them).
    """

    allowed_uids: frozenset[int] = frozenset()
    allowed_gids: frozenset[int] = frozenset()
    admin_gid: int | None = None
    quotas: Quotas = Quotas()
    bounds: Bounds = Bounds()

    def is_admin(self, peer: Peer) -> bool:
        return self.admin_gid is not None and peer.in_group(self.admin_gid)

    def refusal(self, peer: Peer) -> str | None:
        """Why ``peer`` may not connect, or None if it may."""
        if not self.allowed_uids and not self.allowed_gids:
            return None
        if self.is_admin(peer) or peer.uid in self.allowed_uids:
            return None
        if any(peer.in_group(gid) for gid in self.allowed_gids):
            return None
        return f"uid {peer.uid} is not allowed to use this daemon"


class QuotaExceeded(PrimedError):
    """A request would take a client, a uid or the daemon over a quota or bound; the text
    names which."""


@dataclasses.dataclass(slots=True)
class Usage:
    buffers: int = 0
    bytes: int = 0
    tokens: int = 0  #: live share tokens of these buffers


@dataclasses.dataclass(eq=False, slots=True)
class Account:
    """One client's usage, and the usage of every client of its uid."""

    peer: Peer
    own: Usage
    uid: Usage


class Ledger:
    """What each client, each uid and the daemon as a whole hold."""

    def __init__(self) -> None:
        self._uids: dict[int, tuple[Usage, int]] = {}  # uid -> (usage, open accounts)
        self.total = Usage()  #: what every client holds together
        self.accounts = 0  #: open accounts (connections) of every uid

    def open(self, peer: Peer) -> Account:
        usage, accounts = self._uids.get(peer.uid, (Usage(), 0))
        self._uids[peer.uid] = (usage, accounts + 1)
        self.accounts += 1
        return Account(peer, Usage(), usage)

    def close(self, account: Account) -> None:
        """Forget ``account``, refunding whatever it still held."""
        self.refund(account, account.own.buffers, account.own.bytes)
        self.charge_tokens(account, -account.own.tokens)
        usage, accounts = self._uids[account.peer.uid]
        self.accounts -= 1
        if accounts == 1:
            del self._uids[account.peer.uid]
        else:
            self._uids[account.peer.uid] = (usage, accounts - 1)

    def usage(self, uid: int) -> Usage:
        """What the clients of ``uid`` hold together (a copy)."""
        found = self._uids.get(uid)
        return dataclasses.replace(found[0]) if found else Usage()

    def connections(self, uid: int) -> int:
        """How many connections of ``uid`` are open."""
        found = self._uids.get(uid)
        return found[1] if found else 0

    def connection_refusal(self, peer: Peer, policy: Policy) -> str | None:
        """Why one more connection of ``peer`` would go over a bound or its uid's
        share (admins have no share, but meet the bound), or None."""
        bound = policy.bounds.connections
        held = self.connections(peer.uid)
        if over_bound(bound, self.accounts, 1, held):
            return f"connections (daemon-wide, {bound}): {self.accounts} open"
        share = policy.quotas.connections_per_uid
        if share and held >= share and not policy.is_admin(peer):
            return f"connections per uid ({share}): {held} open"
        return None

    def check(self, account: Account, policy: Policy, buffers: int, nbytes: int) -> None:
        """Raise :class:`QuotaExceeded` if ``account`` may not take ``buffers`` more
        buffers of ``nbytes`` bytes in all under ``policy``: the daemon-wide bounds
        first (they hold for admins too), then the quotas."""
        bounds, total, mine = policy.bounds, self.total, account.uid
        # The common case first: a request within every bound and quota (within a bound
        # is within over_bound's rule too) passes here, without the texts being made.
        quotas, own = policy.quotas, account.own
        if (
            (not bounds.buffers or total.buffers + buffers <= bounds.buffers)
            and (not bounds.bytes or total.bytes + nbytes <= bounds.bytes)
            and (
                (
                    (
                        not quotas.buffers_per_client
                        or own.buffers + buffers <= quotas.buffers_per_client
                    )
                    and (
                        not quotas.bytes_per_client or own.bytes + nbytes <= quotas.bytes_per_client
                    )
                    and (
                        not quotas.buffers_per_uid
                        or mine.buffers + buffers <= quotas.buffers_per_uid
                    )
                    and (not quotas.bytes_per_uid or mine.bytes + nbytes <= quotas.bytes_per_uid)
                )
                or policy.is_admin(account.peer)
            )
        ):
            return
        for limit, held, asked, theirs, what in (
            (bounds.buffers, total.buffers, buffers, mine.buffers, "buffers daemon-wide"),
            (bounds.bytes, total.bytes, nbytes, mine.bytes, "bytes daemon-wide"),
        ):
            if limit and over_bound(limit, held, asked, theirs):
                raise QuotaExceeded(f"bound: {limit} {what}; {held} held, {asked} more asked")
        if policy.is_admin(account.peer):
            return
        quotas = policy.quotas
        uid = account.peer.uid
        for limit, held, asked, what in (
            (quotas.buffers_per_client, account.own.buffers, buffers, "buffers per client"),
            (quotas.bytes_per_client, account.own.bytes, nbytes, "bytes per client"),
            (quotas.buffers_per_uid, account.uid.buffers, buffers, f"buffers per uid ({uid})"),
            (quotas.bytes_per_uid, account.uid.bytes, nbytes, f"bytes per uid ({uid})"),
        ):
            if limit and held + asked > limit:
                raise QuotaExceeded(f"quota: {limit} {what}; {held} held, {asked} more asked")

    def check_token(self, account: Account, policy: Policy, on_buffer: int) -> None:
        """Raise :class:`QuotaExceeded` if ``account`` may not make one more token for a
        buffer that has ``on_buffer`` live tokens."""
        bound = policy.bounds.tokens
        if over_bound(bound, self.total.tokens, 1, account.uid.tokens):
            raise QuotaExceeded(f"bound: {bound} tokens daemon-wide; {self.total.tokens} live")
        if policy.is_admin(account.peer):
            return
        quotas = policy.quotas
        uid = account.peer.uid
        for limit, held, what in (
            (quotas.tokens_per_uid, account.uid.tokens, f"tokens per uid ({uid})"),
            (quotas.tokens_per_buffer, on_buffer, "tokens per buffer"),
        ):
            if limit and held >= limit:
                raise QuotaExceeded(f"quota: {limit} {what}; {held} live")

    def charge(self, account: Account, buffers: int, nbytes: int) -> None:
        """Record that ``account`` now holds ``buffers`` more buffers of ``nbytes`` bytes."""
        own, uid, total = account.own, account.uid, self.total  # unrolled: once per buffer
        own.buffers += buffers
        own.bytes += nbytes
        uid.buffers += buffers
        uid.bytes += nbytes
        total.buffers += buffers
        total.bytes += nbytes

    def refund(self, account: Account, buffers: int, nbytes: int) -> None:
        """Record that ``account`` let go of ``buffers`` buffers of ``nbytes`` bytes."""
        self.charge(account, -buffers, -nbytes)

    def charge_tokens(self, account: Account, tokens: int) -> None:
        """Record that ``account``'s buffers have ``tokens`` more live tokens (or fewer)."""
        for usage in (account.own, account.uid, self.total):
            usage.tokens += tokens
