"""Encoding events and envelopes: msgpack on the wire, JSON for people.

Decoding happens once, at the consuming edge, into the type a subscription
declared; a payload that does not fit raises :class:`DecodeError` naming the
field and the reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeVar

import msgspec
import msgspec.inspect as mi

from ._errors import DecodeError, MessageTooLarge, UnknownVersion
from ._event import VERSION_FIELD, Envelope, Event

__all__ = ("Codec", "JsonCodec", "MsgpackCodec", "codec_for")

E = TypeVar("E", bound=Event)

_PATH = re.compile(r"at `(\$[^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")


def field_of(message: str) -> str:
    """The JSON path a msgspec ``ValidationError`` message names
    (``$.amount``); for a missing field, the path the field would have had."""
    head, at, where = message.rpartition(" - at `")
    path = where.rstrip("`") if at else "$"
    missing = _MISSING.search(head if at else message)
    return f"{path}.{missing.group(1)}" if missing else path


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


# What a container or one of its items adds to an encoding, at most: a
# msgpack map or array header is 1-5 bytes; JSON adds braces, a colon and
# a comma. Generous on purpose: a bound only has to be safe.
_CONTAINER, _ITEM = 8, 8


class Codec:
    """Encodes events and envelopes to bytes and back, validating on decode."""

    name: str = ""

    _scalar_bounds: ClassVar[Mapping[type[mi.Type], int] | None] = None
    """The most bytes a value of each bounded scalar kind (a
    ``msgspec.inspect`` type) encodes to; None: no bound is known for any
    type (a codec whose encoding :meth:`size_bound` cannot reason about)."""

    def __init__(self, *, max_message_size: int = 1 << 20) -> None:
        self.max_message_size = max_message_size
        self._decoders: dict[type[Any], Any] = {}
        self._bounds: dict[type[Any], int | None] = {}

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

    def size_bound(self, tp: type[Any]) -> int | None:
        """The most bytes an instance of ``tp`` encodes to when its fields hold
        their declared types, or None when that is unbounded (a ``str``,
        ``bytes`` or collection field, an ``int`` in JSON) or unknown.

        msgspec checks field types when it decodes, not when an instance is
        made, so a field holding something else is not bounded by this; such
        an event fails to decode wherever it crosses a wire anyway."""
        if tp in self._bounds:
            return self._bounds[tp]
        bound: int | None = None
        if self._scalar_bounds is not None:
            try:
                info = mi.type_info(tp)
            except (TypeError, ValueError):  # a type msgspec cannot encode
                info = None
            if info is not None:
                bound = self._bound(info, set())
        self._bounds[tp] = bound
        return bound

    def _bound(self, info: mi.Type, seen: set[int]) -> int | None:
        scalars = self._scalar_bounds
        assert scalars is not None
        kind = type(info)
        if kind in scalars:
            return scalars[kind]
        if isinstance(info, mi.Metadata):
            return self._bound(info.type, seen)
        if isinstance(info, mi.LiteralType):
            return max(len(self._encode(v)) for v in info.values)
        if isinstance(info, mi.EnumType):
            return max(len(self._encode(m)) for m in info.cls)
        if isinstance(info, mi.UnionType):
            parts = [self._bound(t, seen) for t in info.types]
            return None if None in parts else max(p for p in parts if p is not None)
        if isinstance(info, mi.TupleType):
            return self._sum(info.item_types, seen)
        if isinstance(info, (mi.StructType, mi.DataclassType, mi.NamedTupleType)):
            if id(info) in seen:
                return None  # recursive: as deep as the value goes
            seen.add(id(info))
            total = self._sum([f.type for f in info.fields], seen)
            seen.discard(id(info))
            if total is None:
                return None
            total += sum(len(self._encode(f.encode_name)) + _ITEM for f in info.fields)
            if isinstance(info, mi.StructType) and info.tag_field is not None:
                total += len(self._encode(info.tag_field)) + len(self._encode(info.tag)) + _ITEM
            return total
        return None  # str, bytes, collections, Decimal, Any, custom: no bound

    def _sum(self, infos: Sequence[mi.Type], seen: set[int]) -> int | None:
        total = _CONTAINER
        for t in infos:
            b = self._bound(t, seen)
            if b is None:
                return None
            total += b + _ITEM
        return total

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

    # ints beyond 64 bits do not encode (OverflowError); datetimes are a
    # 12-byte timestamp extension or, naive, a string, as dates and times
    _scalar_bounds: ClassVar[Mapping[type[mi.Type], int] | None] = {
        mi.IntType: 9,
        mi.FloatType: 9,
        mi.BoolType: 1,
        mi.NoneType: 1,
        mi.DateTimeType: 40,
        mi.DateType: 40,
        mi.TimeType: 40,
        mi.TimeDeltaType: 40,
        mi.UUIDType: 40,
    }

    def __init__(self, *, max_message_size: int = 1 << 20) -> None:
        super().__init__(max_message_size=max_message_size)
        # encode_event is the encoder itself: a call less per event
        self._encode = self.encode_event = msgspec.msgpack.Encoder().encode  # type: ignore[method-assign,assignment]

    def _decoder(self, tp: type[Any]) -> Any:
        return msgspec.msgpack.Decoder(tp)


class JsonCodec(Codec):
    """JSON: readable in a broker's console; bodies are base64 in envelopes."""

    name = "json"

    # no IntType: JSON writes an int of any size
    _scalar_bounds: ClassVar[Mapping[type[mi.Type], int] | None] = {
        mi.FloatType: 24,
        mi.BoolType: 5,
        mi.NoneType: 4,
        mi.DateTimeType: 40,
        mi.DateType: 40,
        mi.TimeType: 40,
        mi.TimeDeltaType: 40,
        mi.UUIDType: 40,
    }

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
