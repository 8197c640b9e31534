"""A network namespace joined to this one by a veth pair, for partitions.

``veth_namespace()`` makes a namespace and a veth pair with names of its own
(``surge-<hex>``, ``sgh<hex>`` here and ``sgn<hex>`` inside), addresses
``10.213.x.1`` here and ``10.213.x.2`` inside (``x`` a /30 no interface
here uses yet), and removes them on exit, even when the test failed.
Processes started with ``ns.command(...)`` (``ip netns exec``, which execs:
the pid is the program's) reach this side only through the pair.

- ``cut()`` takes this side's end down: the namespace's end loses its
  carrier and drops what its processes send, silently, with no reset and
  no error (their routes stay), so they see a blackhole: TCP retransmits,
  connects time out. This side's replies to ``10.213.x.2`` meet a
  blackhole route (metric 4242, under the link's own while it is up), not
  the default route out of the machine.
- ``heal()``: the link up again; connections still open flow on.

It needs CAP_NET_ADMIN (CI runs as root); without it, it fails with the
reason, never skips.
"""

from __future__ import annotations

import contextlib
import random
import re
import secrets
import subprocess
from collections.abc import Iterator

__all__ = ("IP", "VethNamespace", "veth_namespace")

IP = "/usr/sbin/ip"


def _ip(*args: str) -> None:
    done = subprocess.run([IP, *args], capture_output=True, timeout=10, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"ip {' '.join(args)} failed ({done.returncode}): "
            f"{done.stderr.decode(errors='replace').strip()}"
        )


def _free_net() -> int:
    """An ``x`` with no address in 10.213.x.0/24 on this side."""
    done = subprocess.run(
        [IP, "-o", "-4", "addr"], capture_output=True, timeout=10, check=True, text=True
    )
    used = {int(m) for m in re.findall(r"inet 10\.213\.(\d+)\.", done.stdout)}
    free = [x for x in range(256) if x not in used]
    if not free:
        raise RuntimeError("every 10.213.x.0/24 has an address here: no room for a veth pair")
    return random.choice(free)


class VethNamespace:
    """A namespace and its veth pair (see the module docstring)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"surge-{tag}"
        self.host_if = f"sgh{tag}"
        self.inside_if = f"sgn{tag}"
        x = _free_net()
        self.host = f"10.213.{x}.1"
        """This side's address: what processes inside connect to."""
        self.inside = f"10.213.{x}.2"
        self.net = f"10.213.{x}.0/30"
        self.cut_now = False

    def create(self) -> None:
        try:
            _ip("netns", "add", self.name)
        except RuntimeError as exc:
            raise RuntimeError(
                f"cannot make a network namespace for the partition test (it needs root "
                f"or CAP_NET_ADMIN, and {IP}): {exc}"
            ) from exc
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.inside_if,
            "netns", self.name)  # fmt: skip
        _ip("addr", "add", f"{self.host}/30", "dev", self.host_if)
        _ip("route", "add", "blackhole", self.net, "metric", "4242")
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.inside}/30", "dev", self.inside_if)
        _ip("-n", self.name, "link", "set", self.inside_if, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")

    def remove(self) -> None:
        """Remove the pair, the route and the namespace; raise afterwards
        if any of it failed (what exists is removed all the same)."""
        problems = []
        for args in (
            ("link", "del", self.host_if),  # its peer goes with it
            ("route", "del", "blackhole", self.net, "metric", "4242"),
            ("netns", "del", self.name),
        ):
            try:
                _ip(*args)
            except RuntimeError as exc:
                problems.append(str(exc))
        # a step that failed because an earlier one already removed its
        # object is no problem: what counts is that nothing is left
        left = subprocess.run(
            [IP, "netns", "list"], capture_output=True, timeout=10, check=False, text=True
        ).stdout
        links = subprocess.run(
            [IP, "-o", "link"], capture_output=True, timeout=10, check=False, text=True
        ).stdout
        if self.name in left or f"{self.host_if}@" in links:
            raise RuntimeError(f"namespace {self.name} not removed: {problems}")

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace."""
        return [IP, "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        """The link down: a blackhole both ways (see the module docstring)."""
        _ip("link", "set", self.host_if, "down")
        self.cut_now = True

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")
        self.cut_now = False


@contextlib.contextmanager
def veth_namespace() -> Iterator[VethNamespace]:
    """A :class:`VethNamespace`, created, removed on exit."""
    ns = VethNamespace()
    try:
        ns.create()
        yield ns
    finally:
        ns.remove()
