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

A partition's number comes before the group name, so no group name can
forge another group's key. The Lua scripts (``_scripts``) build the keys of
the sweep and the mover from the same pieces; keep them in step.
"""

from __future__ import annotations

__all__ = ("GroupKeys", "Keys")


class Keys:
    """The keys of one prefix."""

    __slots__ = ("dedup", "partitions", "prefix", "registry", "registry_parts", "version")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.registry = f"{prefix}:groups"
        self.version = f"{prefix}:groups:v"
        self.registry_parts = f"{prefix}:groups:p"
        self.partitions = f"{prefix}:partitions"
        self.dedup = f"{prefix}:dd:"
        """The dedup marker's key, without the event id."""

    def stream(self, group: str) -> str:
        return f"{self.prefix}:s:{group}"

    def zset(self, group: str) -> str:
        return f"{self.prefix}:z:{group}"

    def partition_stream(self, group: str, p: int) -> str:
        return f"{self.prefix}:p{p}:{group}"

    def state(self, key: str) -> str:
        return f"{self.prefix}:state:{key}"

    def group(self, name: str, parts: int) -> GroupKeys:
        return GroupKeys(self, name, parts)


class GroupKeys:
    """The keys of one group; ``parts`` partitions (0: none, an inbox).

    A delivery's token is its entry id in the shared stream, or
    ``b"<n>/<entry id>"`` for an entry of partition n (see ``locate``).
    """

    __slots__ = (
        "alive",
        "dead",
        "leases",
        "members",
        "name",
        "parts",
        "pindex",
        "pstream_ends",
        "pstreams",
        "stream",
        "zset",
    )

    def __init__(self, keys: Keys, name: str, parts: int) -> None:
        prefix = keys.prefix
        self.name = name
        self.parts = parts
        self.stream = keys.stream(name)
        self.zset = keys.zset(name)
        self.dead = f"{prefix}:d:{name}"
        self.alive = f"{prefix}:a:{name}"
        self.members = f"{prefix}:m:{name}"
        self.pstreams = [keys.partition_stream(name, p) for p in range(parts)]
        self.pindex = {s.encode(): p for p, s in enumerate(self.pstreams)}
        self.leases = [f"{prefix}:o{p}:{name}" for p in range(parts)]
        # a partition stream's key around its number, for the scripts
        self.pstream_ends = (f"{prefix}:p", f":{name}")

    def locate(self, token: bytes) -> tuple[str, bytes]:
        """The stream of a delivery's ``token``, and its entry id there."""
        part, slash, entry = token.partition(b"/")
        if not slash:
            return self.stream, token
        return self.pstreams[int(part)], entry

    def streams(self) -> list[str]:
        """Every stream of the group: shared, then its partitions."""
        return [self.stream, *self.pstreams]
