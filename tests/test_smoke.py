"""The first things a user does: publish, handle, reply."""

from __future__ import annotations

import surge


class Ping(surge.Event):
    n: int


class Pong(surge.Event):
    n: int


async def test_request_reply_on_virtual_clock(clock: surge.VirtualClock) -> None:
    """A handler's returned event answers a request, and time stays put."""
    app = surge.App("t", clock=clock)

    @app.on(Ping)
    async def pong(ev: Ping) -> Pong:
        await clock.sleep(2.5)
        return Pong(n=ev.n)

    async with app:
        start = clock.monotonic()
        reply = await app.request(Ping(n=7), expect=Pong, timeout=5)
        assert reply == Pong(n=7)
        assert clock.monotonic() - start == 2.5
