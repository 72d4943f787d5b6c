"""Wait on a condition with a deadline instead of a fixed sleep."""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest


async def wait_for(pilot: Any, predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Let a Textual app run until `predicate()` holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.05)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """The same for plain code: poll `predicate()` every 20 ms until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)
