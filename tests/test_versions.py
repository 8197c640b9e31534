"""Evolving event types: payloads stored by earlier versions (bytes kept in
tests/fixtures/events/, written by make.py there) decode through the
registered upcasters into the current type, on every codec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import surge

FIXTURES = Path(__file__).parent / "fixtures" / "events"
CODECS = [surge.MsgpackCodec(), surge.JsonCodec()]


class OrderPlaced(surge.Event):
    """Version 3: the amount in currency units, the customer as an id."""

    __topic__ = "shop.order_placed"
    __version__ = 3
    order_id: str
    amount: float
    customer_id: str


@surge.upcaster(OrderPlaced, from_version=1)
def _v1_to_v2(fields: dict[str, Any]) -> dict[str, Any]:
    customer = fields.pop("customer")
    return {**fields, "customer_id": f"name:{customer}"}


@surge.upcaster(OrderPlaced, from_version=2)
def _v2_to_v3(fields: dict[str, Any]) -> dict[str, Any]:
    cents = fields.pop("cents")
    return {**fields, "amount": cents / 100}


def _stored(version: int, codec: surge.Codec) -> bytes:
    return (FIXTURES / f"order_placed.v{version}.{codec.name}").read_bytes()


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_stored_payloads_of_every_version_decode_into_the_current_type(
    codec: surge.Codec,
) -> None:
    """v1 goes through both upcasters, v2 through one, v3 through none."""
    assert codec.decode_event(_stored(1, codec), OrderPlaced) == OrderPlaced(
        order_id="o-1", amount=12.5, customer_id="name:ada"
    )
    assert codec.decode_event(_stored(2, codec), OrderPlaced) == OrderPlaced(
        order_id="o-2", amount=0.99, customer_id="c-7"
    )
    now = OrderPlaced(order_id="o-3", amount=1.0, customer_id="c-1")
    assert codec.decode_event(codec.encode_event(now), OrderPlaced) == now


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_a_version_without_upcaster_or_from_the_future_is_a_typed_error(
    codec: surge.Codec,
) -> None:
    """No upcaster from a payload's version, or a version newer than the
    type's, raises UnknownVersion (a DecodeError) naming what to do."""

    class Refund(surge.Event):
        __topic__ = "shop.refund"
        __version__ = 2
        order_id: str

    class RefundV1(surge.Event):
        __topic__ = "shop.refund.v1"
        order_id: str

    class RefundV3(surge.Event):
        __topic__ = "shop.refund.v3"
        __version__ = 3
        order_id: str

    old = codec.encode_event(RefundV1(order_id="o"))
    with pytest.raises(surge.UnknownVersion, match=r"from_version=1") as raised:
        codec.decode_event(old, Refund)
    assert raised.value.version == 1
    assert isinstance(raised.value, surge.DecodeError)
    newer = codec.encode_event(RefundV3(order_id="o"))
    with pytest.raises(surge.UnknownVersion, match="version 3 payload"):
        codec.decode_event(newer, Refund)


def test_upcaster_registration_is_checked() -> None:
    """An upcaster step outside 1..__version__-1 is refused at once."""
    with pytest.raises(ValueError, match="give 1 to 2"):
        surge.upcaster(OrderPlaced, from_version=3)
    with pytest.raises(TypeError, match="__version__"):

        class Bad(surge.Event):
            __version__ = 0


@pytest.mark.parametrize("codec", ["msgpack", "json"])
async def test_an_app_handles_stored_old_payloads_as_the_current_type(
    codec: str, tmp_path: Path
) -> None:
    """Old payloads left on a durable transport by an earlier deploy are
    handled as the current type; the same stored bytes on every codec."""
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    app = surge.App("shop", transport=url, codec=codec)
    got: list[OrderPlaced] = []

    @app.on(OrderPlaced)
    async def ship(ev: OrderPlaced) -> None:
        got.append(ev)

    async with app:
        for version in (1, 2):
            body = _stored(version, app.codec)
            await app.transport.publish(
                [surge.Envelope(surge.new_id(), OrderPlaced.__topic__, None, 0.0, None, None, body)]
            )
        await app.drain()
    assert sorted(e.order_id for e in got) == ["o-1", "o-2"]
    assert {e.amount for e in got} == {12.5, 0.99}
