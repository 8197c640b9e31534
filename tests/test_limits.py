"""Envelope size limits at consume on every transport that carries bytes, and at the ingress.

At publish, on every transport: tests/conformance (test_oversized_envelope_is_refused_at_publish,
test_oversized_event_is_refused_at_publish)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import surge
from surge.http import Server
from surge.tools import fetch
from surge.transports import open_transport

from ._servers import (
    drop_postgres_schema,
    shared_amqp_url,
    shared_nats_url,
    shared_postgres_url,
    shared_redis_url,
)

pytestmark = pytest.mark.realtime

LIMIT = 4096

URLS: dict[str, Callable[[Path], str]] = {
    "sqlite": lambda tmp: f"sqlite:///{tmp / 'limits.db'}",
    "redis": shared_redis_url,
    "nats": shared_nats_url,
    "postgres": shared_postgres_url,
    "amqp": shared_amqp_url,
}


class Note(surge.Event):
    __topic__ = "limits.note"
    text: str


@pytest.fixture(params=list(URLS))
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    made = URLS[request.param](tmp_path)
    yield made
    if request.param == "postgres":
        drop_postgres_schema(made)


def make_app(url: str, limit: int) -> tuple[surge.App, list[int]]:
    codec = surge.MsgpackCodec(max_message_size=limit)
    app = surge.App("limits", transport=open_transport(url, codec=codec), codec=codec)
    seen: list[int] = []

    @app.on(Note, retry=surge.Retry(attempts=3, backoff=0.001, jitter=0.0))
    async def read(event: Note) -> None:
        seen.append(len(event.text))

    return app, seen


async def test_oversized_envelope_is_dead_lettered_at_consume(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An envelope over the consumer's limit (published by an app with a larger one) is
    dead-lettered after one attempt with the reason, never handled."""
    caplog.set_level(logging.CRITICAL, "surge")
    consumer, seen = make_app(url, LIMIT)
    big_codec = surge.MsgpackCodec(max_message_size=1 << 20)
    publisher = surge.App(
        "limits-producer", transport=open_transport(url, codec=big_codec), codec=big_codec
    )
    async with consumer, publisher:
        await publisher.publish(Note(text="y" * (2 * LIMIT)))
        await publisher.publish(Note(text="small"))
        await consumer.drain()
        letters = await consumer.dead_letters()
    assert seen == [5]
    [letter] = letters
    assert letter.attempts == 1
    assert letter.error_type == "DecodeError"
    assert "the limit is 4096" in letter.error


class Ask(surge.Event):
    __topic__ = "limits.ask"
    n: int


async def test_oversized_reply_fails_its_request(tmp_path: Path) -> None:
    """A reply over the requester's limit (from a responder with a larger one) fails the
    request with DecodeError and the reason, before it is decoded."""
    url = f"sqlite:///{tmp_path / 'reply.db'}"
    small = surge.MsgpackCodec(max_message_size=LIMIT)
    requester = surge.App("front", transport=open_transport(url, codec=small), codec=small)
    responder = surge.App("back", transport=url)

    @responder.on(Ask)
    async def answer(event: Ask) -> Note:
        return Note(text="z" * (2 * LIMIT))

    async with requester, responder:
        with pytest.raises(surge.DecodeError, match="the limit is 4096"):
            await requester.request(Ask(n=1), expect=Note, timeout=30)


class Blob(surge.Event):
    __topic__ = "limits.blob"
    data: Any = None
    n: int = 0


async def test_ingress_refuses_json_bombs_cheaply() -> None:
    """Deeply nested JSON answers 400 and numbers out of range 422 (well within the body
    limit, without decoding them into objects); the ingress keeps serving."""
    app = surge.App("bombs")
    handled: list[Blob] = []

    @app.on(Blob)
    async def take(event: Blob) -> None:
        handled.append(event)

    app.http.post("/blob", publish=Blob)
    depth = 200_000
    bombs = {
        b'{"data":' + b"[" * depth + b"]" * depth + b"}": (400, "the body is nested too deeply"),
        b'{"data":' + b"9" * 500_000 + b"}": (422, "Integer value out of range - at `$.data`"),
        b'{"n":' + b"9" * 500_000 + b"}": (422, "Integer value out of range - at `$.n`"),
        b'{"data":1e99999999}': (422, "Number out of range - at `$.data`"),
    }
    async with app, Server(app, port=0) as server:
        for body, (status, error) in bombs.items():
            r = await fetch(server.url + "/blob", "POST", body=body)
            assert (r.status, r.json()["error"]) == (status, error)
        r = await fetch(server.url + "/blob", "POST", json={"data": [[1]], "n": 2})
        assert r.status == 202
        await app.drain()
    assert handled == [Blob(data=[[1]], n=2)]
