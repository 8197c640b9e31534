"""The wall clock stepped forward and back by an hour while triggers run.

The clock is injected at the process boundary: a :class:`~surge.VirtualClock`
whose wall time (``time()``) the test steps by an hour either way while its
monotonic time (what the loop waits on) runs on, as NTP or an operator
stepping the system clock would do. Triggers compute their slots from the
wall time.

What must hold: no slot fires twice (a step back an hour does not replay
the hour already fired: the timer waits until the wall clock passes its
next slot again), and none is skipped beyond the misfire policy (a step
forward with ``skip`` drops the slots of the hour jumped over, but the one
the timer was waiting for; with ``catch_up`` it fires them, at most
``max_catch_up``).
"""

from __future__ import annotations

import pytest

import surge

HOUR = 3600.0
EVERY = 60.0


class SteppedClock(surge.VirtualClock):
    """A virtual clock whose wall time can be stepped (monotonic time cannot)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def step(self, seconds: float) -> None:
        self.offset += seconds

    def time(self) -> float:
        return super().time() + self.offset


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock()


def _slots(start: float, end: float) -> list[float]:
    """The every-60 s slots in (start, end]."""
    first = (start // EVERY + 1) * EVERY
    out = []
    t = first
    while t <= end:
        out.append(t)
        t += EVERY
    return out


@pytest.mark.parametrize("misfire", ["skip", "catch_up"])
async def test_stepping_the_wall_clock_fires_no_slot_twice_and_skips_only_by_policy(
    clock: SteppedClock, misfire: str
) -> None:
    """Every minute for 10 min, the clock stepped an hour forward, 10 min,
    an hour back, then 70 min: each slot fires at most once; with ``skip``
    exactly one hour of slots is missing (the slot being waited for fires
    late, the hour after it is skipped), with ``catch_up`` nothing is; after
    the step back the hour already fired is not fired again."""
    app = surge.App("faults-clock", clock=clock)
    fired: list[float] = []

    @app.every(seconds=EVERY, misfire=misfire)  # type: ignore[arg-type]
    async def tick(t: surge.Tick) -> None:
        fired.append(t.scheduled)

    w0 = clock.time()
    async with app:
        await clock.sleep(10 * EVERY + 1)
        before_jump = clock.time()
        clock.step(HOUR)
        await clock.sleep(10 * EVERY)
        before_back = clock.time()
        clock.step(-HOUR)
        await clock.sleep(HOUR + 10 * EVERY)
        end = clock.time()
    counts = {s: fired.count(s) for s in fired}
    twice = sorted(s for s, n in counts.items() if n > 1)
    expected = _slots(w0, end)
    missing = [s for s in expected if s not in counts]
    jumped = _slots(before_jump, before_jump + HOUR)
    print(
        f"\nFIGURE clock-step[{misfire}] fired={len(fired)} twice={len(twice)} "
        f"missing={len(missing)} (of {len(expected)}; the hour jumped over has {len(jumped)})"
    )
    assert twice == []
    assert fired == sorted(fired)
    assert max(fired) <= end
    if misfire == "skip":
        # the slot waited for fires late, when the wall clock reads an hour
        # past it; the hour of slots after it is skipped
        waited = jumped[0]
        assert waited in counts
        assert missing == _slots(waited, waited + HOUR)
    else:
        assert missing == []
    # the step back replayed nothing: after it, the first firing is the slot
    # after the last one fired before it
    after_back = [s for s in fired if s > before_back]
    assert after_back == _slots(before_back, end)
