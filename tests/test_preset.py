"""Presets: safe YAML, field-path errors, atomic non-clobbering writes, round trips."""

from __future__ import annotations

import pytest

from tuiwiz.errors import Clobber, UserError
from tuiwiz.preset import HardwareRef, ModelRef, Preset, load_preset, save_preset


def _preset() -> Preset:
    return Preset(name="t", model=ModelRef(id="Qwen/Qwen2.5-7B"), hardware=HardwareRef(gpu="RTX 4090", memory_gib=24))


def test_round_trip_preserves_every_field(tmp_path):
    p = _preset().model_copy(update={"training": _preset().training.replace(lora_rank=32, cutoff_len=4096)})
    path = save_preset(p, tmp_path / "a.yaml")
    assert load_preset(path) == p


def test_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("mine\n")
    with pytest.raises(Clobber) as e:
        save_preset(_preset(), path)
    assert e.value.path == path
    assert path.read_text() == "mine\n"
    save_preset(_preset(), path, force=True)
    assert load_preset(path).model.id == "Qwen/Qwen2.5-7B"


def test_errors_name_field_path_and_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nmodel: {id: x}\nhardware: {gpu: a, memory_gib: 24}\n"
                    "training: {lora_rank: 0, optim: sgd, colour: red}\n")
    with pytest.raises(UserError) as e:
        load_preset(path)
    msg = str(e.value)
    assert "training.lora_rank" in msg and "(got 0)" in msg
    assert "training.optim" in msg and "'sgd'" in msg
    assert "training.colour" in msg


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_preset(path)


def test_other_versions_and_missing_files_are_clear(tmp_path):
    path = tmp_path / "v2.yaml"
    path.write_text("version: 2\n")
    with pytest.raises(UserError, match="version"):
        load_preset(path)
    with pytest.raises(UserError, match="no such preset"):
        load_preset(tmp_path / "nope.yaml")
