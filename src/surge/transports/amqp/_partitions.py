"""Per-key order across processes: partition queues with single active
consumers, shared out by gossip.

Each group's keyed events are hashed into ``partitions`` quorum queues
declared with ``x-single-active-consumer``: RabbitMQ delivers a partition's
messages to one consumer at a time, whoever else subscribes waits, and when
the active one's channel closes the broker first returns what it held
unsettled to the head of the queue, in order, and only then activates the
next. That makes the hand-over safe whatever the processes believe.

Who *should* read which partition (so that work spreads over the
processes) is decided by every process on its own from the same facts, as
on the other transports (``surge.transports._partitions.assignment``): the
live members of each group. RabbitMQ cannot list a queue's consumers over
AMQP, so members gossip: each process keeps an exclusive queue bound to the
fanout exchange ``<prefix>.members`` and announces the groups it reads
every ``lease / 3``; a member not heard for ``lease`` is gone (a killed
process's exclusive queue and channels go with its connection, so its
partitions pass at once to whoever waits on them, and are re-planned a
lease later). A stopping process says goodbye, so the others take over at
once.

A process gives a partition up (see ``GroupReader.give_up``) by handing
out nothing more of it, waiting until what it handed out is settled, and
closing that partition's channel; the next owner, already subscribed and
waiting, then reads on from the first unsettled message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiormq
import msgspec
from aiormq.abc import DeliveredMessage

from ..._clock import Clock
from ._consume import GroupReader
from ._link import LOST, Link
from ._topology import Topology

__all__ = ("Balancer", "Members")

log = logging.getLogger("surge.amqp")


class _Beat(msgspec.Struct, array_like=True, frozen=True):
    member: str
    groups: list[str]
    leaving: list[str]


_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE = msgspec.msgpack.Decoder(_Beat).decode


class Members:
    """Who reads which group, as far as this process has heard."""

    def __init__(self, link: Link, topology: Topology, clock: Clock, me: str, lease: float) -> None:
        self.link = link
        self.topology = topology
        self.clock = clock
        self.me = me
        self.lease = lease
        self.exchange = f"{topology.prefix}.members"
        self.queue = f"{topology.prefix}.m.{me}"
        self.groups: set[str] = set()
        """Groups this process reads with partitions (announced)."""
        self._heard: dict[str, dict[str, float]] = {}
        self._ch: aiormq.abc.AbstractChannel | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Subscribe to the gossip (again, after a reconnection)."""
        ch = self._ch = await self.link.channel()
        await ch.exchange_declare(self.exchange, exchange_type="fanout", durable=True)
        await ch.queue_declare(self.queue, exclusive=True, auto_delete=True)
        await ch.queue_bind(self.queue, self.exchange, routing_key="")
        await ch.basic_consume(self.queue, self._on_beat, no_ack=True)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._beating(), name="surge-amqp-members"
            )

    async def _on_beat(self, msg: DeliveredMessage) -> None:
        try:
            beat = _DECODE(msg.body)
        except msgspec.DecodeError:
            return
        if beat.member == self.me:
            return
        now = self.clock.monotonic()
        changed = False
        for g in beat.groups:
            seen = self._heard.setdefault(g, {})
            changed |= beat.member not in seen or now - seen[beat.member] > self.lease
            seen[beat.member] = now
        for g in beat.leaving:
            if self._heard.get(g, {}).pop(beat.member, None) is not None:
                changed = True
        if changed:
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def changes(self) -> asyncio.Event:
        """An event set at the next change of membership (take it before
        reading ``members``: a change in between is not missed)."""
        return self._changed

    def members(self, group: str) -> list[str]:
        """The live members of ``group``, this process included."""
        now = self.clock.monotonic()
        seen = self._heard.get(group, {})
        return [self.me, *(m for m, t in seen.items() if now - t <= self.lease)]

    async def announce(self, leaving: list[str] | None = None) -> None:
        ch = self._ch
        if ch is None or ch.is_closed:
            return
        beat = _Beat(self.me, sorted(self.groups), leaving or [])
        with contextlib.suppress(*LOST):
            await ch.basic_publish(_ENCODE(beat), exchange=self.exchange, routing_key="")

    async def join(self, group: str) -> None:
        self.groups.add(group)
        await self.announce()

    async def leave(self, group: str) -> None:
        self.groups.discard(group)
        await self.announce([group])

    async def _beating(self) -> None:
        while not self.link.closed:
            await self.clock.sleep(self.lease / 3)
            await self.announce()
            # a member heard no more expires: re-plan then too
            now = self.clock.monotonic()
            if any(
                now - t > self.lease and now - t <= self.lease + self.lease / 3
                for seen in self._heard.values()
                for t in seen.values()
            ):
                self._notify()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        ch, self._ch = self._ch, None
        await self.link.close_channel(ch)


# How long a stop lets a partition's subscription being opened finish
# before it cancels it (an open, a QoS and a consume: milliseconds on a
# broker that answers).
_TAKE_BOUND = 1.0


class Balancer:
    """Keeps one reader's share of its group's partitions."""

    def __init__(self, reader: GroupReader, members: Members) -> None:
        self.reader = reader
        self.members = members
        self._task: asyncio.Task[None] | None = None
        self._taking = False

    async def start(self) -> None:
        await self.members.join(self.reader.name)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"surge-amqp-balance-{self.reader.name}"
        )

    async def _run(self) -> None:
        reader = self.reader
        own = reader.own
        assert own is not None
        while not reader.stopping:
            change = self.members.changes()
            members = self.members.members(reader.name)
            acquire, give_up = own.plan(members, self.members.me)
            for p in give_up:
                reader.give_up(p)
            self._taking = True
            try:
                for p in acquire:
                    try:
                        await reader.take(p)
                    except LOST:
                        break  # the link's reconnection subscribes again
            finally:
                self._taking = False
            await _first(change, self.members.lease / 3)

    async def stop(self) -> None:
        """End the rounds (the reader stops first). A partition's
        subscription being opened is let finish, bounded: cancelling it
        mid-call made aiormq close its channel with a warning ("RPC call
        Channel.Open cancelled"), 1-2 of them a stop of 8 workers; the
        reader, stopping, takes nothing more and closes what it opened."""
        task = self._task
        if task is not None:
            if self._taking and not task.done():
                await asyncio.wait({task}, timeout=_TAKE_BOUND)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self.members.leave(self.reader.name)


async def _first(ev: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await ev.wait()
