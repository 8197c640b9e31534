"""Memberships and partition leases in the key-value bucket ``<stream>_parts``.

Entries expire ``lease`` after their last write (the bucket's max age, on
the server's clock). A consumer ``put``s ``m.<durable>.<me>`` every lease/3
while it consumes and lists the live members with one stream-info request
(purged, not deleted, at leave: no tombstone to skip). The lease of
partition p is ``l.<durable>.<p>``: taken with ``create`` (only if absent),
renewed with ``update(last=revision)``, released with
``delete(last=revision)``; a lease that cannot be renewed is lost.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import nats.js.errors
from nats.js.api import StorageType

from ._connection import Connection
from ._layout import Layout

__all__ = ("Leases",)


class Leases:
    """This process's memberships and partition leases, for one transport."""

    def __init__(self, conn: Connection, layout: Layout, *, lease: float) -> None:
        self._conn = conn
        self._lease = lease
        self.bucket = layout.parts_bucket
        self._replicas = layout.replicas
        self._kv_stream = f"KV_{self.bucket}"
        self.me = f"{os.getpid()}-{secrets.token_hex(4)}"
        """This consumer's member id (members are ordered by it)."""
        self._kv: Any = None
        self._kv_js: Any = None  # the connection's JetStream context when _kv was opened
        self._js: Any = None  # the context the bucket's requests go through
        # A request of the bucket is answered in milliseconds, or not at all
        # while a cluster elects the bucket's leader: one that waited nats-py's
        # 5 s was asked again only then, and keyed handling (fenced without a
        # renewal) waited for it (the stream leader's node killed: 10 s).
        # Bounded by the lease's own scale, a round asks again as soon as the
        # bucket has a leader.
        self.timeout = min(5.0, max(1.0, lease / 2))
        self._revs: dict[str, int] = {}
        self._known: dict[str, set[str]] = {}  # durable -> members seen last

    @property
    def prefix(self) -> str:
        """The subject prefix of the bucket's entries (for a watch)."""
        return f"$KV.{self.bucket}."

    def is_known(self, durable: str, member: str) -> bool:
        """Whether ``member`` was among ``durable``'s members at the last look."""
        return member in self._known.get(durable, ())

    async def _open(self) -> Any:
        conn_js = self._conn.js
        if self._kv is not None and self._kv_js is conn_js:
            return self._kv
        # the bucket made or fixed with the connection's timeouts (placing a
        # replicated stream can take seconds), used with the short ones
        try:
            await conn_js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            await conn_js.create_key_value(
                bucket=self.bucket,
                ttl=self._lease,
                history=1,
                storage=StorageType.FILE,
                replicas=self._replicas,
            )
        info = await conn_js.stream_info(self._kv_stream)
        if info.config.max_age != self._lease:
            info.config.max_age = self._lease
            info.config.duplicate_window = min(self._lease, 120.0)
            await conn_js.update_stream(info.config)
        js = self._js = self._conn.client().jetstream(timeout=self.timeout)
        kv = await js.key_value(self.bucket)
        self._kv, self._kv_js = kv, conn_js
        return kv

    def _lease_key(self, durable: str, part: int) -> str:
        return f"l.{durable}.{part}"

    async def members(self, durable: str) -> list[str]:
        """Renew this consumer's membership; the live members (with it)."""
        kv = await self._open()
        await kv.put(f"m.{durable}.{self.me}", b"")
        prefix = f"{self.prefix}m.{durable}."
        info = await self._js.stream_info(self._kv_stream, subjects_filter=prefix + "*")
        members = [s[len(prefix) :] for s in info.state.subjects or ()]
        self._known[durable] = set(members)
        return members

    async def leave(self, durable: str) -> None:
        await self._open()
        await self._js.purge_stream(self._kv_stream, subject=f"{self.prefix}m.{durable}.{self.me}")

    async def _mine(self, kv: Any, key: str) -> int | None:
        """The revision of ``key`` if it holds this consumer's lease: a write
        whose answer was lost (cancelled at close, a dropped reply) left it
        at a revision this consumer did not see."""
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        rev: int = entry.revision
        return rev if entry.value == self.me.encode() else None

    async def acquire(self, durable: str, part: int) -> bool:
        kv = await self._open()
        key = self._lease_key(durable, part)
        for _ in range(2):
            try:
                self._revs[key] = await kv.create(key, self.me.encode())
            except nats.js.errors.KeyNotFoundError:
                # nats-py's create, refused (the key was there), looks the
                # key up to tell a delete marker from a live entry: a lease
                # that expired in between is absent by then. Free now: try
                # again (a second such race leaves it to the next round).
                continue
            except nats.js.errors.KeyWrongLastSequenceError:
                rev = await self._mine(kv, key)
                if rev is None:
                    return False
                # Ours already (a write whose answer was lost, or a partition
                # dropped at a fence): written again, so it lasts a lease from
                # this call on, as the fence counts.
                self._revs[key] = rev
                return await self.renew(durable, part)
            return True
        return False

    async def renew(self, durable: str, part: int) -> bool:
        kv = await self._open()
        key = self._lease_key(durable, part)
        rev = self._revs.pop(key, None)
        for _ in range(2):
            if rev is None:
                return False
            try:
                self._revs[key] = await kv.update(key, self.me.encode(), last=rev)
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
                rev = await self._mine(kv, key)
                continue
            except BaseException:
                # unanswered (a timeout, an election): still ours as far as
                # we know; the next round renews from the same revision, or
                # finds it moved (a write whose answer was lost) and looks
                self._revs.setdefault(key, rev)
                raise
            return True
        return False

    async def release(self, durable: str, part: int) -> None:
        """Compare-and-delete: a lease someone else holds now stays theirs."""
        kv = await self._open()
        key = self._lease_key(durable, part)
        rev = self._revs.pop(key, None) or await self._mine(kv, key)
        for _ in range(2):
            if rev is None:
                return
            try:
                await kv.delete(key, last=rev)
            except nats.js.errors.APIError:
                rev = await self._mine(kv, key)
                continue
            return
