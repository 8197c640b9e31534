"""How much memory the process holds: a handler that leaks shows here.

A handler that keeps what it should drop (a cache without a bound, a list
that only grows) slows nothing at first: the other subscriptions keep
their throughput until the kernel's OOM killer or the container's limit
ends the process. What the app can do is show the growth before that.
``App.statistics().resident_memory`` is the process's resident set size
in bytes, read when asked, and the metrics export it as
``surge_resident_memory_bytes`` (summed over the live worker processes).

Read from ``/proc/self/statm`` (Linux, where surge's workers run); None
where there is no such file. Not from ``resource.getrusage``: its
``ru_maxrss`` is the peak, which never comes down after a release.
"""

from __future__ import annotations

import os

__all__ = ("resident_memory",)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_memory() -> int | None:
    """The resident set size of this process in bytes, or None where the
    platform does not tell (no ``/proc``). About 6 us a call."""
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        return None
    try:
        # size resident shared text lib data dt, in pages
        return int(os.read(fd, 256).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(fd)
