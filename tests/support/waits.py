"""Waiting on real peers: poll until something holds, bounded, never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest


def wait_until(check: Callable[[], Any], timeout: float, what: str | Callable[[], str], interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` s saying ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout:.0f} s: {detail}", pytrace=False)
        time.sleep(interval)


def settles(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.5) -> Any:
    """Run an asserting ``check`` until it passes; re-raise its last failure after ``timeout`` s.
    For snapshots of the queue that a forwarder attempt can catch mid-claim (rows inflight for a
    moment while the down node refuses the connection)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(interval)


def stays(check: Callable[[], bool], seconds: float, interval: float = 0.2) -> bool:
    """True when ``check`` holds throughout ``seconds`` (for "nothing else arrives" assertions)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not check():
            return False
        time.sleep(interval)
    return check()
