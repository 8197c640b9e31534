"""The AsyncAPI 3.0 document: built from the app, served at /asyncapi.json,
printed by `surge asyncapi`, and accepted by the official parser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

import surge
from surge._graph import downstream
from surge.asyncapi import document, mount, returned_types
from surge.cli import main
from surge.examples import shop
from surge.http import Server
from surge.tools import fetch

from ._surge_run import get, surge_run

ROOT = Path(__file__).resolve().parent.parent
PARSER_VERSION = "3.6.6"
PARSER_DIR = Path(os.environ.get("SURGE_ASYNCAPI_PARSER", ROOT / ".cache" / "asyncapi-parser"))
"""Where `.ci/run` (or this test, on first use) installs @asyncapi/parser."""
VALIDATE = Path(__file__).parent / "asyncapi" / "validate.mjs"


class Paid(surge.Event):
    """An order was paid."""

    order_id: str


class Refund(surge.Event):
    order_id: str
    cents: int


class Receipt(surge.Event):
    """A receipt was sent."""

    order_id: str


def other_app() -> surge.App:
    """Pattern topics, sequences returned, outputs declared with publishes=, a reply
    route, a broker URL with a password."""
    app = surge.App("billing", transport="redis://user:s3cret@broker.example:6380/2")

    @app.on(shop.OrderShipped)
    async def bill(ev: shop.OrderShipped) -> list[Paid] | None:
        return [Paid(order_id=ev.order_id)]

    @app.on("refunds.*", Paid)
    async def audit(ev: surge.Event) -> Sequence[Refund]:
        return []

    @app.on(Paid, publishes=(Receipt, Refund, Receipt))
    async def notify(ev: Paid, ctx: surge.Context) -> Refund | None:
        ctx.publish(Receipt(order_id=ev.order_id))
        return None

    app.http.post("/pay", publish=shop.OrderShipped, reply=Paid)
    app.http.cloudevents("/events", Paid, {"com.example.refund.v1": Refund})
    return app


def test_the_shop_document_has_its_topics_subscriptions_outputs_and_routes() -> None:
    """A channel per topic, receive per subscription, send per returned type, POST /orders."""
    doc = document(shop.make_app(http=True))
    assert doc["asyncapi"] == "3.0.0"
    assert set(doc["channels"]) >= {
        "OrderPlaced",
        "StockReserved",
        "ReviewRequested",
        "OrderScored",
        "OrderShipped",
    }
    ops = doc["operations"]
    receives = {k for k, v in ops.items() if v["action"] == "receive"}
    assert {"shop.reserve_stock", "shop.approve", "shop.score_fraud"} <= receives
    sends = {(k, v["channel"]["$ref"]) for k, v in ops.items() if v["action"] == "send"}
    assert ("shop.reserve_stock.publish.StockReserved", "#/channels/StockReserved") in sends
    assert ("shop.reserve_stock.publish.ReviewRequested", "#/channels/ReviewRequested") in sends
    assert ("shop.charge_and_ship.publish.OrderShipped", "#/channels/OrderShipped") in sends
    http = ops["http.POST._orders"]
    assert http["bindings"] == {"http": {"method": "POST"}}
    assert doc["channels"]["http_POST__orders"]["address"] == "/orders"
    schema = doc["components"]["schemas"]["OrderPlaced"]
    assert schema["required"] == ["order_id", "customer", "amount", "placed_at"]
    assert schema["properties"]["amount"] == {"type": "number"}
    assert doc["servers"]["transport"]["protocol"] == "memory"


def test_patterns_replies_and_servers() -> None:
    """A pattern topic is a channel without a message; a reply route has its reply;
    the transport's server keeps host, port and path but never the password."""
    doc = document(other_app())
    assert doc["servers"]["transport"] == {
        "host": "broker.example:6380",
        "protocol": "redis",
        "pathname": "/2",
        "description": "the app's transport (redis://)",
    }
    assert "s3cret" not in json.dumps(doc)
    assert "messages" not in doc["channels"]["refunds._"]
    assert doc["channels"]["refunds._"]["address"] == "refunds.*"
    pay = doc["operations"]["http.POST._pay"]
    assert pay["reply"]["messages"] == [{"$ref": "#/channels/http_POST__pay/messages/Paid"}]
    assert doc["components"]["messages"]["Paid"]["summary"] == "An order was paid."
    assert doc["operations"]["billing.audit.publish.Refund"]["action"] == "send"
    events = doc["operations"]["http.POST._events"]
    assert events["messages"] == [
        {"$ref": "#/channels/http_POST__events/messages/Paid"},
        {"$ref": "#/channels/http_POST__events/messages/Refund"},
    ]
    assert "com.example.refund.v1 -> Refund" in doc["channels"]["http_POST__events"]["description"]


def test_declared_outputs_are_send_operations_beside_returned_ones() -> None:
    """app.on(publishes=...) names what a handler publishes through ctx.publish: each
    type gets a send operation and a channel with its message, merged with the returned
    types (each once); the event graph follows them too."""
    app = other_app()
    sub = app.subscriptions["billing.notify"]
    assert sub.publishes == (Receipt, Refund)
    doc = document(app)
    sends = sorted(
        (k, v["channel"]["$ref"], v["messages"][0]["$ref"])
        for k, v in doc["operations"].items()
        if k.startswith("billing.notify.") and v["action"] == "send"
    )
    assert doc["operations"]["billing.notify"]["action"] == "receive"
    assert sends == [
        (
            "billing.notify.publish.Receipt",
            "#/channels/Receipt",
            "#/channels/Receipt/messages/Receipt",
        ),
        (
            "billing.notify.publish.Refund",
            "#/channels/Refund",
            "#/channels/Refund/messages/Refund",
        ),
    ]
    assert doc["components"]["messages"]["Receipt"]["summary"] == "A receipt was sent."

    @app.on(Receipt)
    async def archive(ev: Receipt) -> None: ...

    reached = [s.name for s in downstream(app.subscriptions.values(), "Paid")]
    assert "billing.archive" in reached
    with pytest.raises(surge.ConfigurationError, match="tuple of Event subclasses"):
        app.on(Paid, name="bad", publishes=Receipt)  # type: ignore[arg-type]
    with pytest.raises(surge.ConfigurationError, match="tuple of Event subclasses"):
        app.on(Paid, name="worse", publishes=("Receipt",))  # type: ignore[arg-type]


def test_returned_types_reads_unions_optionals_and_sequences() -> None:
    """Return annotations name what a handler publishes; anything else names nothing."""

    async def one() -> Paid:
        return Paid(order_id="1")

    async def some() -> list[Paid | Refund] | None: ...
    async def nothing() -> None: ...
    def unannotated(ev):  # type: ignore[no-untyped-def]
        return ev

    assert returned_types(one) == [Paid]
    assert returned_types(some) == [Paid, Refund]
    assert returned_types(nothing) == []
    assert returned_types(unannotated) == []


@pytest.fixture(scope="session")
def asyncapi_parser() -> Path:
    """The official @asyncapi/parser, installed with npm into PARSER_DIR once."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "node and npm are needed to run the AsyncAPI parser: apt-get install nodejs npm"
        )
    modules = PARSER_DIR / "node_modules"
    if not (modules / "@asyncapi" / "parser" / "package.json").exists():
        PARSER_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(PARSER_DIR),
             f"@asyncapi/parser@{PARSER_VERSION}"],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=900,
        )  # fmt: skip
    return modules


def _parse(doc: dict[str, Any], modules: Path, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "asyncapi.json"
    path.write_text(json.dumps(doc))
    proc = subprocess.run(
        ["node", str(VALIDATE), str(path)],
        env={**os.environ, "ASYNCAPI_MODULES": str(modules)},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode in (0, 1), proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    result["returncode"] = proc.returncode
    return result


@pytest.mark.timeout(1200)
@pytest.mark.parametrize(
    "make", [lambda: shop.make_app(http=True), other_app], ids=["shop", "billing"]
)
def test_the_official_parser_accepts_the_document(
    make: Any, asyncapi_parser: Path, tmp_path: Path
) -> None:
    """@asyncapi/parser finds the document valid, with no error and no warning."""
    result = _parse(document(make()), asyncapi_parser, tmp_path)
    assert result["valid"], result
    assert result["returncode"] == 0, result
    # severity 0 = error, 1 = warning; 2 and 3 are hints (a newer 3.x exists)
    assert [d for d in result["diagnostics"] if d["severity"] < 2] == [], result


@pytest.mark.timeout(1200)
def test_the_official_parser_rejects_a_broken_document(
    asyncapi_parser: Path, tmp_path: Path
) -> None:
    """The check can fail: an operation pointing at a channel that is not there is refused."""
    doc = document(shop.make_app(http=True))
    doc["operations"]["shop.approve"]["channel"] = {"$ref": "#/channels/Nowhere"}
    result = _parse(doc, asyncapi_parser, tmp_path)
    assert result["returncode"] == 1, result


@pytest.mark.realtime
async def test_the_ingress_serves_the_document_once_mounted() -> None:
    """`mount(app.http)` serves /asyncapi.json publicly; the ingress alone does not."""
    bare = shop.make_app("bare", http=True)
    async with bare, Server(bare, port=0) as server:
        assert (await fetch(f"{server.url}/asyncapi.json")).status == 404
    app = shop.make_app(http=True)
    mount(mount(app.http))  # idempotent
    async with app, Server(app, port=0) as server:
        answer = await fetch(f"{server.url}/asyncapi.json")
        assert answer.status == 200
        assert answer.json() == json.loads(json.dumps(document(app)))
        assert (await fetch(f"{server.url}/asyncapi.jsonx")).status == 404


def test_the_cli_prints_json_and_yaml(tmp_path: Path) -> None:
    """`surge asyncapi module:app` prints the document; --yaml the same as YAML."""
    runner = CliRunner()
    ref = "surge.examples.shop:app"
    as_json = runner.invoke(main, ["asyncapi", ref])
    assert as_json.exit_code == 0, as_json.output
    expected = json.loads(json.dumps(document(shop.app)))
    assert json.loads(as_json.output) == expected
    as_yaml = runner.invoke(main, ["asyncapi", ref, "--yaml", "-o", str(tmp_path / "a.yaml")])
    assert as_yaml.exit_code == 0, as_yaml.output
    assert yaml.safe_load((tmp_path / "a.yaml").read_text()) == expected
    on_redis = runner.invoke(main, ["asyncapi", ref, "-t", "redis://h:1/0", "--title", "Shop"])
    doc = json.loads(on_redis.output)
    assert doc["servers"]["transport"]["host"] == "h:1"
    assert doc["info"]["title"] == "Shop"


def test_python_m_surge_asyncapi_runs() -> None:
    """The real command in a subprocess prints a document (no traceback)."""
    proc = subprocess.run(
        [sys.executable, "-m", "surge", "asyncapi", "surge.examples.shop:app"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["asyncapi"] == "3.0.0"


def test_surge_run_http_serves_the_document(tmp_path: Path) -> None:
    """`surge run module:app --http 127.0.0.1:PORT` (a subprocess, on a free port) serves
    the app's document at /asyncapi.json on its public listener."""
    pytest.importorskip("uvicorn")
    with surge_run(
        "surge.examples.shop:app", "--http", "127.0.0.1:0", log=tmp_path / "stderr.log"
    ) as at:
        status, body = get(f"{at.public}/asyncapi.json")
    assert status == 200
    assert json.loads(body) == json.loads(json.dumps(document(shop.make_app(http=True))))
