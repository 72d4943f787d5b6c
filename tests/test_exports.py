"""Exports to LLaMA-Factory / Axolotl: every key is one the trainer defines, and the values are the plan.

The key sets below are vendored from the trainers' source (read through the code index, not
from memory). Keys LLaMA-Factory passes straight to Hugging Face's TrainingArguments are
checked against the dataclass fields of the transformers installed here instead.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuiwiz.errors import UserError
from tuiwiz.exports import export_text
from tuiwiz.preset import preset_from_dict

# --------------------------------------------------------------------------- vendored key sets

# LLaMA-Factory's own argument dataclasses (only the fields an export may write).
# Source: github.com/hiyouga/LlamaFactory (the renamed hiyouga/LLaMA-Factory)
#   src/llamafactory/hparams/model_args.py       @ 8ed65e7289b2a1493b2e9f6dad8ac293f2168ec8
#     (BaseModelArguments, QuantizationArguments)
#   src/llamafactory/hparams/data_args.py        @ 58d3a8262345d0cfdf015933c5f6a424dfaf462f (DataArguments)
#   src/llamafactory/hparams/finetuning_args.py  @ 105d781f034a2ec131132a4d8cf60854db09295c
#     (LoraArguments, FinetuningArguments)
# Cross-checked with hiyouga/LLaMA-Factory model_args.py @ cc22c045a7ffef31a3da6a32f189fd100d7c38b2,
# data_args.py @ 072bfe29d3b10447b0702196028af2f0fb87ad6b and finetuning_args.py @
# f9ced615c39dac9692ad2f9efd1c03628ad023ee (older: no trust_remote_code / default_system there).
LLAMAFACTORY_KEYS = {
    # model_args.py
    "model_name_or_path", "trust_remote_code", "flash_attn", "disable_gradient_checkpointing",
    "quantization_method", "quantization_bit", "quantization_type", "double_quantization",
    "use_unsloth", "enable_liger_kernel", "rope_scaling", "cache_dir",
    # data_args.py
    "template", "dataset", "eval_dataset", "dataset_dir", "cutoff_len", "train_on_prompt", "mask_history",
    "val_size", "packing", "neat_packing", "default_system", "max_samples", "preprocessing_num_workers",
    "overwrite_cache",
    # finetuning_args.py
    "stage", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target",
    "use_rslora", "use_dora", "plot_loss",
    # the 0.9.5 release, tag v0.9.5 @ 7af909522a951e3ad9f022ea6f88b6755257eaa5 in hiyouga/LLaMA-Factory:
    # model_args.py (use_reentrant_gc, default True) and finetuning_args.py (early_stopping_steps, which
    # train/tuner.py turns into transformers' EarlyStoppingCallback)
    "use_reentrant_gc", "early_stopping_steps",
}
# extras/constants.py @ 24a406faae1d08f0b83f354ab38f7aceeee0d21b: AttentionFunction and QuantizationMethod.
LLAMAFACTORY_FLASH_ATTN = {"auto", "disabled", "sdpa", "fa2", "fa3"}
LLAMAFACTORY_QUANT_METHODS = {"bnb", "gptq", "awq", "aqlm", "quanto", "eetq", "hqq", "mxfp4", "fp8"}
# Registered template names: data/template.py @ 723eb576838466518396caf8578b747022082128 (llama2, llama3,
# mistral, phi, qwen, qwen3); "gemma" is the template extras/constants.py assigns to Gemma models;
# "default" is registered in every template.py version the index holds. There is no "gemma2" template.
LLAMAFACTORY_TEMPLATES = {"default", "llama2", "llama3", "mistral", "gemma", "phi", "qwen", "qwen3",
                          "empty"}  # "empty": data/template.py @ v0.9.5 (assistant `{{content}}`, user verbatim)
# data/parser.py @ v0.9.5: DatasetAttr.formatting is Literal["alpaca", "sharegpt", "openai"].
LLAMAFACTORY_FORMATTINGS = {"alpaca", "sharegpt", "openai"}
# dataset_info.json entry keys: data/parser.py (DatasetAttr + get_dataset_list) @
# 01d3ac67e604447345b01dfb2bc318200a135d8e in hiyouga/LLaMA-Factory.
LLAMAFACTORY_DATASET_INFO_KEYS = {"file_name", "formatting", "columns", "tags", "ranking", "subset", "split",
                                  "folder", "num_samples", "hf_hub_url", "ms_hub_url", "script_url"}
LLAMAFACTORY_COLUMNS = {"prompt", "query", "response", "history", "messages", "system", "tools", "images",
                        "chosen", "rejected", "kto_tag"}
LLAMAFACTORY_TAGS = {"role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag",
                     "system_tag"}

# Axolotl's pydantic config (AxolotlInputConfig and its bases), only fields an export may write.
# Source: github.com/axolotl-ai-cloud/axolotl
#   src/axolotl/utils/schemas/config.py   @ 70be5461ba09e986aecb2eff3eef1246ce4285c4 (AxolotlInputConfig)
#   src/axolotl/utils/schemas/model.py    @ 113e9cd19323d66f38013616be54cdb4b3a22393 (ModelInput/OutputConfig)
#   src/axolotl/utils/schemas/peft.py     @ f5ff7a9cf14e1f98eadd6d8c177fe9cb28fc432f (LoraConfig)
#   src/axolotl/utils/schemas/training.py @ 94c00c1d041b0e21b694abc6ba5923a19e013d9c (HyperparametersConfig)
AXOLOTL_KEYS = {
    # model.py
    "base_model", "base_model_config", "tokenizer_config", "trust_remote_code", "output_dir",
    # peft.py
    "adapter", "load_in_8bit", "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "lora_target_linear", "lora_modules_to_save", "bnb_config_kwargs", "peft_use_dora", "peft_use_rslora",
    # training.py
    "gradient_accumulation_steps", "micro_batch_size", "learning_rate", "optimizer", "lr_scheduler",
    "weight_decay", "num_epochs", "train_on_inputs", "max_grad_norm",
    # config.py
    "datasets", "dataset_prepared_path", "val_set_size", "sequence_len", "sample_packing", "pad_to_sequence_len",
    "seed", "bf16", "fp16", "tf32", "gradient_checkpointing", "sdp_attention", "flash_attention",
    "eager_attention", "flex_attention", "xformers_attention", "max_steps", "warmup_steps", "warmup_ratio",
    "eval_steps", "evals_per_epoch", "eval_strategy", "save_steps", "saves_per_epoch", "save_strategy",
    "save_total_limit", "logging_steps", "early_stopping_patience", "chat_template", "default_system_message",
    "special_tokens",
    # axolotl 0.19.0 (the PyPI wheel, read in bench/exports_check.py's venv; the same fields at
    # axolotl-ai-cloud/axolotl @ 067b021c7b87a9e5e380b9173c704cf7340e30f5): utils/schemas/config.py
    "attn_implementation", "gradient_checkpointing_kwargs", "excess_length_strategy", "plugins",
    "chat_template_jinja",
    # integrations/liger/args.py (LigerArgs, registered by plugins: [axolotl.integrations.liger.LigerPlugin])
    "liger_fused_linear_cross_entropy", "liger_rms_norm", "liger_glu_activation", "liger_rope",
}
# Same config.py: booleans marked `deprecated="Use attn_implementation: ... instead"`. An export writes none.
AXOLOTL_DEPRECATED = {"sdp_attention", "flash_attention", "eager_attention", "flex_attention", "xformers_attention",
                      "sage_attention", "default_system_message"}
# utils/schemas/enums.py @ the same commit: the canonical attn_implementation values.
AXOLOTL_ATTN_IMPLS = {"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "xformers",
                      "sage", "fp8"}
# src/axolotl/utils/schemas/datasets.py @ 70be5461ba09e986aecb2eff3eef1246ce4285c4 (SFTDataset).
AXOLOTL_DATASET_KEYS = {
    "path", "split", "type", "data_files", "name", "ds_type", "field", "field_messages",
    "message_property_mappings", "roles", "roles_to_train", "train_on_eos", "chat_template",
    "drop_system_message", "trust_remote_code", "revision",
}
# Same file: UserDefinedPrompterType (a dict `type:`).
AXOLOTL_USER_TYPE_KEYS = {"system_prompt", "system_format", "field_system", "field_instruction", "field_input",
                          "field_output", "format", "no_input_format", "field"}
# Built-in types we use: "alpaca" plus modules in src/axolotl/prompt_strategies/ (chat_template.py @
# cf0c79d52e430681659cfe8c9794b1182c9426f7, completion.py @ f7a22632d75927fc9fe49b50dc9dfbe43e8aa4f3).
AXOLOTL_TYPES = {"alpaca", "chat_template", "completion"}


@pytest.fixture(scope="module")
def hf_training_fields() -> set[str]:
    """Field names of transformers' TrainingArguments as installed (LLaMA-Factory subclasses it)."""
    import transformers

    return {f.name for f in dataclasses.fields(transformers.TrainingArguments)}


@pytest.fixture(scope="module")
def hf_values() -> dict[str, set[str]]:
    from transformers import BitsAndBytesConfig, SchedulerType
    from transformers.training_args import OptimizerNames

    return {
        "optim": {o.value for o in OptimizerNames},
        "scheduler": {s.value for s in SchedulerType},
        "bnb": set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"},
    }


# --------------------------------------------------------------------------- presets


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def make(model: str = "meta-llama/Llama-3.1-8B", dataset: dict[str, Any] | None = None, name: str | None = "p",
         trust: bool = False, **training: Any):
    data: dict[str, Any] = {
        "name": name,
        "model": {"id": model, "trust_remote_code": trust},
        "hardware": {"gpu": "RTX 4090", "memory_gib": 24},
        "training": training,
    }
    if dataset is not None:
        data["dataset"] = dataset
    return preset_from_dict(data, "test")


def load(preset, fmt: str) -> dict[str, Any]:
    text = export_text(preset, fmt)
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


@pytest.fixture
def presets(tmp_path: Path) -> dict[str, Any]:
    ds = {"path": str(tmp_path / "chat.jsonl"), "layout": "sharegpt"}
    return {
        "4bit-all-linear": make(dataset=ds, quant_bits=4, target_modules="all-linear"),
        "16bit-attn": make("Qwen/Qwen2.5-7B", dataset=ds, quant_bits=16, target_modules="attn"),
        "8bit-eager": make("mistralai/Mistral-7B-v0.3", dataset=ds, quant_bits=8, attn="eager"),
        "explicit-list": make("Qwen/Qwen3-8B", dataset=ds, target_modules=["q_proj", "v_proj", "down_proj"]),
        "fp16": make("google/gemma-2-9b", dataset=ds, compute_dtype="fp16", grad_checkpointing=False),
        "packing-fa2": make(dataset=ds, packing=True, attn="flash_attention_2", max_steps=500),
        "no-dataset": make(val_ratio=0.0),
        "early-stop": make(dataset=ds, eval_steps=30, save_steps=100, early_stopping_patience=3),
        "trust": make("microsoft/Phi-3-mini-4k-instruct", dataset=ds, trust=True),
        **{f"layout-{lay}": make(dataset={"path": str(tmp_path / f"{lay}.jsonl"), "layout": lay})
           for lay in ("alpaca", "sharegpt", "messages", "prompt_completion", "text")},
    }


# --------------------------------------------------------------------------- key checks


def test_every_llamafactory_key_is_defined_by_llamafactory_or_transformers(presets, hf_training_fields):
    for label, preset in presets.items():
        cfg = load(preset, "llamafactory")
        unknown = [k for k in cfg if k not in LLAMAFACTORY_KEYS and k not in hf_training_fields]
        assert not unknown, f"{label}: keys neither LLaMA-Factory nor TrainingArguments define: {unknown}"


def test_llamafactory_option_values_are_ones_it_accepts(presets, hf_values):
    for label, preset in presets.items():
        cfg = load(preset, "llamafactory")
        assert cfg["flash_attn"] in LLAMAFACTORY_FLASH_ATTN, label
        assert cfg["template"] in LLAMAFACTORY_TEMPLATES, label
        assert cfg["optim"] in hf_values["optim"], label
        assert cfg["lr_scheduler_type"] in hf_values["scheduler"], label
        if "quantization_method" in cfg:
            assert cfg["quantization_method"] in LLAMAFACTORY_QUANT_METHODS, label


def test_every_axolotl_key_is_defined_by_axolotl(presets, hf_values):
    for label, preset in presets.items():
        cfg = load(preset, "axolotl")
        unknown = [k for k in cfg if k not in AXOLOTL_KEYS]
        assert not unknown, f"{label}: keys Axolotl does not define: {unknown}"
        for ds in cfg.get("datasets", []):
            assert set(ds) <= AXOLOTL_DATASET_KEYS, (label, set(ds) - AXOLOTL_DATASET_KEYS)
            if isinstance(ds["type"], dict):
                assert set(ds["type"]) <= AXOLOTL_USER_TYPE_KEYS, label
            else:
                assert ds["type"] in AXOLOTL_TYPES, label
        assert set(cfg.get("bnb_config_kwargs", {})) <= hf_values["bnb"], label
        assert cfg["optimizer"] in hf_values["optim"], label
        assert cfg["lr_scheduler"] in hf_values["scheduler"], label
        assert cfg["attn_implementation"] in AXOLOTL_ATTN_IMPLS, label
        assert not AXOLOTL_DEPRECATED & set(cfg), (label, AXOLOTL_DEPRECATED & set(cfg))


def test_export_starts_with_a_comment_naming_tuiwiz_and_the_plan(tmp_path):
    preset = make(name="my plan")
    for fmt in ("llamafactory", "axolotl"):
        first = export_text(preset, fmt).splitlines()[0]
        assert first.startswith("#") and "tuiwiz" in first and "my plan" in first


def test_unknown_format_is_a_user_error():
    with pytest.raises(UserError, match="axolotl"):
        export_text(make(), "unsloth")


# --------------------------------------------------------------------------- the values are the plan


def test_llamafactory_export_carries_the_plan_numbers():
    preset = make(quant_bits=4, lora_rank=64, lora_alpha=128, lora_dropout=0.1, cutoff_len=4096,
                  micro_batch_size=2, grad_accum=8, epochs=3, learning_rate=1e-4, warmup_ratio=0.05,
                  lr_scheduler="linear", optim="adamw_torch", seed=7, logging_steps=5, save_steps=200,
                  val_ratio=0.2, eval_steps=40)
    cfg = load(preset, "llamafactory")
    k = preset.training
    assert (cfg["quantization_bit"], cfg["quantization_type"], cfg["double_quantization"]) == (4, "nf4", True)
    assert (cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"]) == (k.lora_rank, k.lora_alpha, k.lora_dropout)
    assert cfg["cutoff_len"] == k.cutoff_len
    assert cfg["per_device_train_batch_size"] == k.micro_batch_size
    assert cfg["gradient_accumulation_steps"] == k.grad_accum
    assert cfg["num_train_epochs"] == k.epochs and "max_steps" not in cfg
    assert cfg["learning_rate"] == k.learning_rate and cfg["lr_scheduler_type"] == "linear"
    assert cfg["warmup_steps"] == k.warmup_ratio  # a float < 1 is a ratio in transformers 5
    assert cfg["optim"] == "adamw_torch" and cfg["seed"] == 7
    assert cfg["bf16"] is True and "fp16" not in cfg
    assert (cfg["logging_steps"], cfg["save_steps"]) == (5, 200)
    assert (cfg["val_size"], cfg["eval_strategy"], cfg["eval_steps"]) == (0.2, "steps", 40)
    assert cfg["stage"] == "sft" and cfg["finetuning_type"] == "lora" and cfg["do_train"] is True


def test_axolotl_export_carries_the_plan_numbers():
    preset = make(quant_bits=4, double_quant=False, lora_rank=8, lora_alpha=16, cutoff_len=1024,
                  micro_batch_size=4, grad_accum=4, epochs=2, learning_rate=3e-4, warmup_ratio=0.1, seed=3,
                  val_ratio=0.05, logging_steps=2, save_steps=50)
    cfg = load(preset, "axolotl")
    assert (cfg["adapter"], cfg["load_in_4bit"]) == ("qlora", True)
    assert cfg["bnb_config_kwargs"] == {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False}
    assert (cfg["lora_r"], cfg["lora_alpha"]) == (8, 16)
    assert cfg["sequence_len"] == 1024
    assert (cfg["micro_batch_size"], cfg["gradient_accumulation_steps"], cfg["num_epochs"]) == (4, 4, 2)
    assert (cfg["learning_rate"], cfg["warmup_ratio"], cfg["seed"]) == (3e-4, 0.1, 3)
    assert (cfg["val_set_size"], cfg["logging_steps"], cfg["save_steps"]) == (0.05, 2, 50)
    assert cfg["eval_steps"] == 50  # no eval_steps in the plan: evaluate when saving, as tuiwiz does
    assert cfg["bf16"] is True and cfg["fp16"] is False


@pytest.mark.parametrize("bits", [8, 16])
def test_8_and_16_bit_plans_are_plain_lora(bits):
    preset = make(quant_bits=bits)
    lf, ax = load(preset, "llamafactory"), load(preset, "axolotl")
    assert ax["adapter"] == "lora" and "load_in_4bit" not in ax and "bnb_config_kwargs" not in ax
    assert "quantization_type" not in lf
    if bits == 8:
        assert lf["quantization_bit"] == 8 and ax["load_in_8bit"] is True
    else:
        assert "quantization_bit" not in lf and "load_in_8bit" not in ax


def test_all_linear_targets_every_linear_layer():
    preset = make(target_modules="all-linear")
    assert load(preset, "llamafactory")["lora_target"] == "all"
    ax = load(preset, "axolotl")
    assert ax["lora_target_linear"] is True and "lora_target_modules" not in ax


def test_attention_only_targets_the_attention_projections():
    preset = make("Qwen/Qwen2.5-7B", target_modules="attn")
    assert load(preset, "llamafactory")["lora_target"].split(",") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert load(preset, "axolotl")["lora_target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_phi3_targets_use_its_fused_module_names():
    attn = make("microsoft/Phi-3-mini-4k-instruct", target_modules="attn")
    assert load(attn, "axolotl")["lora_target_modules"] == ["qkv_proj", "o_proj"]
    listed = make("microsoft/Phi-3-mini-4k-instruct", target_modules=["q_proj", "v_proj", "down_proj"])
    assert load(listed, "llamafactory")["lora_target"] == "qkv_proj,down_proj"


def test_explicit_module_list_is_kept_for_a_model_tuiwiz_cannot_resolve():
    preset = make("someone/unknown-model-xyz", target_modules=["q_proj", "v_proj"])
    assert load(preset, "llamafactory")["lora_target"] == "q_proj,v_proj"
    assert load(preset, "axolotl")["lora_target_modules"] == ["q_proj", "v_proj"]


def test_fp16_plan_turns_fp16_on_and_bf16_off():
    preset = make(compute_dtype="fp16")
    lf, ax = load(preset, "llamafactory"), load(preset, "axolotl")
    assert lf["fp16"] is True and "bf16" not in lf
    assert ax["fp16"] is True and ax["bf16"] is False


def test_gradient_checkpointing_off_is_exported():
    preset = make(grad_checkpointing=False)
    assert load(preset, "llamafactory")["disable_gradient_checkpointing"] is True
    assert load(preset, "axolotl")["gradient_checkpointing"] is False


@pytest.mark.parametrize("attn,lf_value,ax_value", [
    ("sdpa", "sdpa", "sdpa"),
    ("flash_attention_2", "fa2", "flash_attention_2"),
    ("eager", "disabled", "eager"),
])
def test_attention_implementation_maps_to_each_trainers_option(attn, lf_value, ax_value):
    preset = make(attn=attn)
    assert load(preset, "llamafactory")["flash_attn"] == lf_value
    assert load(preset, "axolotl")["attn_implementation"] == ax_value


def test_packing_and_max_steps_are_exported():
    preset = make(packing=True, max_steps=500)
    lf, ax = load(preset, "llamafactory"), load(preset, "axolotl")
    assert lf["neat_packing"] is True and lf["max_steps"] == 500  # packed samples never attend to each other
    assert ax["sample_packing"] is True and ax["max_steps"] == 500


def test_no_validation_split_writes_no_eval_settings():
    preset = make(val_ratio=0.0, eval_steps=20)
    lf, ax = load(preset, "llamafactory"), load(preset, "axolotl")
    assert not {"val_size", "eval_strategy", "eval_steps"} & set(lf)
    assert ax["val_set_size"] == 0.0 and "eval_steps" not in ax  # axolotl rejects eval_steps without a split


def test_early_stopping_saves_on_eval_steps_in_axolotl():
    preset = make(eval_steps=30, save_steps=100, early_stopping_patience=3)
    ax = load(preset, "axolotl")
    assert ax["early_stopping_patience"] == 3
    assert ax["save_steps"] % ax["eval_steps"] == 0  # axolotl requires it


def test_trust_remote_code_is_written_only_when_the_plan_opts_in():
    assert load(make(trust=True), "llamafactory")["trust_remote_code"] is True
    assert load(make(trust=True), "axolotl")["trust_remote_code"] is True
    assert "trust_remote_code" not in load(make(), "llamafactory")
    assert "trust_remote_code" not in load(make(), "axolotl")


def test_local_model_path_wins_over_the_hub_id(tmp_path):
    preset = preset_from_dict({"model": {"id": "meta-llama/Llama-3.1-8B", "path": str(tmp_path / "m")},
                               "hardware": {"gpu": "x", "memory_gib": 24}}, "test")
    assert load(preset, "llamafactory")["model_name_or_path"] == str(tmp_path / "m")
    assert load(preset, "axolotl")["base_model"] == str(tmp_path / "m")


@pytest.mark.parametrize("model,template", [
    ("meta-llama/Llama-3.1-8B", "llama3"),
    ("meta-llama/Llama-2-7b-hf", "llama2"),
    ("Qwen/Qwen2.5-7B", "qwen"),
    ("Qwen/Qwen3-8B", "qwen3"),
    ("mistralai/Mistral-7B-v0.3", "mistral"),
    ("google/gemma-2-9b", "gemma"),
    ("microsoft/Phi-3-mini-4k-instruct", "phi"),
    ("someone/unknown-model-xyz", "default"),
])
def test_llamafactory_template_follows_the_model_family(model, template):
    assert load(make(model), "llamafactory")["template"] == template


# --------------------------------------------------------------------------- datasets


def _info_entry(text: str) -> dict[str, Any]:
    """The dataset_info.json entry the export shows in its comment."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line == "# {")
    end = next(i for i in range(start, len(lines)) if lines[i] == "# }")
    return json.loads("\n".join(line[2:] for line in lines[start:end + 1]))


@pytest.mark.parametrize("layout,formatting,ax_type", [
    ("alpaca", "alpaca", dict),
    ("sharegpt", "sharegpt", "chat_template"),
    ("messages", "sharegpt", "chat_template"),
    ("prompt_completion", "alpaca", dict),
    ("text", None, "completion"),
])
def test_each_layout_gets_a_matching_dataset_entry(tmp_path, layout, formatting, ax_type):
    path = tmp_path / "sub" / f"{layout}.jsonl"
    preset = make(dataset={"path": str(path), "layout": layout})
    text = export_text(preset, "llamafactory")
    cfg = yaml.safe_load(text)
    name = cfg["dataset"]
    assert cfg["dataset_dir"] == str(path.parent)
    entry = _info_entry(text)[name]
    assert set(entry) <= LLAMAFACTORY_DATASET_INFO_KEYS
    assert set(entry.get("columns", {})) <= LLAMAFACTORY_COLUMNS
    assert set(entry.get("tags", {})) <= LLAMAFACTORY_TAGS
    assert entry["file_name"] == path.name
    assert entry.get("formatting") == formatting
    assert cfg["stage"] == ("pt" if layout == "text" else "sft")

    ds = load(preset, "axolotl")["datasets"][0]
    assert ds["path"] == str(path) and ds["ds_type"] == "json"
    if ax_type is dict:
        fields = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion")}[layout]
        assert (ds["type"]["field_instruction"], ds["type"]["field_output"]) == fields
    else:
        assert ds["type"] == ax_type


def test_sharegpt_and_messages_map_their_own_role_and_content_keys(tmp_path):
    share = make(dataset={"path": str(tmp_path / "s.jsonl"), "layout": "sharegpt"})
    msgs = make(dataset={"path": str(tmp_path / "m.jsonl"), "layout": "messages"})
    s, m = load(share, "axolotl")["datasets"][0], load(msgs, "axolotl")["datasets"][0]
    assert s["field_messages"] == "conversations"
    assert s["message_property_mappings"] == {"role": "from", "content": "value"}
    assert (m["field_messages"], m["message_property_mappings"]) == ("messages", {"role": "role", "content": "content"})
    tags = _info_entry(export_text(msgs, "llamafactory"))["m"]["tags"]
    assert (tags["user_tag"], tags["assistant_tag"]) == ("user", "assistant")


def test_user_column_names_reach_both_trainers(tmp_path):
    preset = make(dataset={"path": str(tmp_path / "qa.jsonl"), "layout": "alpaca",
                           "columns": {"instruction": "question", "output": "answer", "system": "sys"}})
    entry = _info_entry(export_text(preset, "llamafactory"))["qa"]
    assert entry["columns"] == {"prompt": "question", "query": "input", "response": "answer", "system": "sys"}
    ds = load(preset, "axolotl")["datasets"][0]
    assert (ds["type"]["field_instruction"], ds["type"]["field_output"]) == ("question", "answer")


def test_unset_layout_is_detected_from_the_file(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "yo"}]}])
    preset = make(dataset={"path": path})
    assert _info_entry(export_text(preset, "llamafactory"))["d"]["formatting"] == "sharegpt"
    assert load(preset, "axolotl")["datasets"][0]["type"] == "chat_template"


def test_missing_dataset_file_with_unset_layout_still_exports(tmp_path):
    preset = make(dataset={"path": str(tmp_path / "absent.jsonl")})
    text = export_text(preset, "llamafactory")
    assert "formatting" in text.lower() and "unknown" in text.lower()
    assert yaml.safe_load(export_text(preset, "axolotl"))["datasets"][0]["path"].endswith("absent.jsonl")


def test_plan_without_a_dataset_exports_a_marked_placeholder():
    preset = make()
    lf_text, ax_text = export_text(preset, "llamafactory"), export_text(preset, "axolotl")
    assert "no dataset" in lf_text and "dataset_info.json" in lf_text
    assert yaml.safe_load(lf_text)["dataset"] == "REPLACE_ME"
    assert "no dataset" in ax_text
    # axolotl refuses a config without datasets ("either datasets or pretraining_dataset is required")
    assert yaml.safe_load(ax_text)["datasets"][0]["path"].startswith("REPLACE_ME")


def test_system_prompt_is_exported(tmp_path):
    preset = make(dataset={"path": str(tmp_path / "a.jsonl"), "layout": "alpaca", "system_prompt": "Be brief."})
    assert load(preset, "llamafactory")["default_system"] == "Be brief."
    # axolotl honours default_system_message only with its chatml template: the prompt carries it
    ax = load(preset, "axolotl")
    assert "Be brief." in ax["datasets"][0]["type"]["format"] and "default_system_message" not in ax
