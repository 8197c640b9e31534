"""An order pipeline: the application ``surge demo`` drives.

::

    OrderPlaced ──reserve_stock (async, keyed)──> StockReserved ──approve (async)──┐
                                             └──> ReviewRequested                  │
                                                   └──score_fraud (process)──> OrderScored
    OrderScored ──charge_and_ship (sync, in a thread, keyed, retried)──> OrderShipped

Every order reaches ``OrderShipped`` exactly once. Big orders take the
CPU-bound fraud model in a process pool; the rest are approved on the loop,
because a process round trip costs far more than a small order's risk.
Payment fails now and then on the first attempt, like a real gateway; the
``Retry`` policy absorbs it.

Orders arrive over HTTP: ``POST /orders`` with an ``OrderPlaced`` body
answers 202 with the event id. Run it with ``surge run
surge.examples.shop:app --http 127.0.0.1:8000`` or drive it with ``surge
demo``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import zlib
from typing import Any

import surge

__all__ = (
    "REVIEW_THRESHOLD",
    "OrderPlaced",
    "OrderScored",
    "OrderShipped",
    "PaymentDeclined",
    "ReviewRequested",
    "StockReserved",
    "app",
    "approve",
    "charge_and_ship",
    "make_app",
    "reserve_stock",
    "score_fraud",
)

REVIEW_THRESHOLD = 950.0
"""Orders of at least this amount go through the fraud model (about 5%)."""

FLAKY_ONE_IN = 200
"""One payment in this many fails on its first attempt."""


class OrderPlaced(surge.Event):
    order_id: str
    customer: str
    amount: float
    placed_at: float
    """Wall-clock time the order was placed, for end-to-end latency."""


class StockReserved(surge.Event):
    order_id: str
    amount: float
    warehouse: int
    placed_at: float


class ReviewRequested(surge.Event):
    order_id: str
    customer: str
    amount: float
    warehouse: int
    placed_at: float


class OrderScored(surge.Event):
    order_id: str
    amount: float
    warehouse: int
    risk: float
    placed_at: float


class OrderShipped(surge.Event):
    order_id: str
    tracking: str
    held: bool
    """Shipped but held for a human: the fraud model found it risky."""
    placed_at: float


class PaymentDeclined(Exception):
    """The payment gateway said no, this time."""


async def reserve_stock(ev: OrderPlaced) -> StockReserved | ReviewRequested:
    warehouse = zlib.crc32(ev.customer.encode()) % 8
    if ev.amount >= REVIEW_THRESHOLD:
        return ReviewRequested(
            order_id=ev.order_id,
            customer=ev.customer,
            amount=ev.amount,
            warehouse=warehouse,
            placed_at=ev.placed_at,
        )
    return StockReserved(
        order_id=ev.order_id, amount=ev.amount, warehouse=warehouse, placed_at=ev.placed_at
    )


async def approve(ev: StockReserved) -> OrderScored:
    return OrderScored(
        order_id=ev.order_id,
        amount=ev.amount,
        warehouse=ev.warehouse,
        risk=0.0,
        placed_at=ev.placed_at,
    )


def score_fraud(ev: ReviewRequested) -> OrderScored:
    """The CPU-bound stage: a (pretend) model that hashes its features."""
    digest = f"{ev.customer}|{ev.amount:.2f}|{ev.warehouse}".encode()
    for _ in range(300):
        digest = hashlib.sha256(digest).digest()
    risk = digest[0] / 255
    return OrderScored(
        order_id=ev.order_id,
        amount=ev.amount,
        warehouse=ev.warehouse,
        risk=risk,
        placed_at=ev.placed_at,
    )


def charge_and_ship(ev: OrderScored, ctx: surge.Context) -> OrderShipped:
    """The sync stage: a blocking payment client, run in the thread pool."""
    if ctx.attempt == 1 and zlib.crc32(ev.order_id.encode()) % FLAKY_ONE_IN == 0:
        raise PaymentDeclined(f"gateway timeout charging {ev.order_id}")
    tracking = hashlib.blake2b(ev.order_id.encode(), digest_size=6).hexdigest()
    return OrderShipped(
        order_id=ev.order_id, tracking=tracking, held=ev.risk > 0.9, placed_at=ev.placed_at
    )


def make_app(name: str = "shop", *, http: bool | None = None, **options: Any) -> surge.App:
    """A new shop app; ``options`` (``transport=``, ``clock=``...) go to
    :class:`surge.App`. With ``http`` (by default: when the ``http`` extra is
    installed) it takes orders on ``POST /orders``."""
    app = surge.App(name, **options)
    if http is None:
        http = importlib.util.find_spec("uvicorn") is not None
    if http:
        app.http.post("/orders", publish=OrderPlaced)
    app.on(OrderPlaced, key="order_id", concurrency=256)(reserve_stock)
    app.on(StockReserved, concurrency=256)(approve)
    app.on(ReviewRequested, executor="process", concurrency=8)(score_fraud)
    app.on(
        OrderScored,
        key="order_id",
        # Little's law: each event holds its lane until its output's publish
        # commits (on sqlite, ~30-45 ms at 1,000 orders/s with two workers
        # sharing the write lock): 16 lanes a worker kept up with ~700/s
        concurrency=64,
        retry=surge.Retry(attempts=5, backoff=0.05),
    )(charge_and_ship)
    return app


app = make_app()
