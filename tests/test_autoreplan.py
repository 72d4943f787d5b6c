"""OOM at the probe step: the next plan keeps the effective batch, and `launch --auto-replan`
relaunches with it in the same run, each attempt recorded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tuiwiz.planning.advisor import smaller_plan
from tuiwiz.planning.knobs import TrainingKnobs
from tuiwiz.planning.memory import GIB, estimate_memory
from tuiwiz.runs.events import (DoneEvent, ErrorEvent, EventWriter, MemoryEvent, ReplanEvent, StartEvent,
                                read_events)
from tuiwiz.runs.paths import RunPaths


def _spec():  # noqa: ANN202
    from tuiwiz.models import resolve_model

    return resolve_model("meta-llama/Llama-3.1-8B")


# ---- the next plan ---------------------------------------------------------------------

def test_without_a_measurement_the_next_plan_is_one_advisor_step() -> None:
    from tuiwiz.planning.replan import next_plan

    k = TrainingKnobs(micro_batch_size=8, grad_accum=2, cutoff_len=2048)
    assert next_plan(_spec(), k, budget_bytes=20 * GIB, needed_bytes=None).knobs == smaller_plan(k)


def test_a_large_measured_overshoot_skips_steps_and_keeps_the_effective_batch() -> None:
    from tuiwiz.planning.replan import corrected_peak, next_plan

    spec = _spec()
    k = TrainingKnobs(micro_batch_size=8, grad_accum=2, cutoff_len=2048, grad_checkpointing=True)
    failed = estimate_memory(spec, k)
    budget = failed.peak_bytes  # it was planned to fit, and the step needed more
    small = next_plan(spec, k, budget_bytes=budget, needed_bytes=failed.peak_bytes + 1 * GIB)
    large = next_plan(spec, k, budget_bytes=budget, needed_bytes=failed.peak_bytes + 20 * GIB)
    assert large.moves > small.moves >= 1
    for p in (small, large):
        assert p.knobs.effective_batch() == k.effective_batch() and p.fits
    # the step before the chosen one would not have fitted once corrected (it is the first that fits)
    before = k
    for _ in range(large.moves - 1):
        before = smaller_plan(before)
    assert corrected_peak(estimate_memory(spec, before), failed, 20 * GIB) > budget


# ---- relaunching ------------------------------------------------------------------------

def _failed_run(root: Path, tiny_preset: dict) -> RunPaths:
    import yaml

    paths = RunPaths(root / "r")
    paths.root.mkdir(parents=True)
    paths.preset.write_text(yaml.safe_dump(tiny_preset))
    with EventWriter(paths.events) as w:
        w.write(StartEvent(run_id="r", pid=1, device="cpu", versions={}, config={}, total_steps=3,
                           train_samples=9, eval_samples=0))
        w.write(ErrorEvent(kind="data", message="m", suggestion="s", step=0))
    return paths


def test_relaunch_is_refused_when_the_run_did_not_end_in_an_oom(tmp_path: Path) -> None:
    from tiny_model import tiny_preset_dict
    from tuiwiz.errors import UserError
    from tuiwiz.runs.replan import relaunch_with_next_plan

    paths = _failed_run(tmp_path, tiny_preset_dict(tmp_path / "m", tmp_path / "d.json"))
    with pytest.raises(UserError, match="out-of-memory"):
        relaunch_with_next_plan(paths)
    assert [e.event for e in read_events(paths.events)] == ["start", "error"]  # nothing written


def test_auto_replan_gives_up_after_two_relaunches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tuiwiz.runs import cli
    from tuiwiz.runs.launcher import LaunchedRun
    from tuiwiz.runs.replan import MAX_AUTO_REPLANS, ProbeResult

    paths = RunPaths(tmp_path / "r")
    paths.root.mkdir()
    relaunched: list[int] = []

    def relaunch(p: RunPaths, *, auto: bool = False) -> None:
        relaunched.append(1)
        with EventWriter(p.events) as w:
            w.write(ReplanEvent(attempt=1 + len(relaunched), knobs={}, changed={"micro_batch_size": [2, 1]}))

    oom = ErrorEvent(kind="oom", message="m", suggestion="s", step=0, probe=True, smaller_plan={"x": 1})
    monkeypatch.setattr(cli, "wait_for_probe", lambda *a, **k: ProbeResult("oom", error=oom))
    monkeypatch.setattr(cli, "wait_until_exited", lambda *a, **k: True)
    monkeypatch.setattr(cli, "relaunch_with_next_plan", relaunch)
    assert cli._auto_replan(LaunchedRun("r", paths, 1, ())) == 1
    assert len(relaunched) == MAX_AUTO_REPLANS == 2
    assert "not relaunching" in capsys.readouterr().err


@pytest.mark.slow
def test_auto_replan_after_an_oom_at_step_one_finishes_with_the_same_effective_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from tiny_model import build_model, tiny_preset_dict, write_dataset
    from tuiwiz.runs.cli import run_command
    from tuiwiz.runs.status import is_live, summarize
    from waiting import wait_until

    model, data = build_model(tmp_path / "model"), write_dataset(tmp_path / "data.json", 24)
    preset = tiny_preset_dict(model, data, max_steps=3, save_steps=100, eval_steps=100, micro_batch_size=2,
                              grad_accum=2)
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(preset))
    for k in [k for k in os.environ if k.startswith("TUIWIZ_") and k != "TUIWIZ_CALIBRATION"]:
        monkeypatch.delenv(k)
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                 "TUIWIZ_FAULT": "oom@1"}.items():
        monkeypatch.setenv(k, v)
    code = run_command("launch", [str(tmp_path / "preset.yaml"), "--runs-dir", str(tmp_path / "runs"),
                                  "--run-id", "auto", "--cpu", "--auto-replan"])
    err = capsys.readouterr().err
    assert code == 0, err
    paths = RunPaths(tmp_path / "runs" / "auto")
    wait_until(lambda: not is_live(paths), "the relaunched run to end", timeout=180)
    events = read_events(paths.events)
    assert [e.event for e in events if e.event in ("start", "error", "replan", "done")] == \
        ["start", "error", "replan", "start", "done"], paths.log.read_text()[-2000:]
    starts = [e for e in events if isinstance(e, StartEvent)]
    error = next(e for e in events if isinstance(e, ErrorEvent))
    replan = next(e for e in events if isinstance(e, ReplanEvent))
    assert error.kind == "oom" and error.probe and error.step == 0
    assert [s.attempt for s in starts] == [1, 2] and replan.attempt == 2 and replan.auto
    first, second = (s.config for s in starts)
    assert first["micro_batch_size"] * first["grad_accum"] == second["micro_batch_size"] * second["grad_accum"] == 4
    assert second["micro_batch_size"] < first["micro_batch_size"]
    assert replan.changed["micro_batch_size"] == [2, 1] and replan.resume_from is None
    assert any(isinstance(e, MemoryEvent) and e.probe for e in events[events.index(starts[1]):])
    assert isinstance(events[-1], DoneEvent) and events[-1].step == 3 and summarize(paths).state == "finished"
    assert "attempt 2" in err and "first step fits" in err
