"""Encoding events and envelopes: msgpack on the wire, JSON for people.

Decoding happens once, at the consuming edge, into the type a subscription
declared; a payload that does not fit raises :class:`DecodeError` naming the
field and the reason.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

import msgspec

from ._errors import DecodeError, MessageTooLarge, UnknownVersion
from ._event import VERSION_FIELD, Envelope, Event

__all__ = ("Codec", "JsonCodec", "MsgpackCodec", "codec_for")

E = TypeVar("E", bound=Event)

_PATH = re.compile(r"at `(\$[^`]*)`")


class _Wire(msgspec.Struct, array_like=True, gc=False):
    """An envelope as it is stored and sent: the event already encoded."""

    id: str
    topic: str
    key: str | None
    time: float
    headers: dict[str, str] | None
    body: bytes
    not_before: float | None = None


class _Version(msgspec.Struct, rename={"v": VERSION_FIELD}):
    """Only the version of a payload (1 when it carries none)."""

    v: int = 1


class _Versioned:
    """The decoder of a type with ``__version__`` above 1: the payload's
    version is read first; an earlier one goes through the upcasters."""

    __slots__ = ("codec", "current", "peek", "plain", "tp")

    def __init__(self, codec: Codec, tp: type[Event]) -> None:
        self.codec = codec
        self.tp = tp
        self.current = codec._decoder(tp)
        self.peek = codec._decoder(_Version)
        self.plain = codec._decoder(dict[str, Any])

    def decode(self, data: bytes) -> Any:
        tp = self.tp
        version: int = self.peek.decode(data).v
        if version == tp.__version__:
            return self.current.decode(data)
        name = tp.__name__
        if version > tp.__version__:
            raise UnknownVersion(
                f"{tp.__topic__}: a version {version} payload, and {name} is version "
                f"{tp.__version__} here (a newer publisher: deploy the new type first)",
                topic=tp.__topic__,
                version=version,
            )
        fields: dict[str, Any] = self.plain.decode(data)
        fields.pop(VERSION_FIELD, None)
        for step in range(version, tp.__version__):
            upcast = tp.__upcasters__.get(step)
            if upcast is None:
                raise UnknownVersion(
                    f"{tp.__topic__}: a version {version} payload, and {name} (version "
                    f"{tp.__version__}) has no upcaster from version {step}: register one "
                    f"with @surge.upcaster({name}, from_version={step})",
                    topic=tp.__topic__,
                    version=version,
                )
            try:
                fields = upcast(fields)
            except Exception as exc:
                raise DecodeError(
                    f"{tp.__topic__}: the upcaster of {name} from version {step} raised "
                    f"{type(exc).__name__}: {exc}",
                    topic=tp.__topic__,
                ) from exc
        fields[VERSION_FIELD] = tp.__version__
        return self.current.decode(self.codec._encode(fields))


class Codec:
    """Encodes events and envelopes to bytes and back, validating on decode."""

    name: str = ""

    def __init__(self, *, max_message_size: int = 1 << 20) -> None:
        self.max_message_size = max_message_size
        self._decoders: dict[type[Any], Any] = {}

    # subclasses provide these two
    def _encode(self, obj: Any) -> bytes:
        raise NotImplementedError

    def _decoder(self, tp: type[Any]) -> Any:
        raise NotImplementedError

    def encode_event(self, event: Event) -> bytes:
        return self._encode(event)

    def decode_event(self, data: bytes, event_type: type[E], *, topic: str = "") -> E:
        """Decode ``data`` into ``event_type`` or raise :class:`DecodeError`."""
        decoder = self._decoders.get(event_type)
        if decoder is None:
            decoder = self._decoders[event_type] = (
                _Versioned(self, event_type)
                if event_type.__version__ > 1
                else self._decoder(event_type)
            )
        try:
            result: E = decoder.decode(data)
        except msgspec.ValidationError as exc:
            match = _PATH.search(str(exc))
            raise DecodeError(
                f"{topic or event_type.__name__}: {exc}",
                topic=topic,
                field=match.group(1) if match else None,
            ) from None
        except msgspec.DecodeError as exc:
            raise DecodeError(
                f"{topic or event_type.__name__}: malformed payload: {exc}", topic=topic
            ) from None
        return result

    def encode_envelope(self, env: Envelope) -> bytes:
        """The envelope with its event encoded, ready for a transport."""
        body = env.body if env.event is None else self.encode_event(env.event)
        data = self._encode(
            _Wire(env.id, env.topic, env.key, env.time, env.headers, body or b"", env.not_before)
        )
        if len(data) > self.max_message_size:
            raise MessageTooLarge(
                f"event {env.id} on {env.topic!r} is {len(data)} bytes encoded; "
                f"the limit is {self.max_message_size}"
            )
        return data

    def check_size(self, env: Envelope) -> None:
        """Raise :class:`MessageTooLarge` when ``env``'s event, encoded, is over
        ``max_message_size``: the check of a transport that passes envelopes
        as objects (``memory://``), measuring what the event would weigh on
        a wire, as the consumer's check measures a body. An event this codec
        cannot encode has no size and passes (it could never leave the
        process)."""
        event = env.event
        if event is None:
            size = len(env.body or b"")
        else:
            try:
                size = len(self._encode(event))
            except (TypeError, OverflowError):
                return
        if size > self.max_message_size:
            raise MessageTooLarge(
                f"event {env.id} on {env.topic!r} is {size} bytes encoded; "
                f"the limit is {self.max_message_size}"
            )

    def decode_envelope(self, data: bytes) -> Envelope:
        """An envelope whose ``body`` still holds the encoded event."""
        try:
            w: _Wire = self._wire_decoder.decode(data)
        except msgspec.MsgspecError as exc:
            raise DecodeError(f"malformed envelope: {exc}") from None
        return Envelope(w.id, w.topic, w.key, w.time, w.headers, None, w.body, w.not_before)

    @property
    def _wire_decoder(self) -> Any:
        dec = self._decoders.get(_Wire)
        if dec is None:
            dec = self._decoders[_Wire] = self._decoder(_Wire)
        return dec


class MsgpackCodec(Codec):
    """msgpack: compact and fastest; the default on every transport."""

    name = "msgpack"

    def __init__(self, *, max_message_size: int = 1 << 20) -> None:
        super().__init__(max_message_size=max_message_size)
        # encode_event is the encoder itself: a call less per event
        self._encode = self.encode_event = msgspec.msgpack.Encoder().encode  # type: ignore[method-assign,assignment]

    def _decoder(self, tp: type[Any]) -> Any:
        return msgspec.msgpack.Decoder(tp)


class JsonCodec(Codec):
    """JSON: readable in a broker's console; bodies are base64 in envelopes."""

    name = "json"

    def __init__(self, *, max_message_size: int = 1 << 20) -> None:
        super().__init__(max_message_size=max_message_size)
        self._encode = self.encode_event = msgspec.json.Encoder().encode  # type: ignore[method-assign,assignment]

    def _decoder(self, tp: type[Any]) -> Any:
        return msgspec.json.Decoder(tp)


def codec_for(name: Literal["msgpack", "json"] | str) -> Codec:
    """The codec named ``name``."""
    if name == "msgpack":
        return MsgpackCodec()
    if name == "json":
        return JsonCodec()
    raise ValueError(f"unknown codec {name!r}: use 'msgpack' or 'json'")
