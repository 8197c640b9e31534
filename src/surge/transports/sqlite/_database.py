"""The statements of ``sqlite://``, run on the one thread that owns the connection.

:class:`Database` holds the connection and every statement the transport
runs: events, deliveries and their leases, dead letters, trigger state,
compaction, and the rows of partition ownership (``members``, ``owners``).
Nothing here touches the event loop: the loop's side hands calls over as
:class:`Job` values (``_thread``), and :meth:`Database.run` runs a batch of
them in one transaction, so publishes queued together share one commit.
The tables are described, created and upgraded in ``_schema``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec

from ..._errors import ConfigurationError, SurgeError, TransportError
from ..._event import Envelope
from ..._transport import DeadLetter, Delivery, topic_matches
from .._partitions import assignment, partition_of
from ._options import unopenable
from ._schema import prepare
from ._writelock import WriteLock

__all__ = ("Database", "Job", "Row", "translate")

log = logging.getLogger("surge.sqlite")

_CHUNK = 500  # SQL variables per IN (...) list
_COMPACT_CHUNK = 50_000

Row = tuple[str, str, str | None, float, bytes | None, bytes, float | None]

# (live members, partitions still held, (partition, readable from) taken)
Step = tuple[list[str], list[int], list[tuple[int, float]]]

# The claim of the shared queue (the one statement of an unkeyed claim)...
_CLAIM = (
    "UPDATE deliveries SET visible_at = ?, token = ?, attempt = attempt + 1, "
    "first_time = coalesce(first_time, ?) WHERE id IN (SELECT id FROM deliveries "
    "WHERE grp = ? AND part IS NULL AND visible_at <= ? ORDER BY visible_at, id LIMIT ?) "
    "RETURNING id, msg, attempt, first_time, part"
)
# ... and of a partition: its oldest visible rows in publish (row) order, so
# that what its last owner left comes before what was published after it.
_CLAIM_PART = (
    "UPDATE deliveries SET visible_at = ?, token = ?, attempt = attempt + 1, "
    "first_time = coalesce(first_time, ?) WHERE id IN (SELECT id FROM deliveries "
    "INDEXED BY deliveries_part WHERE grp = ? AND part = ? AND visible_at <= ? "
    "ORDER BY id LIMIT ?) RETURNING id, msg, attempt, first_time, part"
)
# The partitions a claim may read: held by ``me`` (the lease decides, not
# the caller's view of it, which may be stale) and holding a visible row,
# so that a claim of the shared queue alone costs what it did (the first
# EXISTS, one probe, answers at once for a group without keyed rows).
_LIVE = (
    "SELECT part FROM owners o WHERE EXISTS (SELECT 1 FROM deliveries WHERE grp = ?1 "
    "AND part >= 0) AND grp = ?1 AND owner = ?2 AND until > ?3 AND EXISTS "
    "(SELECT 1 FROM deliveries WHERE grp = o.grp AND part = o.part AND visible_at <= ?3)"
)

# Attempts settled by every process, per group (``settled:<group id>``).
_COUNT_SETTLED = (
    "INSERT INTO meta (key, value) VALUES (?1, ?2) "
    "ON CONFLICT (key) DO UPDATE SET value = value + ?2"
)

_decode_headers = msgspec.msgpack.Decoder(dict[str, str]).decode
_encode_headers = msgspec.msgpack.Encoder().encode


def translate(path: Path, err: sqlite3.Error) -> SurgeError:
    """A surge error for an error of SQLite's."""
    text = str(err)
    if "locked" in text or "busy" in text:
        return TransportError(f"{path}: the database is locked by another process ({text})")
    if "full" in text:
        return TransportError(f"{path}: the disk or the size limit is full ({text})")
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return TransportError(f"{path}: the database file is corrupt ({text})")
    return TransportError(f"{path}: {type(err).__name__}: {text}")


class Job:
    """A call to run on the connection's thread, and what came of it."""

    __slots__ = ("after", "args", "error", "fn", "fut", "result", "write")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        write: bool,
        fut: asyncio.Future[Any],
        after: Callable[[Any], None] | None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.write = write
        self.fut = fut
        self.after = after
        self.result: Any = None
        self.error: BaseException | None = None


class Database:
    """One connection, owned by one thread, and the statements run on it."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str,
        busy_timeout: float,
        check: str,
        max_size: int | None,
        dedup_window: float,
        partitions: int,
    ) -> None:
        self.path = path
        self.partitions = partitions
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self.check = check
        self.max_size = max_size
        self.dedup_window = dedup_window
        self._conn: sqlite3.Connection | None = None
        self.writer = WriteLock(path, busy_timeout)
        self.transactions = 0
        self.stale = 0
        self._gver: Any = None
        self._groups: dict[int, tuple[str, list[str]]] = {}
        self._flat: set[int] = set()  # ephemeral groups: never partitioned
        self._ids: dict[str, int] = {}
        self._routes: dict[str, tuple[int, ...]] = {}
        self._cursor = 0
        self._upto = 0
        self._rounds = 0
        self._turn = 0
        self._level = synchronous  # the connection's synchronous level now
        # Writes that need no fsync of their own (synchronous=full): a claim,
        # a settle or a lease (a delivery's, a partition's, a member's) lost
        # with the last unsynced WAL frames is a delivery that comes again,
        # as after any crash. Only a power loss or an OS crash loses them,
        # and every worker of the host (one file, flock: one host) dies
        # with it; a process crash loses nothing (the OS holds the writes).
        # The next commit that syncs (a publish's) makes them durable with
        # it: WAL frames are synced in order.
        self.soft: frozenset[Callable[..., Any]] = frozenset(
            (
                self.claim,
                self.ack,
                self.release,
                self.hand_back,
                self.extend,
                self.keep_partitions,
                self.leave,
            )
        )

    # --- transactions --------------------------------------------------------
    @property
    def alone(self) -> tuple[Callable[[], None], ...]:
        """The calls that run outside a transaction, each alone."""
        return (self.open, self.checkpoint)

    def run(self, jobs: list[Job], more: Callable[[bool], list[Job]] | None = None) -> None:
        """Run ``jobs`` (fn, args, write; result, error) in one transaction.

        ``more``, when given, is asked once the write lock is held for the
        calls queued meanwhile, which join the transaction (group commit:
        a writer that waited for the lock commits everything that came in
        while it waited, not one transaction per wait); ``jobs`` grows by
        them. Told True, it takes only calls of :attr:`soft` (the
        transaction commits without an fsync). When one fails for a reason
        of its own, the others are run again, each in a transaction of its
        own, so one bad call fails alone.
        """
        raw = self.alone
        if any(j.fn in raw for j in jobs):
            # these run outside a transaction, each alone, in queue order
            batch: list[Job] = []
            for job in [*jobs, None]:
                if job is None or job.fn in raw:
                    if batch:
                        self.run(batch, more if job is None else None)
                        batch = []
                    if job is not None:
                        try:
                            job.result = job.fn()
                        except BaseException as exc:
                            job.error = exc
                else:
                    batch.append(job)
            return
        if not all(j.write for j in jobs) and any(j.write for j in jobs):
            # Reads wait for the writes' commit and run after it, outside
            # the write lock, which the other processes wait for: a read
            # sees at least what was committed when it was queued.
            writes = [j for j in jobs if j.write]
            self._settled(writes, more)
            self._settled([j for j in jobs if not j.write], None)
            jobs[:] = writes + [j for j in jobs if not j.write]
            return
        self._settled(jobs, more)

    def _settled(self, jobs: list[Job], more: Callable[[bool], list[Job]] | None) -> None:
        """Run ``jobs`` in one transaction (see :meth:`run`), each ending with
        a result or an error."""
        try:
            self._transaction(jobs, more)
        except Exception as exc:
            text = str(exc)
            if len(jobs) == 1 or "locked" in text or "busy" in text:
                # a lock would hold each job up again for busy_timeout
                for job in jobs:
                    job.error = exc
                return
            # one bad call, or a full disk (acks and claims free or need no
            # space, so they must not fail with the publishes)
            for job in jobs:
                try:
                    self._transaction([job])
                except Exception as exc1:
                    job.error = exc1

    def _transaction(
        self, jobs: list[Job], more: Callable[[bool], list[Job]] | None = None
    ) -> None:
        conn = self._conn
        if conn is None:
            raise TransportError(f"{self.path}: the connection is closed")
        write = any(j.write for j in jobs)
        soft = False
        if write and self.synchronous == "full":
            # a level is set outside a transaction only
            soft = all(j.fn in self.soft for j in jobs)
            level = "normal" if soft else "full"
            if level != self._level:
                conn.execute(f"PRAGMA synchronous = {level.upper()}")
                self._level = level
        if write:
            self.writer.acquire()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except BaseException:
            self.writer.release()
            raise
        if write and more is not None:
            jobs.extend(more(soft))
        publish = self.publish
        try:
            i = 0
            while i < len(jobs):
                job = jobs[i]
                if job.fn == publish:
                    # consecutive publishes become one: one route lookup, one
                    # seq reservation and one executemany per table for all
                    j = i + 1
                    while j < len(jobs) and jobs[j].fn == publish:
                        j += 1
                    rows = [row for k in range(i, j) for row in jobs[k].args[0]]
                    touched = publish(rows, jobs[j - 1].args[1])
                    for k in range(i, j):
                        jobs[k].result = touched
                    i = j
                    continue
                job.result = job.fn(*job.args)
                i += 1
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            self.writer.release()
        if write:
            self.transactions += 1

    # --- opening and closing -------------------------------------------------
    def open(self) -> None:
        path = self.path
        if path.exists() and path.stat().st_size > 0:
            with path.open("rb") as f:
                head = f.read(16)
            if head != b"SQLite format 3\x00":
                raise ConfigurationError(f"{path} is not a surge database (not an SQLite file)")
        self.writer.open()
        try:
            conn = sqlite3.connect(
                path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=True
            )
        except sqlite3.Error as exc:
            self.writer.close()
            raise TransportError(unopenable(path, exc)) from None
        try:
            self.writer.acquire()
            try:
                self._prepare(conn)
            finally:
                self.writer.release()
        except BaseException:
            conn.close()
            self.writer.close()
            raise
        self._conn = conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        path = self.path
        try:
            if self.check != "off":
                pragma = "quick_check" if self.check == "quick" else "integrity_check"
                rows = conn.execute(f"PRAGMA {pragma}").fetchall()
                if rows != [("ok",)]:
                    found = "; ".join(str(r[0]) for r in rows[:3])
                    raise TransportError(f"{path} is corrupt: {pragma} found {found}")
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect on a new file
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise TransportError(f"{path}: cannot use WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            self._level = self.synchronous
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.execute("PRAGMA temp_store = MEMORY")
            if self.max_size is not None:
                page = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {max(16, self.max_size // page)}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                prepare(conn, path, self.partitions)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise translate(path, exc) from None

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the file, so the log is reused
        from its start instead of growing (never waits for readers)."""
        self._c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def pragma(self, name: str) -> Any:
        """The value of ``PRAGMA name`` on this connection."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a pragma name: {name!r}")
        return self._c.execute(f"PRAGMA {name}").fetchone()[0]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.writer.close()

    # --- groups --------------------------------------------------------------
    @property
    def _c(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    def _sync_groups(self) -> None:
        conn = self._c
        ver = conn.execute("SELECT value FROM meta WHERE key = 'groups'").fetchone()[0]
        if ver == self._gver:
            return
        self._gver = ver
        rows = conn.execute("SELECT id, name, patterns, ephemeral FROM groups").fetchall()
        self._groups = {gid: (name, json.loads(patterns)) for gid, name, patterns, _ in rows}
        self._flat = {gid for gid, _, _, ephemeral in rows if ephemeral}
        self._ids = {name: gid for gid, (name, _) in self._groups.items()}
        self._routes = {}

    def _bump_groups(self) -> None:
        # a random version, never a counter: a rolled-back bump must not
        # leave this cache agreeing with someone else's later bump
        self._c.execute("UPDATE meta SET value = hex(randomblob(8)) WHERE key = 'groups'")

    def declare(self, name: str, topics: list[str], ephemeral: bool, now: float) -> int:
        conn = self._c
        row = conn.execute("SELECT id, patterns FROM groups WHERE name = ?", (name,)).fetchone()
        if row is None:
            cur = conn.execute(
                "INSERT INTO groups (name, patterns, ephemeral, alive_until) VALUES (?, ?, ?, ?)",
                (name, json.dumps(topics), int(ephemeral), now + 3600 if ephemeral else None),
            )
            self._bump_groups()
            gid: int = cur.lastrowid  # type: ignore[assignment]
            return gid
        gid, patterns = row[0], json.loads(row[1])
        added = [t for t in topics if t not in patterns]
        if added:
            conn.execute(
                "UPDATE groups SET patterns = ? WHERE id = ?", (json.dumps(patterns + added), gid)
            )
            self._bump_groups()
        return int(gid)

    def group_id(self, name: str) -> int:
        self._sync_groups()
        gid = self._ids.get(name)
        if gid is None:
            raise ConfigurationError(
                f"no group {name!r} in {self.path}; groups: {sorted(self._ids)}"
            )
        return gid

    def groups_for(self, topic: str) -> list[str]:
        """The names of the groups that receive ``topic``, as the file says now."""
        self._sync_groups()
        return sorted(self._groups[gid][0] for gid in self._route(topic))

    def _route(self, topic: str) -> tuple[int, ...]:
        gids = self._routes.get(topic)
        if gids is None:
            gids = self._routes[topic] = tuple(
                gid
                for gid, (_, patterns) in self._groups.items()
                if any(topic_matches(p, topic) for p in patterns)
            )
        return gids

    # --- publishing ----------------------------------------------------------
    def _next_seqs(self, n: int) -> int:
        """Reserve ``n`` seqs; the first of them."""
        end: int = self._c.execute(
            "UPDATE meta SET value = value + ? WHERE key = 'seq' RETURNING value", (n,)
        ).fetchone()[0]
        return end - n + 1

    def publish(self, rows: list[Row], now: float) -> set[int]:
        """Store ``rows`` for every group they match; the groups that got any."""
        conn = self._c
        self._sync_groups()
        route = self._routes.get
        keep: list[tuple[Row, tuple[int, ...]]] = []
        cutoff = now - self.dedup_window
        for row in rows:
            gids = route(row[1])
            if gids is None:
                gids = self._route(row[1])
            if not gids:
                continue
            if row[0][12:13] == "8":  # a derived id, the only kind that repeats
                cur = conn.execute(
                    "INSERT INTO seen (id, time) VALUES (?, ?) ON CONFLICT (id) DO UPDATE "
                    "SET time = excluded.time WHERE seen.time < ?",
                    (row[0], now, cutoff),
                )
                if cur.rowcount != 1:
                    continue
            keep.append((row, gids))
        if not keep:
            return set()
        seq = self._next_seqs(len(keep))
        messages = []
        deliveries: list[tuple[int, int, float]] = []
        keyed: list[tuple[int, int, float, int]] = []
        touched: set[int] = set()
        flat = self._flat
        for row, gids in keep:
            messages.append((seq, *row))
            nb = row[6]
            visible = now if nb is None or nb < now else nb
            key = row[2]
            if key is None:
                deliveries.extend((gid, seq, visible) for gid in gids)
            else:
                part = partition_of(key, self.partitions)
                for gid in gids:
                    if gid in flat:
                        deliveries.append((gid, seq, visible))
                    else:
                        keyed.append((gid, seq, visible, part))
            touched.update(gids)
            seq += 1
        conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)", messages)
        conn.executemany(
            "INSERT INTO deliveries (grp, msg, visible_at) VALUES (?, ?, ?)", deliveries
        )
        if keyed:
            conn.executemany(
                "INSERT INTO deliveries (grp, msg, visible_at, part) VALUES (?, ?, ?, ?)", keyed
            )
        return touched

    # --- consuming -----------------------------------------------------------
    def claim(
        self,
        gid: int,
        group: str,
        n: int,
        now: float,
        until: float,
        token: int,
        parts: tuple[int, ...] = (),
        me: str = "",
    ) -> tuple[list[Delivery], float, dict[int, int]]:
        """Lease up to ``n`` visible deliveries of the shared queue and of
        ``parts`` (partitions ``me`` holds); them, when one is due, and the
        partition of each claimed from one (by row id)."""
        conn = self._c
        if not parts:
            claimed = conn.execute(_CLAIM, (until, token, now, gid, now, n)).fetchall()
        else:
            claimed = self._claim_rows(gid, n, now, until, token, parts, me)
        if not claimed:
            return [], self.next_due(gid, parts), {}
        claimed.sort(key=lambda r: r[1])
        bodies: dict[int, tuple[Any, ...]] = {}
        for i in range(0, len(claimed), _CHUNK):
            part = [r[1] for r in claimed[i : i + _CHUNK]]
            marks = ",".join("?" * len(part))
            for m in conn.execute(
                "SELECT seq, id, topic, key, time, headers, body, not_before FROM messages "
                f"WHERE seq IN ({marks})",
                part,
            ):
                bodies[m[0]] = m
        out = []
        where: dict[int, int] = {}
        for did, msg, attempt, first, p in claimed:
            m = bodies.get(msg)
            if m is None:  # cannot happen while deliveries pin their message
                conn.execute("DELETE FROM deliveries WHERE id = ?", (did,))
                continue
            headers = None
            if m[5] is not None:
                try:
                    headers = _decode_headers(m[5])
                except msgspec.DecodeError as exc:
                    self._bury_foreign(gid, group, did, m, attempt, first or now, now, exc)
                    continue
            env = Envelope(m[1], m[2], m[3], m[4], headers, None, m[6], m[7])
            out.append(Delivery(env, group, attempt, did, first))
            if p is not None:
                where[did] = p
        return out, 0.0, where

    def _bury_foreign(
        self,
        gid: int,
        group: str,
        did: int,
        m: tuple[Any, ...],
        attempt: int,
        first: float,
        now: float,
        exc: Exception,
    ) -> None:
        """Dead-letter a delivery whose message row no surge wrote (its
        headers are not a msgpack map of strings): it could not even be
        handed to the runner, which dead-letters undecodable bodies itself.
        The headers are dropped (a dead letter's must decode); the body kept."""
        reason = f"message {m[1]!r}: its headers are not a map of strings ({exc})"
        log.error("sqlite: %s; dead-lettered from %s", reason, group)
        self._c.execute("DELETE FROM deliveries WHERE id = ?", (did,))
        self._c.execute(
            "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, NULL, ?, ?, ?, '', ?, ?, ?)",
            (gid, m[1], m[2], m[3], m[6], "DecodeError", reason, attempt, first, now),
        )

    def _claim_rows(
        self,
        gid: int,
        n: int,
        now: float,
        until: float,
        token: int,
        parts: tuple[int, ...],
        me: str,
    ) -> list[Any]:
        """Claim up to ``n`` rows of the shared queue and of ``parts``, one
        statement each, starting at another one each time so that none
        waits behind the others' backlogs; (id, msg, attempt, first, part)."""
        conn = self._c
        live = {r[0] for r in conn.execute(_LIVE, (gid, me, now))}
        arms: list[int | None] = [None, *(p for p in parts if p in live)]
        self._turn += 1
        turn = self._turn % len(arms)
        claimed: list[Any] = []
        for p in arms[turn:] + arms[:turn]:
            left = n - len(claimed)
            if p is None:
                got = conn.execute(_CLAIM, (until, token, now, gid, now, left))
            else:
                got = conn.execute(_CLAIM_PART, (until, token, now, gid, p, now, left))
            claimed += got.fetchall()
            if len(claimed) >= n:
                break
        return claimed

    def next_due(self, gid: int, parts: Iterable[int] = ()) -> float:
        """When the next delivery of ``gid``'s shared queue or of ``parts``
        may be claimed (inf: none held). One index probe each (the
        partitions' only when the group holds keyed rows at all)."""
        conn = self._c
        row = conn.execute(
            "SELECT min(visible_at) FROM deliveries WHERE grp = ? AND part IS NULL", (gid,)
        ).fetchone()
        due = float("inf") if row[0] is None else float(row[0])
        keyed = "SELECT 1 FROM deliveries WHERE grp = ? AND part >= 0 LIMIT 1"
        if parts and conn.execute(keyed, (gid,)).fetchone() is None:
            return due
        for p in parts:
            row = conn.execute(
                "SELECT min(visible_at) FROM deliveries WHERE grp = ? AND part = ?", (gid, p)
            ).fetchone()
            if row[0] is not None and row[0] < due:
                due = float(row[0])
        return due

    def busy(self, gids: list[int]) -> tuple[bool, float]:
        """Whether any of ``gids`` holds a delivery, and when one is due."""
        every = range(self.partitions)
        due = min((self.next_due(g, every) for g in gids), default=float("inf"))
        return due != float("inf"), due

    # --- settling ------------------------------------------------------------
    def ack(self, held: list[tuple[int, int]], gid: int | None = None) -> int:
        """Delete settled deliveries (of group ``gid``, which counts them)."""
        cur = self._c.executemany("DELETE FROM deliveries WHERE id = ? AND token = ?", held)
        self.stale += len(held) - cur.rowcount
        if gid is not None:
            self._count_settled(gid, cur.rowcount)
        return cur.rowcount

    def release(self, held: list[tuple[int, int]], when: float, gid: int | None = None) -> int:
        """Make deliveries visible again at ``when``: a retry (counted as a
        settled attempt of ``gid``) or a hand-back (``gid`` None)."""
        cur = self._c.executemany(
            "UPDATE deliveries SET visible_at = ?, token = NULL WHERE id = ? AND token = ?",
            [(when, did, token) for did, token in held],
        )
        self.stale += len(held) - cur.rowcount
        if gid is not None:
            self._count_settled(gid, cur.rowcount)
        return cur.rowcount

    def _count_settled(self, gid: int, n: int) -> None:
        """Add ``n`` to the attempts every process finished for ``gid`` (a
        ``meta`` row; admission reads the group's rate from it)."""
        if n:
            self._c.execute(_COUNT_SETTLED, (f"settled:{gid}", n))

    def hand_back(self, held: list[tuple[int, int]], now: float) -> int:
        """Release deliveries never handed to a handler: visible at once, in
        their place, and the claim's attempt not counted."""
        cur = self._c.executemany(
            "UPDATE deliveries SET visible_at = ?, token = NULL, attempt = attempt - 1, "
            "first_time = CASE WHEN attempt > 1 THEN first_time END "
            "WHERE id = ? AND token = ?",
            [(now, did, token) for did, token in held],
        )
        self.stale += len(held) - cur.rowcount
        return cur.rowcount

    def extend(self, held: list[tuple[int, int]], until: float, now: float, me: str) -> int:
        """Extend leases; a partition's only while ``me`` holds the partition,
        so the next owner knows when what it inherits becomes its own."""
        cur = self._c.executemany(
            "UPDATE deliveries SET visible_at = ? WHERE id = ? AND token = ? AND "
            "(part IS NULL OR EXISTS (SELECT 1 FROM owners o WHERE o.grp = deliveries.grp "
            "AND o.part = deliveries.part AND o.owner = ? AND o.until > ?))",
            [(until, did, token, me, now) for did, token in held],
        )
        return cur.rowcount

    def dead_letter(self, did: int, token: int, gid: int, rec: DeadLetter) -> bool:
        conn = self._c
        cur = conn.execute("DELETE FROM deliveries WHERE id = ? AND token = ?", (did, token))
        if cur.rowcount != 1:
            self.stale += 1
            return False
        self._count_settled(gid, 1)
        conn.execute(
            "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                gid,
                rec.id,
                rec.topic,
                rec.key,
                _encode_headers(rec.headers) if rec.headers else None,
                rec.body,
                rec.error_type,
                rec.error,
                rec.traceback,
                rec.attempts,
                rec.first_attempt_at,
                rec.failed_at,
            ),
        )
        return True

    # --- dead letters, statistics, housekeeping -----------------------------
    def dead_letters(self, gid: int | None) -> list[DeadLetter]:
        sql = (
            "SELECT g.name, d.id, d.topic, d.key, d.headers, d.body, d.error_type, d.error, "
            "d.traceback, d.attempts, d.first_attempt_at, d.failed_at "
            "FROM dead_letters d JOIN groups g ON g.id = d.grp"
        )
        args: tuple[Any, ...] = ()
        if gid is not None:
            sql += " WHERE d.grp = ?"
            args = (gid,)
        rows = self._c.execute(sql + " ORDER BY d.failed_at, d.rowid", args).fetchall()
        return [
            DeadLetter(
                group=r[0],
                id=r[1],
                topic=r[2],
                key=r[3],
                headers=_decode_headers(r[4]) if r[4] is not None else None,
                body=r[5],
                error_type=r[6],
                error=r[7],
                traceback=r[8],
                attempts=r[9],
                first_attempt_at=r[10],
                failed_at=r[11],
            )
            for r in rows
        ]

    def _dead_ids(self, gid: int, ids: list[str] | None) -> list[str]:
        have = [r[0] for r in self._c.execute("SELECT id FROM dead_letters WHERE grp = ?", (gid,))]
        if ids is None:
            return have
        wanted = set(ids)
        return [i for i in have if i in wanted]

    def replay(self, gid: int, ids: list[str] | None, now: float) -> int:
        conn = self._c
        chosen = self._dead_ids(gid, ids)
        if not chosen:
            return 0
        self._sync_groups()
        flat = gid in self._flat
        seq = self._next_seqs(len(chosen))
        for dead_id in chosen:
            r = conn.execute(
                "SELECT topic, key, headers, body FROM dead_letters WHERE grp = ? AND id = ?",
                (gid, dead_id),
            ).fetchone()
            conn.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (seq, dead_id, r[0], r[1], now, r[2], r[3]),
            )
            part = None if r[1] is None or flat else partition_of(r[1], self.partitions)
            conn.execute(
                "INSERT INTO deliveries (grp, msg, visible_at, part) VALUES (?, ?, ?, ?)",
                (gid, seq, now, part),
            )
            conn.execute("DELETE FROM dead_letters WHERE grp = ? AND id = ?", (gid, dead_id))
            seq += 1
        return len(chosen)

    def purge(self, gid: int, ids: list[str] | None) -> int:
        chosen = self._dead_ids(gid, ids)
        self._c.executemany(
            "DELETE FROM dead_letters WHERE grp = ? AND id = ?", [(gid, i) for i in chosen]
        )
        return len(chosen)

    def load_state(self, key: str) -> bytes | None:
        row = self._c.execute("SELECT value FROM meta WHERE key = ?", ("state:" + key,)).fetchone()
        return None if row is None else bytes(row[0])

    def save_state(self, key: str, value: bytes) -> None:
        self._c.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            ("state:" + key, value),
        )

    def save_state_held(
        self, key: str, value: bytes, did: int, token: int, now: Callable[[], float]
    ) -> bool:
        """``save_state`` while the delivery row ``did`` still carries the
        claim ``token`` and its lease is not over; False, nothing written,
        when it is not. ``now`` is read here, under the write lock: the
        partition's next owner claims the row only after its lease ends."""
        cur = self._c.execute(
            "INSERT INTO meta (key, value) SELECT ?, ? WHERE EXISTS (SELECT 1 FROM "
            "deliveries WHERE id = ? AND token = ? AND visible_at > ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            ("state:" + key, value, did, token, now()),
        )
        return cur.rowcount == 1

    def stats(self, gid: int, now: float) -> tuple[int, int, int, int, int, int]:
        """(backlog, pending, scheduled, dead, settled, consumers) of ``gid``."""
        conn = self._c
        backlog, pending, scheduled = conn.execute(
            "SELECT coalesce(sum(visible_at <= :now), 0), "
            "coalesce(sum(visible_at > :now AND token IS NOT NULL), 0), "
            "coalesce(sum(visible_at > :now AND token IS NULL), 0) "
            "FROM deliveries WHERE grp = :gid",
            {"now": now, "gid": gid},
        ).fetchone()
        dead = conn.execute("SELECT count(*) FROM dead_letters WHERE grp = ?", (gid,)).fetchone()
        settled = conn.execute(
            "SELECT value FROM meta WHERE key = ?", (f"settled:{gid}",)
        ).fetchone()
        consumers = conn.execute(
            "SELECT count(*) FROM members WHERE grp = ? AND until > ?", (gid, now)
        ).fetchone()
        return (
            int(backlog),
            int(pending),
            int(scheduled),
            int(dead[0]),
            int(settled[0]) if settled else 0,
            int(consumers[0]),
        )

    def compact(self, upto: int, now: float, mine: list[int], lease: float) -> tuple[int, int]:
        """Delete settled events up to seq ``upto`` (-1: all), expired dedup
        entries and reply groups whose process is gone; (events, top seq)."""
        conn = self._c
        top: int = conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]
        self._upto = max(self._upto, top if upto < 0 else upto)
        self._rounds += 1
        if self._cursor >= self._upto and self._rounds >= 64:
            # A sweep has caught up: now and then start another from the
            # oldest event, for those still unsettled when the last passed.
            self._rounds = 0
            low = conn.execute("SELECT min(seq) FROM messages").fetchone()[0]
            self._cursor = 0 if low is None else low - 1
        deleted = 0
        if self._cursor < self._upto:
            last = conn.execute(
                "SELECT max(seq) FROM (SELECT seq FROM messages WHERE seq > ? AND seq <= ? "
                "ORDER BY seq LIMIT ?)",
                (self._cursor, self._upto, _COMPACT_CHUNK),
            ).fetchone()[0]
            if last is None:
                self._cursor = self._upto
            else:
                cur = conn.execute(
                    "DELETE FROM messages WHERE seq > ? AND seq <= ? AND NOT EXISTS "
                    "(SELECT 1 FROM deliveries WHERE msg = messages.seq)",
                    (self._cursor, last),
                )
                deleted = cur.rowcount
                self._cursor = last
        conn.execute("DELETE FROM seen WHERE time < ?", (now - self.dedup_window,))
        if mine:
            conn.execute(
                f"UPDATE groups SET alive_until = ? WHERE id IN ({','.join('?' * len(mine))})",
                (now + max(600.0, 10 * lease), *mine),
            )
        gone = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM groups WHERE ephemeral = 1 AND alive_until < ?", (now,)
            )
        ]
        if gone:
            self._drop(gone)
        free, pages = (
            conn.execute("PRAGMA freelist_count").fetchone()[0],
            conn.execute("PRAGMA page_count").fetchone()[0],
        )
        if free > 256 and free * 4 > pages:
            conn.execute(f"PRAGMA incremental_vacuum({free})").fetchall()
        return deleted, top

    def _drop(self, gids: list[int]) -> None:
        conn = self._c
        args = [(g,) for g in gids]
        conn.executemany("DELETE FROM deliveries WHERE grp = ?", args)
        conn.executemany("DELETE FROM members WHERE grp = ?", args)
        conn.executemany("DELETE FROM owners WHERE grp = ?", args)
        conn.executemany("DELETE FROM dead_letters WHERE grp = ?", args)
        conn.executemany("DELETE FROM groups WHERE id = ?", args)
        conn.executemany("DELETE FROM meta WHERE key = 'settled:' || ?", args)
        self._bump_groups()

    def shutdown(self, held: list[tuple[int, int]], ephemeral: list[int], now: float) -> None:
        """Hand back unsettled leases and drop this process's reply groups."""
        if held:
            self.release(held, now)
        if ephemeral:
            self._drop(ephemeral)

    # --- partition ownership -------------------------------------------------
    def keep_partitions(
        self,
        gid: int,
        me: str,
        now: float,
        lease: float,
        held: list[int],
        give_back: list[int],
        leaving: bool,
        busy: list[int],
    ) -> Step:
        """One round of ``me``'s ownership of group ``gid`` (see
        ``_ownership``): renew the membership (or end it when ``leaving``),
        release ``give_back``, renew the rest of ``held`` and take the free
        partitions that ``assignment`` gives ``me``, but not those in
        ``busy`` (read by a claim under way); (live members, partitions
        still held, (partition, readable from) taken)."""
        conn = self._c
        until = now + lease
        if leaving:
            conn.execute("DELETE FROM members WHERE grp = ? AND member = ?", (gid, me))
        else:
            conn.execute(
                "INSERT INTO members (grp, member, until) VALUES (?, ?, ?) "
                "ON CONFLICT (grp, member) DO UPDATE SET until = excluded.until",
                (gid, me, until),
            )
        conn.execute("DELETE FROM members WHERE grp = ? AND until <= ?", (gid, now))
        members = [r[0] for r in conn.execute("SELECT member FROM members WHERE grp = ?", (gid,))]
        if give_back:
            conn.executemany(
                "DELETE FROM owners WHERE grp = ? AND part = ? AND owner = ?",
                [(gid, p, me) for p in give_back],
            )
        keep = [p for p in held if p not in give_back]
        mine: list[int] = []
        if keep:
            mine = [
                r[0]
                for r in conn.execute(
                    "UPDATE owners SET until = ? WHERE grp = ? AND owner = ? "
                    f"AND part IN ({','.join('?' * len(keep))}) RETURNING part",
                    (until, gid, me, *keep),
                )
            ]
        taken: list[tuple[int, float]] = []
        if not leaving:
            for p in sorted(assignment(members, me, self.partitions) - {*mine, *busy}):
                cur = conn.execute(
                    "INSERT INTO owners (grp, part, owner, until) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (grp, part) DO UPDATE SET owner = excluded.owner, "
                    "until = excluded.until WHERE owners.until <= ? "
                    "OR owners.owner = excluded.owner",
                    (gid, p, me, until, now),
                )
                if cur.rowcount != 1:
                    continue
                # leases a predecessor left: no delivery of p is read before they end
                row = conn.execute(
                    "SELECT max(visible_at) FROM deliveries WHERE grp = ? AND part = ? "
                    "AND visible_at > ? AND token IS NOT NULL",
                    (gid, p, now),
                ).fetchone()
                taken.append((p, now if row[0] is None else float(row[0])))
        return members, mine, taken

    def leave(self, held: list[tuple[int, int]], now: float, me: str) -> None:
        """Hand back the last leases, then ``me``'s partitions and memberships
        (at close): the next owners need not wait for them to run out."""
        if held:
            self.release(held, now)
        conn = self._c
        conn.execute("DELETE FROM owners WHERE owner = ?", (me,))
        conn.execute("DELETE FROM members WHERE member = ?", (me,))
