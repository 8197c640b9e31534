"""Publishes that no group receives: counted, warned once per topic, and
refused when the publish is mandatory.

A transport fans each envelope out to the groups whose topics match it, so
an envelope of a topic no group was declared for is accepted and then
dropped. Whether a group exists is the transport's to say
(``KnowsGroups``), counting the groups of every process sharing its store,
running or not: a worker's group keeps what is published while no worker
runs, so that publish is not lost. Groups are never undeclared (reply
inboxes aside), so a topic found routed once is remembered for good; a
topic found unrouted is looked up again at most once per ``recheck``
seconds for counting, and on every mandatory publish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from ._clock import Clock
from ._errors import Unroutable
from ._event import Envelope
from ._transport import KnowsGroups

__all__ = ("Routing",)

log = logging.getLogger("surge")

# Reply copies go to a requester's inbox, which may be gone: not a lost event.
_EXEMPT = "_surge.reply."


class _Everything:
    """Every topic (what a transport that cannot tell counts as routed)."""

    def __contains__(self, topic: object) -> bool:
        return True


class Routing:
    """What one app learnt of its transport's routes, and what it counted."""

    recheck = 1.0
    """Seconds during which a topic found unrouted is counted without
    looking again (a mandatory publish always looks)."""

    def __init__(self, app_name: str, clock: Clock) -> None:
        self._app = app_name
        self._clock = clock
        self._groups: KnowsGroups | None = None
        self.blind = False
        """The transport cannot tell (a mandatory publish raises ``NotImplementedError``)."""
        self.routed: set[str] | _Everything = set()
        """Topics some declared group receives (for good): a set lookup on
        the publish path, so a known topic costs no more."""
        self._unrouted_at: dict[str, float] = {}
        # topic -> publishes noted while its background lookup runs (one
        # lookup per topic at a time, however many publish meanwhile)
        self._looking: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def use(self, groups: KnowsGroups | None, declared: Sequence[str] = ()) -> None:
        """Look routes up with ``groups`` (at each start; None: cannot, and
        every topic counts as routed). ``declared``: topics this app's own
        groups receive, just declared: routed without a lookup (patterns
        among them are skipped)."""
        self._groups = groups
        self.blind = groups is None
        self.routed = _Everything() if groups is None else set()
        if isinstance(self.routed, set):
            self.routed.update(t for t in declared if "*" not in t and ">" not in t)
        self._unrouted_at.clear()

    @property
    def unroutable(self) -> dict[str, int]:
        """Publishes no declared group received, by topic, since the app was made."""
        return dict(self._counts)

    async def _routed(self, topic: str, *, fresh: bool) -> bool:
        groups = self._groups
        if groups is None or topic in self.routed or topic.startswith(_EXEMPT):
            return True
        assert isinstance(self.routed, set)
        if not fresh:
            at = self._unrouted_at.get(topic)
            if at is not None and self._clock.monotonic() - at < self.recheck:
                return False
        if await groups.groups_for(topic):
            self.routed.add(topic)
            self._unrouted_at.pop(topic, None)
            return True
        self._unrouted_at[topic] = self._clock.monotonic()
        return False

    async def require(self, envs: Sequence[Envelope]) -> None:
        """Raise :class:`Unroutable` unless every envelope's topic is routed."""
        if self._groups is None:
            raise NotImplementedError(
                "mandatory publishing needs a transport that can tell which groups exist "
                "(KnowsGroups, docs/transports.md)"
            )
        for env in envs:
            if not await self._routed(env.topic, fresh=True):
                raise Unroutable(
                    f"no group declared on the transport receives {env.topic!r} "
                    f"({type(env.event).__name__ if env.event is not None else 'event'} "
                    f"{env.id}); nothing was published",
                    topic=env.topic,
                )

    def note_soon(self, envs: Sequence[Envelope]) -> None:
        """:meth:`note` in the background: a publish never waits for it. One
        lookup per topic at a time: publishes of a topic whose lookup is
        under way wait for its answer to be counted (a burst published
        before the loop runs starts one task, not one per publish)."""
        if self._groups is None:
            return
        looking = self._looking
        for env in envs:
            topic = env.topic
            if topic in self.routed:
                continue
            n = looking.get(topic)
            looking[topic] = 1 if n is None else n + 1
            if n is None:
                task = asyncio.get_running_loop().create_task(self._note_topic(topic))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _note_topic(self, topic: str) -> None:
        try:
            routed = await self._routed(topic, fresh=False)
        except Exception as exc:
            log.debug("could not look up the groups of %r: %r", topic, exc)
            routed = True  # the count never fails a publish, nor guesses
        finally:
            n = self._looking.pop(topic)
        if not routed:
            self._count(topic, n)

    async def close(self) -> None:
        """Wait for the lookups still running in the background (before the
        transport closes; a stop bounds the wait). Not cancelled: a broker
        client cancelled mid-command may leave its connection behind."""
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks)

    def _count(self, topic: str, n: int = 1) -> None:
        before = self._counts.get(topic, 0)
        self._counts[topic] = before + n
        if not before:
            log.warning(
                "app %s published to %r, which no group declared on the transport receives: "
                "dropped (counted in surge_unroutable_total; publish(..., mandatory=True) "
                "raises Unroutable instead)",
                self._app,
                topic,
            )
