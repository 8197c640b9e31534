"""Signed envelopes: forged, unsigned and altered envelopes are dead-lettered, never handled."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import pytest
from redis.asyncio import Redis

import surge
from surge import SIGNATURE_HEADER, Envelope, Signer, new_id
from surge.observe import mount, snapshot
from surge.transports import open_transport

from ._servers import shared_redis_url
from .test_metrics import asgi_get, metric

pytestmark = pytest.mark.realtime

OLD = "old-key-0123456789abcdef0123456789"
NEW = "new-key-0123456789abcdef0123456789"
MALLORY = "mallory-0123456789abcdef0123456789"


class Transfer(surge.Event):
    __topic__ = "bank.transfer"
    to: str
    amount: int


def make_app(
    url: str, keys: dict[str, str | bytes] | None, sign_with: str | None = None
) -> tuple[surge.App, list[Transfer]]:
    app = surge.App("bank", transport=url, signing_keys=keys, sign_with=sign_with)
    seen: list[Transfer] = []

    @app.on(Transfer, retry=surge.Retry(attempts=3, backoff=0.001, jitter=0.0))
    async def pay(event: Transfer) -> None:
        seen.append(event)

    return app, seen


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, "surge")


async def test_forged_envelopes_written_into_redis_are_dead_lettered_not_handled() -> None:
    """Envelopes XADDed straight into the group's stream (unsigned, signed with a key the
    app does not hold, or a validly signed one with its body, topic, key or a header
    (surge-principal) altered, a header added or dropped) are dead-lettered at once with
    the reason; the genuine signed one, written the same way, is handled."""
    url = shared_redis_url()
    prefix = url.rpartition("prefix=")[2]
    app, seen = make_app(url, {"k1": OLD})
    async with app:
        await app.publish(Transfer(to="alice", amount=10))
        await app.drain()
        assert [t.to for t in seen] == ["alice"]

        codec = app.codec

        def wire(
            headers: dict[str, str] | None,
            body: bytes,
            *,
            topic: str = "bank.transfer",
            key: str | None = None,
        ) -> bytes:
            env = Envelope(new_id(), topic, key, 0.0, headers, None, body)
            return codec.encode_envelope(env)

        evil = codec.encode_event(Transfer(to="mallory", amount=10**6))
        signed = Envelope(new_id(), "bank.transfer", None, 0.0, None, Transfer(to="bob", amount=1))
        Signer({"k1": MALLORY}, "k1", codec).sign([signed])
        assert signed.headers is not None
        mallory_signed = signed.headers
        good = Envelope(
            new_id(),
            "bank.transfer",
            "acct-1",
            0.0,
            {"surge-principal": "alice"},
            Transfer(to="bob", amount=1),
        )
        Signer({"k1": OLD}, "k1", codec).sign([good])
        assert good.headers is not None
        body = codec.encode_event(Transfer(to="bob", amount=1))
        # the genuine envelope, as its publisher wrote it, is accepted
        genuine = wire(good.headers, body, key="acct-1")
        entries = {
            "unsigned": wire(None, evil),
            "unknown key": wire({SIGNATURE_HEADER: "k9:AAAA"}, evil),
            "wrong secret": wire(mallory_signed, evil),
            "altered body": wire(good.headers, evil, key="acct-1"),
            "altered topic": wire(good.headers, body, topic="bank.refund", key="acct-1"),
            "altered key": wire(good.headers, body, key="acct-2"),
            "no key": wire(good.headers, body),
            "altered header": wire({**good.headers, "surge-principal": "root"}, body, key="acct-1"),
            "added header": wire({**good.headers, "x-approved": "yes"}, body, key="acct-1"),
            "dropped header": wire(
                {SIGNATURE_HEADER: good.headers[SIGNATURE_HEADER]}, body, key="acct-1"
            ),
        }
        client = Redis.from_url(url.partition("?")[0])
        try:
            for payload in (*entries.values(), genuine):
                await client.xadd(f"{prefix}:s:bank.pay", {"e": payload})
        finally:
            await client.aclose()
        await app.drain()
        letters = await app.dead_letters("bank.pay")
    assert [t.to for t in seen] == ["alice", "bob"]
    assert len(letters) == len(entries)
    assert {d.error_type for d in letters} == {"InvalidSignature"}
    assert all(d.attempts == 1 for d in letters)
    reasons = sorted(d.error for d in letters)
    assert sum("unsigned envelope" in r for r in reasons) == 1
    assert sum("unknown key 'k9'" in r for r in reasons) == 1
    assert sum("does not match" in r for r in reasons) == len(entries) - 2


async def test_keys_rotate_without_downtime(tmp_path: Path) -> None:
    """A consumer holding old and new keys handles envelopes signed with either; one that
    dropped the old key dead-letters what is still signed with it; an app without keys
    publishes unsigned envelopes that are dead-lettered."""
    url = f"sqlite:///{tmp_path / 'bank.db'}"
    consumer, seen = make_app(url, {"k1": OLD, "k2": NEW}, sign_with="k2")
    old_publisher = surge.App("bank", transport=url, signing_keys={"k1": OLD})
    plain = surge.App("bank", transport=url)
    async with consumer, old_publisher, plain:
        await old_publisher.publish(Transfer(to="old", amount=1))
        await consumer.publish(Transfer(to="new", amount=2))
        await consumer.drain()
        assert sorted(t.to for t in seen) == ["new", "old"]
        await plain.publish(Transfer(to="plain", amount=3))
        await consumer.drain()
        assert sorted(t.to for t in seen) == ["new", "old"]
        [letter] = await consumer.dead_letters()
        assert "unsigned envelope" in letter.error
    rotated, seen_after = make_app(url, {"k2": NEW})
    old_publisher = surge.App("bank", transport=url, signing_keys={"k1": OLD})
    async with rotated, old_publisher:
        await old_publisher.publish(Transfer(to="stale", amount=4))
        await rotated.publish(Transfer(to="fresh", amount=5))
        await rotated.drain()
        letters = await rotated.dead_letters()
    assert [t.to for t in seen_after] == ["fresh"]
    assert sorted(msgspec.msgpack.decode(d.body)["to"] for d in letters) == ["plain", "stale"]
    assert any("unknown key 'k1'" in d.error for d in letters)


async def test_signed_in_process_and_through_request_reply() -> None:
    """On memory:// signed apps publish and handle as before; children and replies too."""

    class Asked(surge.Event):
        n: int

    class Answered(surge.Event):
        n: int

    app = surge.App("signed", signing_keys={"k": NEW})
    headers: list[str] = []

    @app.on(Asked)
    async def answer(event: Asked) -> Answered:
        return Answered(n=event.n + 1)

    @app.on(Answered)
    async def record(event: Answered, ctx: surge.Context) -> None:
        headers.append(ctx.headers[SIGNATURE_HEADER])

    async with app:
        reply = await app.request(Asked(n=1), expect=Answered)
        await app.drain()
    assert reply == Answered(n=2)
    assert headers[0].startswith("k:")


class Asked(surge.Event):
    __topic__ = "signing.asked"
    n: int


class Answered(surge.Event):
    __topic__ = "signing.answered"
    n: int


async def test_forged_reply_is_counted_and_logged_and_the_request_waits_for_the_genuine_one(
    tmp_path: Path,
) -> None:
    """A reply written into the broker that fails verification (unsigned, with the
    request's correlation id read off the broker) neither resolves nor fails the request:
    it is counted in statistics() and /metrics and logged with the reason, and the genuine
    reply still resolves the request."""
    url = f"sqlite:///{tmp_path / 'reply.db'}"
    requester = surge.App("front", transport=url, signing_keys={"k1": OLD})
    mount(requester.http)
    responder = surge.App("back", transport=url, signing_keys={"k1": OLD})
    mallory = open_transport(url, codec=requester.codec)
    rejected = asyncio.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("reply rejected"):
                rejected.set()

    @responder.on(Asked)
    async def answer(event: Asked, ctx: surge.Context) -> Answered:
        forged = Envelope(
            new_id(),
            ctx.headers["surge-reply-to"],
            None,
            0.0,
            {k: v for k, v in ctx.headers.items() if k != SIGNATURE_HEADER},
            None,
            requester.codec.encode_event(Answered(n=-1)),
        )
        await mallory.publish([forged])
        await rejected.wait()  # the forged reply reached the requester first
        return Answered(n=event.n + 1)

    seen = Seen()
    logger = logging.getLogger("surge")
    logger.addHandler(seen)
    logger.setLevel(logging.WARNING)
    await mallory.start()
    try:
        async with requester, responder:
            reply = await requester.request(Asked(n=1), expect=Answered, timeout=30)
            stats = requester.statistics()
            _, body = await asgi_get(requester, "/metrics")
    finally:
        logger.removeHandler(seen)
        await mallory.close()
    assert reply == Answered(n=2)
    assert stats.rejected_replies == 1
    assert metric(body.decode(), "surge_rejected_replies_total", app="front") == 1
    assert snapshot(requester).rejected_replies == 1


def test_signing_configuration_errors() -> None:
    """Short secrets, an unknown sign_with, several keys without sign_with are refused."""
    with pytest.raises(surge.ConfigurationError, match="at least 32"):
        surge.App("a", signing_keys={"k": "short"})
    with pytest.raises(surge.ConfigurationError, match="not among"):
        surge.App("a", signing_keys={"k": NEW}, sign_with="x")
    with pytest.raises(surge.ConfigurationError, match="sign_with"):
        surge.App("a", signing_keys={"a": NEW, "b": OLD})
    with pytest.raises(surge.ConfigurationError, match="needs signing_keys"):
        surge.App("a", sign_with="a")
