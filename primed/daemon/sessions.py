"""The daemon's registry: connected clients, the buffers each owns, and share tokens.

No I/O here. A :class:`Session` holds one client's buffers (id -> Allocation);
ids count up from 1 per client, so no client can name another's buffers. A
:class:`Tokens` registry maps each live share token to the buffer it opens;
a token dies when it is revoked, used up (ONCE), or its buffer is released.
"""

from __future__ import annotations

import dataclasses
import secrets
import time

from primed.daemon.policy import Account
from primed.kernel.allocation import Allocation
from primed.wire.schema import TOKEN_SIZE


@dataclasses.dataclass(eq=False)
class Session:
    """One connected client and the buffers it owns."""

    number: int
    pid: int
    uid: int
    gid: int
    account: Account
    since: float = dataclasses.field(default_factory=time.time)
    name: str = ""
    version: int = 0  # 0 until Hello was answered
    buffers: dict[int, Allocation] = dataclasses.field(default_factory=dict)
    next_id: int = 1
    shares: dict[int, set[bytes]] = dataclasses.field(default_factory=dict)  # id -> tokens
    tokens: int = 0  # live tokens in ``shares``

    def __str__(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return f"client {self.number}{name} (pid {self.pid}, uid {self.uid})"

    def adopt(self, allocation: Allocation) -> int:
        """Make ``allocation`` this client's; returns its new id."""
        ident = self.next_id
        self.next_id += 1
        self.buffers[ident] = allocation
        return ident


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Token:
    """What a share token opens, and for whom."""

    owner: Session
    id: int
    once: bool
    uids: frozenset[int]  # empty: anyone

    def admits(self, uid: int) -> bool:
        return not self.uids or uid in self.uids


class Tokens:
    """Every live share token, and each owner's count of them."""

    def __init__(self) -> None:
        self._live: dict[bytes, Token] = {}

    def __len__(self) -> int:
        return len(self._live)

    def get(self, token: bytes) -> Token | None:
        return self._live.get(token)

    def issue(self, owner: Session, ident: int, once: bool, uids: frozenset[int]) -> bytes:
        """A new unguessable token that opens buffer ``ident`` of ``owner``."""
        token = secrets.token_bytes(TOKEN_SIZE)
        self._live[token] = Token(owner, ident, once, uids)
        owner.shares.setdefault(ident, set()).add(token)
        owner.tokens += 1
        return token

    def take(self, token: bytes) -> Token:
        """Take a live token out of use (a ONCE token being opened): it opens nothing
        until :meth:`put_back`, and is gone for good if that never comes."""
        entry = self._live[token]
        self.forget(token)
        return entry

    def put_back(self, token: bytes, entry: Token) -> None:
        """Make a token :meth:`take` took live again (its open failed). The caller
        checks that its buffer still exists."""
        self._live[token] = entry
        entry.owner.shares.setdefault(entry.id, set()).add(token)
        entry.owner.tokens += 1

    def forget(self, token: bytes) -> None:
        """Kill a live token."""
        entry = self._live.pop(token)
        tokens = entry.owner.shares[entry.id]
        tokens.discard(token)
        if not tokens:
            del entry.owner.shares[entry.id]
        entry.owner.tokens -= 1

    def forget_buffer(self, owner: Session, ident: int) -> None:
        """Kill every token of one buffer (it is going away)."""
        for token in list(owner.shares.get(ident, ())):
            self.forget(token)
