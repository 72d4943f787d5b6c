"""What a run looks like so far, folded from its events: the monitor's model, without Textual.

`RunView.apply(event)` is a pure fold over the events.jsonl stream (replayed from the start,
then followed), so the same view comes out of a live run, a finished one and a re-attach,
and it is tested without a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tuiwiz.runs.events import (
    CheckpointEvent, DoneEvent, ErrorEvent, EvalEvent, Event, LogEvent, StartEvent, StoppedEvent,
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
    plan_peak_gib: float | None = None
    state: RunState = "waiting"
    note: str = ""
    error: ErrorEvent | None = None
    last_checkpoint: str | None = None
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

    def _start(self, ev: StartEvent) -> None:
        self.run_id, self.device, self.total_steps = ev.run_id, ev.device, ev.total_steps
        self.step = max(self.step, ev.start_step) if not ev.resumed_from else ev.start_step
        self.plan_peak_gib = ev.config.get("plan_peak_gib", self.plan_peak_gib)
        self.state, self.error, self.note = "running", None, ev.note or ""
        if ev.resumed_from:
            self.note = f"resumed from step {ev.start_step}"

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
