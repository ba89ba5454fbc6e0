"""The daemon's registry: connected clients, the buffers each owns, and share tokens.

No I/O here. A :class:`Session` holds one client's buffers (id -> Allocation);
ids count up from 1 per client, so no client can name another's buffers. A
:class:`Tokens` registry maps each live share token to the buffer it opens;
a token dies when it is revoked, used up (ONCE), or its buffer is released.

Listings page through an :class:`Ordered` mapping: keys that only ever grow,
kept in blocks so that a page from any key on costs about a page of work.

Tokens are compact because a uid may hold thousands: a slotted :class:`Token`,
its uid list packed into sorted bytes shared by every token with the same list,
and the tokens of one buffer chained through the tokens themselves (no set per
buffer); the chain's first token keeps the count.
"""

from __future__ import annotations

import bisect
import dataclasses
import secrets
import struct
import time
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from primed.daemon.policy import Account, Ledger
from primed.kernel.allocation import Allocation
from primed.wire.schema import TOKEN_SIZE

V = TypeVar("V")

#: Keys per block of an Ordered mapping (as a shift): the most a page walks past.
_BLOCK_SHIFT = 8
#: Live tokens below which the registry's dict is never copied to shrink it.
_LIVE_FLOOR = 1024


class Ordered(Generic[V]):
    """A mapping of int keys, each added greater than every key before it.

    The keys live in blocks of 256 consecutive keys (dicts, which keep their keys
    in the order added, so in key order), and a sorted list holds the blocks that
    have any key. :meth:`page` finds the first block at or past a key by bisection
    and walks on from there: it touches at most a page of entries and one block.
    Adding and removing are O(1) dict work, but for a block that empties: its number
    leaves the sorted list (a memmove of 8 bytes per block, one per 256 keys).
    """

    __slots__ = ("_blocks", "_last", "_len", "_starts", "touched")

    def __init__(self) -> None:
        self._blocks: dict[int, dict[int, V]] = {}
        self._starts: list[int] = []  # the blocks' numbers, ascending
        self._len = 0
        self._last = 0
        self.touched = 0  #: entries page() looked at, ever (for tests that bound its work)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, int):
            return False
        block = self._blocks.get(key >> _BLOCK_SHIFT)
        return block is not None and key in block

    def __getitem__(self, key: int) -> V:
        return self._blocks[key >> _BLOCK_SHIFT][key]

    def __iter__(self) -> Iterator[int]:
        for start in self._starts:
            yield from self._blocks[start]

    def get(self, key: int, default: V | None = None) -> V | None:
        block = self._blocks.get(key >> _BLOCK_SHIFT)
        return block.get(key, default) if block is not None else default

    def items(self) -> Iterator[tuple[int, V]]:
        for start in self._starts:
            yield from self._blocks[start].items()

    def values(self) -> Iterator[V]:
        for start in self._starts:
            yield from self._blocks[start].values()

    def add(self, key: int, value: V) -> None:
        """Add ``key``, which must be greater than every key added before."""
        if key <= self._last:
            raise ValueError(f"key {key} added after {self._last}")
        number = key >> _BLOCK_SHIFT
        block = self._blocks.get(number)
        if block is None:
            block = self._blocks[number] = {}
            self._starts.append(number)
        block[key] = value
        self._len += 1
        self._last = key

    def pop(self, key: int) -> V:
        """Remove ``key`` and return its value; KeyError if it is not there."""
        number = key >> _BLOCK_SHIFT
        block = self._blocks[number]
        value = block.pop(key)
        self._len -= 1
        if not block:
            del self._blocks[number]
            del self._starts[bisect.bisect_left(self._starts, number)]
        return value

    def page(self, start: int, limit: int) -> tuple[list[tuple[int, V]], int]:
        """Up to ``limit`` entries with keys from ``start`` on, in key order, and the key
        to start the next page from (that of the first entry not returned; 0: none)."""
        rows: list[tuple[int, V]] = []
        index = bisect.bisect_left(self._starts, start >> _BLOCK_SHIFT)
        while index < len(self._starts):
            for key, value in self._blocks[self._starts[index]].items():
                self.touched += 1
                if key < start:
                    continue
                if len(rows) == limit:
                    return rows, key
                rows.append((key, value))
            index += 1
        return rows, 0


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
    #: buffer id -> the first of its live tokens (the others are chained to it)
    shares: dict[int, Token] = dataclasses.field(default_factory=dict)
    #: the buffers in the order of the daemon-wide listing: listing key -> buffer id
    listed: Ordered[int] = dataclasses.field(default_factory=Ordered)
    #: buffer id -> its listing key
    keys: dict[int, int] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return f"client {self.number}{name} (pid {self.pid}, uid {self.uid})"

    @property
    def tokens(self) -> int:
        """Live tokens of this client's buffers."""
        return self.account.own.tokens

    def adopt(self, allocation: Allocation) -> int:
        """Make ``allocation`` this client's; returns its new id."""
        ident = self.next_id
        self.next_id += 1
        self.buffers[ident] = allocation
        return ident


class Token:
    """What a share token opens, and for whom; a link in its buffer's chain of tokens."""

    __slots__ = ("count", "id", "key", "next", "once", "owner", "prev", "uids")

    def __init__(self, key: bytes, owner: Session, ident: int, once: bool, uids: bytes):
        self.key = key  #: the token itself (the registry's key: the same object)
        self.owner = owner
        self.id = ident
        self.once = once
        self.uids = uids  #: sorted native u32s; empty: anyone
        self.prev: Token | None = None
        self.next: Token | None = None
        self.count = 0  #: in the first token of a chain: the chain's length

    def admits(self, uid: int) -> bool:
        if not self.uids:
            return True
        view = memoryview(self.uids).cast("I")
        index = bisect.bisect_left(view, uid)
        return index < len(view) and view[index] == uid


class Tokens:
    """Every live share token; each is charged to its owner's account in ``ledger``."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self._live: dict[bytes, Token] = {}
        self._peak = _LIVE_FLOOR  # the most live at once since the dict was last copied
        self._ledger = ledger or Ledger()
        # packed uid list -> the one copy every token with that list shares, and its users
        self._lists: dict[bytes, bytes] = {}
        self._uses: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._live)

    def get(self, token: bytes) -> Token | None:
        return self._live.get(token)

    def count(self, owner: Session, ident: int) -> int:
        """Live tokens of buffer ``ident`` of ``owner``."""
        first = owner.shares.get(ident)
        return first.count if first is not None else 0

    def of(self, owner: Session, ident: int) -> list[bytes]:
        """The live tokens of buffer ``ident`` of ``owner``."""
        found, entry = [], owner.shares.get(ident)
        while entry is not None:
            found.append(entry.key)
            entry = entry.next
        return found

    def issue(self, owner: Session, ident: int, once: bool, uids: Iterable[int]) -> bytes:
        """A new unguessable token that opens buffer ``ident`` of ``owner`` for ``uids``
        (empty: anyone)."""
        token = secrets.token_bytes(TOKEN_SIZE)
        ordered = sorted(set(uids))
        packed = self._intern(struct.pack(f"{len(ordered)}I", *ordered))
        entry = Token(token, owner, ident, once, packed)
        self._live[token] = entry
        self._peak = max(self._peak, len(self._live))
        self._link(entry)
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
        entry.uids = self._intern(entry.uids)
        self._live[token] = entry
        self._link(entry)

    def forget(self, token: bytes) -> None:
        """Kill a live token."""
        entry = self._live.pop(token)
        self._unlink(entry)
        self._release(entry.uids)
        # A dict never gives back the room it grew to: copy it once it is mostly empty,
        # so that the memory of tokens gone returns (amortized: each copy follows at
        # least three times as many deaths).
        if len(self._live) * 4 < self._peak:
            self._live = dict(self._live)
            self._peak = max(len(self._live), _LIVE_FLOOR)

    def forget_buffer(self, owner: Session, ident: int) -> None:
        """Kill every token of one buffer (it is going away)."""
        while (first := owner.shares.get(ident)) is not None:
            self.forget(first.key)

    def _link(self, entry: Token) -> None:
        owner = entry.owner
        first = owner.shares.get(entry.id)
        if first is None:
            entry.prev = entry.next = None
            entry.count = 1
            owner.shares[entry.id] = entry
        else:
            entry.prev, entry.next, entry.count = first, first.next, 0
            if first.next is not None:
                first.next.prev = entry
            first.next = entry
            first.count += 1
        self._ledger.charge_tokens(owner.account, 1)

    def _unlink(self, entry: Token) -> None:
        owner = entry.owner
        if entry.prev is None:  # the chain's first: the next one takes its place
            following = entry.next
            if following is None:
                del owner.shares[entry.id]
            else:
                following.prev = None
                following.count = entry.count - 1
                owner.shares[entry.id] = following
        else:
            entry.prev.next = entry.next
            if entry.next is not None:
                entry.next.prev = entry.prev
            owner.shares[entry.id].count -= 1
        entry.prev = entry.next = None
        entry.count = 0
        self._ledger.charge_tokens(owner.account, -1)

    def _intern(self, packed: bytes) -> bytes:
        if not packed:
            return b""
        shared = self._lists.setdefault(packed, packed)
        self._uses[shared] = self._uses.get(shared, 0) + 1
        return shared

    def _release(self, packed: bytes) -> None:
        if not packed:
            return
        left = self._uses[packed] - 1
        if left:
            self._uses[packed] = left
        else:
            del self._uses[packed], self._lists[packed]
