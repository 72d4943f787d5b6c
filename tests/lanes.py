"""Which parameters of a measured sweep run by default and which only under `pytest --full`."""

from __future__ import annotations

from typing import Any, Callable

import pytest


def lane(cases: list[Any], quick: list[Any], ids: Callable[[Any], str] | None = None) -> list[Any]:
    """`cases` as pytest params: those in `quick` run by default, the others are marked `full`
    (deselected unless --full, see tests/conftest.py)."""
    return [pytest.param(c, id=ids(c) if ids else None, marks=() if c in quick else pytest.mark.full)
            for c in cases]
