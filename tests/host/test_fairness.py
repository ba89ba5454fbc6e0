"""Each uid's share of the event loop: a uid over its share waits for the next window
while others are active; alone, or within its share, nobody waits."""

from __future__ import annotations

from primed.daemon.fairness import LoopShares


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_a_uid_alone_is_never_held_back() -> None:
    clock = Clock()
    shares = LoopShares(window=0.01, recent=1.0, clock=clock)
    for _ in range(100):
        assert shares.wait(1000) == 0.0
        shares.charge(1000, 0.004)
        clock.now += 0.004


def test_a_flooding_uid_waits_and_the_other_goes_through() -> None:
    clock = Clock()
    shares = LoopShares(window=0.01, recent=1.0, clock=clock)
    assert shares.wait(1000) == 0.0  # the flooder
    shares.charge(1000, 0.003)
    clock.now += 0.003
    assert shares.wait(2000) == 0.0  # a victim arrives: two uids, 5 ms of each window each
    shares.charge(2000, 0.0001)
    assert shares.wait(1000) == 0.0  # owes 3 ms, within one share
    shares.charge(1000, 0.003)
    clock.now += 0.003
    pause = shares.wait(1000)  # owes 6 ms: waits for the window's end
    assert abs(pause - 0.004) < 1e-9, pause
    assert shares.wait(2000) == 0.0  # the victim is within its share
    clock.now += pause + 1e-6
    assert shares.wait(1000) == 0.0  # 5 ms paid down: owes 1 ms
    # A request longer than a window is paid off over several windows.
    shares.charge(1000, 0.030)
    clock.now += 0.030  # the window rolls once: 15 ms paid, 16 ms still owed
    waited = 0
    while shares.wait(1000):
        clock.now += 0.01 + 1e-6
        waited += 1
        assert shares.wait(2000) == 0.0
    assert waited == 3  # 5 ms a window: 16 -> 11 -> 6 -> 1
    # A uid not seen for ``recent`` seconds no longer takes a share: alone again.
    clock.now += 2.0
    shares.charge(1000, 0.5)
    assert shares.wait(1000) == 0.0


def test_uids_that_left_are_forgotten() -> None:
    clock = Clock()
    shares = LoopShares(window=0.01, recent=1.0, clock=clock)
    for uid in range(5000):
        shares.wait(uid)
    clock.now += 2.0
    shares.wait(1)
    assert len(shares._seen) == 1 and shares._active == 1
