"""`tuiwiz launch / runs / resume / stop` as a user types them: output within 80 columns, relative
--runs-dir, and a real tiny run on CPU from launch to a finished row that cannot be resumed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from tuiwiz.cli import main
from tuiwiz.models import resolve_model
from tuiwiz.preset import load_preset
from tuiwiz.runs import launcher
from tuiwiz.runs.events import EventWriter, StoppedEvent
from tuiwiz.runs.paths import RunPaths
from tuiwiz.runs.preflight import checkpoint_bytes
from tuiwiz.runs.status import is_live, last_checkpoint, read_status, summarize

from test_runs_preflight import fake_model
from tiny_model import build_model, tiny_preset_dict, write_dataset

TIMEOUT = 180.0


def _fits(out: str, paths: list[Path]) -> None:
    """Every line fits 80 columns, except a path printed alone on its line (never broken)."""
    for line in out.splitlines():
        assert len(line) <= 80 or line.strip() in {str(p) for p in paths}, line


def _hints(err: str) -> list[str]:
    return err.splitlines()[-4:]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("TUIWIZ_")]:
        monkeypatch.delenv(k)
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                 "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)


def test_launch_and_resume_say_where_the_run_is_and_how_to_follow_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    spawned: list[tuple[list[str], dict[str, str]]] = []

    def fake_spawn(paths: RunPaths, argv: list[str], env: dict[str, str], lock_fd: int) -> int:
        spawned.append((argv, env))
        return 4242

    monkeypatch.setattr(launcher, "_spawn", fake_spawn)
    monkeypatch.chdir(tmp_path)
    model, data = fake_model(tmp_path / "model"), write_dataset(tmp_path / "data.json", n=12)
    name = "a-plan-with-a-rather-long-descriptive-name-for-the-table-" * 2
    Path("p.yaml").write_text(yaml.safe_dump({**tiny_preset_dict(model, data), "name": name}))

    assert main(["launch", "p.yaml", "--runs-dir", "runs", "--cpu"]) == 0
    out, err = capsys.readouterr()
    rid = out.strip()
    root = tmp_path / "runs" / rid
    assert out == rid + "\n" and (root / "preset.yaml").exists()  # stdout: the id alone
    _fits(err, [root])
    assert _hints(err) == ["follow it:", f"  tuiwiz attach {rid}", "stop it:", f"  tuiwiz stop {rid}"]
    assert "on the CPU" in err and f"  {root}" in err.splitlines()
    argv, env = spawned[0]
    assert argv[-1] == str(root) and env["CUDA_VISIBLE_DEVICES"] == "" and env["HF_HUB_OFFLINE"] == "1"

    # the run stopped after a checkpoint: resume says the same, and remembers it is a CPU run
    paths = RunPaths(root)
    with EventWriter(paths.events) as w:
        w.write(StoppedEvent(step=1))
    (paths.checkpoints / "checkpoint-1").mkdir(parents=True)
    (paths.checkpoints / "checkpoint-1" / "trainer_state.json").write_text("{}")
    assert main(["resume", rid, "--runs-dir", "runs"]) == 0
    out, err2 = capsys.readouterr()
    assert out == rid + "\n"
    _fits(err2, [root])
    assert _hints(err2) == _hints(err) and "resumed" in err2 and "on the CPU" in err2
    argv, env = spawned[1]
    assert argv[-1] == "--resume" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert read_status(paths).cpu is True  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_cpu_run_from_a_relative_runs_dir_finishes_and_then_cannot_be_resumed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], offline: None) -> None:
    model, data = build_model(tmp_path / "model"), write_dataset(tmp_path / "data.json", n=16)
    monkeypatch.chdir(tmp_path)
    preset = tiny_preset_dict(model, data, max_steps=2, save_steps=2, eval_steps=2)
    Path("tiny.yaml").write_text(yaml.safe_dump(preset))

    assert main(["launch", "tiny.yaml", "--runs-dir", "runs", "--cpu", "--run-id", "e2e"]) == 0
    out, err = capsys.readouterr()
    paths = RunPaths(tmp_path / "runs" / "e2e")
    assert out == "e2e\n"
    _fits(err, [paths.root])

    deadline = time.monotonic() + TIMEOUT
    while summarize(paths).state == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    summary = summarize(paths)
    log = paths.log.read_text(errors="replace")[-3000:] if paths.log.exists() else "(no train.log)"
    assert summary.state == "finished", f"{summary}\n{log}"

    # `runs` right after `done` (the worker may still hold the lock): finished, not running
    assert main(["runs", "--runs-dir", "runs"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("e2e "))
    assert row.split()[1] == "finished" and "2/2" in row
    _fits(table, [])

    assert main(["resume", "e2e", "--runs-dir", "runs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "finished" in err and "nothing to resume" in err

    assert main(["stop", "e2e", "--runs-dir", "runs"]) == 0
    assert capsys.readouterr().out == "e2e has finished; nothing to stop.\n"

    # the free-disk check's size of one checkpoint is at least what the trainer wrote
    ckpt = last_checkpoint(paths)
    assert ckpt is not None
    written = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    knobs = load_preset(paths.preset).training
    assert checkpoint_bytes(resolve_model(str(model)), knobs, (model / "tokenizer.json").stat().st_size) >= written

    deadline = time.monotonic() + 30
    while is_live(paths) and time.monotonic() < deadline:  # leave no worker behind
        time.sleep(0.1)
    assert not is_live(paths)
