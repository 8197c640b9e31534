"""The SQLite side of ``sqlite://``: schema, checks and the statements
(those of partitions and their owners are in :mod:`._sqlite_partitions`).

Everything here runs on the transport's own thread, which owns the one
connection; the transport batches queued calls into one transaction
(:meth:`Database.run`). Tables:

``meta``          magic, schema version, the next event seq, groups version,
                  the partition count
``groups``        one row per consumer group: its topic patterns
``messages``      the events: seq, id, topic, key, time, headers, body
``deliveries``    one row per (group, event) until settled; ``visible_at`` is
                  when it may be claimed (publish time, ``not_before``, a
                  nack's delay, or a lease's end while ``token`` is set);
                  ``part`` is the partition of a keyed event (NULL: the
                  group's shared queue)
``dead_letters``  what groups gave up on
``seen``          derived ids published within the dedup window
``members``       the live consumers of each group (see _sqlite_partitions)
``owners``        who holds each partition of each group, until when

Schema version 2 added ``part``, ``members`` and ``owners``; a version 1
file is upgraded in place when it is opened (its deliveries stay in the
shared queues, where they were).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec

from .._errors import ConfigurationError, SurgeError, TransportError
from .._event import Envelope
from .._transport import DeadLetter, Delivery, topic_matches
from ._partitions import partition_of
from ._sqlite_partitions import CLAIM, SCHEMA, UPGRADE_1, claim_rows, keep_count

__all__ = ("Database", "Row", "translate")

MAGIC = "surge-sqlite"
VERSION = 2
_CHUNK = 500  # SQL variables per IN (...) list
_COMPACT_CHUNK = 50_000

Row = tuple[str, str, str | None, float, bytes | None, bytes, float | None]

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE groups (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    patterns TEXT NOT NULL,
    ephemeral INTEGER NOT NULL DEFAULT 0,
    alive_until REAL
);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    topic TEXT NOT NULL,
    key TEXT,
    time REAL NOT NULL,
    headers BLOB,
    body BLOB NOT NULL,
    not_before REAL
);
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY,
    grp INTEGER NOT NULL,
    msg INTEGER NOT NULL,
    visible_at REAL NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    token INTEGER,
    first_time REAL,
    part INTEGER
);
CREATE INDEX deliveries_msg ON deliveries (msg);
CREATE TABLE dead_letters (
    grp INTEGER NOT NULL,
    id TEXT NOT NULL,
    topic TEXT NOT NULL,
    key TEXT,
    headers BLOB,
    body BLOB NOT NULL,
    error_type TEXT NOT NULL,
    error TEXT NOT NULL,
    traceback TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    first_attempt_at REAL NOT NULL,
    failed_at REAL NOT NULL,
    PRIMARY KEY (grp, id)
);
CREATE TABLE seen (id TEXT PRIMARY KEY, time REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX seen_time ON seen (time);
"""


def _script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``script``'s statements inside the caller's transaction
    (``executescript`` would commit it)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


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


STOP: Any = object()  # the job that closes the connection and ends the thread


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
        self.conn: sqlite3.Connection | None = None
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

    # --- transactions --------------------------------------------------------
    def serve(
        self,
        jobs_q: queue.SimpleQueue[Job],
        loop: asyncio.AbstractEventLoop,
        done: Callable[[list[Job]], None],
    ) -> None:
        """The connection's thread: run what is queued, batch by batch, and
        hand each batch back to ``loop`` (``done``) until :data:`STOP`."""
        while True:
            jobs = [jobs_q.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    jobs.append(jobs_q.get_nowait())
            stop = any(j.fn is STOP for j in jobs)
            work = [j for j in jobs if j.fn is not STOP]
            try:
                if work:
                    self.run(work)
                if stop:
                    self.close()
            except BaseException as exc:  # a bug here must not strand the waiters
                for job in work:
                    if job.error is None:
                        job.error = exc
            try:
                loop.call_soon_threadsafe(done, jobs)
            except RuntimeError:  # the loop is gone: nobody waits any more
                return
            if stop:
                return

    def run(self, jobs: list[Job]) -> None:
        """Run ``jobs`` (fn, args, write; result, error) in one transaction.

        When one fails for a reason of its own, the others are run again,
        each in a transaction of its own, so one bad call fails alone.
        """
        raw = (self.open, self.checkpoint)
        if any(j.fn in raw for j in jobs):
            # these run outside a transaction, each alone, in queue order
            batch: list[Job] = []
            for job in [*jobs, None]:
                if job is None or job.fn in raw:
                    if batch:
                        self.run(batch)
                        batch = []
                    if job is not None:
                        try:
                            job.result = job.fn()
                        except BaseException as exc:
                            job.error = exc
                else:
                    batch.append(job)
            return
        try:
            self._transaction(jobs)
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

    def _transaction(self, jobs: list[Job]) -> None:
        conn = self.conn
        if conn is None:
            raise TransportError(f"{self.path}: the connection is closed")
        write = any(j.write for j in jobs)
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
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
        try:
            conn = sqlite3.connect(
                path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=True
            )
        except sqlite3.Error as exc:
            raise TransportError(f"cannot open {path}: {exc}") from None
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        self.conn = conn

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
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.execute("PRAGMA temp_store = MEMORY")
            if self.max_size is not None:
                page = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {max(16, self.max_size // page)}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._schema(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise translate(path, exc) from None

    def _schema(self, conn: sqlite3.Connection) -> None:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            _script(conn, _SCHEMA + SCHEMA)
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("magic", MAGIC),
                    ("version", VERSION),
                    ("seq", 0),
                    ("groups", "0"),
                    ("partitions", self.partitions),
                ],
            )
            return
        magic = None
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'magic'").fetchone()
            magic = row and row[0]
        if magic != MAGIC:
            raise ConfigurationError(
                f"{self.path} is not a surge database (an SQLite file with tables "
                f"{sorted(tables)[:5]})"
            )
        version = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0]
        if version == 1:
            _script(conn, UPGRADE_1 + SCHEMA)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'version'", (VERSION,))
        elif version != VERSION:
            raise ConfigurationError(
                f"{self.path} has surge schema version {version}; this surge reads {VERSION}"
            )
        keep_count(conn, self.path, self.partitions)

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the file, so the log is reused
        from its start instead of growing (never waits for readers)."""
        self._c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # --- groups --------------------------------------------------------------
    @property
    def _c(self) -> sqlite3.Connection:
        assert self.conn is not None
        return self.conn

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
            claimed = conn.execute(CLAIM, (until, token, now, gid, now, n)).fetchall()
        else:
            self._turn += 1
            claimed = claim_rows(conn, gid, n, now, until, token, parts, me, self._turn)
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
            headers = _decode_headers(m[5]) if m[5] is not None else None
            env = Envelope(m[1], m[2], m[3], m[4], headers, None, m[6], m[7])
            out.append(Delivery(env, group, attempt, did, first))
            if p is not None:
                where[did] = p
        return out, 0.0, where

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
    def ack(self, held: list[tuple[int, int]]) -> int:
        cur = self._c.executemany("DELETE FROM deliveries WHERE id = ? AND token = ?", held)
        self.stale += len(held) - cur.rowcount
        return cur.rowcount

    def release(self, held: list[tuple[int, int]], when: float) -> int:
        cur = self._c.executemany(
            "UPDATE deliveries SET visible_at = ?, token = NULL WHERE id = ? AND token = ?",
            [(when, did, token) for did, token in held],
        )
        self.stale += len(held) - cur.rowcount
        return cur.rowcount

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

    def dead_letter(self, did: int, token: int, gid: int, rec: DeadLetter) -> bool:
        conn = self._c
        cur = conn.execute("DELETE FROM deliveries WHERE id = ? AND token = ?", (did, token))
        if cur.rowcount != 1:
            self.stale += 1
            return False
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

    def stats(self, gid: int, now: float) -> tuple[int, int, int, int]:
        conn = self._c
        backlog, pending, scheduled = conn.execute(
            "SELECT coalesce(sum(visible_at <= :now), 0), "
            "coalesce(sum(visible_at > :now AND token IS NOT NULL), 0), "
            "coalesce(sum(visible_at > :now AND token IS NULL), 0) "
            "FROM deliveries WHERE grp = :gid",
            {"now": now, "gid": gid},
        ).fetchone()
        dead = conn.execute("SELECT count(*) FROM dead_letters WHERE grp = ?", (gid,)).fetchone()
        return int(backlog), int(pending), int(scheduled), int(dead[0])

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
        self._bump_groups()

    def shutdown(self, held: list[tuple[int, int]], ephemeral: list[int], now: float) -> None:
        """Hand back unsettled leases and drop this process's reply groups."""
        if held:
            self.release(held, now)
        if ephemeral:
            self._drop(ephemeral)
