"""Export a tuiwiz plan as a config file for another trainer (LLaMA-Factory 0.9.5 or Axolotl 0.19).

Users often plan here and train elsewhere. An export is a promise that the run fits and trains
on the data the way tuiwiz profiled it, so:
- it writes only keys each trainer defines (`tests/test_exports.py` checks every key against
  sets vendored from their source) and none they deprecate;
- its memory is estimated for that trainer's own stack (`tuiwiz.planning.stacks`): the header
  states the peak, and the trainer's fused loss (Liger) is switched on whenever the plan counts on it;
- the data mapping keeps what tuiwiz trains on: system prompts, tool schemas, tool calls and
  tool results, the model's chat template, truncation at the cutoff. What a trainer cannot
  express is refused (`UserError`) rather than dropped; what it does differently is stated in
  the header;
- a plan without a dataset gets a clearly marked placeholder the trainer's parser accepts.
Things that need a file tuiwiz must not write (LLaMA-Factory's dataset_info.json) are given as
YAML comments. `bench/exports_check.py` loads every export with the trainers' own parsers and
dataset loaders.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuiwiz.atomic import write_text_atomic
from tuiwiz.errors import BadValue, UserError
from tuiwiz.planning.knobs import ATTN_TARGETS, TrainingKnobs
from tuiwiz.planning.schedule import eval_and_save_steps
from tuiwiz.planning.stacks import STACKS, fit_to_trainer, residual_fp32
from tuiwiz.preset import DatasetRef, Preset, save_preset

FORMATS = ("llamafactory", "axolotl")
#: Exports that launch the plan on a cluster (tuiwiz.runs.cluster): an sbatch script, a per-node script.
CLUSTER_FORMATS = ("slurm", "torchrun")


@dataclass(frozen=True)
class ExportFormat:
    """One thing a plan can be written as: the CLI's `--export` choices and the wizard's export dialog."""

    key: str
    label: str
    filename: str


EXPORT_FORMATS = (
    ExportFormat("preset", "tuiwiz preset (YAML)", "tuiwiz-preset.yaml"),
    ExportFormat("llamafactory", "LLaMA-Factory config", "llamafactory.yaml"),
    ExportFormat("axolotl", "Axolotl config", "axolotl.yaml"),
    ExportFormat("slurm", "SLURM job script (sbatch)", "job.sbatch"),
    ExportFormat("torchrun", "torchrun launch script (per node)", "launch-node.sh"),
)


def plan_export_text(preset: Preset, fmt: str) -> str:
    """The plan in `fmt` other than a preset: another trainer's config, or a cluster launch script."""
    if fmt in CLUSTER_FORMATS:
        from tuiwiz.runs.cluster import cluster_script

        return cluster_script(preset, fmt)
    return export_text(preset, fmt)


def write_plan_export(preset: Preset, fmt: str, path: str | Path, *, force: bool = False) -> Path:
    """Write the plan as `fmt` atomically. Raises `Clobber` if the file exists and not `force`."""
    if fmt == "preset":
        return save_preset(preset, path, force=force)
    return write_text_atomic(path, plan_export_text(preset, fmt), force=force)

# tuiwiz attention implementation -> each trainer's option (Axolotl: `attn_implementation`; its
# sdp_attention / flash_attention / eager_attention booleans are deprecated).
_LF_ATTN = {"sdpa": "sdpa", "flash_attention_2": "fa2", "eager": "disabled"}
_AXOLOTL_ATTN = {"sdpa": "sdpa", "flash_attention_2": "flash_attention_2", "eager": "eager"}
_DS_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
AXOLOTL_LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
#: What a placeholder says, so that nobody trains on it by mistake.
PLACEHOLDER = "REPLACE_ME"


def export_text(preset: Preset, fmt: str) -> str:
    """The plan as a YAML config for `fmt` ("llamafactory" or "axolotl").

    Raises `UserError` (field "dataset") when the data cannot be mapped without losing something.
    """
    if fmt not in FORMATS:
        raise BadValue("export", fmt, f"unknown format; choose one of {', '.join(FORMATS)}")
    spec = _spec(preset)
    knobs, memory = _for_trainer(preset, fmt, spec)
    facts = data_facts(preset.dataset) if preset.dataset is not None else None
    if fmt == "llamafactory":
        return _llamafactory(preset, knobs, memory, facts)
    return _axolotl(preset, knobs, memory, facts)


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


def _for_trainer(preset: Preset, fmt: str, spec: Any | None) -> tuple[TrainingKnobs, list[str]]:
    """The knobs as `fmt` runs them, and header lines with tuiwiz's estimate for that stack."""
    from tuiwiz.planning.advisor import DEFAULT_HEADROOM
    from tuiwiz.planning.memory import estimate_memory

    knobs = preset.training if preset.training.trainer == fmt else preset.training.replace(trainer=fmt)
    knobs, changes = fit_to_trainer(knobs, spec.model_type if spec is not None else None)
    stack = STACKS[fmt]
    loss = (f"{stack.fused_loss}, switched on below" if knobs.loss == "chunked"
            else "full logits (standard cross-entropy)")
    lines = [f"Stack: {stack.label}; loss: {loss}; residual stream {'fp32' if residual_fp32(knobs) else '16-bit'};"
             " fp32 LoRA weights."]
    if spec is None:
        return knobs, [*lines, f"Memory: not estimated ({_model_ref(preset)} has no config offline)."]
    est = estimate_memory(spec, knobs, preset.hardware.count)
    budget = (preset.estimate.budget_gib if preset.estimate is not None
              else preset.hardware.memory_gib * (1 - DEFAULT_HEADROOM))
    fits = est.peak_gib <= budget
    lines.append(f"Memory, estimated by tuiwiz for this stack: peak {est.peak_gib:.1f} GiB per GPU of a "
                 f"{budget:.1f} GiB budget on {preset.hardware.gpu} ({'fits' if fits else 'DOES NOT FIT'}).")
    if not fits:
        lines.append(f"DOES NOT FIT: re-plan it for this trainer (trainer: {fmt}) before training.")
    return knobs, lines + changes


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


def _header(preset: Preset, trainer: str, run_cmd: str, memory: list[str]) -> list[str]:
    name = _one_line(preset.name) if preset.name else "(unnamed plan)"
    lines = [
        f"# Exported by tuiwiz for {trainer} from plan {name!r} (model {preset.model.id}).",
        f"# Run: {run_cmd}",
    ]
    if preset.description:
        lines.append(f"# Plan: {_one_line(preset.description)}")
    lines.extend(f"# {line}" for line in memory)
    if preset.model.tokenizer:
        lines.append(f"# The plan uses the tokenizer at {preset.model.tokenizer}; copy it next to the model"
                     " weights if they differ.")
    return lines


def _dump(section: dict[str, Any]) -> str:
    return yaml.safe_dump(section, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)


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
    """(evaluates?, eval_steps, save_steps) as tuiwiz's own worker runs them."""
    has_eval = knobs.val_ratio > 0
    return (has_eval, *eval_and_save_steps(knobs, has_eval))


def _warmup_comment(ratio: float) -> str:
    return (f"warmup_steps: {ratio} is a ratio of the total steps (transformers >= 5 reads a float < 1 so);"
            f" with transformers 4.x write `warmup_ratio: {ratio}` instead.")


def _refuse(trainer: str, ds: DatasetRef, what: str) -> UserError:
    return UserError(f"{ds.path}: cannot export to {trainer} without losing data: {what}.", field="dataset")


# ------------------------------------------------------------------------- what the data holds


#: Normalized role -> the names a file may give it (tuiwiz.data.layouts reads all of them).
_ROLE_NAMES = {
    "user": ("human", "user"),
    "assistant": ("gpt", "assistant", "bot", "model", "chatgpt"),
    "tool": ("observation", "tool", "function", "ipython"),
    "function_call": ("function_call",),
    "system": ("system",),
}


@dataclass(frozen=True)
class DataFacts:
    """What the dataset holds that an export must carry: read once, with tuiwiz's own reader."""

    layout: str | None
    cols: dict[str, str] = field(default_factory=dict)
    #: top-level keys of any record, and role names of any turn, as written in the file
    keys: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    rows: int = 0
    tool_rows: int = 0  # rows with tool schemas
    tool_calls: int = 0
    #: assistant turns carry OpenAI `tool_calls` (messages layout)
    openai_calls: bool = False
    #: prompt/completion rows whose values are message lists
    chat_pairs: bool = False
    #: turns whose content is a list of parts (OpenAI / LLaMA-Factory v1), which tuiwiz joins
    content_parts: bool = False
    #: rows with no system turn and no system column value (a preset's system prompt fills them)
    no_system_rows: int = 0
    #: rows whose turns do not alternate user/assistant as LLaMA-Factory's converters require
    lf_broken_rows: int = 0

    def has(self, col: str) -> bool:
        return col in self.cols and self.cols[col] in self.keys


def data_facts(ds: DatasetRef) -> DataFacts:
    """Read the dataset once (I/O): its layout, its keys and roles, and its tool calls.

    An unreadable file gives `DataFacts(layout)` with what the preset says; the export then
    writes what it can and says the rest in comments.
    """
    from tuiwiz.data.layouts import DEFAULT_COLUMNS, iter_conversations, resolve_columns
    from tuiwiz.data.readers import ReadReport, iter_records

    path = Path(ds.path).expanduser()
    try:
        first = next(iter_records(path, ReadReport()), None)
    except (UserError, OSError, ValueError):
        first = None
    if first is None:
        layout = ds.layout if ds.layout in DEFAULT_COLUMNS else None
        return DataFacts(layout, resolve_columns(layout, {}, ds.columns) if layout else {})
    from tuiwiz.data.layouts import _layout_and_columns

    try:
        layout, cols = _layout_and_columns(first, ds.layout, ds.columns, path)
    except UserError:
        return DataFacts(None)
    keys, roles, openai, pairs, parts = set(), set(), False, False, False
    for rec in iter_records(path, ReadReport()):
        keys.update(map(str, rec.data))
        turns = rec.data.get(cols.get("messages", ""))
        for turn in turns if isinstance(turns, list) else ():
            if isinstance(turn, dict):
                roles.add(str(turn.get(cols["role_tag"])))
                openai = openai or bool(turn.get("tool_calls"))
                parts = parts or isinstance(turn.get(cols["content_tag"]), list)
        if layout == "prompt_completion":
            pairs = pairs or any(isinstance(rec.data.get(cols[k]), list) for k in ("prompt", "completion"))
    rows = tool_rows = calls = no_system = broken = 0
    try:
        for s in iter_conversations(ds.model_copy(update={"system_prompt": None}), report=ReadReport()):
            rows += 1
            msgs = s.messages or []
            tool_rows += bool(s.tools)
            calls += sum(len(m.get("tool_calls") or ()) for m in msgs)
            no_system += bool(msgs) and msgs[0]["role"] != "system"
            broken += s.kind == "chat" and not _lf_alternates(msgs, merge_tools=openai)
    except UserError:
        pass
    return DataFacts(layout, cols, frozenset(keys), frozenset(roles), rows, tool_rows, calls, openai, pairs, parts,
                     no_system, broken)


def _lf_alternates(msgs: list[dict[str, Any]], merge_tools: bool) -> bool:
    """LLaMA-Factory's sharegpt/openai converters keep a conversation only when, after a leading
    system turn, it goes user-or-tool / assistant pairs (data/converter.py: odd_tags, even_tags);
    its openai converter first merges consecutive tool results into one turn."""
    roles = [m["role"] for m in msgs]
    if roles and roles[0] == "system":
        roles = roles[1:]
    if merge_tools:
        roles = [r for i, r in enumerate(roles) if not (r == "tool" and i and roles[i - 1] == "tool")]
    return len(roles) % 2 == 0 and all(r in (("user", "tool") if i % 2 == 0 else ("assistant",))
                                       for i, r in enumerate(roles))


def _tool_lines(facts: DataFacts) -> list[str]:
    if not (facts.tool_rows or facts.tool_calls):
        return []
    return [f"Tools: {facts.tool_rows} of {facts.rows} rows carry tool schemas, {facts.tool_calls} tool calls"
            " in all; both are mapped below."]


# ------------------------------------------------------------------------- LLaMA-Factory


def _lf_tag(facts: DataFacts, role: str, ds: DatasetRef) -> str:
    """The one name LLaMA-Factory reads for `role`: the preset's tag, else the name the file uses,
    else the layout's usual one."""
    tag = {"user": "user_tag", "assistant": "assistant_tag", "tool": "observation_tag",
           "function_call": "function_tag", "system": "system_tag"}[role]
    if (ds.columns or {}).get(tag):
        return ds.columns[tag]
    names = _ROLE_NAMES[role]
    used = [n for n in names if n in facts.roles]
    if len(used) > 1:
        raise _refuse("LLaMA-Factory", ds, f"its {role} turns are named both {used[0]!r} and {used[1]!r}, and "
                      "LLaMA-Factory reads one name per role (it would skip one kind of conversation)")
    if used:
        return used[0]
    usual = {"user": ("human", "user"), "assistant": ("gpt", "assistant"), "tool": ("observation", "tool"),
             "function_call": ("function_call", "function_call"), "system": ("system", "system")}[role]
    return usual[0] if facts.layout == "sharegpt" else usual[1]


def _lf_dataset_entry(ds: DatasetRef, facts: DataFacts) -> dict[str, Any]:
    """A dataset_info.json entry for the file.

    Once "columns" is given LLaMA-Factory reads no other column, so every column the file has and
    tuiwiz trains on (system, tools, history) is listed; and it indexes every column it is told
    about, so one the file lacks is listed only when the preset maps it explicitly.
    """
    layout, cols = facts.layout, facts.cols
    mapped = {{"prompt": "instruction", "query": "input", "response": "output"}.get(k, k) for k in ds.columns or {}}
    optional = {name: cols[name] for name in ("system", "tools", "history")
                if name in cols and (facts.has(name) or (name in mapped and not facts.keys))}
    entry: dict[str, Any] = {"file_name": Path(ds.path).expanduser().name}
    if layout == "alpaca":
        entry["formatting"] = "alpaca"
        entry["columns"] = {"prompt": cols["instruction"], "query": cols["input"], "response": cols["output"],
                            **optional}
    elif layout in ("sharegpt", "messages"):
        entry["formatting"] = "openai" if facts.openai_calls else "sharegpt"
        entry["columns"] = {"messages": cols["messages"], **optional}
        entry["tags"] = {"role_tag": cols["role_tag"], "content_tag": cols["content_tag"],
                         "user_tag": _lf_tag(facts, "user", ds), "assistant_tag": _lf_tag(facts, "assistant", ds),
                         "observation_tag": _lf_tag(facts, "tool", ds),
                         "function_tag": _lf_tag(facts, "function_call", ds),
                         "system_tag": _lf_tag(facts, "system", ds)}
    elif layout == "prompt_completion":
        entry["formatting"] = "alpaca"
        entry["columns"] = {"prompt": cols["prompt"], "response": cols["completion"], **optional}
    elif layout == "text":
        entry["columns"] = {"prompt": cols["text"]}
    return entry


def _lf_model(preset: Preset, k: TrainingKnobs) -> dict[str, Any]:
    """Which model, how it is quantized, its attention, checkpointing and the fused loss."""
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
    if k.grad_checkpointing:
        model["use_reentrant_gc"] = False  # as tuiwiz measures its checkpointing (LLaMA-Factory defaults to True)
    if k.loss == "chunked":
        model["enable_liger_kernel"] = True  # the fused loss the estimate counts on (needs liger-kernel)
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


def _lf_dataset_notes(ds: DatasetRef, facts: DataFacts, name: str, data_dir: str) -> list[str]:
    if facts.chat_pairs:
        raise _refuse("LLaMA-Factory", ds, "its prompt/completion values are message lists, which LLaMA-Factory's "
                      "alpaca format reads as plain strings")
    if facts.content_parts:
        raise _refuse("LLaMA-Factory", ds, "its turns hold lists of content parts, which LLaMA-Factory 0.9.5's "
                      "converters pass on as if they were text; join them into strings first")
    entry = _lf_dataset_entry(ds, facts)
    notes = [
        "LLaMA-Factory reads datasets by name from dataset_info.json in dataset_dir; add this entry",
        f"to {Path(data_dir) / 'dataset_info.json'} (create the file if missing):",
        *json.dumps({name: entry}, indent=2, ensure_ascii=False).splitlines(),
    ]
    if facts.layout is None:
        notes.append("Layout unknown: set \"formatting\" (alpaca | sharegpt) and \"columns\" to match the file.")
    elif facts.layout == "text":
        notes.append("Plain text: trained as continued pre-training (stage: pt), every token in the loss.")
    elif facts.layout == "prompt_completion":
        notes.append("prompt_completion: template `empty` keeps the prompt verbatim, as tuiwiz does (tuiwiz"
                     " also ends the completion with the EOS token).")
    else:
        notes.append("Truncation differs: LLaMA-Factory shortens an over-long conversation turn by turn (prompt"
                     " and reply in proportion); tuiwiz keeps its first cutoff_len tokens.")
    notes += _tool_lines(facts)
    if facts.openai_calls:
        notes.append("formatting openai keeps the tool_calls; LLaMA-Factory 0.9.5 then adds \"detailed thinking"
                     " off\" to the system prompt of rows that have neither tools nor that phrase.")
    if facts.lf_broken_rows:
        notes.append(f"{facts.lf_broken_rows} of {facts.rows} conversations do not alternate user/assistant turns:"
                     " LLaMA-Factory skips them (tuiwiz trains them).")
    return notes


def _lf_data(preset: Preset, k: TrainingKnobs, facts: DataFacts | None) -> tuple[dict[str, Any], list[str]]:
    """The dataset section and its notes (the dataset_info.json entry to add, as comments)."""
    ds = preset.dataset
    data: dict[str, Any] = {}
    notes: list[str] = []
    layout = facts.layout if facts is not None else None
    if ds is not None and facts is not None:
        name = re.sub(r"[^A-Za-z0-9_]+", "_", Path(ds.path).expanduser().stem).strip("_") or "tuiwiz_data"
        data["dataset"] = name
        data["dataset_dir"] = str(Path(ds.path).expanduser().parent)
        notes = _lf_dataset_notes(ds, facts, name, data["dataset_dir"])
        if ds.system_prompt:
            data["default_system"] = ds.system_prompt
    else:
        data["dataset"] = PLACEHOLDER
        data["dataset_dir"] = f"{PLACEHOLDER}_data_dir"
        notes += [
            f"PLACEHOLDER: the plan has no dataset. Replace {PLACEHOLDER} with your dataset's name in",
            "dataset_info.json inside dataset_dir, e.g.",
            f'  "{PLACEHOLDER}": {{"file_name": "train.jsonl", "formatting": "sharegpt"}}',
        ]
    data["template"] = "empty" if layout == "prompt_completion" else lf_template(preset)
    data["cutoff_len"] = k.cutoff_len
    if k.batching == "packed":
        # sft: neat_packing (implies packing) keeps packed samples from attending to each other, as
        # tuiwiz packs them; pre-training packs by itself and refuses neat_packing
        data["packing" if layout == "text" else "neat_packing"] = True
    else:
        data["packing"] = False
        if k.batching == "padding_free":
            notes.append("batching padding_free has no LLaMA-Factory option: samples are padded per micro-batch"
                         " (the same memory bound).")
    if k.val_ratio > 0:
        data["val_size"] = k.val_ratio
    return data, notes


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
    """Where checkpoints go and when, and the evaluation schedule with early stopping."""
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
            # LLaMA-Factory 0.9.5 adds transformers' EarlyStoppingCallback, which needs the best model kept
            evaluation.update({"early_stopping_steps": k.early_stopping_patience, "load_best_model_at_end": True,
                               "metric_for_best_model": "eval_loss"})
    else:
        notes.append("No validation split in this plan (val_ratio 0).")
    return output, evaluation, notes


def _llamafactory(preset: Preset, k: TrainingKnobs, memory: list[str], facts: DataFacts | None) -> str:
    data, data_notes = _lf_data(preset, k, facts)
    output, evaluation, eval_notes = _lf_output_and_eval(preset)
    notes = []
    if k.loss == "chunked":
        notes.append("enable_liger_kernel also swaps in Liger's RMSNorm, SwiGLU and RoPE kernels (counted in the"
                     " estimate); it needs `pip install liger-kernel` and a CUDA GPU.")
    sections = [
        ("model", notes, _lf_model(preset, k)),
        ("method", [], _lf_method(preset, facts.layout if facts is not None else None)),
        ("dataset", data_notes, data),
        ("train", [_warmup_comment(preset.training.warmup_ratio)], _lf_train(k)),
        ("output", [], output),
        ("eval", eval_notes, evaluation),
    ]
    from tuiwiz.runs.cluster import strategy_section  # multi-GPU: deepspeed / FSDP keys and launch line
    if (multi := strategy_section(preset, "llamafactory")) is not None:
        sections.append(multi)
    return _join(_header(preset, "LLaMA-Factory", "llamafactory-cli train THIS_FILE.yaml", memory), sections)


# ------------------------------------------------------------------------- Axolotl


def _ax_roles(facts: DataFacts) -> dict[str, list[str]]:
    """Axolotl's roles map ({target: [names in the file]}): every name tuiwiz reads.

    function_call turns hold the call as a JSON string, and Axolotl's roles map cannot turn a
    string into `tool_calls`, so they are trained as assistant text (the call as written).
    """
    names = {role: list(n) for role, n in _ROLE_NAMES.items()}
    for tag, role in (("user_tag", "user"), ("assistant_tag", "assistant"), ("observation_tag", "tool"),
                      ("function_tag", "function_call"), ("system_tag", "system")):
        if tag in facts.cols and facts.cols[tag] not in names[role]:
            names[role].append(facts.cols[tag])
    calls = names.pop("function_call")
    names["assistant"] += calls
    return names


def _ax_chat_entry(ds: DatasetRef, facts: DataFacts, entry: dict[str, Any]) -> list[str]:
    """A `type: chat_template` entry: the model's chat template over the conversations, tool
    schemas from the `tools` key, system turns and the `system` key as Axolotl reads them."""
    for col in ("tools", "system"):
        if facts.has(col) and facts.cols[col] != col:
            raise _refuse("Axolotl", ds, f"its {col} are under the key {facts.cols[col]!r}, and Axolotl's "
                          f"chat_template reads them only from a {col!r} key")
    if ds.system_prompt and facts.no_system_rows:
        raise _refuse("Axolotl", ds, f"the plan's system prompt fills {facts.no_system_rows} rows without one, and "
                      "Axolotl's chat_template has no default system prompt (default_system_message applies "
                      "only to its chatml template); add the system prompt to the data")
    entry.update({"type": "chat_template", "field_messages": facts.cols["messages"],
                  "message_property_mappings": {"role": facts.cols["role_tag"],
                                                "content": facts.cols["content_tag"]},
                  "roles": _ax_roles(facts)})
    notes = _tool_lines(facts)
    if "function_call" in facts.roles:
        notes.append("function_call turns are trained as assistant text (the JSON as written); tuiwiz renders them"
                     " as the template's tool calls.")
    return notes


def _chat_template_choice(preset: Preset) -> tuple[dict[str, Any], Any]:
    """Which chat template Axolotl uses: the tokenizer's own, or (when the tokenizer tuiwiz
    profiled with has none) tuiwiz's built-in default, given inline. Also the tokenizer."""
    from tuiwiz.data import DEFAULT_CHAT_TEMPLATE, load_tokenizer

    try:
        tok = load_tokenizer(preset.model.tokenizer or preset.model.path, model_id=preset.model.id)
    except UserError:
        tok = None
    if tok is not None and tok.chat_template:
        return {"chat_template": "tokenizer_default"}, tok
    return {"chat_template": "jinja", "chat_template_jinja": DEFAULT_CHAT_TEMPLATE}, tok


_INSTR, _REPLY = "\x00tuiwiz-instruction\x00", "\x00tuiwiz-reply\x00"


def _prompt_format(preset: Preset, tok: Any, system: str | None) -> str:
    """The prompt tuiwiz renders for an instruction row, with `{instruction}` where the user's
    text goes: the model's chat template (or tuiwiz's default) over the whole row, up to where
    the reply's text starts (so a template's empty think block stays in the prompt, as in
    tuiwiz's encoding), for Axolotl's user-defined prompt type. A leading BOS is dropped when
    the tokenizer adds its own."""
    from tuiwiz.data.chat_template import render
    from tuiwiz.data.encode import template_for

    if tok is None:
        from tuiwiz.data import HeuristicTokenizer

        tok = HeuristicTokenizer()
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": _INSTR}, {"role": "assistant", "content": _REPLY}]
    text = render(template_for(tok), msgs, tools=None, special=tok.special)
    text = text[:text.index(_REPLY)]
    bos = tok.special.get("bos_token")
    if isinstance(bos, str) and bos and text.startswith(bos) and _adds_bos(tok):
        text = text[len(bos):]
    return text.replace("{", "{{").replace("}", "}}").replace(_INSTR, "{instruction}")


def _adds_bos(tok: Any) -> bool:
    try:
        return len(tok.encode_full(["a"], add_special_tokens=True)[0].ids) > len(
            tok.encode_full(["a"], add_special_tokens=False)[0].ids)
    except (AttributeError, IndexError, TypeError):
        return False


def _ax_prompt_entry(preset: Preset, ds: DatasetRef, facts: DataFacts, entry: dict[str, Any],
                     tok: Any) -> list[str]:
    """Instruction rows as Axolotl's user-defined prompt type, formatted by the model's chat template."""
    cols = facts.cols
    if facts.has("system"):
        raise _refuse("Axolotl", ds, f"its rows carry their own system prompt ({cols['system']!r}), which Axolotl's "
                      "instruction prompt cannot place inside the model's chat template; convert it to messages")
    if facts.has("history"):
        raise _refuse("Axolotl", ds, f"its rows carry earlier turns ({cols['history']!r}), which Axolotl's "
                      "instruction prompt has no field for; convert it to messages")
    if facts.chat_pairs:
        raise _refuse("Axolotl", ds, "its prompt/completion values are message lists; convert it to messages")
    if facts.layout == "alpaca":
        fmt = _prompt_format(preset, tok, ds.system_prompt)
        with_input = fmt.replace("{instruction}", "{instruction}\n{input}")  # tuiwiz joins them so
        entry["type"] = {"field_instruction": cols["instruction"], "field_input": cols["input"],
                         "field_output": cols["output"], "format": with_input, "no_input_format": fmt}
        return ["Instruction rows in the model's chat template, as tuiwiz renders them (Axolotl's user-defined"
                " prompt; the reply ends with the tokenizer's EOS token)."]
    entry["type"] = {"field_instruction": cols["prompt"], "field_output": cols["completion"],
                     "format": "{instruction}", "no_input_format": "{instruction}"}
    return ["prompt_completion: the prompt is used verbatim and only the completion is trained."]


def _axolotl_dataset(preset: Preset, ds: DatasetRef, facts: DataFacts) -> tuple[dict[str, Any], dict[str, Any],
                                                                                  list[str]]:
    """The `datasets` entry, top-level keys it needs (the chat template), and its notes."""
    path = Path(ds.path).expanduser()
    entry: dict[str, Any] = {"path": str(path)}
    ds_type = _DS_TYPES.get(path.suffix.lower())
    if ds_type:
        entry["ds_type"] = ds_type
    top: dict[str, Any] = {}
    if facts.layout in ("sharegpt", "messages"):
        notes = _ax_chat_entry(ds, facts, entry)
        top = _chat_template_choice(preset)[0]
    elif facts.layout in ("alpaca", "prompt_completion"):
        notes = _ax_prompt_entry(preset, ds, facts, entry, _chat_template_choice(preset)[1])
    elif facts.layout == "text":
        entry["type"] = "completion"
        entry["field"] = facts.cols["text"]
        notes = []
    else:
        entry["type"] = "chat_template"
        top = _chat_template_choice(preset)[0]
        notes = ["Layout unknown (the file could not be read): `type: chat_template` over a `messages` key is a"
                 " guess; set field_messages and message_property_mappings to match the file."]
    return entry, top, notes


def _ax_placeholder() -> tuple[dict[str, Any], list[str]]:
    entry = {"path": f"{PLACEHOLDER}_train.jsonl", "ds_type": "json", "type": "chat_template",
             "field_messages": "messages"}
    return entry, [f"PLACEHOLDER: the plan has no dataset. Replace {PLACEHOLDER}_train.jsonl with your data"
                   " (messages: [{role, content}] rows, rendered with the model's chat template)."]


def _ax_adapter(preset: Preset, k: TrainingKnobs) -> dict[str, Any]:
    targets = _targets(preset)
    if k.quant_bits == 4:
        adapter: dict[str, Any] = {
            "adapter": "qlora", "load_in_4bit": True,
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
    return adapter


def _ax_train(k: TrainingKnobs) -> dict[str, Any]:
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
    })
    if k.grad_checkpointing:
        train["gradient_checkpointing_kwargs"] = {"use_reentrant": False}  # as tuiwiz measures it
    train.update({
        "attn_implementation": _AXOLOTL_ATTN[k.attn],
        "bf16": k.compute_dtype == "bf16",
        "fp16": k.compute_dtype == "fp16",
        "seed": k.seed,
    })
    return train


def _ax_liger(k: TrainingKnobs) -> dict[str, Any]:
    """Liger's fused loss when the plan counts on it, and its layer kernels when the plan has them."""
    on = {"liger_fused_linear_cross_entropy": k.loss == "chunked", "liger_rms_norm": k.liger,
          "liger_glu_activation": k.liger, "liger_rope": k.liger}
    on = {key: True for key, value in on.items() if value}
    return {"plugins": [AXOLOTL_LIGER_PLUGIN], **on} if on else {}


def _axolotl(preset: Preset, k: TrainingKnobs, memory: list[str], facts: DataFacts | None) -> str:
    has_eval, eval_steps, save_steps = _eval_plan(k)
    model: dict[str, Any] = {"base_model": _model_ref(preset)}
    if preset.model.trust_remote_code:
        model["trust_remote_code"] = True

    data: dict[str, Any] = {}
    if preset.dataset is not None and facts is not None:
        entry, top, data_notes = _axolotl_dataset(preset, preset.dataset, facts)
    else:
        (entry, data_notes), top = _ax_placeholder(), {"chat_template": "tokenizer_default"}
    data["datasets"] = [entry]
    data.update(top)
    data["dataset_prepared_path"] = "last_run_prepared"
    data["val_set_size"] = k.val_ratio
    data["sequence_len"] = k.cutoff_len
    data["excess_length_strategy"] = "truncate"  # keep the first sequence_len tokens, as tuiwiz does
    data["sample_packing"] = k.batching == "packed"
    if k.batching == "packed":
        data["pad_to_sequence_len"] = True
    elif k.batching == "padding_free":
        data_notes.append("batching padding_free has no Axolotl option here: samples are padded per micro-batch"
                          " (the same memory bound).")

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

    liger = _ax_liger(k)
    sections = [
        ("model", [], model),
        ("adapter", [], _ax_adapter(preset, k)),
        ("dataset", data_notes, data),
        ("train", [], _ax_train(k)),
        ("kernels", ["Liger (an Axolotl dependency): the fused loss the estimate counts on."] if liger else [], liger),
        ("output", [], output),
        ("eval", [] if has_eval else ["No validation split in this plan (val_ratio 0)."], evaluation),
    ]
    from tuiwiz.runs.cluster import strategy_section  # multi-GPU: deepspeed / fsdp_version 2 + fsdp_config
    if (multi := strategy_section(preset, "axolotl")) is not None:
        sections.append(multi)
    return _join(_header(preset, "Axolotl", "axolotl train THIS_FILE.yaml", memory), sections)
