"""PostgreSQL: ``postgresql://user@host:5432/database`` (or ``postgres://``),
with a transactional outbox (``pip install 'surge[postgres]'``).

Options, in the URL's query string (``?schema=shop&lease=10``) or as keyword
arguments (the rest of the query string goes to the driver, asyncpg):

=====================  =========  ==========================================
``schema``             surge      the schema that holds surge's tables
``lease``              30         seconds a consumer holds a delivery
                                  unsettled before another may take it
``heartbeat``          lease / 3  seconds between lease extensions (0: never)
``retention``          600        seconds a settled event is kept
``dedup_window``       600        seconds a derived event id is remembered
``poll``               1          the longest an idle consumer waits between
                                  looks when no notification comes
``max_pending``        10000      envelopes accepted but not yet committed
``batch``              2000       envelopes per publish round trip
``maintenance``        1          seconds between housekeeping rounds
``partitions``         8          partitions of each group's keyed events;
                                  the schema keeps the first count
``pool``               4          connections in the pool (one more LISTENs)
``reconnect_timeout``  30         seconds a publish or settle retries a lost
                                  server before raising ``TransportError``
``command_timeout``    30         seconds a statement waits for the server's
                                  answer before its connection counts as
                                  lost (a silent network); ``publish``
                                  raises within ``reconnect_timeout`` plus
                                  this
``codec``              msgpack    a ``Codec`` for events given as objects
=====================  =========  ==========================================

What ``publish`` promises when it returns: the envelopes are committed (as
durable as the server's ``synchronous_commit`` makes a commit). Concurrent
publishes share one call of the schema's ``publish`` function (group
commit), which routes each topic to the groups whose patterns match, drops
derived ids seen within ``dedup_window``, stores the rows and NOTIFYs the
groups touched, so idle consumers wake in about a round trip
(:mod:`._listen`; polling every ``poll`` seconds at most is the fallback).

Consuming, settling, partitions: as on ``sqlite://`` (leases with tokens,
``FOR UPDATE SKIP LOCKED`` claims of the shared queue, partitions of keyed
events each read by the one consumer holding its lease; see
:mod:`._consume` and :mod:`._partitions`). Several hosts may share a schema:
times (leases, ``not_before``) are read from each process's clock, so the
hosts' clocks must agree to well within ``lease``.

The transactional outbox: ``await app.publish(event, connection=conn)``
writes through the caller's connection inside its transaction
(:mod:`._outbox`). :class:`Relay` (``surge relay``) moves what is committed
there to another transport, for an app whose bus is Redis or NATS
(:mod:`._relay`).

The schema is created on first start (the role needs CREATE on the
database, or on an existing schema), versioned, migrated in place by a
newer surge and refused by an older one; a schema that holds other objects
is refused (see :mod:`._schema`). Errors: a URL without a database, a role
without rights, a foreign schema: ``ConfigurationError``; a server that
cannot be reached: ``TransportError``.

The parts: :mod:`._options` (URL), :mod:`._schema` (tables, versions),
:mod:`._db` (pool, errors), :mod:`._publish` (group commit),
:mod:`._outbox`, :mod:`._consume` (claims, settles), :mod:`._partitions`
(owners), :mod:`._dead` (dead letters), :mod:`._groups`, :mod:`._relay`,
:mod:`._listen` (LISTEN/NOTIFY), :mod:`._retention` (housekeeping), and
:mod:`._transport`, which wires them together.
"""

from __future__ import annotations

from ._relay import RELAY_GROUP, Relay
from ._transport import PostgresTransport

__all__ = ("RELAY_GROUP", "PostgresTransport", "Relay")
