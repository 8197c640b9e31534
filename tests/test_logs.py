"""Structured logs: every line about an event names it, rendered as JSON."""

from __future__ import annotations

import io
import logging

import msgspec
import pytest

import surge
from surge.observe import EVENT_FIELDS, JsonFormatter, log_json


class Job(surge.Event):
    n: int


async def test_event_lines_carry_event_fields_as_json(clock: surge.VirtualClock) -> None:
    """Retry, dead-letter and ctx.log lines are JSON with id, topic, subscription, attempt."""
    stream = io.StringIO()
    handler = log_json(logging.INFO, stream)
    app = surge.App("logs", clock=clock)

    @app.on(Job, retry=surge.Retry(attempts=2, backoff=0.1, jitter=0.0))
    async def work(event: Job, ctx: surge.Context) -> None:
        ctx.log.info("working on %d", event.n)
        raise ValueError(f"bad job {event.n}")

    try:
        async with app:
            event_id = await app.publish(Job(n=7))
            await app.drain()
    finally:
        logging.getLogger("surge").removeHandler(handler)
        logging.getLogger("surge").setLevel(logging.NOTSET)
    lines = [msgspec.json.decode(line) for line in stream.getvalue().splitlines()]
    about = [line for line in lines if "event_id" in line]
    # two attempts each log "working", then one retry line and one dead-letter line
    assert [(line["level"], line["attempt"]) for line in about] == [
        ("INFO", 1),
        ("WARNING", 1),
        ("INFO", 2),
        ("ERROR", 2),
    ]
    for line in about:
        assert {k: line[k] for k in EVENT_FIELDS[:3]} == {
            "event_id": event_id,
            "topic": "Job",
            "subscription": "logs.work",
        }
    assert about[0]["message"] == "working on 7"
    assert "dead-lettered" in about[3]["message"]
    assert "ValueError: bad job 7" in about[3]["exception"]
    assert {line["logger"] for line in about} == {"surge", "surge.handler"}


def test_json_formatter_keeps_other_extras_and_unencodable_values() -> None:
    """Extra fields other than the event's become keys too; odd values are repr'd."""
    record = logging.LogRecord("surge", logging.WARNING, __file__, 1, "hi %s", ("there",), None)
    record.__dict__.update(topic="T", custom=object())
    out = msgspec.json.decode(JsonFormatter().format(record))
    assert out["message"] == "hi there"
    assert out["topic"] == "T"
    assert out["custom"].startswith("<object object")
    assert "event_id" not in out
    with pytest.raises(KeyError):
        out["exception"]
