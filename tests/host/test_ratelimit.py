"""The per-uid log limiter: a burst per window, then lines held back and counted."""

from __future__ import annotations

import pytest

from primed.daemon import ratelimit
from primed.daemon.ratelimit import LogLimiter, held_note


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_held_back_then_counted() -> None:
    clock = Clock()
    limiter = LogLimiter(interval=10.0, burst=3, clock=clock)
    assert [limiter.allow(1000, "refused") for _ in range(3)] == [0, 0, 0]
    assert [limiter.allow(1000, "refused") for _ in range(500)] == [None] * 500
    # Another uid, and another kind of line of the same uid, have windows of their own.
    assert limiter.allow(1001, "refused") == 0
    assert limiter.allow(1000, "bad message") == 0
    clock.now += 10.0
    assert limiter.allow(1000, "refused") == 500
    assert limiter.allow(1000, "refused") == 0
    assert held_note(500) == " (500 similar line(s) held back)" and held_note(0) == ""


def test_memory_stays_bounded_whatever_the_uids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "MAX_KEYS", 8)
    clock = Clock()
    limiter = LogLimiter(interval=10.0, burst=1, clock=clock)
    for uid in range(1000):
        limiter.allow(uid, "refused")
    assert len(limiter._windows) <= 9  # 8, and the one shared by the uids past them
    # Past the keys, uids share one window: still limited, never unbounded.
    assert sum(limiter.allow(uid, "refused") is not None for uid in range(2000, 2100)) <= 1
    clock.now += 10.0
    limiter.allow(5000, "refused")  # expired windows are forgotten to make room
    assert (5000, "refused") in limiter._windows
