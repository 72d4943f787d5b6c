"""End to end on CPU: a tiny local Llama trained by the real detached worker (bnb 4-bit + LoRA + trl)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuiwiz.preset import preset_from_dict
from tuiwiz.runs.control import stop_run
from tuiwiz.runs.events import DoneEvent, ErrorEvent, LogEvent, StartEvent, StoppedEvent, parse_event
from tuiwiz.runs.launcher import launch, resume
from tuiwiz.runs.paths import RunPaths
from tuiwiz.runs.status import is_live, last_checkpoint, summarize

from tiny_model import tiny_preset_dict, worker_env

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120.0


def _lines(paths: RunPaths) -> list[bytes]:
    data = paths.events.read_bytes() if paths.events.exists() else b""
    return data.split(b"\n")[:-1]


def _events(paths: RunPaths) -> list:
    return [parse_event(raw) for raw in _lines(paths)]  # every line must validate


def _wait(paths: RunPaths, until: str = "exit", step: int = 0) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if until == "exit" and paths.events.exists() and not is_live(paths):
            return
        if until == "step" and any(isinstance(e, LogEvent) and e.step >= step for e in _events(paths)):
            return
        time.sleep(0.2)
    tail = paths.log.read_text(errors="replace")[-3000:] if paths.log.exists() else "(no log)"
    pytest.fail(f"timed out waiting for {until} {step}; train.log tail:\n{tail}")


def test_detached_run_survives_its_launcher_and_reaches_done(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny
    preset_file = tmp_path / "preset.yaml"
    import yaml

    preset_file.write_text(yaml.safe_dump(tiny_preset_dict(model, data)))
    code = ("import sys, time; from tuiwiz.runs.cli import run_command; "
            f"run_command('launch', [{str(preset_file)!r}, '--runs-dir', {str(tmp_path / 'runs')!r}, "
            "'--run-id', 'detached']); print('launched', flush=True); time.sleep(600)")
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env={**worker_env(), "PYTHONPATH": str(REPO)})
    assert launcher.stdout is not None
    assert launcher.stdout.readline().strip() == b"detached"
    launcher.kill()  # the "terminal" goes away
    launcher.wait()
    paths = RunPaths(tmp_path / "runs" / "detached")
    _wait(paths)
    events = _events(paths)
    start = events[0]
    assert isinstance(start, StartEvent) and start.device == "cpu" and "CPU" in (start.note or "")
    assert start.versions["trl"] and start.versions["bitsandbytes"]
    assert start.config["resolved"]["param_dtypes"]["linear"].startswith("Params4bit")
    assert isinstance(events[-1], DoneEvent) and events[-1].step == start.total_steps == 6
    logs = [e for e in events if isinstance(e, LogEvent)]
    assert [e.step for e in logs] == list(range(1, 7))
    assert all(e.loss is not None and e.lr is not None and e.tokens_per_s for e in logs)
    assert any(e.event == "eval" for e in events) and any(e.event == "checkpoint" for e in events)
    assert (paths.adapter / "adapter_model.safetensors").exists()
    assert summarize(paths).state == "finished"
    assert "running on CPU" in paths.log.read_text()


def test_stop_checkpoints_and_resume_continues_the_step_count(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny
    preset = preset_from_dict(tiny_preset_dict(model, data, max_steps=8, save_steps=100, eval_steps=100))
    run = launch(preset, tmp_path, run_id="stopme", env=worker_env(TUIWIZ_STEP_DELAY="0.4"))
    _wait(run.paths, "step", 2)
    assert stop_run(run.paths, wait=60) == "stopped"
    events = _events(run.paths)
    stopped = events[-1]
    assert isinstance(stopped, StoppedEvent) and stopped.graceful and stopped.step is not None
    assert 2 <= stopped.step < 8
    ckpt = last_checkpoint(run.paths)
    assert ckpt is not None and ckpt.name == f"checkpoint-{stopped.step}"  # saved on stop, not on schedule
    assert (run.paths.adapter / "adapter_model.safetensors").exists()
    assert summarize(run.paths).state == "stopped"

    resume(run.paths, env=worker_env())
    _wait(run.paths)
    events = _events(run.paths)
    starts = [e for e in events if isinstance(e, StartEvent)]
    assert len(starts) == 2 and starts[1].start_step == stopped.step and starts[1].resumed_from
    after = [e.step for e in events[events.index(starts[1]):] if isinstance(e, LogEvent)]
    assert after == list(range(stopped.step + 1, 9))
    assert isinstance(events[-1], DoneEvent) and events[-1].step == 8
    assert summarize(run.paths).state == "finished"


@pytest.mark.parametrize("fault,kind", [("oom", "oom"), ("data", "data")])
def test_injected_faults_are_classified(tiny: tuple[Path, Path], tmp_path: Path, fault: str, kind: str) -> None:
    model, data = tiny
    preset = preset_from_dict(tiny_preset_dict(model, data))
    run = launch(preset, tmp_path, run_id=f"fault-{fault}", env=worker_env(TUIWIZ_FAULT=f"{fault}@3"))
    _wait(run.paths)
    events = _events(run.paths)
    err = events[-1]
    assert isinstance(err, ErrorEvent) and err.kind == kind and err.step == 2
    assert summarize(run.paths).state == "failed"
    if kind == "oom":
        assert err.smaller_plan is not None
        assert err.smaller_plan["micro_batch_size"] == 1 and err.smaller_plan["grad_accum"] == 2
    else:
        assert err.smaller_plan is None


def test_sigkill_mid_run_leaves_only_whole_lines_and_reads_stale(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny
    preset = preset_from_dict(tiny_preset_dict(model, data, max_steps=50, logging_steps=1))
    run = launch(preset, tmp_path, run_id="killed", env=worker_env())
    _wait(run.paths, "step", 3)
    os.killpg(os.getpgid(run.pid), signal.SIGKILL)
    deadline = time.monotonic() + 20
    while is_live(run.paths) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run.paths.events.read_bytes().endswith(b"\n")
    events = _events(run.paths)  # raises if any line is torn
    assert not any(e.event in ("done", "error", "stopped") for e in events)
    assert summarize(run.paths).state == "stale"


def test_attach_shows_the_finished_curve(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from waiting import wait_for

    from tuiwiz.tui.monitor import MonitorApp, MonitorScreen

    model, data = tiny
    run = launch(preset_from_dict(tiny_preset_dict(model, data)), tmp_path, run_id="shown", env=worker_env())
    _wait(run.paths)

    async def scenario() -> tuple[str, int, int, str, str]:
        app = MonitorApp(run.paths, gpu_reader=lambda: [], poll_s=0.05)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen.view.state == "finished"
                           and not app.screen._dirty, "the finished run on screen")
            screen = app.screen
            title = str(screen.query_one("#title").render())
            stats = str(screen.query_one("#stats").render())
            out = (screen.view.state, len(screen.view.train_curve), len(screen.view.eval_curve), title, stats)
            await pilot.press("q")
        return out

    state, n_train, n_eval, title, stats = asyncio.run(scenario())
    assert state == "finished" and n_train == 6 and n_eval >= 1
    assert "FINISHED" in title and "loss" in stats
