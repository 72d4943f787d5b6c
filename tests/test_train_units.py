"""Worker pieces in-process: error classification, data split/truncation, the builders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tuiwiz.errors import UserError
from tuiwiz.train.dataset import split_train_eval, truncate_example
from tuiwiz.train.errors import DataError
from tuiwiz.train.faults import fault_from_env


def test_truncation_keeps_the_start_and_reports_it() -> None:
    ids, mask, cut = truncate_example(list(range(10)), [0] * 4 + [1] * 6, 8)
    assert (ids, mask, cut) == (list(range(8)), [0] * 4 + [1] * 4, True)
    assert truncate_example([1, 2], [0, 1], 8)[2] is False


def test_split_is_seeded_disjoint_and_keeps_at_least_one_validation_row() -> None:
    rows = list(range(20))
    train, val = split_train_eval(rows, 0.01, seed=1)
    assert len(val) == 1 and sorted(train + val) == rows
    assert split_train_eval(rows, 0.25, seed=1) == split_train_eval(rows, 0.25, seed=1)
    assert split_train_eval(rows, 0.25, seed=1) != split_train_eval(rows, 0.25, seed=2)
    assert split_train_eval(rows, 0.0, seed=1) == (rows, [])


def test_fault_spec_parses_kind_and_step_and_rejects_typos() -> None:
    assert fault_from_env({"TUIWIZ_FAULT": "oom@5"}).step == 5  # type: ignore[union-attr]
    assert fault_from_env({"TUIWIZ_FAULT": "data"}).step == 2  # type: ignore[union-attr]
    assert fault_from_env({}) is None
    with pytest.raises(ValueError):
        fault_from_env({"TUIWIZ_FAULT": "segfault"})


def test_errors_are_classified_by_type_message_and_phase() -> None:
    import torch

    from tuiwiz.train.classify import classify

    assert classify(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"), "train")[0] == "oom"
    assert classify(RuntimeError("CUDA error: an illegal memory access was encountered"), "train")[0] == "cuda"
    assert classify(DataError("row 3"), "train")[0] == "data"
    assert classify(UserError("data.json line 4: bad"), "data")[0] == "data"
    assert classify(UserError("model path missing"), "model")[0] == "other"
    assert classify(KeyError("x"), "train")[0] == "other"


@pytest.mark.slow
def test_standard_loss_trains_on_full_logits(tmp_path: Path) -> None:
    from tiny_model import build_model as build_tiny
    from tuiwiz.planning.knobs import TrainingKnobs
    from tuiwiz.train import build

    model_dir = build_tiny(tmp_path / "m")
    knobs = TrainingKnobs(loss="standard", micro_batch_size=2, grad_accum=1, max_steps=2, cutoff_len=32,
                          lora_rank=4, lora_alpha=8, save_steps=100, logging_steps=1, warmup_ratio=0.0)
    model = build.build_model(str(model_dir), knobs, "cpu")
    tok = build.load_hf_tokenizer(model_dir)
    rows = [{"input_ids": [1] + [10 + (i + j) % 50 for j in range(20)], "completion_mask": [0] * 5 + [1] * 16}
            for i in range(8)]
    trainer = build.build_trainer(model, tok, knobs, rows, [], tmp_path / "out", device="cpu")
    assert isinstance(trainer, build.StandardLossSFTTrainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[-1]["num_tokens"] == 2 * 2 * 21  # our token count: both steps, full rows
    dtypes = build.param_dtype_summary(trainer.model)
    # the default bf16 stream: embeddings and norms stay in the compute dtype (tests/test_exports_stack.py
    # checks peft's fp32 upcast under residual: fp32)
    assert dtypes["lora"] == "bfloat16" and dtypes["norms"] == "bfloat16" and dtypes["embeddings"] == "bfloat16"


@pytest.mark.slow
def test_build_model_from_a_bare_config_quantizes_random_weights(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from tuiwiz.planning.knobs import TrainingKnobs
    from tuiwiz.train import build

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = build.build_model(cfg, TrainingKnobs(), "cpu", scratch_dir=tmp_path / "rand")
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit"
    assert model.model.layers[0].input_layernorm.weight.dtype.is_floating_point
    with pytest.raises(ValueError, match="scratch_dir"):
        build.build_model(cfg, TrainingKnobs(), "cpu")


@pytest.mark.parametrize("targets,want", [
    ("attn", ["qkv_proj", "o_proj"]),
    (["q_proj", "v_proj", "down_proj"], ["qkv_proj", "down_proj"]),
    (["gate_proj", "up_proj"], ["gate_up_proj"]),
])
def test_lora_targets_on_phi3_are_the_fused_modules_the_model_really_has(targets, want) -> None:
    """The worker resolves names through tuiwiz.models (as the estimate does); the truth is the
    module tree transformers builds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuiwiz.planning.knobs import TrainingKnobs
    from tuiwiz.train import build

    cfg = AutoConfig.for_model("phi3", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    got = build.lora_targets(TrainingKnobs(target_modules=targets), model)
    assert got == want
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(got) <= present
    assert build.lora_targets(TrainingKnobs(target_modules="all-linear"), model) == "all-linear"
    with pytest.raises(UserError, match="qkv_proj"):  # says what the model has instead
        build.lora_targets(TrainingKnobs(target_modules=["w_pack"]), model)
