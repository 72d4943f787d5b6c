"""Two processes on one machine through the accelerate config `tuiwiz launch` writes (gloo on CPU):
the same code path as a 2-GPU DDP run, launcher to worker to events, stopped and resumed.

The truth: accelerate's own launcher starts the ranks (their pid files and the start event's
world size say two ran), the event log the monitor reads, and the checkpoint the resume used.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tuiwiz.preset import preset_from_dict
from tuiwiz.runs.control import stop_run
from tuiwiz.runs.events import DoneEvent, LogEvent, StartEvent, StoppedEvent, parse_event
from tuiwiz.runs.launcher import launch, resume
from tuiwiz.runs.paths import RunPaths
from tuiwiz.runs.status import is_live, last_checkpoint, summarize

from tiny_model import tiny_preset_dict, worker_env

pytestmark = pytest.mark.slow
TIMEOUT = 240.0


#: Enough steps, each slowed down, that the stop lands mid-run even on a loaded machine.
STEPS = 4


def _events(paths: RunPaths) -> list:
    data = paths.events.read_bytes() if paths.events.exists() else b""
    return [parse_event(raw) for raw in data.split(b"\n")[:-1]]


def _wait(paths: RunPaths, done, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.2)
    tail = paths.log.read_text(errors="replace")[-4000:] if paths.log.exists() else "(no log)"
    pytest.fail(f"timed out waiting for {what}; train.log tail:\n{tail}")


def test_two_process_run_through_the_generated_config_stops_and_resumes(tiny: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    model, data = tiny
    d = tiny_preset_dict(model, data, max_steps=STEPS, save_steps=100, eval_steps=100, val_ratio=0.0,
                         micro_batch_size=1)
    d["hardware"]["count"] = 2
    run = launch(preset_from_dict(d), tmp_path, run_id="two", cpu=True, env=worker_env(TUIWIZ_STEP_DELAY="2.0"))
    assert run.argv[1:5] == ("-m", "accelerate.commands.launch", "--config_file",
                             str(run.paths.root / "accelerate.yaml"))
    _wait(run.paths, lambda: any(isinstance(e, LogEvent) for e in _events(run.paths)), "step 1")
    assert stop_run(run.paths, wait=120) == "stopped"
    events = _events(run.paths)
    start, stopped = events[0], events[-1]
    assert isinstance(start, StartEvent) and start.world_size == 2
    assert isinstance(stopped, StoppedEvent) and stopped.graceful and 1 <= stopped.step < STEPS
    assert sorted(p.name for p in (run.paths.root / "workers").glob("*.pid")) == ["0.pid", "1.pid"]
    ckpt = last_checkpoint(run.paths)
    assert ckpt is not None and ckpt.name == f"checkpoint-{stopped.step}"  # both ranks stopped at one step
    assert summarize(run.paths).state == "stopped"

    again = resume(run.paths, env=worker_env())
    assert "--resume" in again.argv
    _wait(run.paths, lambda: not is_live(run.paths) and isinstance(_events(run.paths)[-1], (DoneEvent,)),
          "the resumed run to finish")
    events = _events(run.paths)
    starts = [e for e in events if isinstance(e, StartEvent)]
    assert len(starts) == 2 and starts[1].start_step == stopped.step and starts[1].resumed_from == str(ckpt)
    logs = [e.step for e in events[events.index(starts[1]):] if isinstance(e, LogEvent)]
    assert logs == list(range(stopped.step + 1, STEPS + 1))  # rank 0 alone writes events: one line per step
    assert isinstance(events[-1], DoneEvent) and events[-1].step == STEPS
    assert (run.paths.adapter / "adapter_model.safetensors").exists()
    assert summarize(run.paths).state == "finished"
