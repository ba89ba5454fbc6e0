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


@dataclasses.dataclass(frozen=True, slots=True)
class Quotas:
    """How much may be held at once; 0 means no quota."""

    buffers_per_client: int = 0
    bytes_per_client: int = 0
    buffers_per_uid: int = 0
    bytes_per_uid: int = 0
    connections_per_uid: int = 0
    tokens_per_uid: int = 0
    tokens_per_buffer: int = 0
    #: fds sent to the uid's connections and not read yet (the kernel charges them to us)
    fds_in_flight_per_uid: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Bounds:
    """Daemon-wide bounds, whatever the quotas say; derived from the daemon's
    RLIMIT_NOFILE (:meth:`for_nofile`), never switched off."""

    connections: int = 240
    buffers: int = 480
    tokens: int = 65536
    fds_in_flight: int = 512
    #: fds never handed to clients' needs: logs, the listener, exports under way
    fd_reserve: int = 64

    @classmethod
    def for_nofile(cls, nofile: int) -> Bounds:
        """The bounds for a daemon that may hold ``nofile`` fds."""
        reserve = max(64, nofile // 16)
        usable = max(nofile - reserve, 64)
        return cls(
            connections=max(16, usable // 4),
            buffers=max(16, usable // 2),
            tokens=65536,
            fds_in_flight=max(512, nofile // 2),
            fd_reserve=reserve,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """Access rules and quotas.

    With no ``allowed_uids`` and no ``allowed_gids`` anyone who can open the
    socket is served. Otherwise a peer is served if its uid is allowed, or its
    primary or a supplementary group is. Members of ``admin_gid`` are always
    served and hold no quota (the per-request limits still apply to them).
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
    """A request would take a client or a uid over its quota; the text names which."""


@dataclasses.dataclass(slots=True)
class Usage:
    buffers: int = 0
    bytes: int = 0


@dataclasses.dataclass(eq=False, slots=True)
class Account:
    """One client's usage, and the usage of every client of its uid."""

    peer: Peer
    own: Usage
    uid: Usage


class Ledger:
    """What each client and each uid holds."""

    def __init__(self) -> None:
        self._uids: dict[int, tuple[Usage, int]] = {}  # uid -> (usage, open accounts)

    def open(self, peer: Peer) -> Account:
        usage, accounts = self._uids.get(peer.uid, (Usage(), 0))
        self._uids[peer.uid] = (usage, accounts + 1)
        return Account(peer, Usage(), usage)

    def close(self, account: Account) -> None:
        """Forget ``account``, refunding whatever it still held."""
        self.refund(account, account.own.buffers, account.own.bytes)
        usage, accounts = self._uids[account.peer.uid]
        if accounts == 1:
            del self._uids[account.peer.uid]
        else:
            self._uids[account.peer.uid] = (usage, accounts - 1)

    def usage(self, uid: int) -> Usage:
        """What the clients of ``uid`` hold together (a copy)."""
        found = self._uids.get(uid)
        return dataclasses.replace(found[0]) if found else Usage()

    def check(self, account: Account, policy: Policy, buffers: int, nbytes: int) -> None:
        """Raise :class:`QuotaExceeded` if ``account`` may not take ``buffers`` more
        buffers of ``nbytes`` bytes in all under ``policy``."""
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

    def charge(self, account: Account, buffers: int, nbytes: int) -> None:
        """Record that ``account`` now holds ``buffers`` more buffers of ``nbytes`` bytes."""
        for usage in (account.own, account.uid):
            usage.buffers += buffers
            usage.bytes += nbytes

    def refund(self, account: Account, buffers: int, nbytes: int) -> None:
        """Record that ``account`` let go of ``buffers`` buffers of ``nbytes`` bytes."""
        self.charge(account, -buffers, -nbytes)
