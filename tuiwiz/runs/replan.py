"""Relaunch a run that ran out of GPU memory with its next plan, in the same run directory.

The worker's `error` event after an OOM carries the next plan (`smaller_plan`: the same
effective batch in smaller steps, corrected by the measured overshoot, tuiwiz.planning.replan).
`relaunch_with_next_plan` is the one way to act on it, for `tuiwiz launch --auto-replan` and
the monitor's relaunch key alike:

- it appends a `replan` event (attempt number, the new knobs, what changed, the overshoot),
- rewrites the run's preset.yaml with the new knobs (and their estimate),
- and starts the worker again in the same directory: from the last checkpoint when there is
  one (the effective batch is the same, so the step count and the data order carry over),
  else from step 0. Its `start` event says `attempt: N`.

So one run id holds every attempt, and its events read: start, error (oom), replan, start,
memory (probe), ... done. `wait_for_probe` follows a run until its first step has passed or
failed, which is what `--auto-replan` waits on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

from tuiwiz.errors import UserError
from tuiwiz.preset import EstimateInfo, Preset, load_preset, save_preset
from tuiwiz.runs.events import (DoneEvent, ErrorEvent, Event, EventFollower, EventWriter, MemoryEvent, ReplanEvent,
                                StartEvent, StoppedEvent, read_events)
from tuiwiz.runs.launcher import LaunchedRun, absolute, resume
from tuiwiz.runs.paths import RunPaths
from tuiwiz.runs.status import is_live, last_checkpoint

#: `tuiwiz launch --auto-replan` relaunches at most this many times (three attempts in all).
MAX_AUTO_REPLANS = 2


def pending_oom(events: list[Event]) -> ErrorEvent | None:
    """The OOM error that ended the run's latest attempt, when it carries a next plan."""
    last: Event | None = None
    for ev in events:
        if isinstance(ev, (StartEvent, ReplanEvent, ErrorEvent, DoneEvent, StoppedEvent)):
            last = ev
    if isinstance(last, ErrorEvent) and last.kind == "oom" and last.smaller_plan:
        return last
    return None


def knob_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    """knob -> [before, after] for every knob that differs."""
    return {k: [before.get(k), v] for k, v in after.items() if before.get(k) != v}


def reestimated(preset: Preset, knobs: Any) -> EstimateInfo | None:
    """The preset's estimate for new knobs (same budget); None when the model cannot be read offline."""
    from tuiwiz.models import resolve_model
    from tuiwiz.planning.memory import GIB, estimate_memory

    if preset.estimate is None:
        return None
    try:
        spec = resolve_model(preset.model.path or preset.model.id)
    except UserError:
        return None
    est = estimate_memory(spec, knobs, preset.hardware.count * preset.hardware.nodes)
    budget = preset.estimate.budget_gib
    return EstimateInfo(peak_gib=round(est.peak_gib, 3), allocated_gib=round(est.allocated_gib, 3),
                        budget_gib=budget, fits=est.peak_bytes <= budget * GIB, breakdown_gib=est.breakdown_gib())


def relaunch_with_next_plan(run: RunPaths, *, env: dict[str, str] | None = None, auto: bool = False) -> LaunchedRun:
    """Start `run` again with the next plan of its OOM error (module docstring). Refused (UserError)
    when the run is live, did not end in an OOM with a next plan, or would resume a checkpoint
    whose examples the next plan changes (a shorter cutoff)."""
    from tuiwiz.planning.knobs import knobs_from

    paths = RunPaths(absolute(run.root))
    if is_live(paths):
        raise UserError(f"run {paths.run_id} is still live; there is nothing to relaunch yet.", field="run")
    events = read_events(paths.events)
    err = pending_oom(events)
    if err is None or err.smaller_plan is None:
        raise UserError(f"run {paths.run_id} did not end in an out-of-memory error with a next plan; "
                        "nothing to re-plan.", field="run")
    preset = load_preset(paths.preset)
    new = knobs_from(err.smaller_plan)
    before = preset.training.model_dump(mode="json")
    ckpt = last_checkpoint(paths)
    if ckpt is not None and new.cutoff_len != preset.training.cutoff_len:
        raise UserError(f"run {paths.run_id}: the next plan shortens cutoff_len to {new.cutoff_len}, which changes "
                        f"the examples its checkpoint {ckpt.name} was trained on; launch that plan as a new run.",
                        field="cutoff_len")
    attempt = 2 + sum(isinstance(e, ReplanEvent) for e in events)
    save_preset(preset.model_copy(update={"training": new, "estimate": reestimated(preset, new)}), paths.preset,
                force=True)
    with EventWriter(paths.events) as writer:
        writer.write(ReplanEvent(attempt=attempt, knobs=new.model_dump(mode="json"),
                                 changed=knob_changes(before, new.model_dump(mode="json")),
                                 overshoot_gib=err.overshoot_gib, resume_from=str(ckpt) if ckpt else None, auto=auto))
    try:
        return resume(paths, env=env, fresh=ckpt is None)
    except BaseException:
        save_preset(preset, paths.preset, force=True)  # the attempt never started: the old plan stands
        raise


# ---- following a run until its first step ---------------------------------------------

Outcome = Literal["passed", "oom", "failed", "finished", "stopped", "stale"]


@dataclass(frozen=True)
class ProbeResult:
    """How a (re)start's first step went: `passed` (its memory event), an `oom`, or how the run ended."""

    outcome: Outcome
    memory: MemoryEvent | None = None
    error: ErrorEvent | None = None


def _result(ev: Event) -> ProbeResult | None:
    if isinstance(ev, MemoryEvent) and ev.probe:
        return ProbeResult("passed", memory=ev)
    if isinstance(ev, ErrorEvent):
        return ProbeResult("oom" if ev.kind == "oom" and ev.probe else "failed", error=ev)
    if isinstance(ev, DoneEvent):
        return ProbeResult("finished")
    if isinstance(ev, StoppedEvent):
        return ProbeResult("stopped")
    return None


def wait_until_exited(paths: RunPaths, *, timeout: float = 120.0, poll_s: float = 0.2,
                      sleep: Callable[[float], None] = time.sleep) -> bool:
    """Wait for the run's worker to let go of its lock (it exits right after its last event)."""
    deadline = time.monotonic() + timeout
    while is_live(paths):
        if time.monotonic() > deadline:
            return False
        sleep(poll_s)
    return True


def wait_for_probe(paths: RunPaths, follower: EventFollower, *, poll_s: float = 0.5,
                   sleep: Callable[[float], None] = time.sleep) -> ProbeResult:
    """Follow `follower` (on the run's events.jsonl) until the current start's first step passes or
    the attempt ends. The worker writes its last event before it lets go of the run's lock, so a
    run found not live is read once more before it counts as stale."""
    while True:
        live = is_live(paths)
        for ev in follower.poll():
            result = _result(ev)
            if result is not None:
                return result
        if not live:
            return ProbeResult("stale")
        sleep(poll_s)
