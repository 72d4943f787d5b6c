"""Export a tuiwiz plan as a config file for another trainer (LLaMA-Factory or Axolotl).

Users often plan here and train elsewhere. The export writes only keys each trainer defines
(`tests/test_exports.py` checks every key against sets vendored from their source), so the
file is accepted as is and runs the same plan: quantization, LoRA, batch, schedule, data.
Things a trainer cannot express (or that need a file tuiwiz must not write, like
LLaMA-Factory's dataset_info.json) are explained in YAML comments instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tuiwiz.errors import BadValue, UserError
from tuiwiz.planning.schedule import eval_and_save_steps
from tuiwiz.planning.knobs import ATTN_TARGETS, TrainingKnobs
from tuiwiz.preset import DatasetRef, Preset

FORMATS = ("llamafactory", "axolotl")

# tuiwiz attention implementation -> each trainer's option.
_LF_ATTN = {"sdpa": "sdpa", "flash_attention_2": "fa2", "eager": "disabled"}
_AXOLOTL_ATTN = {"sdpa": "sdp_attention", "flash_attention_2": "flash_attention", "eager": "eager_attention"}
_DS_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def export_text(preset: Preset, fmt: str) -> str:
    """The plan as a YAML config for `fmt` ("llamafactory" or "axolotl")."""
    if fmt == "llamafactory":
        return _llamafactory(preset)
    if fmt == "axolotl":
        return _axolotl(preset)
    raise BadValue("export", fmt, f"unknown format; choose one of {', '.join(FORMATS)}")


# ------------------------------------------------------------------------- shared helpers


def _model_ref(preset: Preset) -> str:
    return preset.model.path or preset.model.id


def _spec(preset: Preset) -> Any | None:
    """The ModelSpec when the model resolves offline, else None (export must not need it)."""
    from tuiwiz.models import resolve_model

    try:
        return resolve_model(_model_ref(preset))
    except UserError:
        return None


def lf_template(preset: Preset) -> str:
    """LLaMA-Factory's `template` name for the model family ("default" when unknown).

    LLaMA-Factory registers one "gemma" template for Gemma and Gemma 2 (there is no "gemma2").
    """
    spec = _spec(preset)
    if spec is None:
        return "default"
    ident = f"{spec.id} {preset.model.id}".lower().replace("_", "-")
    mt = spec.model_type
    if mt == "llama":
        if re.search(r"llama-?3", ident):
            return "llama3"
        if re.search(r"llama-?2", ident):
            return "llama2"
        return "llama3" if spec.vocab >= 128000 else "llama2"
    return {"qwen2": "qwen", "qwen3": "qwen3", "qwen3_moe": "qwen3", "mistral": "mistral",
            "gemma2": "gemma", "gemma": "gemma", "phi3": "phi"}.get(mt, "default")


def _targets(preset: Preset) -> list[str] | None:
    """LoRA module names for this model, or None for "all linear layers"."""
    knobs = preset.training
    if knobs.target_modules == "all-linear":
        return None
    spec = _spec(preset)
    if knobs.target_modules == "attn":
        return list(spec.attention_module_names()) if spec is not None else list(ATTN_TARGETS)
    if spec is None:
        return list(knobs.target_modules)
    return list(spec.resolve_targets(tuple(knobs.target_modules)))  # Phi-3: q_proj -> qkv_proj


def _slug(preset: Preset) -> str:
    base = preset.name or preset.model.id.rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "run"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _header(preset: Preset, trainer: str, run_cmd: str) -> list[str]:
    name = _one_line(preset.name) if preset.name else "(unnamed plan)"
    lines = [
        f"# Exported by tuiwiz for {trainer} from plan {name!r} (model {preset.model.id}).",
        f"# Run: {run_cmd}",
    ]
    if preset.description:
        lines.append(f"# Plan: {_one_line(preset.description)}")
    if preset.model.tokenizer:
        lines.append(f"# The plan uses the tokenizer at {preset.model.tokenizer}; copy it next to the model"
                     " weights if they differ.")
    return lines


def _dump(section: dict[str, Any]) -> str:
    return yaml.safe_dump(section, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _join(header: list[str], sections: list[tuple[str, list[str], dict[str, Any]]]) -> str:
    out = [*header, ""]
    for title, comments, body in sections:
        out.append(f"### {title}")
        out.extend(f"# {c}" if c else "#" for c in comments)
        if body:
            out.append(_dump(body).rstrip("\n"))
        out.append("")
    return "\n".join(out)


def _eval_plan(knobs: TrainingKnobs) -> tuple[bool, int, int]:
    """(evaluates?, eval_steps, save_steps) as tuiwiz's own worker runs them.

    No eval_steps means "evaluate when saving"; early stopping needs saves on eval steps.
    """
    has_eval = knobs.val_ratio > 0
    return (has_eval, *eval_and_save_steps(knobs, has_eval))


def _layout_and_columns(ds: DatasetRef) -> tuple[str | None, dict[str, str]]:
    """The layout (from the preset, else detected from the first record) and its file keys."""
    from tuiwiz.data.layouts import DEFAULT_COLUMNS, detect_layout, resolve_columns

    layout, found = ds.layout, {}
    if layout is None:
        try:
            from tuiwiz.data.readers import ReadReport, iter_records

            first = next(iter_records(Path(ds.path).expanduser(), ReadReport()), None)
            if first is not None:
                layout, found = detect_layout(first.data)
        except (UserError, OSError, ValueError):
            return None, {}
    if layout not in DEFAULT_COLUMNS:
        return None, {}
    return layout, resolve_columns(layout, found, ds.columns)


def _warmup_comment(ratio: float) -> str:
    return (f"warmup_steps: {ratio} is a ratio of the total steps (transformers >= 5 reads a float < 1 so);"
            f" with transformers 4.x write `warmup_ratio: {ratio}` instead.")


# ------------------------------------------------------------------------- LLaMA-Factory


def _lf_dataset_entry(ds: DatasetRef) -> tuple[dict[str, Any], str | None]:
    """A dataset_info.json entry for the file, and the layout it assumes (None if unknown).

    Once "columns" is given LLaMA-Factory reads no other column, and it indexes every column
    it is told about, so optional ones (system, tools, history) are listed only when the
    preset maps them explicitly.
    """
    layout, cols = _layout_and_columns(ds)
    aliases = {"prompt": "instruction", "query": "input", "response": "output"}
    mapped = {aliases.get(key, key) for key in (ds.columns or {})}
    optional = {name: cols[name] for name in ("system", "tools", "history") if name in mapped and name in cols}
    entry: dict[str, Any] = {"file_name": Path(ds.path).expanduser().name}
    if layout == "alpaca":
        entry["formatting"] = "alpaca"
        entry["columns"] = {"prompt": cols["instruction"], "query": cols["input"], "response": cols["output"],
                            **optional}
    elif layout in ("sharegpt", "messages"):
        sharegpt = layout == "sharegpt"
        user, assistant, tool = ("human", "gpt", "observation") if sharegpt else ("user", "assistant", "tool")
        entry["formatting"] = "sharegpt"
        entry["columns"] = {"messages": cols["messages"], **optional}
        entry["tags"] = {"role_tag": cols["role_tag"], "content_tag": cols["content_tag"], "user_tag": user,
                         "assistant_tag": assistant, "observation_tag": tool, "function_tag": "function_call",
                         "system_tag": "system"}
    elif layout == "prompt_completion":
        entry["formatting"] = "alpaca"
        entry["columns"] = {"prompt": cols["prompt"], "response": cols["completion"], **optional}
    elif layout == "text":
        entry["columns"] = {"prompt": cols["text"]}
    return entry, layout


def _lf_model(preset: Preset) -> dict[str, Any]:
    """Which model, how it is quantized, and its attention and checkpointing."""
    k = preset.training
    model: dict[str, Any] = {"model_name_or_path": _model_ref(preset)}
    if preset.model.trust_remote_code:
        model["trust_remote_code"] = True
    if k.quant_bits in (4, 8):
        model["quantization_bit"] = k.quant_bits
        model["quantization_method"] = "bnb"
        if k.quant_bits == 4:
            model["quantization_type"] = "nf4"
            model["double_quantization"] = k.double_quant
    model["flash_attn"] = _LF_ATTN[k.attn]
    model["disable_gradient_checkpointing"] = not k.grad_checkpointing
    return model


def _lf_method(preset: Preset, layout: str | None) -> dict[str, Any]:
    """LoRA on the plan's targets; plain text trains as continued pre-training (stage pt)."""
    k, targets = preset.training, _targets(preset)
    return {
        "stage": "pt" if layout == "text" else "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": k.lora_rank,
        "lora_alpha": k.lora_alpha,
        "lora_dropout": k.lora_dropout,
        "lora_target": "all" if targets is None else ",".join(targets),
    }


def _lf_data(preset: Preset) -> tuple[dict[str, Any], list[str], str | None]:
    """The dataset section, the dataset_info.json entry to add (as comments), and the layout."""
    k, ds = preset.training, preset.dataset
    data: dict[str, Any] = {}
    notes: list[str] = []
    layout = None
    if ds is not None:
        entry, layout = _lf_dataset_entry(ds)
        name = re.sub(r"[^A-Za-z0-9_]+", "_", Path(ds.path).expanduser().stem).strip("_") or "tuiwiz_data"
        data["dataset"] = name
        data["dataset_dir"] = str(Path(ds.path).expanduser().parent)
        notes += [
            "LLaMA-Factory reads datasets by name from dataset_info.json in dataset_dir; add this entry",
            f"to {Path(data['dataset_dir']) / 'dataset_info.json'} (create the file if missing):",
            *json.dumps({name: entry}, indent=2, ensure_ascii=False).splitlines(),
        ]
        if layout is None:
            notes.append("Layout unknown: set \"formatting\" (alpaca | sharegpt) and \"columns\" to match the file.")
        elif layout == "text":
            notes.append("Plain text: trained as continued pre-training (stage: pt), every token in the loss.")
        if ds.system_prompt:
            data["default_system"] = ds.system_prompt
    else:
        data["dataset"] = "my_dataset"
        data["dataset_dir"] = "data"
        notes += [
            "The plan has no dataset: register yours in data/dataset_info.json under \"my_dataset\", e.g.",
            '  "my_dataset": {"file_name": "train.jsonl", "formatting": "alpaca"}',
        ]
    data["template"] = lf_template(preset)
    data["cutoff_len"] = k.cutoff_len
    data["packing"] = k.packing
    if k.val_ratio > 0:
        data["val_size"] = k.val_ratio
    return data, notes, layout


def _lf_train(k: TrainingKnobs) -> dict[str, Any]:
    train: dict[str, Any] = {
        "per_device_train_batch_size": k.micro_batch_size,
        "gradient_accumulation_steps": k.grad_accum,
        "learning_rate": k.learning_rate,
        "num_train_epochs": k.epochs,
    }
    if k.max_steps is not None:
        train["max_steps"] = k.max_steps
    train["lr_scheduler_type"] = k.lr_scheduler
    train["warmup_steps"] = k.warmup_ratio
    train["optim"] = k.optim
    train["bf16" if k.compute_dtype == "bf16" else "fp16"] = True
    train["seed"] = k.seed
    return train


def _lf_output_and_eval(preset: Preset) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Where checkpoints go and when, and the evaluation schedule (with what it cannot express)."""
    k = preset.training
    has_eval, eval_steps, save_steps = _eval_plan(k)
    output = {"output_dir": f"saves/{_slug(preset)}", "logging_steps": k.logging_steps, "save_strategy": "steps",
              "save_steps": save_steps, "report_to": "none"}
    evaluation: dict[str, Any] = {}
    notes: list[str] = []
    if has_eval:
        evaluation = {"per_device_eval_batch_size": k.micro_batch_size, "eval_strategy": "steps",
                      "eval_steps": eval_steps}
        if k.early_stopping_patience:
            notes.append(f"The plan stops early after {k.early_stopping_patience} evaluations without"
                         " improvement; LLaMA-Factory has no option for that.")
    else:
        notes.append("No validation split in this plan (val_ratio 0).")
    return output, evaluation, notes


def _llamafactory(preset: Preset) -> str:
    data, data_notes, layout = _lf_data(preset)
    output, evaluation, eval_notes = _lf_output_and_eval(preset)
    sections = [
        ("model", [], _lf_model(preset)),
        ("method", [], _lf_method(preset, layout)),
        ("dataset", data_notes, data),
        ("train", [_warmup_comment(preset.training.warmup_ratio)], _lf_train(preset.training)),
        ("output", [], output),
        ("eval", eval_notes, evaluation),
    ]
    return _join(_header(preset, "LLaMA-Factory", "llamafactory-cli train THIS_FILE.yaml"), sections)


# ------------------------------------------------------------------------- Axolotl


def _axolotl_dataset(ds: DatasetRef) -> tuple[dict[str, Any], list[str]]:
    layout, cols = _layout_and_columns(ds)
    path = Path(ds.path).expanduser()
    entry: dict[str, Any] = {"path": str(path)}
    ds_type = _DS_TYPES.get(path.suffix.lower())
    if ds_type:
        entry["ds_type"] = ds_type
    notes: list[str] = []
    if layout == "alpaca":
        if (cols["instruction"], cols["input"], cols["output"]) == ("instruction", "input", "output"):
            entry["type"] = "alpaca"
        else:  # axolotl's user-defined prompt type maps other key names
            entry["type"] = {"field_instruction": cols["instruction"], "field_input": cols["input"],
                             "field_output": cols["output"], "format": "{instruction}\n{input}\n",
                             "no_input_format": "{instruction}\n"}
    elif layout in ("sharegpt", "messages"):
        entry["type"] = "chat_template"
        entry["field_messages"] = cols["messages"]
        entry["message_property_mappings"] = {"role": cols["role_tag"], "content": cols["content_tag"]}
        if layout == "sharegpt":
            entry["roles"] = {"user": ["human", "user"], "assistant": ["gpt", "assistant"], "system": ["system"]}
    elif layout == "prompt_completion":
        entry["type"] = {"field_instruction": cols["prompt"], "field_output": cols["completion"],
                         "format": "{instruction}", "no_input_format": "{instruction}"}
        notes.append("prompt_completion: the prompt is used verbatim and only the completion is trained.")
    elif layout == "text":
        entry["type"] = "completion"
        entry["field"] = cols["text"]
    else:
        entry["type"] = "alpaca"
        notes.append("Layout unknown: `type: alpaca` is a guess; use chat_template for conversations.")
    return entry, notes


def _axolotl(preset: Preset) -> str:
    k = preset.training
    targets = _targets(preset)
    has_eval, eval_steps, save_steps = _eval_plan(k)

    model: dict[str, Any] = {"base_model": _model_ref(preset)}
    if preset.model.trust_remote_code:
        model["trust_remote_code"] = True

    adapter: dict[str, Any] = {}
    if k.quant_bits == 4:
        adapter = {"adapter": "qlora", "load_in_4bit": True,
                   "bnb_config_kwargs": {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": k.double_quant}}
    elif k.quant_bits == 8:
        adapter = {"adapter": "lora", "load_in_8bit": True}
    else:
        adapter = {"adapter": "lora"}
    adapter.update({"lora_r": k.lora_rank, "lora_alpha": k.lora_alpha, "lora_dropout": k.lora_dropout})
    if targets is None:
        adapter["lora_target_linear"] = True
    else:
        adapter["lora_target_modules"] = targets

    data: dict[str, Any] = {}
    data_notes: list[str] = []
    if preset.dataset is not None:
        entry, data_notes = _axolotl_dataset(preset.dataset)
        data["datasets"] = [entry]
        if preset.dataset.system_prompt:
            data["default_system_message"] = preset.dataset.system_prompt
    else:
        data_notes += ["The plan has no dataset: add one, e.g.",
                       "datasets:", "  - path: train.jsonl", "    ds_type: json", "    type: alpaca"]
    data["dataset_prepared_path"] = "last_run_prepared"
    data["val_set_size"] = k.val_ratio
    data["sequence_len"] = k.cutoff_len
    data["sample_packing"] = k.packing
    if k.packing:
        data["pad_to_sequence_len"] = True

    train: dict[str, Any] = {
        "micro_batch_size": k.micro_batch_size,
        "gradient_accumulation_steps": k.grad_accum,
        "num_epochs": k.epochs,
    }
    if k.max_steps is not None:
        train["max_steps"] = k.max_steps
    train.update({
        "learning_rate": k.learning_rate,
        "lr_scheduler": k.lr_scheduler,
        "warmup_ratio": k.warmup_ratio,
        "optimizer": k.optim,
        "gradient_checkpointing": k.grad_checkpointing,
        _AXOLOTL_ATTN[k.attn]: True,
        "bf16": k.compute_dtype == "bf16",
        "fp16": k.compute_dtype == "fp16",
        "seed": k.seed,
    })

    output: dict[str, Any] = {
        "output_dir": f"./outputs/{_slug(preset)}",
        "logging_steps": k.logging_steps,
        "save_steps": save_steps,
    }
    evaluation: dict[str, Any] = {}
    if has_eval:
        evaluation["eval_steps"] = eval_steps  # axolotl rejects eval_steps when val_set_size is 0
        if k.early_stopping_patience:
            evaluation["early_stopping_patience"] = k.early_stopping_patience

    sections = [
        ("model", [], model),
        ("adapter", [], adapter),
        ("dataset", data_notes, data),
        ("train", [], train),
        ("output", [], output),
        ("eval", [] if has_eval else ["No validation split in this plan (val_ratio 0)."], evaluation),
    ]
    return _join(_header(preset, "Axolotl", "axolotl train THIS_FILE.yaml"), sections)
