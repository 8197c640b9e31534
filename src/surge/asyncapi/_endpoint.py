"""``GET /asyncapi.json``: the document, built once per ingress on first
request (subscriptions and routes are fixed once the app runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from ._document import document

if TYPE_CHECKING:
    from ..http import Ingress

__all__ = ("PATH", "mount")

PATH = "/asyncapi.json"


class _Document:
    """The ASGI application of ``/asyncapi.json``."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.body: bytes | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            status, body = 405, b'{"error":"use GET"}'
        else:
            if self.body is None:
                self.body = msgspec.json.encode(document(self.ingress.app))
            status, body = 200, self.body
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def mount(ingress: Ingress, *, admin: bool = False) -> Ingress:
    """Serve the app's AsyncAPI document at ``/asyncapi.json`` on
    ``ingress`` (``app.http``); public unless ``admin`` (then guarded like
    ``/_surge/``). Idempotent. Returns ``ingress``."""
    if PATH not in ingress.mounted:
        ingress.mount(PATH, _Document(ingress), admin=admin)
    return ingress
