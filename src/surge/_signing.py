"""Signed envelopes: an HMAC-SHA256 per envelope, checked before decoding.

``App(signing_keys={"k1": secret, "k2": newer}, sign_with="k2")`` signs
every envelope it publishes with ``sign_with`` and accepts envelopes signed
with any key it holds, so keys rotate without downtime: deploy the new key
everywhere, then switch ``sign_with``, then drop the old key.

The MAC covers the topic, the key, the headers (all but the signature's
own) and the encoded event (the body as the transport carries it), in one
unambiguous msgpack array, and travels as the header ``surge-signature:
<key id>:<base64url MAC>``. The envelope id, time and ``not_before`` are
not covered: transports rewrite ``not_before`` on a delayed retry, and a
copy of a signed envelope is still an event its publisher signed.

An envelope that is unsigned, names a key this app does not hold, or does
not match raises :class:`InvalidSignature` at the consuming edge, which the
runner dead-letters at once with the reason (a :class:`DecodeError` is never
retried). In-process deliveries (``memory://``) carry the event object,
never bytes anyone else could write, and are not checked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping

import msgspec

from ._codec import Codec
from ._errors import ConfigurationError, InvalidSignature
from ._event import Envelope

__all__ = ("SIGNATURE_HEADER", "Signer")

SIGNATURE_HEADER = "surge-signature"
_encode = msgspec.msgpack.encode
_Pads = tuple["hashlib._Hash", "hashlib._Hash"]


def _pads(key: bytes) -> _Pads:
    """HMAC-SHA256's inner and outer hashes with the key absorbed (RFC 2104).

    Copying these per message is HMAC itself, at a third of the cost of
    ``hmac.digest`` under OpenSSL 3, which looks the digest up on every call.
    """
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    return inner, outer


class Signer:
    """Signs and verifies envelopes with one app's keys."""

    __slots__ = ("_codec", "_keys", "_sign_key", "_sign_prefix")

    def __init__(self, keys: Mapping[str, str | bytes], sign_with: str, codec: Codec) -> None:
        if not keys:
            raise ConfigurationError("signing_keys is empty")
        self._keys: dict[str, _Pads] = {}
        for kid, secret in keys.items():
            if not kid or ":" in kid:
                raise ConfigurationError(f"signing key id {kid!r}: no ':' and not empty")
            raw = secret.encode() if isinstance(secret, str) else bytes(secret)
            if len(raw) < 32:
                raise ConfigurationError(f"signing key {kid!r} must be at least 32 bytes")
            self._keys[kid] = _pads(raw)
        if sign_with not in self._keys:
            raise ConfigurationError(f"sign_with={sign_with!r} is not among signing_keys")
        self._sign_key = self._keys[sign_with]
        self._sign_prefix = sign_with + ":"
        self._codec = codec

    def _mac(self, pads: _Pads, env: Envelope, body: bytes) -> bytes:
        headers = env.headers
        items = (
            sorted((k, v) for k, v in headers.items() if k != SIGNATURE_HEADER) if headers else ()
        )
        inner = pads[0].copy()
        inner.update(_encode((env.topic, env.key, items, body)))
        outer = pads[1].copy()
        outer.update(inner.digest())
        return outer.digest()

    def sign(self, envs: Iterable[Envelope]) -> None:
        """Add the signature header to each envelope (replacing any)."""
        encode_event = self._codec.encode_event
        secret = self._sign_key
        prefix = self._sign_prefix
        for env in envs:
            body = env.body if env.event is None else encode_event(env.event)
            mac = base64.urlsafe_b64encode(self._mac(secret, env, body or b"")).rstrip(b"=")
            value = prefix + mac.decode()
            if env.headers is None:
                env.headers = {SIGNATURE_HEADER: value}
            else:
                env.headers = {**env.headers, SIGNATURE_HEADER: value}

    def verify(self, env: Envelope) -> None:
        """Raise :class:`InvalidSignature` unless ``env`` (as received, its
        body still encoded) carries a valid signature by a key held here."""
        given = (env.headers or {}).get(SIGNATURE_HEADER)
        if not given:
            raise InvalidSignature(f"{env.topic}: unsigned envelope {env.id}", topic=env.topic)
        kid, _, mac = given.partition(":")
        secret = self._keys.get(kid)
        if secret is None:
            raise InvalidSignature(
                f"{env.topic}: envelope {env.id} is signed with unknown key {kid!r}",
                topic=env.topic,
            )
        body = env.body if env.event is None else self._codec.encode_event(env.event)
        want = base64.urlsafe_b64encode(self._mac(secret, env, body or b"")).rstrip(b"=")
        if not hmac.compare_digest(want, mac.encode("ascii", "replace")):
            raise InvalidSignature(
                f"{env.topic}: the signature of envelope {env.id} does not match "
                "(forged or altered)",
                topic=env.topic,
            )
