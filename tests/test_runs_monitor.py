"""The monitor screen on synthetic event logs (Textual Pilot; no training, no torch)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuiwiz.runs.events import ErrorEvent, EvalEvent, EventWriter, LogEvent, StartEvent
from tuiwiz.runs.paths import RunPaths
from tuiwiz.runs.status import RunStatus, take_lock, write_status
from tuiwiz.runs.view import RunView
from tuiwiz.tui.monitor import MonitorApp, MonitorScreen, tail_lines
from tuiwiz.tui.screens.modals import ConfirmScreen, ErrorScreen
from waiting import wait_for

KNOBS = {"micro_batch_size": 4, "grad_accum": 4}
START = StartEvent(run_id="m", pid=1, device="cuda", versions={},
                   config={"plan_peak_gib": 10.0, "plan_allocated_gib": 10.0}, total_steps=20,
                   train_samples=10, eval_samples=1)


def _run(tmp_path: Path, *events: Any) -> RunPaths:
    paths = RunPaths(tmp_path / "runs" / "m")
    paths.root.mkdir(parents=True)
    paths.preset.write_text(yaml.safe_dump({
        "version": 1, "name": "m", "model": {"id": "org/m"}, "dataset": {"path": "d.json"},
        "hardware": {"gpu": "H100", "memory_gib": 80}, "training": KNOBS}))
    write_status(paths, RunStatus(run_id="m", pid=None))
    with EventWriter(paths.events) as w:
        for e in events:
            w.write(e)
    return paths


def _drawn(app: Any, events: int) -> Any:
    """True once the monitor has folded `events` events and redrawn since."""
    return lambda: (isinstance(app.screen, MonitorScreen) and app.screen.events_seen >= events
                    and not app.screen._dirty)


def _drive(paths: RunPaths, steps: Any, events: int, **app_kw: Any) -> Any:
    async def scenario() -> Any:
        app = MonitorApp(paths, gpu_reader=lambda: [], poll_s=0.02, **app_kw)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, _drawn(app, events), f"the first {events} events on screen")
            result = await steps(app, pilot)
            if app.is_running:
                app.exit()
        return result

    return asyncio.run(scenario())


def test_view_folds_events_and_a_resume_replaces_later_points() -> None:
    v = RunView()
    for e in (START, LogEvent(step=1, loss=3.0), LogEvent(step=2, loss=2.0), EvalEvent(step=2, eval_loss=2.5),
              START.model_copy(update={"start_step": 1, "resumed_from": "c1"}), LogEvent(step=2, loss=1.9)):
        v.apply(e)
    assert v.train_curve == [(1, 3.0), (2, 1.9)]
    assert v.eval_curve == [(2, 2.5)] and v.plan_peak_gib == 10.0 and "resumed" in v.note


def test_tail_lines_reads_only_the_end_of_a_big_log(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert tail_lines(log, 3) == ["line 99997", "line 99998", "line 99999"]


def test_monitor_fits_80x24_and_follows_new_events(tmp_path: Path) -> None:
    paths = _run(tmp_path, START, LogEvent(step=1, loss=3.0, mem_peak_gib=11.0))

    async def steps(app: Any, pilot: Any) -> Any:
        screen = app.screen
        first = len(screen.view.train_curve)
        with EventWriter(paths.events) as w:
            w.write(LogEvent(step=2, loss=2.5, eta_s=90.0))
        await wait_for(pilot, _drawn(app, 3), "the new event on screen")
        regions = [w.region for w in screen.query("*") if w.display]
        gpu = str(screen.query_one("#gpu").render())
        return first, len(screen.view.train_curve), regions, gpu

    first, later, regions, gpu = _drive(paths, steps, events=2)
    assert (first, later) == (1, 2)
    assert all(r.right <= 80 and r.bottom <= 24 for r in regions)
    # torch's allocated peak is compared with the plan's allocated, not with the driver-level peak
    assert "plan peak 10.00 GiB" in gpu and "+10% vs plan's allocated" in gpu


def test_oom_offers_a_one_key_relaunch_with_the_smaller_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smaller = {**KNOBS, "micro_batch_size": 2, "grad_accum": 8}
    paths = _run(tmp_path, START, ErrorEvent(kind="oom", message="CUDA out of memory", suggestion="smaller",
                                             step=1, peak_gib=79.0, smaller_plan=smaller))
    launched: list[Any] = []

    def fake_relaunch(run: RunPaths, **_: Any) -> Any:
        launched.append(run)
        raise __import__("tuiwiz.errors").errors.UserError("not really launching in a test")

    monkeypatch.setattr("tuiwiz.runs.replan.relaunch_with_next_plan", fake_relaunch)

    async def steps(app: Any, pilot: Any) -> tuple[str, str]:
        gpu = str(app.screen.query_one("#gpu").render())
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the relaunch question")
        await pilot.press("y")
        # the launch runs in a thread worker; its UserError ends in the one shared error panel
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorScreen), "the error panel")
        return gpu, app.screen.message

    gpu, message = _drive(paths, steps, events=2, error_log=tmp_path / "tui.log")
    assert "OOM" in gpu and "micro_batch_size 2" in gpu
    assert message == "not really launching in a test"
    assert not (tmp_path / "tui.log").exists()  # a UserError is the user's to fix: no traceback logged
    assert launched == [paths]  # the same run, re-planned in place (what --auto-replan does)


def test_stop_key_asks_first_then_sends_sigterm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuiwiz.runs import control

    paths = _run(tmp_path, START, LogEvent(step=1, loss=3.0))
    stops: list[bool] = []
    real_stop = control.stop_run

    def counted_stop(paths: RunPaths, *, force: bool = False, **kw: Any) -> Any:
        stops.append(force)
        return real_stop(paths, force=force, **kw)

    monkeypatch.setattr(control, "stop_run", counted_stop)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    write_status(paths, RunStatus(run_id="m", pid=sleeper.pid))
    fd = take_lock(paths)
    try:
        async def steps(app: Any, pilot: Any) -> bool:
            def asking() -> bool:
                return isinstance(app.screen, ConfirmScreen)

            await pilot.press("s")
            await wait_for(pilot, asking, "the stop question")
            await pilot.press("n")  # declined: nothing is sent
            await wait_for(pilot, lambda: not asking(), "the question to close")
            alive_after_no = sleeper.poll() is None
            await pilot.press("s")
            await wait_for(pilot, asking, "the stop question, asked again")
            await pilot.press("y")
            await wait_for(pilot, lambda: sleeper.poll() is not None, "the worker to get SIGTERM")
            return alive_after_no

        alive_after_no = _drive(paths, steps, events=2)
        assert alive_after_no
        assert stops == [False]  # one graceful stop, for the "y" only
        assert sleeper.wait(timeout=10) == -15  # SIGTERM
    finally:
        if fd is not None:
            os.close(fd)
        if sleeper.poll() is None:
            sleeper.kill()


def test_view_folds_a_whole_run_and_each_way_it_can_end() -> None:
    from tuiwiz.runs.events import CheckpointEvent, DoneEvent, StoppedEvent

    logs = [LogEvent(step=s, loss=3.0 - s / 10, eta_s=100.0 - s, mem_peak_gib=9.5 + s / 10) for s in (1, 2, 3)]
    going = RunView().fold([START, *logs, CheckpointEvent(step=3, path="c3")])
    assert (going.state, going.step, going.total_steps, going.loss, going.eta_s) == ("running", 3, 20, 2.7, 97.0)
    assert going.mem_peak_gib == 9.8 and going.last_checkpoint == "c3" and going.error is None
    done = RunView().fold([START, *logs, DoneEvent(step=20, adapter_path="a", peak_gib=10.4)])
    assert (done.state, done.step, done.eta_s, done.mem_peak_gib) == ("finished", 20, 0.0, 10.4)
    stopped = RunView().fold([START, *logs, StoppedEvent(step=3)])
    assert (stopped.state, stopped.step) == ("stopped", 3)
    oom = ErrorEvent(kind="oom", message="out of memory", suggestion="smaller", step=3, peak_gib=23.5)
    failed = RunView().fold([START, *logs, oom])
    assert (failed.state, failed.error, failed.mem_peak_gib) == ("failed", oom, 23.5)
    # a resume after the failure clears it and goes back to the step it resumed from
    again = failed.fold([START.model_copy(update={"start_step": 2, "resumed_from": "c2"})])
    assert (again.state, again.error, again.step) == ("running", None, 2)


def test_the_run_view_imports_no_textual() -> None:
    code = "import sys, tuiwiz.runs.view; sys.exit('textual' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_q_asks_before_quitting_the_monitor(tmp_path: Path) -> None:
    paths = _run(tmp_path, START, LogEvent(step=1, loss=3.0))

    async def steps(app: Any, pilot: Any) -> tuple[str, bool, bool]:
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the quit question")
        question = app.screen.question
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen), "the monitor again")
        still_running = app.is_running
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the quit question again")
        await pilot.press("y")
        await wait_for(pilot, lambda: not app.is_running, "the monitor to quit")
        return question, still_running, app.is_running

    question, still_running, running_after_yes = _drive(paths, steps, events=2)
    assert "Detach and quit" in question and "goes on" in question
    assert still_running and not running_after_yes
