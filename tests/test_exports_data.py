"""Exports keep the data's meaning: tool schemas, tool calls and results, system prompts, the
model's chat template, truncation; what a trainer cannot express is refused, never dropped.

The truth for the prompt format is tuiwiz's own rendering of the same row with the real
tokenizer (shared/data); the consumers' parsers and loaders run in bench/exports_check.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuiwiz.cli import main
from tuiwiz.errors import UserError
from tuiwiz.exports import export_text
from tuiwiz.preset import preset_from_dict

TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _preset(dataset: dict[str, Any], model: str = "Qwen/Qwen2.5-7B-Instruct", **model_extra: Any):
    return preset_from_dict({"name": "p", "model": {"id": model, **model_extra},
                             "hardware": {"gpu": "RTX 4090", "memory_gib": 24}, "dataset": dataset}, "test")


def _lf_entry(text: str) -> dict[str, Any]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line == "# {")
    end = next(i for i in range(start, len(lines)) if lines[i] == "# }")
    return next(iter(json.loads("\n".join(line[2:] for line in lines[start:end + 1])).values()))


def _sharegpt_tool_row(tools: Any = json.dumps(TOOLS)) -> dict[str, Any]:
    return {"conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": json.dumps({"temp": 3})},
        {"from": "gpt", "value": "It is 3 degrees."},
    ], "tools": tools}


@pytest.fixture
def glaive_like(tmp_path: Path) -> str:
    return _jsonl(tmp_path / "tools.jsonl", [_sharegpt_tool_row(), {"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "tools": ""}])


# --------------------------------------------------------------------------- tool calls


def test_llamafactory_keeps_tool_schemas_calls_and_results(glaive_like):
    text = export_text(_preset({"path": glaive_like}), "llamafactory")
    entry = _lf_entry(text)
    assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "conversations", "tools": "tools"}
    tags = entry["tags"]
    assert (tags["function_tag"], tags["observation_tag"]) == ("function_call", "observation")
    assert "1 of 2 rows carry tool schemas, 1 tool calls" in text


def test_axolotl_maps_function_calls_and_observations(glaive_like):
    cfg = yaml.safe_load(export_text(_preset({"path": glaive_like}), "axolotl"))
    ds = cfg["datasets"][0]
    assert ds["type"] == "chat_template" and ds["field_messages"] == "conversations"
    assert "function_call" in ds["roles"]["assistant"] and "observation" in ds["roles"]["tool"]
    # the tool schemas are read from the `tools` key, which this file uses
    assert cfg["chat_template"] == "tokenizer_default" or cfg["chat_template"] == "jinja"


def test_openai_tool_calls_use_llamafactorys_openai_format(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "3 degrees."}], "tools": TOOLS}])
    text = export_text(_preset({"path": path}), "llamafactory")
    entry = _lf_entry(text)
    assert entry["formatting"] == "openai" and entry["columns"]["tools"] == "tools"
    assert entry["tags"]["observation_tag"] == "tool"
    assert "detailed thinking off" in text  # what 0.9.5's openai converter adds, stated


def test_tools_under_another_key_are_refused_for_axolotl(tmp_path):
    row = _sharegpt_tool_row()
    row["functions"] = row.pop("tools")
    preset = _preset({"path": _jsonl(tmp_path / "f.jsonl", [row]), "columns": {"tools": "functions"}})
    assert _lf_entry(export_text(preset, "llamafactory"))["columns"]["tools"] == "functions"
    with pytest.raises(UserError, match="tools"):
        export_text(preset, "axolotl")


def test_mixed_role_names_are_refused_for_llamafactory(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "user", "value": "a"}, {"from": "gpt", "value": "b"}]}])
    with pytest.raises(UserError, match="one name per role"):
        export_text(_preset({"path": path}), "llamafactory")


def test_conversations_llamafactory_skips_are_counted_in_the_header(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                           {"from": "gpt", "value": "c"}]}])
    assert "1 of 2 conversations do not alternate" in export_text(_preset({"path": path}), "llamafactory")


def test_content_parts_are_refused_for_llamafactory(tmp_path):
    path = _jsonl(tmp_path / "v1.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "value": "a"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "b"}]}]}])
    with pytest.raises(UserError, match="content parts"):
        export_text(_preset({"path": path}), "llamafactory")
    assert yaml.safe_load(export_text(_preset({"path": path}), "axolotl"))["datasets"][0]["type"] == "chat_template"


# --------------------------------------------------------------------------- system prompts


def test_a_system_prompt_axolotl_cannot_place_is_refused_with_exit_2(tmp_path, capsys):
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                       {"role": "assistant", "content": "b"}]}])
    preset = _preset({"path": path, "system_prompt": "Be brief."})
    assert _lf_entry(export_text(preset, "llamafactory"))  # LLaMA-Factory has default_system
    assert yaml.safe_load(export_text(preset, "llamafactory"))["default_system"] == "Be brief."
    with pytest.raises(UserError, match="system prompt"):
        export_text(preset, "axolotl")
    rc = main(["--auto", "--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu", "4090", "--dataset", path,
               "--export", "axolotl", "--out", str(tmp_path / "x.yaml")])
    assert rc == 0  # the CLI plan has no system prompt: nothing to lose


def test_system_column_of_chat_rows_is_listed_for_llamafactory(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [{"system": "Be brief.", "conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}])
    assert _lf_entry(export_text(_preset({"path": path}), "llamafactory"))["columns"]["system"] == "system"


# --------------------------------------------------------------------------- the model's chat template


@pytest.mark.parametrize("tokenizer", ["qwen2.5", "qwen3", "llama3"])
def test_axolotl_instruction_prompt_is_the_models_chat_template(tmp_path, shared_data, tokenizer):
    """Axolotl's user-defined prompt, filled with a row, is the text tuiwiz renders for that row
    (Qwen3's empty think block included; Llama 3's BOS left to the tokenizer)."""
    from tuiwiz.data import load_tokenizer, render_sample
    from tuiwiz.data.layouts import iter_conversations
    from tuiwiz.preset import DatasetRef

    tok_dir = shared_data / "tokenizers" / tokenizer
    path = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Add {x} and 2", "input": "x=1", "output": "3"},
                                         {"instruction": "Say hi", "input": "", "output": "hi"}])
    preset = _preset({"path": path, "system_prompt": "Be brief."}, tokenizer=str(tok_dir))
    fmt = yaml.safe_load(export_text(preset, "axolotl"))["datasets"][0]["type"]
    tok = load_tokenizer(str(tok_dir))
    ds = DatasetRef(path=path, system_prompt="Be brief.")
    for sample, (instr, inp) in zip(iter_conversations(ds), [("Add {x} and 2", "x=1"), ("Say hi", "")]):
        ours = render_sample(sample, tok).text
        prompt = (fmt["format"].format(instruction=instr, input=inp) if inp
                  else fmt["no_input_format"].format(instruction=instr))
        bos = tok.special.get("bos_token") or ""
        if tokenizer == "llama3":  # the tokenizer adds <|begin_of_text|> itself: not in the format
            assert not prompt.startswith(bos) and ours.startswith(bos)
            ours = ours[len(bos):]
        assert ours.startswith(prompt + sample.messages[-1]["content"]), (prompt, ours)
        assert "### Instruction" not in prompt


def test_axolotl_instruction_rows_with_their_own_system_are_refused(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "input": "", "output": "b", "system": "s"}])
    with pytest.raises(UserError, match="system prompt"):
        export_text(_preset({"path": path}), "axolotl")
    assert _lf_entry(export_text(_preset({"path": path}), "llamafactory"))["columns"]["system"] == "system"


def test_a_base_model_without_a_template_gets_tuiwizs_default_inline(tmp_path):
    from tuiwiz.data import DEFAULT_CHAT_TEMPLATE

    path = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                       {"role": "assistant", "content": "b"}]}])
    cfg = yaml.safe_load(export_text(_preset({"path": path}, model="someone/unknown-model-xyz"), "axolotl"))
    assert cfg["chat_template"] == "jinja" and cfg["chat_template_jinja"] == DEFAULT_CHAT_TEMPLATE


# --------------------------------------------------------------------------- truncation and packing


def test_axolotl_truncates_like_tuiwiz_instead_of_dropping(glaive_like):
    assert yaml.safe_load(export_text(_preset({"path": glaive_like}), "axolotl"))["excess_length_strategy"] == \
        "truncate"


def test_llamafactory_states_how_its_truncation_differs(glaive_like):
    assert "Truncation differs" in export_text(_preset({"path": glaive_like}), "llamafactory")


def test_prompt_completion_keeps_the_prompt_verbatim_in_llamafactory(tmp_path):
    path = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    assert yaml.safe_load(export_text(_preset({"path": path}), "llamafactory"))["template"] == "empty"
