"""Pre-flight: `tuiwiz launch` refuses a run that cannot start, in one line, before any run directory exists.

No torch here: the model folder holds a real config.json and tokenizer, and an empty weights file
(pre-flight checks which files the worker will load, it never loads them).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import namedtuple
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tuiwiz.cli import main
from tuiwiz.errors import UserError
from tuiwiz.hardware import GpuInfo
from tuiwiz.preset import preset_from_dict
from tuiwiz.runs import launcher, preflight as pf

from tiny_model import build_tokenizer, tiny_preset_dict, write_dataset

TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 256, "tie_word_embeddings": False}


def fake_model(folder: Path) -> Path:
    """A model folder as the worker wants it (config.json, weights, tokenizer.json), weights left empty."""
    build_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG), encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def gpu(index: int, cc: str = "8.0") -> GpuInfo:
    return GpuInfo(index=index, name="NVIDIA A100-SXM4-80GB", total_gib=80.0, used_gib=0.5, free_gib=79.5,
                   bf16=True, compute_capability=cc)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A model, a dataset, an empty HF cache, and a launcher that must not start anything."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_spawn(*_: object, **__: object) -> int:
        raise AssertionError("pre-flight should have refused this run before the worker was started")

    monkeypatch.setattr(launcher, "_spawn", no_spawn)
    model = fake_model(tmp_path / "model")
    data = write_dataset(tmp_path / "data.json", n=12)
    return {"tmp": tmp_path, "model": model, "data": data, "preset": tiny_preset_dict(model, data, max_steps=2)}


def _launch(w: dict[str, Any], capsys: pytest.CaptureFixture[str], *extra: str,
            runs: Path | None = None) -> tuple[int, str]:
    preset_file = w["tmp"] / "preset.yaml"
    preset_file.write_text(yaml.safe_dump(w["preset"]), encoding="utf-8")
    runs = runs or w["tmp"] / "runs"
    code = main(["launch", str(preset_file), "--runs-dir", str(runs), *extra])
    return code, capsys.readouterr().err


def _no_run_dir(runs: Path) -> bool:
    return not runs.exists() or not any(runs.iterdir())


# Each case: how to break the world, flags, the words the one line must hold.
Case = namedtuple("Case", "break_it flags words")


def _drop_dataset(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    del w["preset"]["dataset"]


def _gone_dataset(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    w["preset"]["dataset"]["path"] = str(w["tmp"] / "gone.json")


def _unknown_layout(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    f = w["tmp"] / "odd.jsonl"
    f.write_text('{"foo": 1, "bar": 2}\n' * 3, encoding="utf-8")
    w["preset"]["dataset"] = {"path": str(f)}


def _not_json(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    f = w["tmp"] / "broken.jsonl"
    f.write_text("this is not json\n{also not\n", encoding="utf-8")
    w["preset"]["dataset"] = {"path": str(f)}


def _gone_model(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    w["preset"]["model"]["path"] = str(w["tmp"] / "no-such-model")


def _no_weights(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    (w["model"] / "model.safetensors").unlink()


def _missing_shard(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    (w["model"] / "model.safetensors").unlink()
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (w["model"] / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    (w["model"] / "model-00001-of-00002.safetensors").write_bytes(b"")


def _uncached_hub_id(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    w["preset"]["model"] = {"id": "nobody/nothing-7b", "tokenizer": str(w["model"])}


def _catalog_only(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    w["preset"]["model"] = {"id": "Qwen/Qwen2.5-0.5B-Instruct"}


def _no_tokenizer(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    (w["tmp"] / "empty").mkdir()
    w["preset"]["model"]["tokenizer"] = str(w["tmp"] / "empty")


def _model_without_tokenizer(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    (w["model"] / "tokenizer.json").unlink()


def _tiny_disk(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    mp.setattr(pf.shutil, "disk_usage", lambda _p: usage(10 * 2**20, 9 * 2**20, 2**20))


def _no_gpu(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    mp.setattr(pf, "read_gpus", lambda: [])


def _wrong_index(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    mp.setattr(pf, "read_gpus", lambda: [gpu(0), gpu(1)])
    w["preset"]["hardware"]["indices"] = [3]


def _too_many(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    mp.setattr(pf, "read_gpus", lambda: [gpu(0)])
    w["preset"]["hardware"]["count"] = 2


def _no_flash(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    mp.setattr(pf, "read_gpus", lambda: [gpu(0)])
    mp.setattr(pf, "flash_attn_installed", lambda: False)
    w["preset"]["training"]["attn"] = "flash_attention_2"


def _hide(*names: str) -> Callable[[dict[str, Any], pytest.MonkeyPatch], None]:
    real = importlib.util.find_spec

    def break_it(w: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
        mp.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))
    return break_it


CASES = {
    "no dataset": Case(_drop_dataset, ["--cpu"], ["no dataset", "dataset.path"]),
    "dataset gone": Case(_gone_dataset, ["--cpu"], ["dataset.path", "gone.json", "no such file"]),
    "unknown layout": Case(_unknown_layout, ["--cpu"], ["odd.jsonl", "foo"]),
    "not json": Case(_not_json, ["--cpu"], ["broken.jsonl", "empty"]),
    "model path gone": Case(_gone_model, ["--cpu"], ["model.path", "no-such-model", "no such folder"]),
    "no weights": Case(_no_weights, ["--cpu"], ["model.path", "no weights", "model.safetensors"]),
    "missing shard": Case(_missing_shard, ["--cpu"], ["model-00002-of-00002.safetensors", "missing"]),
    "hub id not cached": Case(_uncached_hub_id, ["--cpu"], ["nobody/nothing-7b", "HF cache", "hf download",
                                                            "--online"]),
    "catalog only": Case(_catalog_only, ["--cpu"], ["Qwen/Qwen2.5-0.5B-Instruct", "catalog", "model.path"]),
    "no tokenizer": Case(_no_tokenizer, ["--cpu"], ["model.tokenizer", "tokenizer.json"]),
    "model folder without tokenizer": Case(_model_without_tokenizer, ["--cpu"], ["tokenizer.json", "model.tokenizer"]),
    "disk full": Case(_tiny_disk, ["--cpu"], ["GiB free", "checkpoints", "--runs-dir"]),
    "no gpu": Case(_no_gpu, [], ["no NVIDIA GPU", "hardware", "--cpu"]),
    "wrong gpu index": Case(_wrong_index, [], ["hardware.indices", "index 3", "0, 1"]),
    "more gpus than here": Case(_too_many, [], ["hardware.count is 2", "1 GPU"]),
    "flash attention missing": Case(_no_flash, [], ["training.attn", "flash"]),
    "no training stack": Case(_hide("trl", "peft"), ["--cpu"], ["peft, trl", "pip install 'tuiwiz[train]'"]),
    "no bitsandbytes for 4-bit": Case(_hide("bitsandbytes"), ["--cpu"], ["bitsandbytes", "tuiwiz[train]"]),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_launch_refuses_in_one_line_and_creates_no_run_dir(world: dict[str, Any], case: Case,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    case.break_it(world, monkeypatch)
    code, err = _launch(world, capsys, *case.flags)
    assert code == 2
    assert err.startswith("tuiwiz launch: ") and err.count("\n") == 1, err
    for word in case.words:
        assert word in err, f"{word!r} not in {err!r}"
    assert _no_run_dir(world["tmp"] / "runs")


def test_an_unwritable_runs_dir_is_named(world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    blocker = world["tmp"] / "a-file"
    blocker.write_text("x")
    code, err = _launch(world, capsys, "--cpu", runs=blocker / "runs")
    assert code == 2 and err.count("\n") == 1
    assert str(blocker / "runs") in err and "cannot write" in err and "--runs-dir" in err


def test_the_same_checks_pass_for_a_sound_plan(world: dict[str, Any]) -> None:
    preset = preset_from_dict(world["preset"])
    assert pf.preflight(preset, world["tmp"] / "runs", cpu=True) == []
    assert (world["tmp"] / "runs").is_dir()  # the runs folder is created, nothing in it
    assert pf.preflight(preset, world["tmp"] / "runs", gpus=[gpu(0)]) == []


def test_online_lets_an_uncached_hub_model_through_with_a_warning(world: dict[str, Any]) -> None:
    preset = preset_from_dict({**world["preset"], "model": {"id": "nobody/nothing-7b", "tokenizer": str(world["model"])}})
    with pytest.raises(pf.ModelNotLocal, match="nobody/nothing-7b"):
        pf.preflight(preset, world["tmp"] / "runs", cpu=True)
    warnings = pf.preflight(preset, world["tmp"] / "runs", cpu=True, online=True)
    assert any("nobody/nothing-7b" in w and "download" in w for w in warnings)


def test_a_complete_hf_cache_snapshot_is_found_offline(world: dict[str, Any]) -> None:
    snap = world["tmp"] / "hf" / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (snap / f).write_bytes((world["model"] / f).read_bytes())
    preset = preset_from_dict({**world["preset"], "model": {"id": "org/tiny"}})
    assert pf.preflight(preset, world["tmp"] / "runs", cpu=True) == []
    (snap / "model.safetensors").unlink()  # an interrupted download: config but no weights
    with pytest.raises(pf.ModelNotLocal, match="no weights"):
        pf.preflight(preset, world["tmp"] / "runs", cpu=True)


def test_cuda_visible_devices_limits_the_gpus_a_plan_may_use(world: dict[str, Any]) -> None:
    preset = preset_from_dict({**world["preset"], "hardware": {**world["preset"]["hardware"], "count": 2}})
    assert pf.preflight(preset, world["tmp"] / "runs", gpus=[gpu(0), gpu(1)], env={}) == []
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES"):
        pf.preflight(preset, world["tmp"] / "runs", gpus=[gpu(0), gpu(1)], env={"CUDA_VISIBLE_DEVICES": "1"})


def test_flash_attention_on_a_pre_ampere_card_is_refused_but_a_cpu_run_falls_back(world: dict[str, Any]) -> None:
    knobs = {**world["preset"]["training"], "attn": "flash_attention_2"}
    preset = preset_from_dict({**world["preset"], "training": knobs})
    with pytest.raises(UserError, match="Ampere") as err:
        pf.preflight(preset, world["tmp"] / "runs", gpus=[gpu(0, cc="7.5")])
    assert err.value.field == "attn"
    assert pf.preflight(preset, world["tmp"] / "runs", cpu=True) == []  # the worker uses sdpa on CPU


def test_every_checkpoint_is_counted_with_early_stopping(world: dict[str, Any]) -> None:
    """With early stopping the trainer keeps every checkpoint (and saves on eval steps)."""
    knobs = preset_from_dict(world["preset"]).training
    early = knobs.replace(early_stopping_patience=3, max_steps=2000, save_steps=10, eval_steps=None)
    assert pf.checkpoints_kept(knobs, 2000) == pf.SAVE_TOTAL_LIMIT + 1
    assert pf.checkpoints_kept(early, 2000) == 201  # 200 scheduled saves and the final one
    assert pf.checkpoints_kept(early.replace(eval_steps=4), 2000) == 501  # saves move onto the eval steps
    assert pf.checkpoints_kept(early.replace(val_ratio=0.0), 2000) == pf.SAVE_TOTAL_LIMIT + 1  # no eval, no early stop


def test_a_relative_dataset_path_is_pinned_before_the_preset_is_copied(world: dict[str, Any],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world["tmp"])
    monkeypatch.setattr(launcher, "_spawn", lambda *a, **k: 4242)
    preset = preset_from_dict({**world["preset"], "dataset": {"path": "data.json", "layout": "alpaca"},
                               "model": {"id": "tiny", "path": "model"}})
    run = launcher.launch(preset, Path("runs"), run_id="pinned", cpu=True)
    assert run.paths.root == world["tmp"] / "runs" / "pinned"
    saved = yaml.safe_load(run.paths.preset.read_text())
    assert saved["dataset"]["path"] == str(world["data"]) and saved["model"]["path"] == str(world["model"])
    assert os.path.isabs(run.argv[-1])
