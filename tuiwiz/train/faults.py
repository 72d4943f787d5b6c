"""Test seams: inject real failures into a running worker, so error handling is tested end to end.

TUIWIZ_FAULT=oom[@STEP]    raise a real torch.OutOfMemoryError when optimizer step STEP begins (default 2)
TUIWIZ_FAULT=data[@STEP]   the data collator raises DataError while building that step's batch
TUIWIZ_FAULT=enospc[@STEP] raise OSError(ENOSPC) on the checkpoints folder when optimizer step STEP begins
TUIWIZ_STEP_DELAY=SECONDS  sleep after every optimizer step (makes stop/kill tests deterministic)
None of these are set in normal use; they are documented in docs/runs.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FAULT_KINDS = ("oom", "data", "enospc")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int


def fault_from_env(env: dict[str, str] | None = None) -> Fault | None:
    raw = (env if env is not None else os.environ).get("TUIWIZ_FAULT", "").strip()
    if not raw:
        return None
    kind, _, step = raw.partition("@")
    if kind not in FAULT_KINDS:
        raise ValueError(f"TUIWIZ_FAULT={raw!r}: use {', '.join(k + '[@STEP]' for k in FAULT_KINDS)}")
    return Fault(kind, int(step) if step else 2)


def step_delay_from_env(env: dict[str, str] | None = None) -> float:
    raw = (env if env is not None else os.environ).get("TUIWIZ_STEP_DELAY", "").strip()
    return float(raw) if raw else 0.0
