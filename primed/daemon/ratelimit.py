"""Log lines rate-limited per uid, so that no local user can flood the journal.

No I/O here; the clock is injected. A refused uid reconnecting in a loop, or a
client that keeps hitting the same error, would otherwise write thousands of
lines a second and spend journald's burst for everyone. Each (uid, kind) may
write ``burst`` lines per ``interval`` seconds; past that its lines are held
back and counted, and the next line it may write says how many were.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Keys remembered at once; past that, expired windows are forgotten, and if none
#: has expired every uid's lines of that kind share one window.
MAX_KEYS = 4096


class LogLimiter:
    """Which log lines to write: ``burst`` per uid and kind per ``interval`` seconds."""

    def __init__(
        self,
        interval: float = 10.0,
        burst: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.interval, self.burst, self._clock = interval, burst, clock
        # (uid, kind) -> [window start, lines written in it, lines held back]
        self._windows: dict[tuple[int, str], list[float]] = {}

    def allow(self, uid: int, kind: str) -> int | None:
        """None if this line is to be held back (it is counted); otherwise how many
        lines of this uid and kind were held back since the last one written."""
        now = self._clock()
        key = (uid, kind)
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= MAX_KEYS:
                self._expire(now)
                if len(self._windows) >= MAX_KEYS:
                    key = (-1, kind)
                    window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = [now, 0, 0]
        if now - window[0] >= self.interval:
            held = int(window[2])
            window[:] = [now, 1, 0]
            return held
        if window[1] < self.burst:
            window[1] += 1
            held = int(window[2])
            window[2] = 0
            return held
        window[2] += 1
        return None

    def _expire(self, now: float) -> None:
        stale = [k for k, w in self._windows.items() if now - w[0] >= self.interval and not w[2]]
        for key in stale:
            del self._windows[key]


def held_note(held: int) -> str:
    """The words to append to a line written after ``held`` were held back."""
    return f" ({held} similar line(s) held back)" if held else ""
