"""What a run looks like so far, folded from its events: the monitor's model, without Textual.

`RunView.apply(event)` is a pure fold over the events.jsonl stream (replayed from the start,
then followed), so the same view comes out of a live run, a finished one and a re-attach,
and it is tested without a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tuiwiz.runs.events import (
    CheckpointEvent, DoneEvent, ErrorEvent, EvalEvent, Event, LogEvent, MemoryEvent, ReplanEvent, StartEvent,
    StoppedEvent,
)

RunState = Literal["waiting", "running", "finished", "stopped", "failed"]

#: LogEvent fields that carry over until the next log that has them.
_LOGGED = ("loss", "lr", "tokens_per_s", "samples_per_s", "eta_s", "mem_allocated_gib", "mem_reserved_gib",
           "mem_peak_gib")


@dataclass
class RunView:
    """Everything the monitor shows about one run, as of the last event applied."""

    run_id: str = ""
    device: str = "-"
    total_steps: int = 0
    step: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    mem_allocated_gib: float | None = None
    mem_reserved_gib: float | None = None
    mem_peak_gib: float | None = None
    plan_peak_gib: float | None = None  # the plan's driver-level peak: compare with NVML, never with torch's
    plan_allocated_gib: float | None = None  # the plan's allocated: compare with torch's mem_peak_gib
    state: RunState = "waiting"
    note: str = ""
    error: ErrorEvent | None = None
    last_checkpoint: str | None = None
    #: the latest `memory` event (the probe's, then the end's): measured next to the estimate
    memory: MemoryEvent | None = None
    attempt: int = 1
    replans: list[ReplanEvent] = field(default_factory=list)
    #: (step, loss) points; a resume drops the points after the step it resumed from
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)

    def apply(self, ev: Event) -> None:
        """Fold one event into the view."""
        if isinstance(ev, StartEvent):
            self._start(ev)
        elif isinstance(ev, LogEvent):
            self._log(ev)
        elif isinstance(ev, EvalEvent):
            self.eval_loss = ev.eval_loss
            self.eval_curve = [p for p in self.eval_curve if p[0] < ev.step] + [(ev.step, ev.eval_loss)]
        elif isinstance(ev, CheckpointEvent):
            self.last_checkpoint = ev.path
        elif isinstance(ev, DoneEvent):
            self.state, self.step, self.eta_s = "finished", ev.step, 0.0
            if ev.peak_gib is not None:
                self.mem_peak_gib = ev.peak_gib
        elif isinstance(ev, StoppedEvent):
            self.state = "stopped"
            self.step = ev.step if ev.step is not None else self.step
        elif isinstance(ev, ErrorEvent):
            self.state, self.error = "failed", ev
            if ev.peak_gib is not None:
                self.mem_peak_gib = ev.peak_gib
        elif isinstance(ev, MemoryEvent):
            self.memory = ev
        elif isinstance(ev, ReplanEvent):
            self._replan(ev)

    def _start(self, ev: StartEvent) -> None:
        self.run_id, self.device, self.total_steps = ev.run_id, ev.device, ev.total_steps
        self.step = max(self.step, ev.start_step) if not ev.resumed_from else ev.start_step
        self.plan_peak_gib = ev.config.get("plan_peak_gib", self.plan_peak_gib)
        self.plan_allocated_gib = ev.config.get("plan_allocated_gib", self.plan_allocated_gib)
        self.state, self.error, self.note = "running", None, ev.note or ""
        self.attempt = ev.attempt
        if ev.resumed_from:
            self.note = f"resumed from step {ev.start_step}"

    def _replan(self, ev: ReplanEvent) -> None:
        """A relaunch with the next plan; from step 0 it is a new curve (the failed attempt's is gone)."""
        self.replans.append(ev)
        self.attempt = ev.attempt
        if ev.resume_from is None:
            self.step, self.train_curve, self.eval_curve = 0, [], []
            self.memory = self.mem_peak_gib = self.mem_allocated_gib = self.mem_reserved_gib = None

    def _log(self, ev: LogEvent) -> None:
        self.step = ev.step
        for name in _LOGGED:
            value = getattr(ev, name)
            if value is not None:
                setattr(self, name, value)
        if ev.loss is not None:
            self.train_curve = [p for p in self.train_curve if p[0] < ev.step] + [(ev.step, ev.loss)]

    def fold(self, events: list[Event]) -> "RunView":
        """Apply `events` in order; returns self so a view can be built in one expression."""
        for ev in events:
            self.apply(ev)
        return self


# ---- estimate against measurement, level by level ------------------------------------------

#: (label, measured field, estimate field): torch's allocated against the estimate's allocated,
#: reserved against reserved, and the process's NVML reading against the driver-level peak.
LEVELS = (("allocated", "allocated_gib", "allocated_gib"), ("reserved", "reserved_gib", "reserved_gib"),
          ("driver peak", "nvml_gib", "peak_gib"))


def memory_levels(ev: MemoryEvent) -> list[tuple[str, float | None, float | None]]:
    """(level, measured GiB, estimated GiB) at each level; None where one side is unknown."""
    est = ev.estimate
    return [(label, getattr(ev.measured, m), getattr(est, e) if est is not None else None) for label, m, e in LEVELS]


def vs_plan(measured: float | None, estimate: float | None) -> float | None:
    """measured / estimate - 1 at one level (None when either is unknown)."""
    if measured is None or not estimate:
        return None
    return measured / estimate - 1


def memory_summary(ev: MemoryEvent) -> tuple[str, str]:
    """(which step, what it measured against the plan), e.g. (`step 1 (worst case, 4096 tokens)`,
    `allocated 13.1/12.8 GiB +2%, driver peak 14.9/15.3 GiB -3%`): measured/plan at the same level.
    Each part fits 70 columns; on CPU the second says there is nothing to measure."""
    what = "worst case" if ev.probe else "end"
    tokens = f", {ev.batch_tokens} tokens" if ev.batch_tokens is not None else ""
    head = f"step {ev.step} ({what}{tokens})"
    parts = []
    for label, measured, estimate in memory_levels(ev):
        if label == "reserved" or measured is None:
            continue
        ratio = vs_plan(measured, estimate)
        plan = f"/{estimate:.1f}" if estimate is not None else ""
        parts.append(f"{label} {measured:.1f}{plan} GiB" + (f" {ratio * 100:+.0f}%" if ratio is not None else ""))
    if not parts:
        return head, f"no GPU memory measured ({'CPU run' if ev.gpu is None else 'no reading'})"
    return head, ", ".join(parts)
