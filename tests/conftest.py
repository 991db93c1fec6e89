"""Shared test configuration: hypothesis profiles and a deadline for every test.

``ci`` (the default) keeps the whole suite well under a minute on two cores and is
deterministic; ``dev`` explores more. Choose with ``HYPOTHESIS_PROFILE=dev``.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# A test that hangs must fail with the stacks of what it waits on, never stall the suite:
# each phase (setup, call, teardown) of a test gets CHARGEGW_TEST_TIMEOUT seconds.
# SIGALRM raises in the main thread, where the event loop runs; should the phase still
# not end, faulthandler ends the process a minute later with every thread's stack.
TEST_TIMEOUT = float(os.environ.get("CHARGEGW_TEST_TIMEOUT", "300"))


class PhaseTimeoutError(Exception):
    """A test's phase outran CHARGEGW_TEST_TIMEOUT."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    with contextlib.suppress(RuntimeError):
        for task in asyncio.all_tasks(asyncio.get_running_loop()):
            task.print_stack(limit=12, file=sys.stderr)
    raise PhaseTimeoutError(f"over {TEST_TIMEOUT:g} s (CHARGEGW_TEST_TIMEOUT); stacks on stderr")


@contextlib.contextmanager
def _deadline() -> Iterator[None]:
    if TEST_TIMEOUT <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    faulthandler.dump_traceback_later(TEST_TIMEOUT + 60, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _deadline():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _deadline():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    with _deadline():
        return (yield)
