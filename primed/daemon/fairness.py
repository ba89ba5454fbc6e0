"""Each uid's share of the event loop. No I/O here; the clock is injected.

The daemon serves every connection from one event loop, so the time a request
takes to handle (the handler, the kernel's work for a batch ALLOCATE, a LIST page
of a large listing) is time no other client is served. One connection can't hold
the loop for long: its requests are handled one at a time, and its socket yields
its turn (:mod:`primed.daemon.lean`). But a uid may have many connections, each
with a costly request ready, and trio runs every ready task once per round: a
victim's request would wait for one request of each of them.

So the loop is shared by uid. Each uid owes the loop time its requests took;
every window of :data:`WINDOW` seconds pays each uid's debt down by its share of
the window (the window divided among the uids served in the last :data:`RECENT`
seconds). A uid that owes more than one share waits, a window at a time, before
its next request is handled; a request that took longer than a window is paid
off over several, so long requests don't escape the rule. A uid alone is never
held back, and nor is one within its share: a victim uid's requests go through
while the uid that floods the loop waits its turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Seconds of one window of loop time.
WINDOW = 0.01
#: A uid served within this many seconds counts as active, and takes a share.
RECENT = 1.0


class LoopShares:
    """What each uid owes the loop, paid down window by window."""

    def __init__(
        self,
        window: float = WINDOW,
        recent: float = RECENT,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.window, self.recent, self.clock = window, recent, clock
        self._start = clock()  # of the current window
        self._owed: dict[int, float] = {}  # uid -> loop seconds not paid down yet
        self._seen: dict[int, float] = {}  # uid -> when it last asked
        self._active = 0  # uids seen within ``recent``, counted at each window's start

    def wait(self, uid: int) -> float:
        """Seconds ``uid``'s next request must wait before it is handled (0: at once)."""
        now = self.clock()
        if now - self._start >= self.window:
            self._roll(now)
        if self._seen.get(uid, -self.recent) < now - self.recent:
            self._active += 1  # a newcomer takes its share at once, not from the next window
        self._seen[uid] = now
        owed = self._owed.get(uid)
        if owed is None or self._active < 2 or owed <= self.window / self._active:
            return 0.0
        return self._start + self.window - now

    def charge(self, uid: int, seconds: float) -> None:
        """``uid`` held the loop for ``seconds``."""
        self._owed[uid] = self._owed.get(uid, 0.0) + seconds

    def _roll(self, now: float) -> None:
        stale = now - self.recent
        for uid in [u for u, seen in self._seen.items() if seen < stale]:
            del self._seen[uid]
        self._active = len(self._seen)
        paid = (now - self._start) / max(self._active, 1)  # each uid's share of the time gone
        self._start = now
        for uid, owed in list(self._owed.items()):
            if owed <= paid:
                del self._owed[uid]
            else:
                self._owed[uid] = owed - paid
