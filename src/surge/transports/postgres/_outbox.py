"""The transactional outbox: envelopes written through the caller's own
connection, inside its open transaction.

``await app.publish(event, connection=conn)`` calls the schema's
``publish`` function on ``conn``: the envelope becomes rows of the caller's
transaction, routed and deduplicated exactly like a publish of the
transport. Rolled back, the event never existed; committed, it is delivered
(once per group, at least once), and the function's NOTIFY, sent at that
commit, wakes the consumers. Accepted connections: an asyncpg
``Connection`` (or a pool's proxy of one) and a psycopg 3
``AsyncConnection``. From SQLAlchemy's ``AsyncSession`` (asyncpg dialect)::

    conn = (await (await session.connection()).get_raw_connection()).driver_connection

The connection must reach the transport's database: a connection to another
one (no surge schema there) raises :class:`~surge.ConfigurationError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

from ..._clock import Clock
from ..._errors import ConfigurationError, SurgeError, TransportError
from ..._event import Envelope
from ._publish import CALL

if TYPE_CHECKING:
    from ._publish import Publisher
    from ._schema import Schema

__all__ = ("Outbox",)

_ASYNCPG = (asyncpg.Connection, asyncpg.pool.PoolConnectionProxy)


class Outbox:
    """Writes envelopes through connections that are not the transport's."""

    def __init__(self, schema: Schema, publisher: Publisher, clock: Clock, window: float) -> None:
        self._schema = schema
        self._publisher = publisher
        self._clock = clock
        self._window = window
        self._asyncpg_sql = schema.q(CALL)
        # psycopg's placeholders, same casts
        sql = schema.q(CALL)
        for i in range(10, 0, -1):
            sql = sql.replace(f"${i}", "%s")
        self._psycopg_sql = sql

    async def publish_in(self, connection: Any, envelopes: Sequence[Envelope]) -> None:
        cols = self._publisher.columns(envelopes)
        if not cols[0]:
            return
        args = (self._clock.time(), self._window, *cols)
        if isinstance(connection, _ASYNCPG):
            try:
                await connection.fetchval(self._asyncpg_sql, *args)
            except (asyncpg.UndefinedFunctionError, asyncpg.InvalidSchemaNameError):
                raise self._elsewhere(connection) from None
            except asyncpg.PostgresError as exc:
                raise TransportError(f"outbox publish failed: {type(exc).__name__}: {exc}") from exc
            return
        if _is_psycopg(connection):
            await self._psycopg(connection, args)
            return
        raise ConfigurationError(
            f"publish(connection=...) takes an asyncpg Connection or a psycopg AsyncConnection, "
            f"not {type(connection).__module__}.{type(connection).__qualname__}"
        )

    async def _psycopg(self, connection: Any, args: tuple[Any, ...]) -> None:
        import psycopg

        try:
            await connection.execute(self._psycopg_sql, args)
        except (psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName):
            raise self._elsewhere(connection) from None
        except psycopg.Error as exc:
            raise TransportError(f"outbox publish failed: {type(exc).__name__}: {exc}") from exc

    def _elsewhere(self, connection: Any) -> SurgeError:
        s = self._schema
        return ConfigurationError(
            f"publish(connection=...): the connection does not reach surge's schema "
            f"{s.name!r} of database {s.database!r} (the transport's); an outbox write must "
            "go to the transport's own database"
        )


def _is_psycopg(connection: Any) -> bool:
    module = type(connection).__module__
    if not module.startswith("psycopg"):
        return False
    import psycopg

    return isinstance(connection, psycopg.AsyncConnection)
