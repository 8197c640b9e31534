"""Run an app in-process on virtual time, record what happens, inject faults."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

import msgspec

from .._app import App
from .._event import Envelope, Event
from .._transport import DeadLetter, Delivery, Transport
from ..transports import MemoryTransport

__all__ = ("Faults", "FaultyTransport", "Harness", "InjectedFault")

E = TypeVar("E", bound=Event)


class InjectedFault(Exception):
    """The failure a :class:`Faults` plan injects into a handler."""


class Faults(msgspec.Struct, frozen=True, kw_only=True):
    """A plan of faults, drawn from ``seed`` so a failing run replays exactly.

    ``fail``: ordinals (from 1, counted over all deliveries to handlers) whose
    handling raises :class:`InjectedFault` before the handler runs.
    ``fail_rate``, ``duplicate_rate``, ``delay_rate``: probability per
    delivery of failing it, delivering it a second time, or holding it back
    for up to ``max_delay`` seconds (virtual) first. ``groups`` limits the
    transport faults (duplicate, delay) to those subscriptions (full names).
    """

    fail: frozenset[int] = frozenset()
    fail_rate: float = 0.0
    duplicate_rate: float = 0.0
    delay_rate: float = 0.0
    max_delay: float = 1.0
    groups: frozenset[str] = frozenset()


class FaultyTransport(MemoryTransport):
    """The memory transport, duplicating and delaying deliveries by plan."""

    def __init__(self, *, faults: Faults, rng: random.Random, **options: Any) -> None:
        super().__init__(**options)
        self.faults = faults
        self.rng = rng
        self.duplicated = 0
        self.delayed = 0

    async def consume(self, group: str, *, prefetch: int) -> AsyncIterator[list[Delivery]]:
        f = self.faults
        rng = self.rng
        if f.groups and group not in f.groups:
            async for batch in super().consume(group, prefetch=prefetch):
                yield batch
            return
        async for batch in super().consume(group, prefetch=prefetch):
            out = []
            for d in batch:
                roll = rng.random()
                if roll < f.duplicate_rate:
                    self.duplicated += 1
                    self.redeliver(d)
                    out.append(d)
                elif roll < f.duplicate_rate + f.delay_rate:
                    self.delayed += 1
                    self.hold_back(d, rng.uniform(0, f.max_delay))
                else:
                    out.append(d)
            if out:
                yield out


class _Recorder:
    """The harness's observer (``App.use_observer``): records and injects
    handler faults without a middleware, so the app keeps its plain paths."""

    def __init__(self, harness: Harness) -> None:
        self.h = harness

    def published(self, envelopes: Sequence[Envelope]) -> None:
        self.h.published.extend(envelopes)

    def handling(self, subscription: str, delivery: Delivery) -> None:
        h = self.h
        h._deliveries += 1
        f = h.faults
        if h._deliveries in f.fail or (f.fail_rate and h._rng.random() < f.fail_rate):
            h.injected += 1
            raise InjectedFault(
                f"injected fault on delivery #{h._deliveries} ({delivery.envelope.id})"
            )

    def handled(self, subscription: str, delivery: Delivery) -> None:
        self.h.handled.append((subscription, delivery.envelope))


class Harness:
    """Runs ``app`` in-process and records what it published and handled.

    Use it on a virtual clock (``VirtualClock.run``, or the pytest plumbing
    of surge's own tests) so retries and timers take no real time::

        async with Harness(app, seed=7, faults=Faults(fail_rate=0.1)) as h:
            await app.publish(OrderPlaced(order_id="1", amount=3.0))
            await h.drain()
            assert h.events(OrderPaid) == [OrderPaid(order_id="1")]

    The harness watches as the app's observer (``app.use_observer``), not
    through a middleware, so the app runs the dispatch paths it runs without
    the harness: the synchronous put, the runner's plain loop. Handler faults
    (``fail``, ``fail_rate``) work on any transport; the transport faults
    (``duplicate_rate``, ``delay_rate``) need the app on ``memory://``: the
    harness puts a :class:`FaultyTransport` in its place. :meth:`drain`
    needs a transport that can tell when it is idle (docs/transports.md).
    """

    def __init__(self, app: App, *, seed: int = 0, faults: Faults | None = None) -> None:
        self.app = app
        self.seed = seed
        self.faults = faults or Faults()
        self._rng = random.Random(seed)  # noqa: S311 - reproducible fault schedule
        self.published: list[Envelope] = []
        self.handled: list[tuple[str, Envelope]] = []
        self.injected = 0
        self._deliveries = 0
        if app.state != "new":
            raise ValueError("give the harness an app that has not started")
        self.transport: Transport = app.transport
        if self.faults.duplicate_rate or self.faults.delay_rate:
            if not self.transport.url.startswith("memory:"):
                raise ValueError("duplicate and delay faults need the app on memory://")
            self.transport = FaultyTransport(
                faults=self.faults,
                rng=random.Random(seed + 1),  # noqa: S311 - reproducible faults
                clock=app.clock,
            )
            app.use_transport(self.transport)
        if app.observer is not None:
            raise ValueError("the app already has an observer (another harness?)")
        app.use_observer(_Recorder(self))

    async def __aenter__(self) -> Harness:
        await self.app.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.app.stop()

    async def drain(self) -> None:
        """Wait until nothing is in flight, queued or scheduled."""
        await self.app.drain()

    def events(self, event_type: type[E]) -> list[E]:
        """Events of ``event_type`` published so far, in publish order."""
        return [e.event for e in self.published if isinstance(e.event, event_type)]

    def handled_by(self, subscription: str) -> list[Event]:
        """Events the named subscription handled successfully, in order."""
        full = (
            subscription
            if subscription in self.app.subscriptions
            else f"{self.app.name}.{subscription}"
        )
        return [env.event for name, env in self.handled if name == full]

    async def dead_letters(self) -> Sequence[DeadLetter]:
        return await self.app.dead_letters()
