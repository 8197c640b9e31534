"""NATS JetStream: a stream per app, a durable pull consumer per group.

Layout on the server, for ``stream="surge"`` (the default):

==========================  ================================================
stream ``surge``            subjects ``surge.<topic>`` (topic dots are subject
                            tokens, so ``orders.*`` / ``orders.>`` are NATS
                            wildcards), ``surge_k.<p>.<topic>`` (keyed
                            envelopes, partition p) and
                            ``surge_replay.<group>``; file storage, interest
                            retention (a message goes once every group that
                            wanted it has acked it); the partition count in
                            its metadata
consumer per group          durable, pull, explicit acks; AckWait is the
                            lease; filter subjects = the group's topics plus
                            its own replay subject
consumer per partition      ``<group>-p<p>``: the group's keyed envelopes of
                            partition p, read by the lease holder only
bucket ``surge_parts``      partition leases and group memberships
bucket ``surge_state``      small durable values (trigger state)
stream ``surge_dlq``        dead letters, ``surge_dlq.<group>`` (JetStream
                            has no dead-letter queue of its own)
stream ``surge_released``   how many times a message was handed back
                            untouched (``release``), one message per
                            ``surge_released.<consumer>.<seq>``, so that the
                            hand-back does not count as an attempt
==========================  ================================================

The parts, each an object owning its state (:class:`NatsTransport` composes
them and orders their start and stop):

====================  ==========================================================
``_options``          ``NatsOptions``: settings from keywords and the URL query
``_layout``           names of subjects, consumers, buckets; the streams ensured
``_connection``       ``Connection``: connect, reconnect, acks, bounded close;
                      nats-py errors translated
``_publisher``        ``Publisher``: messages in flight, acks awaited, resends
``_groups``           ``Group`` / ``Source`` / ``Hold``: a group's state here
``_consumer``         ``Consumer``: declare, pull, settle, extend, hand back
``_leases``           ``Leases``: memberships and partition leases in a bucket
``_balancer``         ``Balancer``: partition rounds, takeovers, hand-over at close
``_dead_letters``     ``DeadLetters``: the dlq stream, MaxDeliver, replay, purge
``_released``         ``Released``: hand-back counts, subtracted from attempts
``_state``            ``StateBucket``: trigger state
``_transport``        ``NatsTransport``: the facade
====================  ==========================================================

Why it is built this way:

- Publishing fires many messages, each with a reply inbox, and awaits all
  the acks (``publish_async`` style) with a bounded number outstanding, so
  ``await publish()`` returns when JetStream stored the batch. ``Nats-Msg-Id``
  carries the event id, so a republish after a lost ack, or a redelivered
  handler republishing derived ids, is dropped by the server within
  ``dedup_window``.
- Pulling keeps pull requests outstanding for at most ``prefetch`` messages
  of the shared consumer, and a share of ``prefetch`` per owned partition
  (so up to about twice ``prefetch`` when keyed and unkeyed events both
  flow); a silent pull is detected and reissued, so a consumer resumes by
  itself after a reconnect or a server restart (see ``_consumer``).
- Deliveries held by this process get an in-progress ack every third of the
  lease, so a slow handler is not redelivered to another worker.
- ``not_before``: JetStream cannot hold a message back; an early delivery
  is NAKed with a delay for the remainder (see ``_consumer``).
- Replay republishes a dead letter to ``surge_replay.<group>``: a topic
  subject would fan it out to every group, the replay subject reaches only
  the consumer of the group that gave up on it.
- MaxDeliver is only a safety net (``max_deliver``, default 100) against a
  message that kills its worker every time; retries and dead letters are the
  runner's (see ``_dead_letters``).
- Several workers on one group share its unkeyed work: JetStream hands
  each message to whichever worker pulls next. Keyed envelopes (``key=``,
  or the key of the app's keyed subscription) go to one of ``partitions``
  (default 8, fixed per stream) partitions, each read by the one worker
  holding its lease, so one key is handled one event at a time and in
  publish order across workers, while workers join and leave; a killed
  worker's partitions move after its lease, its unsettled deliveries first.
  A retried event (nack with a delay) may come after later ones of its key.
  Unkeyed events take the same path as without partitions. See
  ``_balancer``.
- Interest retention: a message stays until every group it matched acked
  it; one that no declared group matches is not kept (as on every surge
  transport), so workers declare their groups before producers publish.

- A cluster: name every server in the URL
  (``nats://a:4222,b:4222,c:4222``; the client also learns the others from
  the one it reaches, and reconnects to a survivor) and ``?replicas=3``: the
  stream, the dead-letter stream and both buckets are kept on three servers
  (consumers inherit the stream's replicas), so one node's loss loses no
  acknowledged publish. While a dead node's streams elect new leaders
  (seconds), publishes get no answer or "no responders" and are sent again
  under the same ``Nats-Msg-Id`` until ``publish_timeout``; a publish of an
  id another publish is still replicating ("duplicate message id is in
  process") is asked again until the server settles it.

Needs nats-server 2.10 or later (consumers with several filter subjects,
stream metadata).
"""

from ._transport import NatsTransport

__all__ = ("NatsTransport",)
