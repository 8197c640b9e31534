"""Dead letters: one quorum queue for every group, read without consuming.

``dead_letter`` publishes the :class:`DeadLetter` record (with confirm) and
only then acks the delivery. The broker's own dead letters (an event that
exceeded ``x-delivery-limit``, say because it kills its worker every time)
arrive through the dead-letter exchange with their ``x-death`` reason and
are listed the same way.

RabbitMQ cannot read a queue without taking its messages, so listing takes
every message on a channel of its own (``basic.get``, unacked) and closes
that channel, which puts them all back in order; purge and replay ack what
they removed before closing. A second process listing at the same moment
sees fewer (what the first holds); nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import aiormq
import aiormq.exceptions as aexc
from pamqp.commands import Basic

from ..._codec import Codec
from ..._errors import ConfigurationError, DecodeError
from ..._event import Envelope
from ..._transport import DeadLetter
from .._partitions import partition_of
from ._link import LOST, Link, translate
from ._publish import Outgoing, Publisher
from ._topology import Topology
from ._wire import ATTEMPTS, dead_message, dead_record, props

__all__ = ("DeadLetters",)


class _Held:
    __slots__ = ("body", "headers", "record", "tag")

    def __init__(self, tag: int, record: DeadLetter, body: bytes, headers: dict[str, Any]) -> None:
        self.tag = tag
        self.record = record
        self.body = body
        self.headers = headers


class DeadLetters:
    """The dead-letter queue of one prefix."""

    def __init__(
        self,
        link: Link,
        topology: Topology,
        publisher: Publisher,
        codec: Codec,
        now: Callable[[], float],
    ) -> None:
        self.link = link
        self.topology = topology
        self.publisher = publisher
        self.codec = codec
        self.now = now

    async def store(self, record: DeadLetter) -> None:
        body, properties = dead_message(record)
        await self.publisher.send([Outgoing("", self.topology.dlq, body, properties)])

    def _record(self, msg: aiormq.abc.DeliveredMessage) -> DeadLetter:
        headers: dict[str, Any] = msg.header.properties.headers or {}
        rec = dead_record(headers, msg.body)
        if rec is not None:
            return rec
        # The broker's own: the body is an envelope, x-death says why.
        deaths = headers.get("x-death") or [{}]
        death = deaths[0] if isinstance(deaths, list) and deaths else {}
        queue = str(death.get("queue", "")) if isinstance(death, dict) else ""
        reason = str(death.get("reason", "")) if isinstance(death, dict) else ""
        count = headers.get("x-delivery-count")
        attempts = (count if isinstance(count, int) else 0) + 1
        now = self.now()
        try:
            env = self.codec.decode_envelope(msg.body)
        except DecodeError:
            mid = msg.header.properties.message_id or f"amqp-dead-{msg.delivery_tag}"
            return DeadLetter(
                id=mid, group=self.topology.group_of_queue(queue), topic="", key=None,
                headers=None, body=msg.body, error_type="DecodeError",
                error=f"not a surge envelope (dead-lettered by RabbitMQ: {reason})",
                traceback="", attempts=attempts, first_attempt_at=now, failed_at=now,
            )  # fmt: skip
        return DeadLetter(
            id=env.id, group=self.topology.group_of_queue(queue), topic=env.topic, key=env.key,
            headers=env.headers, body=env.body or b"", error_type=_REASONS.get(reason, reason),
            error=f"dead-lettered by RabbitMQ ({reason}) from queue {queue}",
            traceback="", attempts=attempts, first_attempt_at=env.time or now, failed_at=now,
        )  # fmt: skip

    async def _take_all(self, ch: aiormq.abc.AbstractChannel) -> list[_Held]:
        out: list[_Held] = []
        while True:
            msg = await ch.basic_get(self.topology.dlq, no_ack=False)
            if not isinstance(msg.delivery, Basic.GetOk):
                return out
            out.append(
                _Held(msg.delivery.delivery_tag or 0, self._record(msg), msg.body,
                      msg.header.properties.headers or {})
            )  # fmt: skip

    async def _session(
        self, work: Callable[[aiormq.abc.AbstractChannel, list[_Held]], Any], doing: str
    ) -> Any:
        await self.link.wait_up()
        ch = await self.link.channel()
        try:
            held = await self._take_all(ch)
            return await work(ch, held)
        except LOST as exc:
            raise translate(exc, doing) from exc
        finally:
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(2.0):
                    await ch.close()  # what was not acked goes back, in order

    async def list(self, group: str | None) -> list[DeadLetter]:
        async def work(_: aiormq.abc.AbstractChannel, held: list[_Held]) -> list[DeadLetter]:
            return [h.record for h in held if group is None or h.record.group == group]

        out: list[DeadLetter] = await self._session(work, "reading dead letters")
        return out

    async def count(self, group: str) -> int:
        return len(await self.list(group))

    async def counts(self) -> dict[str, int]:
        """Dead letters per group, in one read of the queue."""
        out: dict[str, int] = {}
        for rec in await self.list(None):
            out[rec.group] = out.get(rec.group, 0) + 1
        return out

    async def purge(self, group: str, ids: Sequence[str] | None) -> int:
        wanted = None if ids is None else set(ids)

        async def work(ch: aiormq.abc.AbstractChannel, held: list[_Held]) -> int:
            n = 0
            for h in held:
                if h.record.group == group and (wanted is None or h.record.id in wanted):
                    await ch.basic_ack(h.tag)
                    n += 1
            return n

        n: int = await self._session(work, f"purging dead letters of {group!r}")
        return n

    async def replay(self, group: str, ids: Sequence[str] | None) -> int:
        await self._known(group)
        wanted = None if ids is None else set(ids)

        async def work(ch: aiormq.abc.AbstractChannel, held: list[_Held]) -> int:
            chosen = [
                h for h in held
                if h.record.group == group and (wanted is None or h.record.id in wanted)
            ]  # fmt: skip
            msgs = [self._again(group, h.record) for h in chosen]
            await self.publisher.send(msgs)
            for h in chosen:
                await ch.basic_ack(h.tag)
            return len(chosen)

        n: int = await self._session(work, f"replaying dead letters of {group!r}")
        return n

    def _again(self, group: str, rec: DeadLetter) -> Outgoing:
        """The message that delivers ``rec`` to ``group`` again (only there)."""
        top = self.topology
        env = Envelope(rec.id, rec.topic, rec.key, rec.first_attempt_at, rec.headers, None,
                       rec.body)  # fmt: skip
        queue = top.group_queue(group)
        if rec.key is not None and top.partitions:
            queue = f"{queue}.p{partition_of(rec.key, top.partitions)}"
        body = self.codec.encode_envelope(env)
        return Outgoing("", queue, body, props(rec.id, {ATTEMPTS: 0}))

    async def _known(self, group: str) -> None:
        """``ConfigurationError`` unless ``group``'s queue exists."""
        await self.link.wait_up()
        ch = await self.link.channel()
        try:
            await ch.queue_declare(self.topology.group_queue(group), passive=True)
        except aexc.ChannelNotFoundEntity:
            raise ConfigurationError(f"group {group!r} was never declared") from None
        except LOST as exc:
            raise translate(exc, f"looking up group {group!r}") from exc
        finally:
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(2.0):
                    await ch.close()


_REASONS = {
    "delivery_limit": "DeliveryLimitExceeded",
    "rejected": "Rejected",
    "maxlen": "MaxLength",
}
