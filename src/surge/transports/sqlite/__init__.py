"""A durable transport in one SQLite file, shared by the processes of a host.

``sqlite:///relative.db`` or ``sqlite:////absolute/path.db``, with options in
the query string (``?synchronous=normal&lease=10``) or as keyword arguments:

================  =========  ================================================
``synchronous``   ``full``   ``full`` or ``normal``, see below
``lease``         30         seconds a consumer holds a delivery unsettled
                             before another consumer may take it
``heartbeat``     lease / 3  seconds between lease extensions of deliveries
                             this process holds (0: never extend)
``retention``     600        seconds an event handled by every group is kept
``dedup_window``  600        seconds a derived event id is remembered
``poll``          0.025      longest wait before looking for events another
                             process published (5 ms at first, doubling)
``busy_timeout``  5          seconds to wait for another process's lock
                             before raising ``TransportError``
``check``         ``quick``  integrity check at start: quick, full or off
``max_size``      none       bytes the file may hold; past it publish raises
``max_pending``   10000      envelopes accepted but not yet committed;
                             ``publish`` waits and ``publish_nowait`` raises
                             ``Overloaded`` past it
``maintenance``   1          seconds between compactions
``codec``         msgpack    a ``Codec`` for events given as objects (the
                             App's codec must read what it writes)
``partitions``    8          partitions of each group's keyed events; the
                             file keeps the first count (another raises)
``wakeups``       true       a process that commits publishes wakes the
                             others' consumers (false: they only poll)
================  =========  ================================================

What ``publish`` promises when it returns (the file is in WAL mode):

- ``synchronous=full`` (the default): the transaction holding the envelopes
  is in the write-ahead log and the log is fsynced. The envelopes survive
  the process's crash, the operating system's crash and a power loss.
- ``synchronous=normal``: the transaction is in the write-ahead log, which
  is fsynced only at checkpoints. The envelopes survive the process's crash
  (SIGKILL included); an operating system crash or power loss may lose the
  transactions committed since the last checkpoint, never corrupting the
  file. Faster: no fsync per commit.

``publish_nowait`` only queues: its envelopes are durable once the batch
they joined commits (a failure is logged).

Concurrent publishes share one transaction (group commit): publishes made
in one turn of the event loop travel as one job to the thread that owns the
connection, and that thread commits everything queued at once, so many
publishes pay for one fsync. Consumers claim deliveries with a lease (a
token and a visibility deadline); acks, nacks and lease extensions name the
token, so a consumer that lost its lease (stopped, too slow) cannot settle a
delivery that another consumer now holds. Delivery is at-least-once; events
published by handlers carry derived ids and are deduplicated within
``dedup_window``. Dead letters live in the same file. Events that every
group has settled are deleted after ``retention`` (counted, for events
stored before this process started, from its start) and the freed pages are
reused or returned to the file system (incremental vacuum); the write-ahead
log is checkpointed after each compaction so it is reused, not grown.

Per-key order holds across processes: an envelope with a key goes to the
partition of its key in each group (but reply inboxes), and one consumer at
a time reads a partition, under a lease kept in the file; the next owner
reads first what its predecessor left unsettled (``_ownership``).
Unkeyed envelopes go to the group's shared queue, read by every consumer.

Several processes may share the file, each with its own transport: claims
take the write lock (``BEGIN IMMEDIATE``), a process wakes its consumers at
once when it publishes itself, and those of the user's other processes on
the host through a Unix datagram socket each (``_wakeups``); a consumer
also polls (5 to ``poll`` ms), which is all it does where the sockets
cannot be used. The
host's writers take turns (``_writelock``): a write transaction waits for
about one transaction of each other writer, never for luck, and a lock held
by another process past ``busy_timeout`` raises ``TransportError``.
Errors: a file that is not a surge database raises ``ConfigurationError``;
a corrupt file (integrity check at start), a full disk or ``max_size`` (the
transaction is rolled back: what was committed stays) and a lock held too
long raise ``TransportError``.

The parts, one module each:

==================  ==========================================================
``_transport``      ``SqliteTransport``: the async facade (group commit, the
                    consume loop, settling, idleness, housekeeping)
``_options``        the options above, parsed and checked once
``_thread``         the thread that owns the connection; the loop's handle
``_database``       the connection and every statement run on it
``_schema``         the tables, and the upgrade of older files
``_ownership``      one group's membership and the partitions it holds
``_leases``         this process's consumers and unsettled leases
``_writelock``      the turns the host's writers take at the write lock
==================  ==========================================================
"""

from __future__ import annotations

from ._transport import SqliteTransport

__all__ = ("SqliteTransport",)
