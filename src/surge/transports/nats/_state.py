"""Small durable values (trigger state) in the key-value bucket ``<stream>_state``."""

from __future__ import annotations

import base64
from typing import Any

import nats.errors
import nats.js.errors

from ._connection import CancelGuard, Connection, translate
from ._layout import Layout

__all__ = ("StateBucket",)


class StateBucket:
    """The state bucket of one transport's stream."""

    def __init__(self, conn: Connection, layout: Layout) -> None:
        self._conn = conn
        self._bucket = layout.state_bucket
        self._replicas = layout.replicas

    async def load(self, key: str) -> bytes | None:
        try:
            with CancelGuard():
                kv = await self._open()
                entry = await kv.get(_state_key(key))
        except nats.js.errors.KeyNotFoundError:
            return None
        except nats.errors.Error as exc:
            raise translate(exc, f"reading state {key!r}") from exc
        value: bytes | None = entry.value
        return value

    async def save(self, key: str, value: bytes) -> None:
        try:
            with CancelGuard():
                kv = await self._open()
                await kv.put(_state_key(key), value)
        except nats.errors.Error as exc:
            raise translate(exc, f"writing state {key!r}") from exc

    async def _open(self) -> Any:
        self._conn.client()
        js = self._conn.js
        try:
            return await js.key_value(self._bucket)
        except nats.js.errors.BucketNotFoundError:
            return await js.create_key_value(bucket=self._bucket, replicas=self._replicas)
        except nats.errors.Error as exc:
            raise translate(exc, f"opening the state bucket {self._bucket!r}") from exc


def _state_key(key: str) -> str:
    # KV keys allow [-/_=.A-Za-z0-9]; base64url stays inside that alphabet.
    return base64.urlsafe_b64encode(key.encode()).decode()
