"""Run directories, states, the runs table and the CLI's error handling (no torch needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuiwiz.errors import UserError
from tuiwiz.preset import preset_from_dict
from tuiwiz.runs.cli import format_runs_table, run_command
from tuiwiz.runs.events import DoneEvent, ErrorEvent, EventWriter, LogEvent, StartEvent, StoppedEvent
from tuiwiz.runs.launcher import launch, worker_argv, worker_env
from tuiwiz.runs.paths import RunPaths, default_runs_root, new_run_id, resolve_run
from tuiwiz.runs.status import RunStatus, last_checkpoint, summarize, take_lock, write_status

REPO = Path(__file__).resolve().parents[1]


def _preset(**hardware: object) -> dict:
    return {"version": 1, "name": "t", "model": {"id": "org/m", "path": "/nonexistent"},
            "dataset": {"path": "/nonexistent.json"},
            "hardware": {"gpu": "H100", "memory_gib": 80, **hardware}, "training": {}}


def _run(tmp_path: Path, rid: str, *events: object) -> RunPaths:
    paths = RunPaths(tmp_path / rid)
    paths.root.mkdir(parents=True)
    paths.preset.write_text(yaml.safe_dump(_preset()))
    write_status(paths, RunStatus(run_id=rid, pid=999999, state="running"))
    with EventWriter(paths.events) as w:
        for ev in events:
            w.write(ev)  # type: ignore[arg-type]
    return paths


START = StartEvent(run_id="x", pid=1, device="cpu", versions={}, config={}, total_steps=10, train_samples=1,
                   eval_samples=0)


@pytest.mark.parametrize("terminal,state", [
    (DoneEvent(step=10, adapter_path="a"), "finished"),
    (ErrorEvent(kind="data", message="m", suggestion="s"), "failed"),
    (StoppedEvent(step=3), "stopped"),
])
def test_state_comes_from_the_last_terminal_event(tmp_path: Path, terminal: object, state: str) -> None:
    paths = _run(tmp_path, "r", START, LogEvent(step=3, loss=1.5), terminal)
    s = summarize(paths)
    assert s.state == state
    assert s.total_steps == 10 and s.loss == 1.5


def test_dead_worker_without_terminal_event_is_stale(tmp_path: Path) -> None:
    paths = _run(tmp_path, "r", START, LogEvent(step=3, loss=1.5))
    assert summarize(paths).state == "stale"


def test_held_lock_means_running_even_after_a_terminal_event(tmp_path: Path) -> None:
    paths = _run(tmp_path, "r", START, StoppedEvent(step=2))
    fd = take_lock(paths)
    assert fd is not None
    try:
        assert summarize(paths).state == "running"
        assert take_lock(paths) is None  # a second holder is refused
    finally:
        os.close(fd)
    assert summarize(paths).state == "stopped"


def test_a_resume_start_event_reopens_a_stopped_run(tmp_path: Path) -> None:
    resumed = START.model_copy(update={"start_step": 4})
    paths = _run(tmp_path, "r", START, StoppedEvent(step=4), resumed)
    s = summarize(paths)
    assert s.state == "stale" and s.step == 4  # no worker holds the lock, no new terminal event


def test_launch_refuses_a_second_live_run_in_the_same_run_directory(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path / "same")
    fd = take_lock(paths)
    try:
        with pytest.raises(UserError, match="already live"):
            launch(preset_from_dict(_preset()), tmp_path, run_id="same")
    finally:
        assert fd is not None
        os.close(fd)
    assert not paths.preset.exists()


def test_launch_refuses_to_reuse_a_finished_run_directory(tmp_path: Path) -> None:
    _run(tmp_path, "done", START, DoneEvent(step=1, adapter_path="a"))
    with pytest.raises(UserError, match="resume"):
        launch(preset_from_dict(_preset()), tmp_path, run_id="done")


def test_merge_is_refused_for_a_quantized_base(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="quant_bits"):
        launch(preset_from_dict(_preset()), tmp_path, merge=True)


def test_multi_gpu_plan_goes_through_accelerate_with_one_process_per_gpu(tmp_path: Path) -> None:
    preset = preset_from_dict(_preset(count=4, indices=[2, 3, 4, 5]))
    argv = worker_argv(preset, tmp_path)
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    assert argv[argv.index("--num_processes") + 1] == "4"
    assert argv[-3:] == ["-m", "tuiwiz.train", str(tmp_path)]
    assert worker_env(preset, {})["CUDA_VISIBLE_DEVICES"] == "2,3,4,5"


def test_single_gpu_plan_runs_the_worker_module_directly(tmp_path: Path) -> None:
    argv = worker_argv(preset_from_dict(_preset()), tmp_path, resume=True)
    assert argv[1:] == ["-m", "tuiwiz.train", str(tmp_path), "--resume"]


def test_runs_root_follows_xdg_data_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TUIWIZ_RUNS_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_runs_root() == tmp_path / "tuiwiz" / "runs"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_runs_root() == Path.home() / ".local" / "share" / "tuiwiz" / "runs"


def test_run_ids_are_resolved_by_unique_prefix_and_ambiguity_is_an_error(tmp_path: Path) -> None:
    _run(tmp_path, "alpha-1", START)
    _run(tmp_path, "alpha-2", START)
    _run(tmp_path, "beta-1", START)
    assert resolve_run("beta", tmp_path).run_id == "beta-1"
    with pytest.raises(UserError, match="ambiguous"):
        resolve_run("alpha", tmp_path)
    with pytest.raises(UserError, match="no run 'gamma'"):
        resolve_run("gamma", tmp_path)


def test_new_run_id_is_a_safe_directory_name() -> None:
    rid = new_run_id("my plan/v2 (test)", now=0.0)
    assert "/" not in rid and " " not in rid and rid.startswith("my-plan-v2-test-")


def test_runs_table_fits_80_columns(tmp_path: Path) -> None:
    p = _run(tmp_path, "a-very-long-run-identifier-that-goes-on-and-on-20260101-000000", START,
             LogEvent(step=5, loss=1.23456))
    table = format_runs_table([summarize(p)])
    assert all(len(line) <= 80 for line in table.splitlines())
    assert "50%" in table and "1.235" in table


def test_runs_json_lists_state_and_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path, "r1", START, LogEvent(step=5, loss=1.0), DoneEvent(step=10, adapter_path="a"))
    assert run_command("runs", ["--json", "--runs-dir", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["run_id"] == "r1" and rows[0]["state"] == "finished" and rows[0]["progress"] == 1.0


def test_user_errors_are_one_line_on_stderr_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command("stop", ["nope", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err


def test_launching_a_missing_preset_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command("launch", [str(tmp_path / "missing.yaml"), "--runs-dir", str(tmp_path)]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_stop_on_a_finished_run_says_it_has_finished(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path, "r1", START, DoneEvent(step=10, adapter_path="a"))
    assert run_command("stop", ["r1", "--runs-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "r1 has finished; nothing to stop.\n"


def test_a_done_run_reads_finished_while_its_worker_still_holds_the_lock(tmp_path: Path) -> None:
    paths = _run(tmp_path, "r", START, LogEvent(step=10, loss=1.0), DoneEvent(step=10, adapter_path="a"))
    fd = take_lock(paths)  # the worker wrote `done` and has not exited yet
    assert fd is not None
    try:
        s = summarize(paths)
        assert s.state == "finished" and s.ended_at is not None
    finally:
        os.close(fd)


def test_an_error_event_reads_failed_while_the_worker_exits_but_running_once_resumed(tmp_path: Path) -> None:
    err = ErrorEvent(kind="oom", message="CUDA out of memory", suggestion="s", t=2000.0)
    paths = _run(tmp_path, "r", START.model_copy(update={"t": 1000.0}), err)
    write_status(paths, RunStatus(run_id="r", pid=1, state="failed", launched_at=999.0))
    fd = take_lock(paths)
    assert fd is not None
    try:
        assert summarize(paths).state == "failed"  # the lock holder is the worker that wrote the error
        write_status(paths, RunStatus(run_id="r", pid=2, state="running", launched_at=3000.0))
        assert summarize(paths).state == "running"  # a resume launched after the error holds it
    finally:
        os.close(fd)


def test_runs_table_says_why_a_failed_run_failed_under_its_row(tmp_path: Path) -> None:
    why = "CUDA out of memory. Tried to allocate 20.00 GiB; GPU 0 has a total capacity of 23.65 GiB " * 2
    ok = _run(tmp_path, "ok", START, LogEvent(step=3, loss=1.0), DoneEvent(step=10, adapter_path="a"))
    bad = _run(tmp_path, "bad", START, LogEvent(step=3, loss=1.0), ErrorEvent(kind="oom", message=why, suggestion="s"))
    lines = format_runs_table([summarize(ok), summarize(bad)]).splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["ok", "bad"]
    assert lines[3].startswith("  oom: CUDA out of memory. Tried to allocate 20.00 GiB")
    assert len(lines) == 4 and all(len(line) <= 80 for line in lines)


def test_generated_run_ids_keep_the_attach_hint_within_80_columns() -> None:
    rid = new_run_id("x" * 200, now=0.0)
    assert len(f"  tuiwiz attach {rid}") <= 80 and rid.startswith("x" * 48 + "-")


def test_last_checkpoint_ignores_incomplete_saves(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    for n, complete in ((2, True), (10, True), (12, False)):
        d = paths.checkpoints / f"checkpoint-{n}"
        d.mkdir(parents=True)
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert last_checkpoint(paths) == paths.checkpoints / "checkpoint-10"


def test_run_management_never_imports_torch_or_textual(tmp_path: Path) -> None:
    code = ("import sys; from tuiwiz.runs.cli import run_command; "
            f"run_command('runs', ['--runs-dir', {str(tmp_path)!r}]); "
            "import tuiwiz.runs.launcher, tuiwiz.runs.control, tuiwiz.runs.status; "
            "bad = [m for m in ('torch', 'transformers', 'textual', 'trl', 'peft') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
