"""HTTP ingress throughput against a bare uvicorn + starlette baseline.

One run measures, each server in its own process and driven by ``wrk``
(``apt-get install wrk``), or by surge's own load generator when wrk is
missing:

  (a) bare uvicorn + starlette "hello world"     GET /
  (b) surge ingress, fire-and-forget (202)       POST /orders -> a no-op handler
  (c) surge request/reply through a no-op handler POST /pay -> reply event (200)

and prints requests/s, p99 and the ratios b/a and c/a. Every server runs
uvicorn with httptools on uvloop, with access logs off.

surge's routes admit from downstream state (docs/http.md): a request the
pipeline behind the route could not take in time is answered 503 with
``Retry-After``, which wrk does not honour. The first fraction of a second
of a cold flood is such a case (no throughput measured yet), so each
measurement follows an unmeasured warm-up; 503s in a measured run are
counted apart (column "503"), and any other non-2xx answer aborts the run.

    python benchmarks/http_bench.py [--duration 10] [--connections 100] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BODY = '{"order_id": "o-1", "amount": 9.5}'
PATHS = {"a": ("GET", "/"), "b": ("POST", "/orders"), "c": ("POST", "/pay")}
NAMES = {
    "a": "bare uvicorn+starlette hello world",
    "b": "surge ingress, publish (202)",
    "c": "surge request/reply, no-op handler (200)",
}


# --- the servers, each run in its own process ---------------------------------
def serve_starlette(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request: object) -> PlainTextResponse:
        return PlainTextResponse("Hello, world!")

    app = Starlette(routes=[Route("/", hello)])
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        access_log=False,
        log_level="warning",
        proxy_headers=False,  # as surge's server: no per-request header rewriting
    )


def serve_surge(port: int) -> None:
    import surge
    from surge.http import run

    class OrderPlaced(surge.Event):
        order_id: str
        amount: float

    class OrderPaid(surge.Event):
        order_id: str

    class PayRequested(surge.Event):
        order_id: str
        amount: float

    app = surge.App("bench")

    @app.on(OrderPlaced)
    async def noop(event: OrderPlaced) -> None:
        return None

    @app.on(PayRequested)
    async def pay(event: PayRequested) -> OrderPaid:
        return OrderPaid(order_id=event.order_id)

    app.http.post("/orders", publish=OrderPlaced)
    app.http.post("/pay", publish=PayRequested, reply=OrderPaid, timeout=10)
    run(app, "127.0.0.1", port, max_in_flight=100_000)


# --- driving them ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Counts each answer's status in the thread that got it; done() prints them.
_STATUS_LUA = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do
      io.write(string.format("status %d %d\\n", code, n))
    end
  end
end
"""


def run_wrk(url: str, method: str, duration: float, connections: int) -> tuple[float, float, int]:
    """(requests/s, p99 seconds, 503 answers) of one wrk run."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if method == "POST":
            script.write(
                f'wrk.method = "POST"\nwrk.body = {BODY!r}\n'
                'wrk.headers["Content-Type"] = "application/json"\n'
            )
        script.write(_STATUS_LUA)
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(duration))}s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    p99 = float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]
    statuses = {int(c): int(n) for c, n in re.findall(r"^status (\d+) (\d+)$", out, re.M)}
    wrong = {c: n for c, n in statuses.items() if not 200 <= c < 300 and c != 503}
    if wrong or not statuses:
        raise RuntimeError(f"{url} answered {wrong or 'nothing counted'}:\n{out}")
    return rps, p99, statuses.get(503, 0)


def run_builtin(
    url: str, method: str, duration: float, connections: int
) -> tuple[float, float, int]:
    from surge._app import run_loop
    from surge.tools import run_load

    body = BODY.encode() if method == "POST" else None
    # about duration seconds at a first guess of 5,000 req/s; no resends, so
    # a 503 is counted as wrk counts it
    report = run_loop(
        run_load(url, int(5000 * duration), connections, body=body, method=method, retries=0)
    )
    wrong = {c: n for c, n in report.statuses.items() if not 200 <= c < 300 and c != 503}
    if wrong or report.errors:
        raise RuntimeError(f"{url} answered {wrong} with errors {report.errors}")
    return report.rps, report.p99, report.statuses.get(503, 0)


def measure(key: str, args: argparse.Namespace) -> tuple[float, float, float, int]:
    """(requests/s, p99 seconds, requests per CPU-second of the server,
    503 answers)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", key, "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, proc)
        method, path = PATHS[key]
        url = f"http://127.0.0.1:{port}{path}"
        drive = run_wrk if shutil.which("wrk") and not args.builtin else run_builtin
        drive(url, method, min(2.0, args.duration), args.connections)  # warm-up
        cpu = cpu_seconds(proc.pid)
        start = time.monotonic()
        rps, p99, shed = drive(url, method, args.duration, args.connections)
        elapsed = time.monotonic() - start
        cpu = cpu_seconds(proc.pid) - cpu
        return rps, p99, rps * elapsed / cpu if cpu > 0 else float("nan"), shed
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1, help="repeat a, b, c; report medians")
    parser.add_argument("--builtin", action="store_true", help="use surge's load generator")
    parser.add_argument("--serve", choices=("a", "b", "c"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        (serve_starlette if args.serve == "a" else serve_surge)(args.port)
        return
    tool = "wrk -t1" if shutil.which("wrk") and not args.builtin else "surge load"
    print(
        f"{tool}, {args.connections} connections, {args.duration:.0f}s x {args.rounds} round(s), "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[str, list[tuple[float, float, float, int]]] = {k: [] for k in PATHS}
    for _ in range(args.rounds):
        for key in PATHS:
            results[key].append(measure(key, args))
    rps = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    p99 = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    per_cpu = {k: statistics.median(r[2] for r in v) for k, v in results.items()}
    shed = {k: sum(r[3] for r in v) for k, v in results.items()}
    for key in PATHS:
        print(
            f"({key}) rounds: "
            + ", ".join(f"{r[0]:,.0f} req/s p99 {r[1] * 1000:.2f} ms" for r in results[key])
        )
    # On a shared machine wall-clock req/s swings with the neighbours' load;
    # requests per CPU-second of the server process is the steadier measure.
    print(
        f"\n{'':4}{'server':44}{'req/s':>9}{'vs a':>6}{'p99 ms':>9}{'vs a':>6}"
        f"{'req/cpu-s':>11}{'vs a':>6}{'503':>7}"
    )
    for key in PATHS:
        print(
            f"({key}) {NAMES[key]:44}{rps[key]:>9,.0f}{rps[key] / rps['a']:>6.2f}"
            f"{p99[key] * 1000:>9.2f}{p99[key] / p99['a']:>6.2f}"
            f"{per_cpu[key]:>11,.0f}{per_cpu[key] / per_cpu['a']:>6.2f}{shed[key]:>7,}"
        )
    print(
        f"\np99 b/a = {p99['b'] / p99['a']:.2f}   (issue 17: bar 3, goal 1.5); "
        "503: answers shed by admission in the measured runs"
    )
    print(
        f"\nb/a = {rps['b'] / rps['a']:.2f} by req/s, {per_cpu['b'] / per_cpu['a']:.2f} by "
        "req/cpu-s   (bar 0.5, goal 0.7)"
    )
    print(
        f"c/a = {rps['c'] / rps['a']:.2f} by req/s, {per_cpu['c'] / per_cpu['a']:.2f} by "
        "req/cpu-s   (goal 0.5)"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    main()
