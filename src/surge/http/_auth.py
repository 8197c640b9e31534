"""Who is calling: the ``auth=`` hooks of the ingress, and two ready ones.

An :data:`Auth` hook receives the request's headers (lower-case names) and
returns the caller's principal (a string: a user, a service, a key's
name), or raises :class:`~surge.Unauthorized` (401: no or bad credentials)
or :class:`~surge.Forbidden` (403: known, but not allowed here). It may be
a plain function or a coroutine function. The principal travels with the
published event as the ``surge-principal`` header (and on to the events
its handlers publish), so handlers and logs know who asked.

* :func:`api_keys`: keys (from a mapping or an environment variable)
  mapped to principals, sent as ``X-API-Key`` (or another header).
* :func:`jwt_bearer`: ``Authorization: Bearer <JWT>`` verified with PyJWT
  against a secret or public key (given, or from an environment variable)
  or a JWKS file; expiry is checked against the app's clock.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._clock import Clock, RealClock
from .._errors import ConfigurationError, Forbidden, Unauthorized

if TYPE_CHECKING:
    import jwt

__all__ = ("PRINCIPAL_HEADER", "Auth", "api_keys", "jwt_bearer")

PRINCIPAL_HEADER = "surge-principal"
"""The envelope header that carries the principal an ``auth=`` hook returned."""

Auth = Callable[[Mapping[str, str]], "str | Awaitable[str]"]
"""Headers (lower-case names) -> the principal, or raise Unauthorized / Forbidden."""


def api_keys(
    keys: Mapping[str, str] | None = None, *, env: str | None = None, header: str = "x-api-key"
) -> Auth:
    """An :data:`Auth` hook accepting the API keys of ``keys`` (key ->
    principal) and of the environment variable ``env`` (``name:key`` pairs
    separated by commas, read once, now), sent in ``header``.

    Keys are looked up by their SHA-256, so the lookup's timing says nothing
    about how much of a guessed key is right.
    """
    found: dict[str, str] = dict(keys or {})
    if env is not None:
        raw = os.environ.get(env)
        if not raw:
            raise ConfigurationError(f"api_keys(env={env!r}): the variable is not set")
        for pair in raw.split(","):
            name, sep, key = pair.strip().partition(":")
            if not sep or not name or not key:
                raise ConfigurationError(f"{env}: write it as name:key[,name:key...]")
            found[key] = name
    if not found:
        raise ConfigurationError("api_keys needs at least one key")
    for key in found:
        if len(key) < 16:
            raise ConfigurationError("an API key must be at least 16 characters")
    digests = {hashlib.sha256(key.encode()).digest(): who for key, who in found.items()}
    header = header.lower()

    def check(headers: Mapping[str, str]) -> str:
        given = headers.get(header)
        if not given:
            raise Unauthorized(f"send an API key in {header}")
        who = digests.get(hashlib.sha256(given.encode()).digest())
        if who is None:
            raise Unauthorized("unknown API key")
        return who

    return check


_SYMMETRIC = ("HS256", "HS384", "HS512")
_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")


def jwt_bearer(
    *,
    key: str | None = None,
    key_env: str | None = None,
    jwks_file: str | Path | None = None,
    algorithms: Sequence[str] | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    principal_claim: str = "sub",
    leeway: float = 0.0,
    clock: Clock | None = None,
) -> Auth:
    """An :data:`Auth` hook for ``Authorization: Bearer <JWT>``.

    The verification key is one of ``key`` (an HMAC secret, or a PEM public
    key), the environment variable ``key_env`` holding either (read once,
    now), or ``jwks_file`` (a JWKS document; the token's ``kid`` picks the
    key). ``algorithms`` defaults to HS256 for a secret and to the
    asymmetric ones for a public key or a JWKS, never both: a public key
    must not verify an HMAC made with it as the secret. The token must
    carry ``exp`` (checked against ``clock``, with ``leeway`` seconds),
    ``aud``/``iss`` when ``audience``/``issuer`` are given, and
    ``principal_claim``, which becomes the principal. Needs the ``jwt``
    extra: ``pip install 'surge[jwt]'``.
    """
    try:
        import jwt
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            f"jwt_bearer needs the jwt extra ({exc.name} is missing): pip install 'surge[jwt]'"
        ) from exc
    if sum(x is not None for x in (key, key_env, jwks_file)) != 1:
        raise ConfigurationError("jwt_bearer takes exactly one of key=, key_env=, jwks_file=")
    if key_env is not None:
        key = os.environ.get(key_env)
        if not key:
            raise ConfigurationError(f"jwt_bearer(key_env={key_env!r}): the variable is not set")
    keys: jwt.PyJWKSet | None = None
    if jwks_file is not None:
        try:
            keys = jwt.PyJWKSet.from_json(Path(jwks_file).read_text())
        except (OSError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
            raise ConfigurationError(f"jwks_file {jwks_file}: {exc}") from None
        asymmetric = True
    else:
        assert key is not None
        asymmetric = key.lstrip().startswith("-----BEGIN")
        if not asymmetric and len(key) < 32:
            raise ConfigurationError("an HMAC secret for JWTs must be at least 32 characters")
    allowed = tuple(algorithms or (_ASYMMETRIC if asymmetric else ("HS256",)))
    wrong = [a for a in allowed if (a in _SYMMETRIC) == asymmetric]
    if wrong:
        kind = "a public key or JWKS" if asymmetric else "an HMAC secret"
        raise ConfigurationError(f"algorithms {wrong} do not fit {kind}")
    now = (clock or RealClock()).time
    options: Any = {
        "require": ["exp"],
        # expiry is checked below, on the given clock
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "verify_aud": audience is not None,
        "verify_iss": issuer is not None,
    }

    def check(headers: Mapping[str, str]) -> str:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("send 'Authorization: Bearer <JWT>'")
        try:
            if keys is not None:
                kid = jwt.get_unverified_header(token).get("kid")
                if not isinstance(kid, str):
                    raise Unauthorized("the token names no key (kid)")
                try:
                    verify_with: Any = keys[kid]
                except KeyError:
                    raise Unauthorized(f"no key {kid!r} in the JWKS") from None
            else:
                verify_with = key
            claims = jwt.decode(
                token,
                verify_with,
                algorithms=list(allowed),
                audience=audience,
                issuer=issuer,
                options=options,
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        t = now()
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or exp + leeway <= t:
            raise Unauthorized("the token has expired")
        nbf = claims.get("nbf")
        if isinstance(nbf, (int, float)) and nbf - leeway > t:
            raise Unauthorized("the token is not valid yet")
        who = claims.get(principal_claim)
        if not isinstance(who, str) or not who:
            raise Forbidden(f"the token has no {principal_claim!r} claim")
        return who

    return check
