"""The dashboard at /_surge/, in a real headless Chromium, and its dead-letter endpoints."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import surge
from surge.http import Server
from surge.observe import instrument, mount, set_admin_token
from surge.tools import fetch

pytestmark = pytest.mark.realtime

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Order(surge.Event):
    n: int


def make_app() -> tuple[surge.App, dict[str, bool]]:
    app = surge.App("dash")
    instrument(app)
    mount(app.http)
    broken = {"13": True}

    @app.on(Order, retry=surge.Retry(attempts=1))
    async def charge(event: Order) -> None:
        if event.n == 13 and broken["13"]:
            raise ValueError("card 13 declined")

    return app, broken


@asynccontextmanager
async def serving(app: surge.App) -> AsyncIterator[Server]:
    async with app, Server(app, port=0, admin=True) as server:
        yield server


async def test_dashboard_shows_live_numbers_and_replays_a_dead_letter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Chromium loads /_surge/, sees the count rise, lists a dead letter and replays it."""
    from playwright.async_api import async_playwright

    caplog.set_level(logging.CRITICAL, "surge")
    app, broken = make_app()
    async with serving(app) as server, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(server.url + "/_surge/")
            handled = 'tr[data-sub="dash.charge"] td[data-field="succeeded"]'
            await page.wait_for_function(
                f"document.querySelector('{handled}')?.textContent === '0'"
            )
            for n in range(10):
                await app.publish(Order(n=n))
            await app.drain()
            # the live number changes without a reload
            await page.wait_for_function(
                f"document.querySelector('{handled}').textContent === '10'"
            )
            dead_id = await app.publish(Order(n=13))
            await app.drain()
            letter = page.locator(f'li[data-id="{dead_id}"]')
            await letter.wait_for(state="visible")
            assert "ValueError: card 13 declined" in await letter.inner_text()
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            broken["13"] = False
            await letter.locator("button.replay").click()
            await letter.wait_for(state="detached")
            await page.wait_for_function(
                f"document.querySelector('{handled}').textContent === '11'"
            )
            assert await app.dead_letters() == []
            assert app.statistics().subscriptions["dash.charge"].succeeded == 11
        finally:
            await browser.close()


async def _post(url: str, body: dict[str, Any], **headers: str) -> tuple[int, Any]:
    r = await fetch(url, "POST", json=body, headers=headers)
    return r.status, r.json()


async def test_dead_letter_actions_need_json_same_origin_and_token_when_set(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """POST /_surge/dlq/* on the admin listener refuses other origins, non-JSON and, once a
    token is set, a missing or wrong one (401); purge deletes."""
    caplog.set_level(logging.CRITICAL, "surge")
    app, _ = make_app()
    async with serving(app) as server:
        dead_id = await app.publish(Order(n=13))
        await app.drain()
        purge = server.url + "/_surge/dlq/purge"
        r = await fetch(
            purge, "POST", body=b'{"subscription":"charge"}', headers={"content-type": "text/plain"}
        )
        assert (r.status, r.json()["error"]) == (
            403,
            "send the action as content-type: application/json",
        )
        status, body = await _post(purge, {"subscription": "charge"}, origin="http://evil.test")
        assert (status, body["error"]) == (403, "cross-origin requests are refused")
        status, body = await _post(purge, {"subscription": "nope"})
        assert status == 404
        status, body = await _post(purge, {"subscription": "charge", "extra": 1})
        assert status == 400
        set_admin_token(app, "s3cret")
        try:
            status, body = await _post(purge, {"subscription": "charge"})
            assert status == 401
            status, body = await _post(
                purge, {"subscription": "charge"}, authorization="Bearer wrong"
            )
            assert status == 401
            assert len(await app.dead_letters()) == 1
            status, body = await _post(
                purge, {"subscription": "charge", "ids": [dead_id]}, authorization="Bearer s3cret"
            )
            assert (status, body) == (200, {"count": 1})
        finally:
            set_admin_token(app, None)
        assert await app.dead_letters() == []


async def test_dashboard_page_is_self_contained() -> None:
    """/_surge/ is one HTML document that loads nothing from another host."""
    app, _ = make_app()
    async with serving(app) as server:
        r = await fetch(server.url + "/_surge/")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/html")
    text = r.body.decode()
    assert "<script src" not in text
    assert "<link" not in text
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text


assert os.path.sep == "/"  # the Chromium path above is a Debian one
