"""The app the cross-process condition test (tests/test_conditions_workers.py)
runs in worker processes: four conditions, each firing appended as one line
to ``$SURGE_CONDITION_RECORDS``. Kept light (no pytest, no hypothesis) so
that four workers start quickly."""

from __future__ import annotations

import os

import surge

WITHIN = 5.0
AT_LEAST = 3
ALL_AT_LEAST = 4


class Opened(surge.Event):
    user: int


class Settled(surge.Event):
    user: int


class Pinged(surge.Event):
    user: int


_RECORDS = os.environ.get("SURGE_CONDITION_RECORDS")


def _record(m: surge.ConditionMet, ctx: surge.Context) -> None:
    if _RECORDS is None:
        return
    line = f"{ctx.envelope.id}|{m.condition}|{m.key}|{','.join(m.ids)}|{m.time!r}\n"
    fd = os.open(_RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def build(app: surge.App) -> surge.App:
    """The conditions under test, on ``app`` (workers and publisher alike:
    a publisher routes by the keys of the conditions it declares)."""
    app.when(surge.count(Opened, by="user", at_least=AT_LEAST, within=WITHIN), name="count")(
        _record
    )
    app.when(surge.sequence(Opened, Settled, by="user", within=WITHIN), name="seq")(_record)
    app.when(surge.absence(Opened, Settled, by="user", within=WITHIN), name="absent")(_record)
    # No by=: every Pinged event in one partition. (Over Settled it would
    # conflict: an event is routed by one key, and Settled's is the user.)
    app.when(surge.count(Pinged, at_least=ALL_AT_LEAST, within=WITHIN), name="all")(_record)
    return app


worker_app = build(surge.App("cw"))
"""Started by a Supervisor in worker processes."""
