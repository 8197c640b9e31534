"""Authenticated ingress: auth= hooks per route and app-wide, API keys, JWT bearer tokens."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

import surge
from surge.http import PRINCIPAL_HEADER, Server, api_keys, jwt_bearer
from surge.tools import fetch

pytestmark = pytest.mark.realtime

SECRET = "a-32-byte-long-secret-for-hs256!"
NOW = 1_800_000_000.0


class Order(surge.Event):
    item: str


class Confirmed(surge.Event):
    item: str
    by: str


class FixedClock(surge.RealClock):
    """Wall time frozen at NOW, so token expiry is exact."""

    def time(self) -> float:
        return NOW


def make_app() -> tuple[surge.App, list[tuple[str, str | None]]]:
    app = surge.App("shop")
    seen: list[tuple[str, str | None]] = []

    @app.on(Order)
    async def take(event: Order, ctx: surge.Context) -> Confirmed:
        seen.append((event.item, ctx.headers.get(PRINCIPAL_HEADER)))
        return Confirmed(item=event.item, by=ctx.headers.get(PRINCIPAL_HEADER, ""))

    @app.on(Confirmed)
    async def confirmed(event: Confirmed, ctx: surge.Context) -> None:
        seen.append((f"confirmed {event.item}", ctx.headers.get(PRINCIPAL_HEADER)))

    return app, seen


@asynccontextmanager
async def serving(app: surge.App) -> AsyncIterator[str]:
    async with app, Server(app, port=0) as server:
        yield server.url


def hs256(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


async def post(url: str, **headers: str) -> int:
    r = await fetch(url, "POST", json={"item": "book"}, headers=headers)
    return r.status


async def test_jwt_route_refuses_missing_bad_and_expired_tokens_and_passes_the_principal() -> None:
    """A route with auth=jwt_bearer answers 401 to no token, a forged or expired one, an
    unsigned ('none') one; a good one publishes with the principal, which handlers and the
    events they publish carry."""
    app, seen = make_app()
    auth = jwt_bearer(key=SECRET, audience="shop", clock=FixedClock())
    app.http.post("/orders", publish=Order, auth=auth)
    good = {"sub": "alice", "aud": "shop", "exp": NOW + 60}
    async with serving(app) as url:
        url += "/orders"
        assert await post(url) == 401
        assert await post(url, authorization="Basic YWxpY2U6eA==") == 401
        forged = hs256(good, secret="another-32-byte-secret-of-mallory")
        assert await post(url, authorization=f"Bearer {forged}") == 401
        expired = hs256({**good, "exp": NOW})
        assert await post(url, authorization=f"Bearer {expired}") == 401
        no_exp = hs256({"sub": "alice", "aud": "shop"})
        assert await post(url, authorization=f"Bearer {no_exp}") == 401
        other_aud = hs256({**good, "aud": "bank"})
        assert await post(url, authorization=f"Bearer {other_aud}") == 401
        unsigned = jwt.encode(good, key="", algorithm="none")
        assert await post(url, authorization=f"Bearer {unsigned}") == 401
        await app.drain()
        assert seen == []
        assert await post(url, authorization=f"Bearer {hs256(good)}") == 202
        await app.drain()
    assert seen == [("book", "alice"), ("confirmed book", "alice")]


async def test_jwks_file_verifies_by_kid_and_refuses_hmac_made_with_the_public_key(
    tmp_path: Path,
) -> None:
    """jwt_bearer(jwks_file=) verifies RS256 tokens by kid, and refuses an HS256 token whose
    secret is the public key (algorithm confusion) and a token naming an unknown kid."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    app, seen = make_app()
    app.http.post("/orders", publish=Order, auth=jwt_bearer(jwks_file=jwks))
    claims = {"sub": "svc-billing", "exp": time.time() + 60}
    good = jwt.encode(claims, private, algorithm="RS256", headers={"kid": "k1"})
    unknown = jwt.encode(claims, private, algorithm="RS256", headers={"kid": "k9"})
    async with serving(app) as url:
        url += "/orders"
        assert await post(url, authorization=f"Bearer {unknown}") == 401
        # PyJWT itself refuses to HMAC with a PEM, so forge the token by hand
        header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT","kid":"k1"}')
        payload = jwt.utils.base64url_encode(json.dumps(claims).encode())
        mac = hmac.new(pem.encode(), header + b"." + payload, hashlib.sha256).digest()
        confused = b".".join((header, payload, jwt.utils.base64url_encode(mac))).decode()
        assert await post(url, authorization=f"Bearer {confused}") == 401
        assert await post(url, authorization=f"Bearer {good}") == 202
        await app.drain()
    assert seen[0] == ("book", "svc-billing")
    with pytest.raises(surge.ConfigurationError, match="do not fit"):
        jwt_bearer(jwks_file=jwks, algorithms=["HS256"])


async def test_app_wide_api_keys_from_env_and_a_route_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """set_auth(api_keys(env=)) guards every route without its own auth=; a route's own
    async hook answers 403 to a known principal it does not permit (bob) and 202 to one it
    does (alice); the refused requests publish nothing."""
    monkeypatch.setenv("SHOP_KEYS", "alice:alice-key-0123456789,bob:bob-key-0123456789ab")
    app, seen = make_app()
    app.http.set_auth(api_keys(env="SHOP_KEYS"))
    app.http.post("/orders", publish=Order)

    known = api_keys(env="SHOP_KEYS")

    async def admins_only(headers: Mapping[str, str]) -> str:
        who = known(headers)
        assert isinstance(who, str)
        if who != "alice":
            raise surge.Forbidden(f"{who} may not reserve")
        return who

    app.http.put("/reserve", publish=Order, auth=admins_only)
    async with serving(app) as url:
        assert await post(url + "/orders") == 401
        assert await post(url + "/orders", **{"x-api-key": "alice-key-01234567"}) == 401
        r = await fetch(
            url + "/reserve", "PUT", json={"item": "x"}, headers={"x-api-key": "nobody"}
        )
        assert r.status == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = await fetch(
            url + "/reserve",
            "PUT",
            json={"item": "x"},
            headers={"x-api-key": "bob-key-0123456789ab"},
        )
        assert (r.status, r.json()) == (403, {"error": "bob may not reserve"})
        await app.drain()
        assert seen == []
        assert await post(url + "/orders", **{"x-api-key": "bob-key-0123456789ab"}) == 202
        await app.drain()
        assert seen == [("book", "bob"), ("confirmed book", "bob")]
        r = await fetch(
            url + "/reserve",
            "PUT",
            json={"item": "seat"},
            headers={"x-api-key": "alice-key-0123456789"},
        )
        assert r.status == 202
        await app.drain()
        assert seen[2:] == [("seat", "alice"), ("confirmed seat", "alice")]
    with pytest.raises(surge.ConfigurationError):
        api_keys({"short": "x"})


async def test_reply_route_carries_the_principal() -> None:
    """A request/reply route's event carries the principal too."""
    app, _ = make_app()

    def fixed(headers: Mapping[str, str]) -> str:
        if headers.get("x-user") != "carol":
            raise surge.Unauthorized("who are you?")
        return "carol"

    app.http.post("/confirm", publish=Order, reply=Confirmed, auth=fixed)
    async with serving(app) as url:
        r = await fetch(url + "/confirm", "POST", json={"item": "pen"}, headers={"x-user": "eve"})
        assert (r.status, r.json()) == (401, {"error": "who are you?"})
        r = await fetch(url + "/confirm", "POST", json={"item": "pen"}, headers={"x-user": "carol"})
        assert (r.status, r.json()) == (200, {"item": "pen", "by": "carol"})


async def test_jwt_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """jwt_bearer(key_env=) reads the secret from the variable, once, at construction:
    tokens signed with it pass, others are refused; an unset variable is refused at once."""
    monkeypatch.setenv("SHOP_JWT_SECRET", SECRET)
    auth = jwt_bearer(key_env="SHOP_JWT_SECRET", clock=FixedClock())
    monkeypatch.setenv("SHOP_JWT_SECRET", "another-32-byte-secret-of-mallory")
    app, seen = make_app()
    app.http.post("/orders", publish=Order, auth=auth)
    claims = {"sub": "dave", "exp": NOW + 60}
    async with serving(app) as url:
        url += "/orders"
        mallory = hs256(claims, secret="another-32-byte-secret-of-mallory")
        assert await post(url, authorization=f"Bearer {mallory}") == 401
        assert await post(url, authorization=f"Bearer {hs256(claims)}") == 202
        await app.drain()
    assert seen == [("book", "dave"), ("confirmed book", "dave")]
    monkeypatch.delenv("SHOP_JWT_SECRET")
    with pytest.raises(surge.ConfigurationError, match="SHOP_JWT_SECRET"):
        jwt_bearer(key_env="SHOP_JWT_SECRET")
