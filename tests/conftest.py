"""Test plumbing: ``async def`` tests run on a virtual clock by default.

A test that asks for the ``clock`` fixture gets the VirtualClock its loop
runs on, to pass to ``App(clock=...)`` and to assert exact times. Tests
marked ``@pytest.mark.realtime`` run on a plain asyncio loop instead (for
real sockets, processes and threads that must take real time).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from surge import VirtualClock


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    fn = pyfuncitem.obj
    if not inspect.iscoroutinefunction(fn):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs: dict[str, Any] = {name: pyfuncitem.funcargs[name] for name in names}
    if pyfuncitem.get_closest_marker("realtime"):
        with asyncio.Runner() as runner:
            runner.run(fn(**kwargs))
    else:
        vclock = kwargs.get("clock")
        if not isinstance(vclock, VirtualClock):
            vclock = VirtualClock()
        vclock.run(fn(**kwargs))
    return True
