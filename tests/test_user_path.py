"""The common path, planned from a local model folder with relative paths, gives a preset that
launches from anywhere: paths are absolute, the model keeps its folder, exports keep it too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tiny_model import build_tokenizer, write_dataset
from tuiwiz.cli import main
from tuiwiz.preset import load_preset


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """models/my-model (config + tokenizer, no weights needed to plan) and data/train.json; cwd = data/."""
    model = tmp_path / "models" / "my-model"
    build_tokenizer(model)
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 256}))
    build_tokenizer(tmp_path / "tok")
    write_dataset(tmp_path / "data" / "train.json")
    monkeypatch.chdir(tmp_path / "data")
    return tmp_path


def test_preset_from_a_model_folder_keeps_absolute_paths(work: Path, capsys) -> None:
    code = main(["--auto", "--model", "../models/my-model", "--dataset", "train.json", "--gpu", "24GB",
                 "--tokenizer", "../tok", "--out", "plan.yaml"])
    assert code == 0, capsys.readouterr().err
    preset = load_preset(work / "data" / "plan.yaml")
    assert preset.model.path == str((work / "models" / "my-model").resolve())
    assert preset.model.tokenizer == str((work / "tok").resolve())
    assert preset.dataset is not None and preset.dataset.path == str((work / "data" / "train.json").resolve())
    raw = yaml.safe_load((work / "data" / "plan.yaml").read_text())
    assert Path(raw["model"]["path"]).is_absolute() and Path(raw["dataset"]["path"]).is_absolute()


def test_counts_are_exact_with_the_folders_own_tokenizer(work: Path, capsys) -> None:
    main(["--auto", "--json", "--model", "../models/my-model", "--dataset", "train.json", "--gpu", "24GB"])
    data = json.loads(capsys.readouterr().out)
    assert data["dataset"]["approximate"] is False


@pytest.mark.parametrize("fmt, key", [("axolotl", "base_model"), ("llamafactory", "model_name_or_path")])
def test_exports_keep_the_model_folder(work: Path, capsys, fmt: str, key: str) -> None:
    out = work / f"{fmt}.yaml"
    code = main(["--auto", "--model", "../models/my-model", "--dataset", "train.json", "--gpu", "24GB",
                 "--export", fmt, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert yaml.safe_load(out.read_text())[key] == str((work / "models" / "my-model").resolve())


def test_relative_paths_in_a_hand_written_preset_are_relative_to_the_preset(work: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (work / "plan.yaml").write_text("version: 1\nmodel: {id: my-model, path: models/my-model}\n"
                                    "dataset: {path: data/train.json}\nhardware: {gpu: H100, memory_gib: 80}\n")
    monkeypatch.chdir(work / "models")
    preset = load_preset(work / "plan.yaml")
    assert preset.model.path == str(work / "models" / "my-model")
    assert preset.dataset is not None and preset.dataset.path == str(work / "data" / "train.json")


@pytest.mark.slow
def test_plan_from_a_folder_then_launch_from_elsewhere_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys) -> None:
    """The whole common path, as typed: plan with relative paths, launch the preset from another
    folder (offline, on the CPU), and the run finishes."""
    from tiny_model import build_model
    from tuiwiz.runs.paths import RunPaths
    from tuiwiz.runs.status import summarize
    from waiting import wait_until

    build_model(tmp_path / "models" / "my-model")
    write_dataset(tmp_path / "data" / "train.json", n=16)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path / "data")
    code = main(["--auto", "--model", "../models/my-model", "--dataset", "train.json", "--gpu", "24GB",
                 "--cutoff-len", "64", "--micro-batch", "2", "--grad-accum", "1", "--max-steps", "2",
                 "--save-steps", "2", "--lora-rank", "4", "--out", "plan.yaml"])
    assert code == 0, capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "data/plan.yaml", "--cpu", "--runs-dir", "runs", "--run-id", "common"]) == 0, \
        capsys.readouterr().err
    paths = RunPaths(tmp_path / "runs" / "common")
    wait_until(lambda: summarize(paths).state != "running", "the run to end", timeout=240)
    log = paths.log.read_text(errors="replace")[-3000:] if paths.log.exists() else "(no train.log)"
    assert summarize(paths).state == "finished", log
    assert (paths.adapter / "adapter_config.json").exists()


def test_a_plan_for_another_trainer_is_not_launched_by_ours(work: Path, capsys) -> None:
    """Its estimate assumed that trainer's loss and dtypes, which tuiwiz's worker does not run."""
    code = main(["--auto", "--model", "../models/my-model", "--dataset", "train.json", "--gpu", "24GB",
                 "--trainer", "llamafactory", "--out", "lf.yaml"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["launch", "lf.yaml", "--cpu", "--runs-dir", str(work / "runs")]) == 2
    err = capsys.readouterr().err
    assert "trainer" in err and "llamafactory" in err and err.count("\n") == 1
    assert not (work / "runs").exists() or not any((work / "runs").iterdir())
