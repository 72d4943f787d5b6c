"""The plan to relaunch with after an out-of-memory error, corrected by what the failure measured.

Pure: no torch, no I/O. The training worker calls `next_plan` when a step runs out of GPU
memory and puts the result in its `error` event; `tuiwiz launch --auto-replan` and the
monitor relaunch with it (`tuiwiz.runs.replan`).

The advisor's `smaller_plan` keeps the effective batch and takes one step down (half the
micro-batch and twice the accumulation; at micro-batch 1 checkpointing on; then a shorter
cutoff). Without a measurement the next plan is that one step. With one, the failed plan
needed at least `needed_bytes` (what the process held when it failed plus the allocation
that failed beyond the free memory), so the estimate missed at least `needed - estimate`.
Those missed bytes are taken to grow with the batch, like the activations and logits they
most likely belong to (parameter, adapter and optimizer bytes are exact), so a candidate's
corrected peak is

    estimate(candidate) + missed * dynamic(candidate) / dynamic(failed plan)

and the walk takes as many steps as it needs (at most `MAX_MOVES`) until that fits the budget:
a large overshoot skips steps instead of failing once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuiwiz.models import ModelSpec
from tuiwiz.planning.advisor import smaller_plan
from tuiwiz.planning.knobs import TrainingKnobs
from tuiwiz.planning.memory import MemoryEstimate, estimate_memory

#: Steps down the advisor can take in one re-plan (micro-batch 64 -> 1 is six halvings).
MAX_MOVES = 8
#: The groups whose bytes grow with the micro-batch (what the missed bytes are scaled with).
DYNAMIC_GROUPS = ("activations", "logits")


@dataclass(frozen=True)
class NextPlan:
    """The knobs to relaunch with, and how they were reached."""

    knobs: TrainingKnobs
    moves: int  # smaller_plan steps taken
    #: the candidate's estimate corrected by the measured miss (None: nothing was measured)
    corrected_peak_bytes: int | None = None
    fits: bool | None = None  # whether the corrected peak fits the budget (None: not measured)


def dynamic_bytes(est: MemoryEstimate) -> int:
    """The bytes of an estimate that grow with the micro-batch."""
    return sum(b for g, b in est.breakdown_bytes().items() if g in DYNAMIC_GROUPS)


def corrected_peak(candidate: MemoryEstimate, failed: MemoryEstimate, missed_bytes: int) -> int:
    """`candidate`'s peak plus the failed plan's missed bytes, scaled by their dynamic bytes."""
    base = dynamic_bytes(failed)
    share = dynamic_bytes(candidate) / base if base > 0 else 1.0
    return candidate.peak_bytes + round(missed_bytes * share)


def next_plan(spec: ModelSpec, knobs: TrainingKnobs, *, gpus: int = 1, budget_bytes: int | None = None,
              needed_bytes: int | None = None) -> NextPlan:
    """The plan after `knobs` ran out of memory: the same effective batch in smaller steps.

    `needed_bytes` is what the failed step needed at least, at the driver level (None when
    the failure measured nothing, e.g. on CPU): then the next plan is one `smaller_plan` step.
    """
    first = smaller_plan(knobs)
    if needed_bytes is None or budget_bytes is None:
        return NextPlan(first, 1)
    failed = estimate_memory(spec, knobs, gpus)
    missed = max(0, needed_bytes - failed.peak_bytes)
    current, moves = knobs, 0
    peak = failed.peak_bytes + missed
    while moves < MAX_MOVES:
        candidate = smaller_plan(current)
        if candidate == current:
            break
        current, moves = candidate, moves + 1
        peak = corrected_peak(estimate_memory(spec, current, gpus), failed, missed)
        if peak <= budget_bytes:
            break
    return NextPlan(current, moves, peak, peak <= budget_bytes)
