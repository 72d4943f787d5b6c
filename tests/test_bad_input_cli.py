"""Broken input through the whole CLI: exit 2, a bounded message naming the file, line or field,
never a traceback, and nothing the user had is clobbered.

One case per class of mistake (see the user-path issue): impossible model configs, places that
cannot take the output, nonsense values that pass a type check, presets that are not data,
flags that contradict each other. Data-file classes live in tests/test_bad_input_data.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tuiwiz.cli import EXIT_USAGE, main

BASE = ["--auto", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "H100", "--cutoff-len", "512"]


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *names: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, (argv, err)
    assert "Traceback" not in err and len(err) < 2500, err
    for n in names:
        assert n in err, (n, err)
    return err


def _config(tmp_path: Path, **changes: object) -> Path:
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512}
    cfg.update(changes)
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes, key", [
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": "wide"}, "hidden_size"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_hidden_layers": -3}, "num_hidden_layers"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    ({"vocab_size": 0}, "vocab_size"),
])
def test_impossible_model_configs_are_refused_naming_the_key(tmp_path: Path, capsys, changes, key) -> None:
    folder = _config(tmp_path, **changes)
    _fails(["--auto", "--model", str(folder), "--gpu", "H100", "--cutoff-len", "256"], capsys, key, "config.json")


def test_empty_model_is_refused_not_replaced_by_the_demo_model(capsys) -> None:
    _fails(["--auto", "--model", "", "--gpu", "H100"], capsys, "--model")


@pytest.mark.parametrize("argv, names", [
    (["--epochs", "inf"], ["--epochs"]),
    (["--lora-alpha", str(10**29)], ["--lora-alpha"]),
    (["--percentile", "99.9"], ["--percentile"]),
    (["--gpus", "-1"], ["--gpus"]),
    (["--effective-batch", "0"], ["--effective-batch"]),
    (["--headroom", "1.5"], ["--headroom"]),
    (["--export", "deepspeed"], ["--export"]),
])
def test_nonsense_values_name_their_flag(capsys, argv, names) -> None:
    _fails([*BASE, *argv], capsys, *names)


def test_gpu_indices_on_a_machine_without_those_gpus(capsys) -> None:
    _fails(["--auto", "--model", "Qwen/Qwen2.5-0.5B", "--gpus", "7", "--cutoff-len", "512"], capsys, "--gpus")


def test_a_catalog_card_and_device_indices_contradict(capsys) -> None:
    _fails([*BASE, "--gpus", "0,1"], capsys, "--gpu", "--gpus")


def test_output_onto_a_folder_or_under_a_file_keeps_everything(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "plans"
    folder.mkdir()
    _fails([*BASE, "--out", str(folder), "--force"], capsys, str(folder), "folder")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    _fails([*BASE, "--out", str(a_file / "plan.yaml")], capsys, "plan.yaml")
    assert a_file.read_text() == "mine\n"


def test_existing_output_is_not_clobbered_without_force(tmp_path: Path, capsys) -> None:
    out = tmp_path / "plan.yaml"
    out.write_text("mine\n")
    _fails([*BASE, "--out", str(out)], capsys, "--force", str(out))
    assert out.read_text() == "mine\n"


def _mount_tmpfs(path: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_fs(tmp_path: Path):
    mnt = tmp_path / "fs"
    if not _mount_tmpfs(mnt, "size=64k"):
        pytest.skip("needs root and tmpfs mounts to make a full disk")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_leaves_the_old_file_intact(small_fs: Path, capsys) -> None:
    out = small_fs / "plan.yaml"
    out.write_text("mine\n")
    (small_fs / "filler").write_bytes(b"x" * (64 * 1024 - 8192))  # leave less room than a preset needs
    try:
        with open(small_fs / "filler2", "wb") as fh:
            fh.write(b"y" * 64 * 1024)
    except OSError:
        pass  # the disk is full now
    _fails([*BASE, "--out", str(out), "--force"], capsys, "disk is full")
    assert out.read_text() == "mine\n"
    assert [p.name for p in small_fs.iterdir() if p.name.startswith(".plan.yaml")] == []


def test_read_only_place(tmp_path: Path, capsys) -> None:
    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt, "ro,size=64k"):
        pytest.skip("needs root and tmpfs mounts to make a read-only place")
    try:
        _fails([*BASE, "--out", str(mnt / "plan.yaml")], capsys, "read-only")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_yaml_alias_bomb_is_refused_in_one_short_message(tmp_path: Path, capsys) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
              for i in range(1, 9)]
    lines += ["version: 1", "model: {id: x}", "hardware: {gpu: a, memory_gib: 24}", "training: *a8"]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    err = _fails(["--auto", "--preset", str(bomb)], capsys, "bomb.yaml", "line 2", "aliases")
    assert len(err) < 300


def test_preset_with_nonsense_numbers_names_the_field_path(tmp_path: Path, capsys) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("version: 1\nmodel: {id: Qwen/Qwen2.5-0.5B}\nhardware: {gpu: H100, memory_gib: 80}\n"
                 "training: {epochs: .inf, lora_alpha: 100000000000000000000000000000}\n")
    _fails(["--auto", "--preset", str(p)], capsys, "training.epochs", "training.lora_alpha")


def test_preset_that_is_a_folder_or_missing(tmp_path: Path, capsys) -> None:
    _fails(["--auto", "--preset", str(tmp_path)], capsys, str(tmp_path))
    _fails(["--auto", "--preset", str(tmp_path / "nope.yaml")], capsys, "nope.yaml")
