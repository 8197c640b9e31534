"""The tables of a ``sqlite://`` file, and how an older file is brought up to date.

``meta``          magic, schema version, the next event seq, groups version,
                  the partition count, trigger state (``state:<key>``)
``groups``        one row per consumer group: its topic patterns
``messages``      the events: seq, id, topic, key, time, headers, body
``deliveries``    one row per (group, event) until settled; ``visible_at`` is
                  when it may be claimed (publish time, ``not_before``, a
                  nack's delay, or a lease's end while ``token`` is set);
                  ``part`` is the partition of a keyed event (NULL: the
                  group's shared queue)
``dead_letters``  what groups gave up on
``seen``          derived ids published within the dedup window
``members``       the live consumers of each group (see ``_ownership``)
``owners``        who holds each partition of each group, until when

Version 2 added ``part``, ``members`` and ``owners``; a version 1 file is
upgraded in place when it is opened (its deliveries stay in the shared
queues, where they were). A file keeps the partition count it was first
opened with: read under another count, a key's events would be split
between partitions.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..._errors import ConfigurationError

__all__ = ("MAGIC", "VERSION", "prepare")

MAGIC = "surge-sqlite"
VERSION = 2

_TABLES = """
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

# Version 2: partitions. The shared queue is read by (grp, part IS NULL,
# visible_at), a partition in publish order by (grp, part, id); unkeyed
# rows stay out of the second index, so they cost what they did.
_PARTITIONS = """
CREATE INDEX deliveries_due ON deliveries (grp, part, visible_at);
CREATE INDEX deliveries_part ON deliveries (grp, part) WHERE part IS NOT NULL;
CREATE TABLE members (
    grp INTEGER NOT NULL,
    member TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (grp, member)
) WITHOUT ROWID;
CREATE TABLE owners (
    grp INTEGER NOT NULL,
    part INTEGER NOT NULL,
    owner TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (grp, part)
) WITHOUT ROWID;
"""

# version -> the script that takes a file of that version to the next
_MIGRATIONS = {
    1: """
ALTER TABLE deliveries ADD COLUMN part INTEGER;
DROP INDEX deliveries_due;
"""
    + _PARTITIONS,
}


def prepare(conn: sqlite3.Connection, path: Path, partitions: int) -> None:
    """Create the tables in an empty file, or check that the file is a surge
    database of this version (upgrading an older one) kept in ``partitions``
    partitions. Runs inside the caller's transaction."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        _script(conn, _TABLES + _PARTITIONS)
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [
                ("magic", MAGIC),
                ("version", VERSION),
                ("seq", 0),
                ("groups", "0"),
                ("partitions", partitions),
            ],
        )
        return
    magic = None
    if "meta" in tables:
        row = conn.execute("SELECT value FROM meta WHERE key = 'magic'").fetchone()
        magic = row and row[0]
    if magic != MAGIC:
        raise ConfigurationError(
            f"{path} is not a surge database (an SQLite file with tables {sorted(tables)[:5]})"
        )
    version = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0]
    if version not in _MIGRATIONS and version != VERSION:
        raise ConfigurationError(
            f"{path} has surge schema version {version}; this surge reads {VERSION}"
        )
    if version != VERSION:
        while version != VERSION:
            _script(conn, _MIGRATIONS[version])
            version += 1
        conn.execute("UPDATE meta SET value = ? WHERE key = 'version'", (VERSION,))
    _keep_count(conn, path, partitions)


def _keep_count(conn: sqlite3.Connection, path: Path, partitions: int) -> None:
    """Write the partition count into a file that has none; refuse another."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'partitions'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('partitions', ?)", (partitions,))
    elif row[0] != partitions:
        raise ConfigurationError(
            f"{path} keeps keyed events in {row[0]} partitions per group; this "
            f"transport was opened with partitions={partitions} (use {row[0]})"
        )


def _script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``script``'s statements inside the caller's transaction
    (``executescript`` would commit it)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)
