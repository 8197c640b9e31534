"""The connection to NATS: connecting (credentials, TLS), reconnecting,
sending acks, closing within a bound; and nats-py's errors translated into
surge's at this boundary."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from ..._clock import Clock
from ..._errors import Closed, TransportError

__all__ = (
    "ELECTION_BOUND",
    "ELECTION_ERRORS",
    "CancelGuard",
    "Connection",
    "Election",
    "safe_url",
    "ssl_context",
    "translate",
)

log = logging.getLogger("surge.nats")

ELECTION_BOUND = 30.0
ELECTION_ERRORS: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,  # "JetStream system temporarily unavailable"
)
"""What JetStream's API answers while a cluster has no leader for it."""
"""How long a JetStream API that does not answer (a cluster electing a
leader, a node rejoining) is asked again before its error is the caller's."""


class Connection:
    """One nats-py client and its JetStream context, for one transport.

    ``open`` from a successful :meth:`connect` until :meth:`closing`; acks
    still go out after ``closing`` (a stop hands deliveries back) until
    :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        connect: dict[str, Any],
        *,
        ack_timeout: float,
        on_reconnect: Callable[[], None],
    ) -> None:
        self.url = url
        self._connect = connect
        self._ack_timeout = ack_timeout
        self._on_reconnected = on_reconnect
        self._nc: Client | None = None
        self._js: Any = None
        self._open = False
        self._connected = False
        self._recent_acks: deque[str] = deque(maxlen=4096)
        self.last_error: str | None = None
        """The last connection error, until the connection is back."""

    @property
    def open(self) -> bool:
        """Connected (or reconnecting) and not closing."""
        return self._open

    @property
    def connected(self) -> bool:
        """The socket is up now (False while reconnecting)."""
        return self._connected

    def client(self) -> Client:
        """The client, while open; else raises ``Closed``."""
        if self._nc is None or not self._open:
            raise Closed("transport is closed")
        return self._nc

    @property
    def js(self) -> Any:
        """The JetStream context (nats-py's, untyped), until closed (a stop
        still deletes consumers and releases leases while ``closing``)."""
        if self._nc is None:
            raise Closed("transport is closed")
        return self._js

    async def connect(self) -> None:
        opts = {k: v for k, v in self._connect.items() if v is not None}
        nc = Client()
        self.last_error = None
        try:
            # A failed TLS handshake can leave nats-py's connect hanging:
            # bound it, then clean up what it left.
            async with asyncio.timeout(4 * self._connect["connect_timeout"] + 1):
                await nc.connect(
                    **opts,
                    allow_reconnect=True,
                    # Each server twice at first (so bad credentials fail
                    # fast); forever once connected, set below.
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # a float works; typed int
                    ping_interval=5,
                    max_outstanding_pings=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                )
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            # nats-py ends with NoServersError; the reason is the last error
            # its callback saw (a refused connection, a TLS failure)
            reason = self.last_error or repr(exc)
            raise TransportError(
                f"cannot connect to NATS at {safe_url(self.url)}: {reason}"
            ) from exc
        nc.options["max_reconnect_attempts"] = -1
        version = nc.connected_server_version
        if (version.major, version.minor) < (2, 10):
            await nc.close()
            raise TransportError(
                f"nats-server {version} at {safe_url(self.url)} is too old: "
                "surge needs 2.10 or later"
            )
        self._nc = nc
        self._js = nc.jetstream()
        self._open = True
        self._connected = True
        self.last_error = None  # a server of the list that failed before one answered

    async def _on_error(self, exc: Exception) -> None:
        self.last_error = repr(exc)
        # Before the first connection the error is the one connect() raises
        # (one line for the operator, not a warning per attempt besides).
        level = logging.WARNING if self._open else logging.DEBUG
        log.log(level, "NATS connection error (%s): %r", safe_url(self.url), exc)

    async def _on_disconnect(self) -> None:
        if self._open:
            self._connected = False
            log.warning("lost connection to NATS at %s; reconnecting", safe_url(self.url))

    async def _on_reconnect(self) -> None:
        self._connected = True
        self.last_error = None
        log.warning("reconnected to NATS at %s", safe_url(self.url))
        self._on_reconnected()
        # Acks sent just before the drop may never have arrived; acking
        # twice is harmless, a lost ack costs a redelivery a lease later.
        for reply in list(self._recent_acks):
            await self.send(reply, b"+ACK")

    # --- acks ------------------------------------------------------------------------
    @property
    def can_send(self) -> bool:
        """Acks can still go out (open, or closing and not closed yet)."""
        return self._nc is not None and not self._nc.is_closed

    async def send(self, reply: str, payload: bytes) -> None:
        """An ack (``+ACK``, ``-NAK``, ``+WPI``, ``+TERM``) to ``reply``,
        unconfirmed (callers guard a batch of them with :class:`CancelGuard`)."""
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        try:
            await nc.publish(reply, payload)
        except nats.errors.Error as exc:
            # The server redelivers after the lease: at-least-once holds.
            log.warning("could not send %r for %s: %r", payload[:4], reply, exc)

    async def ack(self, reply: str) -> None:
        """``+ACK``, sent again after a reconnect if it was among the last ones."""
        self._recent_acks.append(reply)
        await self.send(reply, b"+ACK")

    async def nak_confirmed(self, replies: Sequence[str]) -> list[BaseException]:
        """NAK ``replies`` in this order, each confirmed by the server within
        ``ack_timeout``; the failures (sent anyway: the server redelivers
        after the lease)."""
        nc = self._nc
        if not replies or nc is None or nc.is_closed:
            return []
        # Tasks start in order, so the NAKs go out in order.
        done = await asyncio.gather(
            *(nc.request(reply, b"-NAK", timeout=self._ack_timeout) for reply in replies),
            return_exceptions=True,
        )
        return [r for r in done if isinstance(r, BaseException)]

    # --- closing ---------------------------------------------------------------------
    def closing(self) -> None:
        """No new work from now on: ``client()`` raises ``Closed``."""
        self._open = False

    async def close(self) -> None:
        """Flush the last acks and close, each bounded: a close never holds
        up a worker's exit."""
        self._open = False
        nc, self._nc = self._nc, None
        if nc is None:
            return
        try:
            await nc.flush(timeout=2)
        except (nats.errors.Error, TimeoutError):
            log.warning("could not flush the last acks to NATS before closing")
        finally:
            # also when the close is cancelled: the socket must not outlive it
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                async with asyncio.timeout(2.0):
                    await nc.close()

    async def drop(self) -> None:
        """Close at once, flushing nothing (as a killed process would)."""
        self._open = False
        nc, self._nc = self._nc, None
        if nc is not None:
            await nc.close()


class CancelGuard:
    """``with CancelGuard(): await <nats-py calls>``: a cancellation of the
    running task that the calls swallowed is raised at the end of the block.

    nats-py waits for every reply with ``asyncio.wait_for``, which on Python
    3.11 returns the reply and drops a cancel that lands in the same loop
    iteration (fixed in 3.12), and its flush catches ``CancelledError`` and
    carries on. A stop cancels tasks (a trigger's timer, a runner's consumer
    and acker) and waits for them: a lost cancel left that task running and
    the stop waiting until the supervisor killed the worker.
    """

    __slots__ = ("_before", "_task")

    def __enter__(self) -> None:
        task = self._task = asyncio.current_task()
        self._before = 0 if task is None else task.cancelling()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        task = self._task
        if (
            task is not None
            and task.cancelling() > self._before
            and not isinstance(exc, asyncio.CancelledError)
        ):
            log.debug("nats: %s was cancelled in a client call that lost it", task.get_name())
            raise asyncio.CancelledError from exc


def ssl_context(
    url: str, ca: str | None, cert: str | None, key: str | None
) -> ssl.SSLContext | None:
    if not (ca or cert or url.startswith("tls://")):
        return None
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def safe_url(url: str) -> str:
    """``url`` without credentials, for logs and errors."""
    return re.sub(r"//[^@/]*@", "//", url)


def translate(exc: Exception, doing: str) -> Exception:
    """A nats-py error as the surge error to raise."""
    if isinstance(exc, nats.errors.ConnectionClosedError):
        return Closed(f"NATS connection closed while {doing}")
    desc = getattr(exc, "description", None) or repr(exc)
    return TransportError(f"NATS failed while {doing}: {desc}")


class Election:
    """Waits out JetStream's API having no leader for a moment (a cluster
    electing one after a node died answers with timeouts or 'no responders';
    one whose node restarted cannot place a new replicated stream yet):
    :meth:`wait_out` pauses 0.1 s and returns, for up to ``bound`` seconds from
    the first trouble, then raises the translated error. Says so once in the
    log, at the first trouble."""

    def __init__(self, clock: Clock, doing: str, bound: float = ELECTION_BOUND) -> None:
        self._clock = clock
        self._doing = doing
        self._bound = bound
        self._since: float | None = None

    async def wait_out(self, exc: Exception) -> None:
        now = self._clock.monotonic()
        if self._since is None:
            self._since = now
            log.info("JetStream did not answer while %s (%r): asking again", self._doing, exc)
        elif now - self._since > self._bound:
            if isinstance(exc, nats.errors.Error):
                raise translate(exc, self._doing) from exc
            raise exc
        await self._clock.sleep(0.1)
