"""The knob registry: every TrainingKnobs field has a flag, and every flag round-trips.

The truth here is pydantic's own field list and argparse's own parser: a knob added to
`TrainingKnobs` without metadata, or a flag that parses to another value, fails these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuiwiz.cli import build_parser, main, request_from_args
from tuiwiz.errors import BadValue
from tuiwiz.planning.knobs import KNOB_BY_NAME, KNOBS, TrainingKnobs, format_knob, knobs_from, parse_knob
from tuiwiz.preset import load_preset

#: A value other than the default for each kind, so a round trip cannot pass by accident.
def _other_value(name: str) -> object:
    info = KNOB_BY_NAME[name]
    if info.kind == "switch":
        return not info.default
    if info.kind in ("choice", "targets"):
        return next(c for c in info.choices if c != info.default)
    field = TrainingKnobs.model_fields[name]
    bounds = {type(m).__name__: m for m in field.metadata}
    if info.kind == "int":
        return (info.default or 1) + 3 if "Le" not in bounds or (info.default or 1) + 3 <= bounds["Le"].le else 1
    return {"lora_dropout": 0.0, "warmup_ratio": 0.1, "val_ratio": 0.2, "learning_rate": 1e-4}.get(name, 2.5)


def test_every_field_has_a_distinct_flag_and_a_label() -> None:
    assert [k.name for k in KNOBS] == list(TrainingKnobs.model_fields)
    flags = [k.flag for k in KNOBS]
    assert len(set(flags)) == len(flags) and all(f.startswith("--") for f in flags)
    assert all(k.label and k.help for k in KNOBS)


@pytest.mark.parametrize("name", list(TrainingKnobs.model_fields))
def test_flag_round_trips_through_the_parser_and_a_preset(name: str, tmp_path: Path, capsys) -> None:
    value = _other_value(name)
    TrainingKnobs().replace(**{name: value})  # the chosen value is valid
    info = KNOB_BY_NAME[name]
    args = build_parser().parse_args(["--model", "Qwen/Qwen2.5-0.5B", "--gpu", "H100", "--cutoff-len", "512",
                                      info.flag, format_knob(name, value)])
    req = request_from_args(args)
    assert getattr(req.knobs, name) == value and name in req.fixed
    out = tmp_path / "p.yaml"
    code = main(["--auto", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "H100", "--cutoff-len", "512",
                 info.flag, format_knob(name, value), "--out", str(out)])
    capsys.readouterr()
    assert code in (0, 3)
    assert getattr(load_preset(out).training, name) == value


def test_choices_come_from_the_literal_types() -> None:
    assert KNOB_BY_NAME["optim"].choices == ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit")
    with pytest.raises(BadValue) as e:
        parse_knob("optim", "sgd")
    assert e.value.field == "optim" and "paged_adamw_8bit" in e.value.why


def test_lora_dropout_is_a_flag_the_estimate_sees(capsys) -> None:
    def peak(*extra: str) -> float:
        main(["--auto", "--json", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "24GB", "--cutoff-len", "2048",
              "--micro-batch", "2", "--grad-checkpointing", "off", *extra])
        return json.loads(capsys.readouterr().out)["memory"]["terms"]

    with_dropout = {t["key"]: t["gib"] for t in peak("--lora-dropout", "0.1")}
    without = {t["key"]: t["gib"] for t in peak("--lora-dropout", "0")}
    assert with_dropout["activations"] > without["activations"]


@pytest.mark.parametrize("data, field", [
    ({"epochs": float("inf")}, "epochs"),
    ({"lora_alpha": 10**29}, "lora_alpha"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"micro_batch_size": 0}, "micro_batch_size"),
    ({"lr_scheduler": "cosine-ish"}, "lr_scheduler"),
])
def test_nonsense_values_are_bad_values_naming_the_knob(data: dict, field: str) -> None:
    with pytest.raises(BadValue) as e:
        knobs_from(data)
    assert e.value.field == field


def test_cli_errors_name_the_flag_the_user_typed(capsys) -> None:
    code = main(["--auto", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "H100", "--micro-batch", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tuiwiz: --micro-batch:") and "micro_batch_size" not in err
    code = main(["--auto", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "H100", "--lr", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tuiwiz: --lr:") and "learning_rate" not in err
