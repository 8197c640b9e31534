"""``surge load``: an asynchronous HTTP load generator for any endpoint.

``concurrency`` workers each keep one HTTP/1.1 connection alive and send
requests until ``requests`` have been sent. With ``rate``, request ``i`` is
due at ``i / rate`` seconds and its latency counts from then, not from when
a worker got to it, so a slow server cannot hide its queue (no coordinated
omission). It measures real time: it is a tool that times a server, not
library code, so it reads ``time.perf_counter`` directly.

A 503 (the server is overloaded or its transport in trouble) is sent again
after the server's ``Retry-After`` (at most ``retries`` times, each wait
capped at ``max_backoff`` and spread by half of it): a client backing off
as a well-behaved one does. Its latency runs from the first send to the
last answer, ``retried`` counts the sends again and ``retried_requests``
the requests sent more than once. A request sent again is made again:
``body_factory(i)`` is called for each send (a body that carries the time
it was sent says when the accepted one was).
"""

from __future__ import annotations

import asyncio
import random
import time
from array import array
from collections.abc import Callable

import msgspec

from ._client import Connection, Response, build_request, split_url

__all__ = ("LoadReport", "raise_fd_limit", "run_load")


class LoadReport(msgspec.Struct, frozen=True, kw_only=True):
    """What a load run measured; latencies in seconds."""

    url: str
    requests: int
    completed: int
    """Requests answered (any status)."""
    errors: dict[str, int]
    """Requests with no answer, by cause (``timeout``, ``ConnectionResetError``...)."""
    statuses: dict[int, int]
    """Final answers by status (after retries of 503)."""
    duration: float
    rps: float
    """Answered requests per second over the whole run."""
    mean: float
    p50: float
    p95: float
    p99: float
    max: float
    timeline: list[tuple[float, int, float, float, float]] = msgspec.field(default_factory=list)
    """Per time slice: (start s, answers, p50, p99, max)."""
    retried: int = 0
    """Requests sent again after a 503, every time counted."""
    retried_requests: int = 0
    """Requests sent more than once (after one 503 or more)."""

    def summary(self) -> str:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())) or "none"
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"
        ms = 1000.0
        return (
            f"{self.completed}/{self.requests} answered in {self.duration:.2f}s: "
            f"{self.rps:,.0f} req/s\n"
            f"latency ms: p50 {self.p50 * ms:.2f}  p95 {self.p95 * ms:.2f}  "
            f"p99 {self.p99 * ms:.2f}  max {self.max * ms:.2f}  mean {self.mean * ms:.2f}\n"
            f"status codes: {codes} (503 sent again: {self.retried}, "
            f"requests sent again: {self.retried_requests})\nerrors: {errs}"
        )


async def run_load(
    url: str,
    requests: int = 1000,
    concurrency: int = 50,
    rate: float | None = None,
    body_factory: Callable[[int], bytes] | None = None,
    *,
    method: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    on_response: Callable[[int, Response], object] | None = None,
    on_progress: Callable[[int, int], object] | None = None,
    retries: int = 3,
    max_backoff: float = 2.0,
) -> LoadReport:
    """Send ``requests`` requests to ``url`` from ``concurrency`` connections.

    ``body`` is sent with every request, or ``body_factory(i)`` with the
    i-th; ``method`` defaults to POST with a body, GET without.
    ``on_response(i, response)`` sees every final answer; ``on_progress(done,
    requests)`` is called as answers arrive. Every send is bounded by
    ``timeout`` seconds (connecting included). A 503 is sent again, up to
    ``retries`` times, after its ``Retry-After`` (at most ``max_backoff``).
    """
    if requests < 0 or concurrency < 1:
        raise ValueError("requests must be >= 0 and concurrency >= 1")
    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive")
    if retries < 0 or max_backoff < 0:
        raise ValueError("retries and max_backoff must not be negative")
    host, port, path = split_url(url)
    raise_fd_limit(concurrency + 256)
    has_body = body is not None or body_factory is not None
    verb = (method or ("POST" if has_body else "GET")).upper()
    fixed = None if body_factory else build_request(verb, host, port, path, body, headers)
    starts = array("d")
    latencies = array("d")
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    next_index = 0
    done = 0
    retried = 0
    retried_requests = 0
    clock = time.perf_counter
    t0 = clock()

    async def worker() -> None:
        nonlocal next_index, done, retried, retried_requests
        conn: Connection | None = None
        try:
            while next_index < requests:
                i = next_index
                next_index += 1
                if rate is not None:
                    due = t0 + i / rate
                    wait = due - clock()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    start = due
                else:
                    start = clock()
                if fixed is not None:
                    request = fixed
                else:
                    assert body_factory is not None
                    request = build_request(verb, host, port, path, body_factory(i), headers)
                try:
                    for again in range(retries + 1):
                        async with asyncio.timeout(timeout):
                            if conn is None or conn.closed:
                                conn = await Connection.open(host, port)
                            response = await conn.send(request)
                        if response.status != 503 or again == retries:
                            break
                        retried += 1
                        if not again:
                            retried_requests += 1
                        if not conn.keep_alive:
                            conn.close()
                        await asyncio.sleep(_backoff(response, max_backoff))
                        if body_factory is not None:
                            request = build_request(
                                verb, host, port, path, body_factory(i), headers
                            )
                except TimeoutError:
                    errors["timeout"] = errors.get("timeout", 0) + 1
                    if conn is not None:
                        conn.close()
                    conn = None
                except OSError as exc:
                    name = type(exc).__name__
                    errors[name] = errors.get(name, 0) + 1
                    if conn is not None:
                        conn.close()
                    conn = None
                else:
                    latencies.append(clock() - start)
                    starts.append(start - t0)
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    if on_response is not None:
                        on_response(i, response)
                    if conn is not None and not conn.keep_alive:
                        conn.close()
                        conn = None
                done += 1
                if on_progress is not None:
                    on_progress(done, requests)
        finally:
            if conn is not None:
                conn.close()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, max(requests, 1)))))
    duration = clock() - t0
    report = _report(url, requests, statuses, errors, duration, starts, latencies)
    return msgspec.structs.replace(report, retried=retried, retried_requests=retried_requests)


def _backoff(response: Response, cap: float) -> float:
    """Seconds to wait before sending a 503'd request again: the server's
    ``Retry-After`` (seconds; 1 when absent or a date), at most ``cap``,
    spread over its upper half so clients do not come back in step."""
    try:
        wait = float(response.headers.get("retry-after", "1"))
    except ValueError:
        wait = 1.0
    wait = min(max(wait, 0.0), cap)
    return wait * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not a secret


def _report(
    url: str,
    requests: int,
    statuses: dict[int, int],
    errors: dict[str, int],
    duration: float,
    starts: array[float],
    latencies: array[float],
) -> LoadReport:
    ordered = sorted(latencies)
    n = len(ordered)

    def pct(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] if n else 0.0

    return LoadReport(
        url=url,
        requests=requests,
        completed=n,
        errors=dict(errors),
        statuses=dict(sorted(statuses.items())),
        duration=duration,
        rps=n / duration if duration > 0 else 0.0,
        mean=sum(ordered) / n if n else 0.0,
        p50=pct(0.50),
        p95=pct(0.95),
        p99=pct(0.99),
        max=ordered[-1] if n else 0.0,
        timeline=_timeline(starts, latencies, duration),
    )


def _timeline(
    starts: array[float], latencies: array[float], duration: float, slices: int = 100
) -> list[tuple[float, int, float, float, float]]:
    if not latencies:
        return []
    width = max(duration / slices, 0.001)
    buckets: dict[int, list[float]] = {}
    for s, lat in zip(starts, latencies, strict=True):
        buckets.setdefault(int(s / width), []).append(lat)
    out = []
    for b in sorted(buckets):
        lats = sorted(buckets[b])
        k = len(lats)
        out.append((b * width, k, lats[k // 2], lats[min(k - 1, int(0.99 * k))], lats[-1]))
    return out


def raise_fd_limit(wanted: int) -> None:
    """Raise the soft limit on open descriptors to ``wanted`` (or the hard
    limit) if it is lower: each connection of a load run is one."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
