"""Where the Redis transport keeps things: every key, by name.

Every key starts with ``prefix`` (``surge`` by default)::

    {prefix}:groups        hash  group -> its topic patterns ("\\n"-joined)
    {prefix}:groups:v      int   bumped by every declare that changes the hash
    {prefix}:groups:p      hash  group -> its partition count (0: an inbox)
    {prefix}:s:{group}     stream, read by the Redis consumer group ``group``
    {prefix}:p{n}:{group}  partition n of the group's keyed envelopes
    {prefix}:o{n}:{group}  the lease of partition n: its owner (SET NX PX)
    {prefix}:m:{group}     sorted set of the group's live consumers
    {prefix}:a:{group}     an ephemeral group's liveness (SET PX, renewed)
    {prefix}:partitions    the partition count of every group under prefix
    {prefix}:z:{group}     sorted set of delayed entries (retries, not_before)
    {prefix}:d:{group}     stream of the group's dead letters
    {prefix}:dd:{id}       dedup marker of a derived event id (SET NX EX)
    {prefix}:state:{key}   a small value of ``save_state``

On a Redis Cluster (``slotted``) the keys are spread over slots so that a
group's partitions spread over the shards, while each script still touches
one slot (Redis refuses a script whose keys are in several):

    {{prefix}}:...           the keys above but those of partitions, in the
                             prefix's slot (its "home"); plus
    {{prefix}}:layout        the layout's version ("2"), see ``LAYOUT``
    {{prefix:n}}:p:{group}   partition n of the group's keyed envelopes,
    {{prefix:n}}:z:{group}   its delayed entries,
    {{prefix:n}}:d:{group}   its dead letters,
    {{prefix:n}}:dd:{id}     the dedup markers of keyed envelopes of partition n
    {{prefix:n}}:groups:v    a copy of the registry version, raised by every
                             declare (the publish script checks it there)

Partition n of every group shares the slot of ``{prefix:n}``, so a keyed
envelope's fan-out to several groups stays one script; a prefix (never
containing ``:``) cannot name another's partition slot. The leases stay home,
beside the state keys (``FencedState`` checks a lease and saves in one
script). A delayed or dead entry of partition n never leaves partition n's
slot: the retry, the bury and the mover are single-slot scripts.

A partition's number comes before the group name, so no group name can
forge another group's key. The Lua scripts (``_scripts``) build the keys of
the sweep and the mover from the same pieces; keep them in step.
"""

from __future__ import annotations

__all__ = ("LAYOUT", "GroupKeys", "Keys")

LAYOUT = "2"
"""The version of the cluster layout, kept in ``{prefix}:layout``. Layout 1
(every key under the prefix's one hash tag, before partitions had slots of
their own) recorded none: a prefix with keys and no layout is refused."""


class Keys:
    """The keys of one prefix; ``slotted``: a Redis Cluster's layout."""

    __slots__ = (
        "_base",
        "dedup",
        "layout",
        "partitions",
        "prefix",
        "registry",
        "registry_parts",
        "slotted",
        "version",
    )

    def __init__(self, prefix: str, *, slotted: bool = False) -> None:
        home = f"{{{prefix}}}" if slotted else prefix
        self._base = prefix
        self.slotted = slotted
        self.prefix = home
        """What the prefix's keys outside partitions start with."""
        self.registry = f"{home}:groups"
        self.version = f"{home}:groups:v"
        self.registry_parts = f"{home}:groups:p"
        self.partitions = f"{home}:partitions"
        self.layout = f"{home}:layout"
        self.dedup = f"{home}:dd:"
        """The dedup marker's key, without the event id."""

    def tag(self, p: int) -> str:
        """What partition ``p``'s own keys start with (``slotted`` only)."""
        return f"{{{self._base}:{p}}}"

    def version_of(self, p: int) -> str:
        """Partition ``p``'s slot's copy of the registry version (``slotted``)."""
        return f"{self.tag(p)}:groups:v"

    def dedup_of(self, p: int | None) -> str:
        """The dedup marker's key (without the id) of an envelope written to
        partition ``p``'s slot (None: the prefix's)."""
        return self.dedup if p is None or not self.slotted else f"{self.tag(p)}:dd:"

    def stream(self, group: str) -> str:
        return f"{self.prefix}:s:{group}"

    def zset(self, group: str) -> str:
        return f"{self.prefix}:z:{group}"

    def partition_stream(self, group: str, p: int) -> str:
        if self.slotted:
            return f"{self.tag(p)}:p:{group}"
        return f"{self.prefix}:p{p}:{group}"

    def partition_zset(self, group: str, p: int) -> str:
        return f"{self.tag(p)}:z:{group}" if self.slotted else self.zset(group)

    def state(self, key: str) -> str:
        return f"{self.prefix}:state:{key}"

    def group(self, name: str, parts: int) -> GroupKeys:
        return GroupKeys(self, name, parts)


class GroupKeys:
    """The keys of one group; ``parts`` partitions (0: none, an inbox).

    A delivery's token is its entry id in the shared stream, or
    ``b"<n>/<entry id>"`` for an entry of partition n (see ``locate``).
    Partition n's delayed set and dead letters (``pzsets``, ``pdeads``) are
    the group's own unless ``slotted``.
    """

    __slots__ = (
        "alive",
        "dead",
        "leases",
        "members",
        "name",
        "parts",
        "pdeads",
        "pindex",
        "pstream_ends",
        "pstreams",
        "pzsets",
        "slotted",
        "stream",
        "zset",
    )

    def __init__(self, keys: Keys, name: str, parts: int) -> None:
        prefix = keys.prefix
        self.name = name
        self.parts = parts
        self.slotted = keys.slotted
        self.stream = keys.stream(name)
        self.zset = keys.zset(name)
        self.dead = f"{prefix}:d:{name}"
        self.alive = f"{prefix}:a:{name}"
        self.members = f"{prefix}:m:{name}"
        self.pstreams = [keys.partition_stream(name, p) for p in range(parts)]
        self.pindex = {s.encode(): p for p, s in enumerate(self.pstreams)}
        self.leases = [f"{prefix}:o{p}:{name}" for p in range(parts)]
        if keys.slotted:
            self.pzsets = [f"{keys.tag(p)}:z:{name}" for p in range(parts)]
            self.pdeads = [f"{keys.tag(p)}:d:{name}" for p in range(parts)]
            # no script builds a partition's key: each runs in one slot
            self.pstream_ends = ("", "")
        else:
            self.pzsets = [self.zset] * parts
            self.pdeads = [self.dead] * parts
            # a partition stream's key around its number, for the scripts
            self.pstream_ends = (f"{prefix}:p", f":{name}")

    def locate(self, token: bytes) -> tuple[str, bytes]:
        """The stream of a delivery's ``token``, and its entry id there."""
        part, slash, entry = token.partition(b"/")
        if not slash:
            return self.stream, token
        return self.pstreams[int(part)], entry

    def zset_of(self, token: bytes) -> str:
        """The delayed set a delivery's ``token`` goes to on a retry."""
        part, slash, _ = token.partition(b"/")
        return self.pzsets[int(part)] if slash else self.zset

    def dead_of(self, token: bytes) -> str:
        """The dead-letter stream a delivery's ``token`` is buried in."""
        part, slash, _ = token.partition(b"/")
        return self.pdeads[int(part)] if slash else self.dead

    def streams(self) -> list[str]:
        """Every stream of the group: shared, then its partitions."""
        return [self.stream, *self.pstreams]

    def zsets(self) -> list[tuple[str, str]]:
        """Every delayed set of the group, each with the stream its entries
        go back to when they have no partition of their own."""
        if not self.slotted:
            return [(self.zset, self.stream)]
        return [(self.zset, self.stream), *zip(self.pzsets, self.pstreams, strict=True)]

    def deads(self) -> list[tuple[str, str]]:
        """Every dead-letter stream of the group, each with the stream a
        replay puts its letters back into (None: by their key)."""
        if not self.slotted:
            return [(self.dead, "")]
        return [(self.dead, self.stream), *zip(self.pdeads, self.pstreams, strict=True)]
