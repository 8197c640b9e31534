"""Partitions of the Redis transport: who reads which, and handing over.

A group's keyed envelopes go to ``{prefix}:p{n}:{group}`` (n =
``partition_of(key)``), each a stream with the group's consumer group, read
only by the consumer holding the lease ``{prefix}:o{n}:{group}`` (a key set
with NX and a PX expiry, renewed every lease/3). Members of the group renew
their score in the sorted set ``{prefix}:m:{group}`` (expiry on the server's
clock); each computes the same assignment from it (see ``_partitions``).

The functions take a :class:`~surge.transports._redis.RedisTransport` (its
consume and maintenance loops call them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis.asyncio as aredis

from .._errors import ConfigurationError
from . import _redis_consume as _consume
from ._redis_groups import GroupState, partition_lease

if TYPE_CHECKING:
    from ._redis import RedisTransport

__all__ = ("balance", "check_count", "claim_pending", "leave")

_CLAIM_PAGE = 1000


def _held_in(g: GroupState, p: int) -> bool:
    prefix = b"%d/" % p
    return any(t.startswith(prefix) for t in g.held)


async def balance(t: RedisTransport, r: aredis.Redis, g: GroupState) -> bool:
    """Renew membership and leases; take, keep and give up partitions.

    True when the split is not done yet (a wanted partition is still held
    by its previous owner, or ours is to be given up): tick again soon."""
    own = g.own
    assert own is not None
    lease_ms = int(t.lease * 1000)
    leaving = not g.active  # the consumer stopped: hand everything over
    members = await t._scripts["balance"](
        keys=[g.members], args=[t.consumer, lease_ms, "1" if leaving else "0"], client=r
    )
    acquire, give_up = own.plan([m.decode() for m in members], t.consumer, leaving=leaving)
    release = [p for p in give_up if p not in g.reading and not _held_in(g, p)]
    keep = [p for p in own.owned if p not in release]
    ops = [(p, "r") for p in keep] + [(p, "a") for p in acquire] + [(p, "d") for p in release]
    if not ops:
        return False
    done = await t._scripts["own"](
        keys=[partition_lease(t.prefix, g.name, p) for p, _ in ops],
        args=[t.consumer, lease_ms, *(op for _, op in ops)],
        client=r,
    )
    lost = [p for (p, op), ok in zip(ops, done, strict=True) if op != "a" and (op == "d" or not ok)]
    gained = [p for (p, op), ok in zip(ops, done, strict=True) if op == "a" and ok]
    if lost:
        own.lost(lost)
        g.rescan -= set(lost)  # the next owner claims what is pending there
    for p in gained:
        # What the previous owner left unsettled comes before anything new.
        await claim_pending(t, r, g, p)
        own.acquired((p,))
    if leaving:
        g.rescan.clear()  # nobody reads a backlog now: the next owner claims them
    for p in sorted(g.rescan):
        if p in own.owned and p not in own.releasing:
            await claim_pending(t, r, g, p)
        g.rescan.discard(p)  # only once claimed: a failure leaves it for the next round
    if g.backlog and g.room is not None and not g.room.done():
        g.room.set_result(None)  # wake a consumer waiting for room: there is work
    return len(gained) < len(acquire) or bool(own.releasing)


async def claim_pending(t: RedisTransport, r: aredis.Redis, g: GroupState, p: int) -> None:
    """Every unsettled entry of partition ``p`` not held here, oldest first,
    onto the group's backlog (page by page: a failure keeps what was taken)."""
    stream = g.pstreams[p]
    prefix = b"%d/" % p
    start = "-"
    while True:
        pending: Any = await r.execute_command(  # type: ignore[no-untyped-call]
            "XPENDING", stream, g.name, start, "+", _CLAIM_PAGE
        )
        counts = {e[0]: int(e[3]) for e in pending if prefix + e[0] not in g.held}
        if counts:
            claimed: Any = await r.execute_command(  # type: ignore[no-untyped-call]
                "XCLAIM", stream, g.name, t.consumer, 0, *counts
            )
            g.backlog.extend(await _consume.deliveries(t, g, claimed, counts, prefix))
        if len(pending) < _CLAIM_PAGE:
            return
        start = "(" + pending[-1][0].decode()


async def leave(t: RedisTransport, r: aredis.Redis, g: GroupState) -> None:
    """Give up every partition and the membership (at close)."""
    own = g.own
    assert own is not None
    # Every partition, not only those we know we own: a lease taken by a
    # round that close() cancelled before it saw the reply is ours too. The
    # script deletes a lease only if it is ours.
    parts = range(own.partitions)
    await t._scripts["own"](
        keys=[partition_lease(t.prefix, g.name, p) for p in parts],
        args=[t.consumer, int(t.lease * 1000), *("d" for _ in parts)],
        client=r,
    )
    own.lost(parts)
    await t._scripts["balance"](
        keys=[g.members], args=[t.consumer, int(t.lease * 1000), "1"], client=r
    )


async def check_count(t: RedisTransport, r: aredis.Redis) -> None:
    """Keyed envelopes written under one partition count must not be read
    under another: the first process fixes it for the prefix."""
    key = t._key("partitions")
    try:
        await r.set(key, t.partitions, nx=True)
        stored = int(await r.get(key) or 0)
    except Exception as exc:
        await r.aclose()
        t._r = None
        t._closed = True
        raise t._error(exc, "reading the partition count") from exc
    if t._asked_partitions is not None and stored != t._asked_partitions:
        await r.aclose()
        t._r = None
        t._closed = True
        raise ConfigurationError(
            f"redis prefix {t.prefix!r} has {stored} partitions, not the "
            f"{t._asked_partitions} asked for: use another prefix to change it"
        )
    t.partitions = stored
