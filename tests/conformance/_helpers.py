"""Reading deliveries in tests without sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import msgspec

import surge
from surge._event import Envelope
from surge.transports._partitions import Ownership


class Item(surge.Event):
    __topic__ = "conf.item"
    n: int


def body(n: int, pad: int = 0) -> bytes:
    """``Item(n)`` encoded; ``pad`` bytes more in a field Item does not have."""
    if pad:
        return msgspec.msgpack.encode({"n": n, "pad": bytes(pad)})
    return msgspec.msgpack.encode(Item(n=n))


def env(
    n: int,
    *,
    topic: str = "conf.item",
    id: str | None = None,
    not_before: float | None = None,
    time: float = 0.0,
    pad: int = 0,
) -> Envelope:
    """An envelope carrying ``Item(n)`` already encoded, as on a wire."""
    return Envelope(id or surge.new_id(), topic, None, time, None, None, body(n, pad), not_before)


def number(d: surge.Delivery) -> int:
    """The ``n`` of the Item a delivery carries."""
    item: Item = msgspec.msgpack.decode(d.envelope.body or b"", type=Item)
    return item.n


class Reader:
    """Batches of one ``consume`` iterator, taken with bounded waits."""

    def __init__(self, transport: surge.Transport, group: str, prefetch: int = 100) -> None:
        self._it: AsyncIterator[list[surge.Delivery]] = transport.consume(group, prefetch=prefetch)
        self._next: asyncio.Task[list[surge.Delivery]] | None = None

    def start(self) -> Reader:
        """Start consuming now (a consumer joins its group's partitions)."""
        self._pending()
        return self

    def _pending(self) -> asyncio.Task[list[surge.Delivery]]:
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self._it))
        return self._next

    async def batch(self, timeout: float = 30.0) -> list[surge.Delivery]:
        """The next batch; fails the test if none comes within ``timeout``."""
        task = self._pending()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        assert done, f"no delivery within {timeout}s"
        self._next = None
        return task.result()

    async def take(self, n: int, timeout: float = 30.0) -> list[surge.Delivery]:
        """Exactly ``n`` deliveries (across batches)."""
        out: list[surge.Delivery] = []
        while len(out) < n:
            out.extend(await self.batch(timeout))
        assert len(out) == n, f"expected {n} deliveries, got {len(out)}"
        return out

    async def quiet(self, seconds: float) -> bool:
        """True when no batch arrives within ``seconds`` (the wait is kept)."""
        done, _ = await asyncio.wait({self._pending()}, timeout=seconds)
        return not done

    async def aclose(self) -> None:
        if self._next is not None:
            self._next.cancel()
            await asyncio.gather(self._next, return_exceptions=True)
        aclose = getattr(self._it, "aclose", None)
        if aclose is not None:
            await aclose()


async def balanced(
    transports: Sequence[surge.Transport], group: str, timeout: float = 30.0
) -> None:
    """Wait until the partitions of ``group`` are split among ``transports``:
    each owns some, none twice, none left over, none being given up."""
    owns = []
    for t in transports:
        own = t.ownership(group)  # type: ignore[attr-defined]
        assert isinstance(own, Ownership)
        owns.append(own)
    parts = owns[0].partitions
    async with asyncio.timeout(timeout):
        while True:
            held = [p for o in owns for p in o.owned]
            if sorted(held) == list(range(parts)) and all(
                o.owned and not o.releasing for o in owns
            ):
                return
            waits = [asyncio.ensure_future(o.changed()) for o in owns]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
