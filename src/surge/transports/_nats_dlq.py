"""Dead letters of a :class:`NatsTransport`, in a stream of their own.

JetStream has no dead-letter queue: a record (a msgpack ``DeadLetter``) goes
to the stream ``<stream>_dlq`` on the subject ``<stream>_dlq.<group>``, with a
``Nats-Msg-Id`` made of the group, the event id and its stream sequence, so a
worker that dies between writing the record and settling the message (and
writes it again) leaves one record. Replay publishes to the group's own
replay subject ``<stream>_replay.<group>``, which only that group's consumer
filters on (a topic subject would reach every group), then deletes the
record.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from .._clock import Clock
from .._codec import Codec
from .._errors import Closed, ConfigurationError, DecodeError, TransportError
from .._event import Envelope
from .._transport import DeadLetter
from ._nats_publish import Publisher, translate

if TYPE_CHECKING:
    from ._nats_consume import Group

__all__ = ("DeadLetters", "consumer_name")

log = logging.getLogger("surge.nats")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_DEAD = msgspec.msgpack.Decoder(DeadLetter)
_ENCODE = msgspec.msgpack.Encoder().encode


def consumer_name(group: str) -> str:
    """A valid, stable durable name (and subject token) for ``group``."""
    digest = hashlib.blake2b(group.encode(), digest_size=4).hexdigest()
    return f"{_UNSAFE.sub('_', group)[:48]}-{digest}"


class DeadLetters:
    """The dead-letter half of :class:`NatsTransport` (a mixin: it uses the
    transport's connection, streams and groups)."""

    stream: str
    dlq_stream: str
    max_deliver: int
    clock: Clock
    codec: Codec
    _js: Any
    _closed: bool
    _groups: dict[str, Group]
    _pub: Publisher
    _background: set[asyncio.Task[None]]

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def _nats(self) -> Any:
        raise NotImplementedError

    # --- dead letters ------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[None]:
        """Connected for the block: reopened for it if this transport is
        closed (reading dead letters or stats after the app stopped)."""
        if not self._closed:
            yield
            return
        await self.start()
        try:
            yield
        finally:
            await self.close()

    async def _read_dead(self, subject: str) -> list[tuple[int, DeadLetter]]:
        out: list[tuple[int, DeadLetter]] = []
        seq = 1
        try:
            while True:
                try:
                    raw = await self._js.get_msg(
                        self.dlq_stream, seq=seq, subject=subject, next=True
                    )
                except nats.js.errors.NotFoundError:
                    return out
                try:
                    out.append((raw.seq, _DEAD.decode(raw.data or b"")))
                except msgspec.DecodeError:
                    log.error("undecodable dead letter %d in %s", raw.seq, self.dlq_stream)
                seq = raw.seq + 1
        except nats.errors.Error as exc:
            raise translate(exc, "reading dead letters") from exc

    async def _known(self, group: str) -> str:
        durable = consumer_name(group)
        if group not in self._groups:
            try:
                await self._js.consumer_info(self.stream, durable)
            except nats.js.errors.NotFoundError:
                raise ConfigurationError(f"no group {group!r} on stream {self.stream!r}") from None
        return durable

    async def dead_letters(self, group: str | None = None) -> list[DeadLetter]:
        async with self._session():
            if group is None:
                subject = f"{self.stream}_dlq.>"
            else:
                subject = f"{self.stream}_dlq.{await self._known(group)}"
            letters = [d for _, d in await self._read_dead(subject)]
        return sorted(letters, key=lambda d: d.failed_at)

    async def _chosen(self, group: str, ids: Sequence[str] | None) -> list[tuple[int, DeadLetter]]:
        durable = await self._known(group)
        found = await self._read_dead(f"{self.stream}_dlq.{durable}")
        if ids is not None:
            wanted = set(ids)
            found = [(s, d) for s, d in found if d.id in wanted]
        return found

    async def _delete_dead(self, seqs: list[int]) -> None:
        try:
            for s in seqs:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await self._js.delete_msg(self.dlq_stream, s)
        except nats.errors.Error as exc:
            raise translate(exc, "deleting dead letters") from exc

    async def replay(self, group: str, ids: Sequence[str] | None = None) -> int:
        async with self._session():
            return await self._replay(group, ids)

    async def _replay(self, group: str, ids: Sequence[str] | None) -> int:
        chosen = await self._chosen(group, ids)
        subject = f"{self.stream}_replay.{consumer_name(group)}"
        now = self.clock.time()
        futs = []
        for seq, rec in chosen:
            env = Envelope(rec.id, rec.topic, rec.key, now, rec.headers, None, rec.body)
            # a msg id of its own: the original id may still be in the window
            headers = {"Nats-Msg-Id": f"{rec.id}.replay.{seq}"}
            futs.append(await self._pub.send(subject, self.codec.encode_envelope(env), headers))
        await self._pub.confirm(futs)
        await self._delete_dead([s for s, _ in chosen])
        return len(chosen)

    async def purge(self, group: str, ids: Sequence[str] | None = None) -> int:
        async with self._session():
            chosen = await self._chosen(group, ids)
            await self._delete_dead([s for s, _ in chosen])
        return len(chosen)

    async def _on_max_deliveries(self, msg: Msg) -> None:
        """JetStream gave up on a message (MaxDeliver): record it as dead.

        The runner dead-letters what keeps failing long before; this catches
        what never got that far (a message its worker crashes on, every time).
        """
        try:
            advisory = json.loads(msg.data)
            durable, seq = advisory["consumer"], int(advisory["stream_seq"])
            n = int(advisory.get("deliveries", self.max_deliver))
        except (ValueError, KeyError, TypeError):
            return
        g = next((g for g in self._groups.values() if durable in g.by_durable), None)
        if g is None:
            return  # not a group of this app's; its own workers record it
        task = asyncio.get_running_loop().create_task(self._max_delivered(g, seq, n))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _max_delivered(self, g: Group, seq: int, n: int) -> None:
        try:
            raw = await self._js.get_msg(self.stream, seq)
            try:
                env = self.codec.decode_envelope(raw.data or b"")
            except DecodeError:
                env = Envelope(f"nats-{self.stream}-{seq}", "", None, 0.0, None, None, raw.data)
            record = DeadLetter(
                id=env.id,
                group=g.name,
                topic=env.topic,
                key=env.key,
                headers=env.headers,
                body=env.body or b"",
                error_type="MaxDeliverExceeded",
                error=f"delivered {n} times and never settled (max_deliver={self.max_deliver}); "
                "does its handler kill the worker?",
                traceback="",
                attempts=n,
                first_attempt_at=env.time,
                failed_at=self.clock.time(),
            )
            await self._store_dead(g.durable, record, f"dlq.{g.durable}.{env.id}.{seq}")
        except (nats.errors.Error, TransportError, Closed) as exc:
            log.error("could not record message %d of %s as dead: %r", seq, g.name, exc)
            return
        log.error(
            "%s: event %s was delivered %d times and never settled; dead-lettered (max_deliver)",
            g.name,
            env.id,
            n,
        )

    async def _store_dead(self, durable: str, record: DeadLetter, msg_id: str) -> None:
        self._nats()
        fut = await self._pub.send(
            f"{self.stream}_dlq.{durable}", _ENCODE(record), {"Nats-Msg-Id": msg_id}
        )
        await self._pub.confirm([fut])

    # --- small durable state (trigger state) ---------------------------------------
    async def load_state(self, key: str) -> bytes | None:
        """A small value kept under ``key`` in the JetStream key-value bucket
        ``<stream>_state`` (the last fired slot of each trigger)."""
        async with self._session():
            kv = await self._state_bucket()
            try:
                entry = await kv.get(_state_key(key))
            except nats.js.errors.KeyNotFoundError:
                return None
            except nats.errors.Error as exc:
                raise translate(exc, f"reading state {key!r}") from exc
            value: bytes | None = entry.value
            return value

    async def save_state(self, key: str, value: bytes) -> None:
        async with self._session():
            kv = await self._state_bucket()
            try:
                await kv.put(_state_key(key), value)
            except nats.errors.Error as exc:
                raise translate(exc, f"writing state {key!r}") from exc

    async def _state_bucket(self) -> Any:
        self._nats()
        bucket = f"{self.stream}_state"
        try:
            return await self._js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            return await self._js.create_key_value(bucket=bucket)
        except nats.errors.Error as exc:
            raise translate(exc, f"opening the state bucket {bucket!r}") from exc


def _state_key(key: str) -> str:
    # KV keys allow [-/_=.A-Za-z0-9]; base64url stays inside that alphabet.
    return base64.urlsafe_b64encode(key.encode()).decode()
