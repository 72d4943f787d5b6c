"""status.json (written atomically by the worker) and the run's effective state.

Liveness comes from an exclusive `flock` on RUN_DIR/.lock held by the worker for its
whole life (taken by the launcher and inherited), not from the pid alone: a lock dies
with its process, so a reused pid or an unreaped zombie never looks alive.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tuiwiz.atomic import write_text_atomic
from tuiwiz.runs.events import EvalEvent, LogEvent, StartEvent, iter_events
from tuiwiz.runs.paths import RunPaths

State = Literal["running", "finished", "failed", "stopped", "stale"]
_TERMINAL_STATE = {"done": "finished", "error": "failed", "stopped": "stopped"}


class RunStatus(BaseModel):
    """The worker's own view, rewritten atomically at every event and heartbeat."""

    model_config = ConfigDict(extra="ignore")

    run_id: str
    pid: int | None = None
    state: State = "running"
    heartbeat: float | None = None
    launched_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    device: str | None = None
    stop_requested_at: float | None = None
    message: str | None = None
    cpu: bool = False  # launched as a CPU run (resume does the same unless told otherwise)
    online: bool = False  # the worker may download from the Hugging Face Hub


def write_status(paths: RunPaths, status: RunStatus) -> None:
    write_text_atomic(paths.status, status.model_dump_json(indent=1) + "\n", force=True)


def read_status(paths: RunPaths) -> RunStatus | None:
    try:
        return RunStatus.model_validate(json.loads(paths.status.read_text(encoding="utf-8")))
    except (FileNotFoundError, ValueError):
        return None


_UPDATE_LOCK = threading.Lock()  # the worker's heartbeat thread and callbacks both update


def update_status(paths: RunPaths, **changes: Any) -> RunStatus:
    """Read-modify-write status.json (atomic replace; serialised within this process)."""
    with _UPDATE_LOCK:
        cur = read_status(paths) or RunStatus(run_id=paths.run_id)
        new = cur.model_copy(update=changes)
        write_status(paths, new)
        return new


def take_lock(paths: RunPaths) -> int | None:
    """An fd holding the run's exclusive lock, or None if a live process holds it."""
    paths.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_live(paths: RunPaths) -> bool:
    """True while a worker (or its accelerate parent) of this run is alive."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class RunSummary(BaseModel):
    """One row of `tuiwiz runs` (and `--json`)."""

    run_id: str
    path: str
    state: State
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    age_s: float | None = None
    pid: int | None = None
    message: str | None = None

    @property
    def progress(self) -> float | None:
        if not self.total_steps:
            return None
        return min(1.0, self.step / self.total_steps)


def _exiting(last_terminal: str | None, ended: float | None, status: RunStatus | None) -> bool:
    """A live lock whose holder already wrote its last event: the worker is on its way out.

    The worker writes `done` / `error` / `stopped`, then exits and only then drops the lock, so
    for a moment both are true. `done` is final (a finished run is never resumed); after
    `error` or `stopped` the holder may be a resume in flight, which the launcher stamps
    (launched_at) after that event: then the run is running again.
    """
    if last_terminal == "done":
        return True
    if last_terminal is None or ended is None or status is None or status.launched_at is None:
        return False
    return status.launched_at < ended


def summarize(paths: RunPaths, now: float | None = None) -> RunSummary:
    """State from the event log (authoritative) + lock liveness; status.json fills gaps."""
    now = time.time() if now is None else now
    status = read_status(paths)
    last_terminal: str | None = None
    message: str | None = None
    step = 0
    total: int | None = None
    loss = eval_loss = None
    started = ended = None
    for ev in iter_events(paths.events):
        if isinstance(ev, StartEvent):
            total, started = ev.total_steps, started or ev.t
            step = max(step, ev.start_step)
            last_terminal = None  # a resume reopens the run
        elif isinstance(ev, LogEvent):
            step = max(step, ev.step)
            loss = ev.loss if ev.loss is not None else loss
        elif isinstance(ev, EvalEvent):
            eval_loss = ev.eval_loss
        elif ev.event in _TERMINAL_STATE:
            last_terminal, ended = ev.event, ev.t
            if ev.event == "error":
                message = f"{ev.kind}: {ev.message}"  # type: ignore[union-attr]
            if getattr(ev, "step", None) is not None:
                step = max(step, ev.step)  # type: ignore[union-attr]
    live = is_live(paths)
    state: State
    if live and not _exiting(last_terminal, ended, status):
        state = "running"
    elif last_terminal is not None:
        state = _TERMINAL_STATE[last_terminal]  # type: ignore[assignment]
        live = False
    elif status is not None and status.state in ("finished", "failed", "stopped"):
        state = status.state
    else:
        state = "stale"
        message = "worker is gone without a done, error or stopped event; see train.log"
    if started is None and status is not None:
        started = status.started_at or status.launched_at
    return RunSummary(
        run_id=paths.run_id,
        path=str(paths.root),
        state=state,
        step=step,
        total_steps=total if total is not None else (status.total_steps if status else None),
        loss=loss,
        eval_loss=eval_loss,
        started_at=started,
        ended_at=ended if not live else None,
        age_s=(now - started) if started else None,
        pid=status.pid if status else None,
        message=message or (status.message if status and state == "failed" else None),
    )


def last_checkpoint(paths: RunPaths) -> Path | None:
    """The newest `checkpoint-N` folder with a trainer_state.json (i.e. completely saved)."""
    if not paths.checkpoints.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for d in paths.checkpoints.iterdir():
        if d.is_dir() and d.name.startswith("checkpoint-") and (d / "trainer_state.json").exists():
            try:
                n = int(d.name.split("-", 1)[1])
            except ValueError:
                continue
            if best is None or n > best[0]:
                best = (n, d)
    return best[1] if best else None
