"""Dead letters, in a stream of their own: written, listed, replayed, purged.

JetStream has no dead-letter queue: a record (a msgpack ``DeadLetter``) goes
to the stream ``<stream>_dlq`` on the subject ``<stream>_dlq.<group>``, with a
``Nats-Msg-Id`` made of the group, the event id and its stream sequence, so a
worker that dies between writing the record and settling the message (and
writes it again) leaves one record. Replay publishes to the group's own
replay subject ``<stream>_replay.<group>``, which only that group's consumer
filters on (a topic subject would reach every group), then deletes the
record.

MaxDeliver is only a safety net (``max_deliver``) against a message that
kills its worker every time; retries and dead letters are the runner's.
JetStream's MaxDeliver advisory makes it a dead letter here too; the message
itself stays in the stream (other groups may still want it) until
``max_age`` removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from ..._clock import Clock
from ..._codec import Codec
from ..._errors import Closed, ConfigurationError, DecodeError, TransportError
from ..._event import Envelope
from ..._transport import DeadLetter
from ._connection import Connection, translate
from ._consumer import Consumer
from ._groups import Group
from ._layout import Layout, consumer_name
from ._options import NatsOptions
from ._publisher import Publisher

__all__ = ("DeadLetters",)

log = logging.getLogger("surge.nats")

_DEAD = msgspec.msgpack.Decoder(DeadLetter)
_ENCODE = msgspec.msgpack.Encoder().encode


class DeadLetters:
    """The dead letters of one transport's stream."""

    def __init__(
        self,
        conn: Connection,
        layout: Layout,
        options: NatsOptions,
        clock: Clock,
        codec: Codec,
        publisher: Publisher,
        consumer: Consumer,
    ) -> None:
        self._conn = conn
        self._layout = layout
        self._max_deliver = options.max_deliver
        self._clock = clock
        self._codec = codec
        self._pub = publisher
        self._consumer = consumer
        self._recording: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Listen for JetStream's MaxDeliver advisories of this stream."""
        await self._conn.client().subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self._layout.stream}.*",
            cb=self._on_max_deliveries,
        )

    async def wait_recorded(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for advisories being recorded."""
        if self._recording:
            await asyncio.wait(list(self._recording), timeout=timeout)

    async def known(self, group: str) -> str:
        """The durable name of ``group``; ConfigurationError if it exists
        neither here nor on the server."""
        durable = consumer_name(group)
        if self._consumer.get(group) is None:
            try:
                await self._conn.js.consumer_info(self._layout.stream, durable)
            except nats.js.errors.NotFoundError:
                raise ConfigurationError(
                    f"no group {group!r} on stream {self._layout.stream!r}"
                ) from None
        return durable

    async def store(self, durable: str, record: DeadLetter, msg_id: str) -> None:
        """Write ``record`` (``msg_id``: the same record written twice is one)."""
        self._conn.client()
        fut = await self._pub.send(
            self._layout.dead(durable), _ENCODE(record), {"Nats-Msg-Id": msg_id}
        )
        await self._pub.confirm([fut])

    async def count(self, group: str) -> int:
        subject = self._layout.dead(consumer_name(group))
        try:
            info = await self._conn.js.stream_info(self._layout.dlq_stream, subjects_filter=subject)
        except nats.errors.Error as exc:
            raise translate(exc, f"reading the state of {group!r}") from exc
        return int((info.state.subjects or {}).get(subject, 0))

    async def _read_subject(self, subject: str) -> list[tuple[int, DeadLetter]]:
        out: list[tuple[int, DeadLetter]] = []
        seq = 1
        js = self._conn.js
        stream = self._layout.dlq_stream
        try:
            while True:
                try:
                    raw = await js.get_msg(stream, seq=seq, subject=subject, next=True)
                except nats.js.errors.NotFoundError:
                    return out
                try:
                    out.append((raw.seq, _DEAD.decode(raw.data or b"")))
                except msgspec.DecodeError:
                    log.error("undecodable dead letter %d in %s", raw.seq, stream)
                seq = raw.seq + 1
        except nats.errors.Error as exc:
            raise translate(exc, "reading dead letters") from exc

    async def read(self, group: str | None) -> list[DeadLetter]:
        subject = self._layout.dead(">" if group is None else await self.known(group))
        letters = [d for _, d in await self._read_subject(subject)]
        return sorted(letters, key=lambda d: d.failed_at)

    async def _chosen(self, group: str, ids: Sequence[str] | None) -> list[tuple[int, DeadLetter]]:
        durable = await self.known(group)
        found = await self._read_subject(self._layout.dead(durable))
        if ids is not None:
            wanted = set(ids)
            found = [(s, d) for s, d in found if d.id in wanted]
        return found

    async def _delete(self, seqs: list[int]) -> None:
        js = self._conn.js
        try:
            for s in seqs:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_msg(self._layout.dlq_stream, s)
        except nats.errors.Error as exc:
            raise translate(exc, "deleting dead letters") from exc

    async def replay(self, group: str, ids: Sequence[str] | None) -> int:
        chosen = await self._chosen(group, ids)
        subject = self._layout.replay(consumer_name(group))
        now = self._clock.time()
        futs = []
        for seq, rec in chosen:
            env = Envelope(rec.id, rec.topic, rec.key, now, rec.headers, None, rec.body)
            # a msg id of its own: the original id may still be in the window
            headers = {"Nats-Msg-Id": f"{rec.id}.replay.{seq}"}
            futs.append(await self._pub.send(subject, self._codec.encode_envelope(env), headers))
        await self._pub.confirm(futs)
        await self._delete([s for s, _ in chosen])
        return len(chosen)

    async def purge(self, group: str, ids: Sequence[str] | None) -> int:
        chosen = await self._chosen(group, ids)
        await self._delete([s for s, _ in chosen])
        return len(chosen)

    async def _on_max_deliveries(self, msg: Msg) -> None:
        """JetStream gave up on a message (MaxDeliver): record it as dead.

        The runner dead-letters what keeps failing long before; this catches
        what never got that far (a message its worker crashes on, every time).
        """
        try:
            advisory = json.loads(msg.data)
            durable, seq = advisory["consumer"], int(advisory["stream_seq"])
            n = int(advisory.get("deliveries", self._max_deliver))
        except (ValueError, KeyError, TypeError):
            return
        g = self._consumer.by_durable(durable)
        if g is None:
            return  # not a group of this app's; its own workers record it
        task = asyncio.get_running_loop().create_task(self._max_delivered(g, seq, n))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def _max_delivered(self, g: Group, seq: int, n: int) -> None:
        stream = self._layout.stream
        try:
            raw = await self._conn.js.get_msg(stream, seq)
            try:
                env = self._codec.decode_envelope(raw.data or b"")
            except DecodeError:
                env = Envelope(f"nats-{stream}-{seq}", "", None, 0.0, None, None, raw.data)
            record = DeadLetter(
                id=env.id,
                group=g.name,
                topic=env.topic,
                key=env.key,
                headers=env.headers,
                body=env.body or b"",
                error_type="MaxDeliverExceeded",
                error=f"delivered {n} times and never settled (max_deliver={self._max_deliver}); "
                "does its handler kill the worker?",
                traceback="",
                attempts=n,
                first_attempt_at=env.time,
                failed_at=self._clock.time(),
            )
            await self.store(g.durable, record, f"dlq.{g.durable}.{env.id}.{seq}")
        except (nats.errors.Error, TransportError, Closed) as exc:
            log.error("could not record message %d of %s as dead: %r", seq, g.name, exc)
            return
        log.error(
            "%s: event %s was delivered %d times and never settled; dead-lettered (max_deliver)",
            g.name,
            env.id,
            n,
        )
