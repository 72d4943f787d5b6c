"""Advisor: picks the largest fitting micro-batch, holds fixed knobs, says what would fit."""

from __future__ import annotations

from tuiwiz.models import resolve_model
from tuiwiz.planning.advisor import advise, budget_bytes, smaller_plan
from tuiwiz.planning.knobs import TrainingKnobs
from tuiwiz.planning.memory import estimate_memory

LLAMA = resolve_model("meta-llama/Llama-3.1-8B")


def test_chosen_micro_batch_fits_and_double_would_not():
    budget = budget_bytes(24)
    a = advise(LLAMA, TrainingKnobs(cutoff_len=2048), budget)
    b = a.knobs.micro_batch_size
    assert a.fits and b < 16  # memory stopped the search here, not the cap of 16
    assert estimate_memory(LLAMA, a.knobs).peak_bytes <= budget
    assert estimate_memory(LLAMA, a.knobs.replace(micro_batch_size=b * 2)).peak_bytes > budget


def test_grad_accum_reaches_target_effective_batch():
    a = advise(LLAMA, TrainingKnobs(cutoff_len=1024), budget_bytes(80), gpus=2, target_effective_batch=32)
    assert a.knobs.micro_batch_size * a.knobs.grad_accum * 2 >= 32
    assert a.knobs.micro_batch_size * (a.knobs.grad_accum - 1) * 2 < 32


def test_checkpointing_off_when_memory_is_plentiful_and_on_when_tight():
    roomy = advise(resolve_model("Qwen/Qwen2.5-0.5B"), TrainingKnobs(cutoff_len=512), budget_bytes(80))
    assert not roomy.knobs.grad_checkpointing
    tight = advise(LLAMA, TrainingKnobs(cutoff_len=4096), budget_bytes(16))
    assert tight.knobs.grad_checkpointing and any("30%" in r for r in tight.reasons)


def test_fixed_knobs_are_held():
    k = TrainingKnobs(micro_batch_size=2, lora_rank=64, grad_checkpointing=True)
    a = advise(LLAMA, k, budget_bytes(80), fixed={"micro_batch_size", "lora_rank", "grad_checkpointing"})
    assert (a.knobs.micro_batch_size, a.knobs.lora_rank, a.knobs.grad_checkpointing) == (2, 64, True)
    assert a.knobs.lora_alpha == 128


def test_every_choice_has_a_reason():
    a = advise(LLAMA, TrainingKnobs(), budget_bytes(24))
    text = " ".join(a.reasons)
    for word in ("rank", "checkpointing", "micro-batch", "accumulation"):
        assert word in text


def test_smaller_plan_keeps_effective_batch_then_enables_checkpointing():
    k = TrainingKnobs(micro_batch_size=4, grad_accum=4, grad_checkpointing=False)
    s = smaller_plan(k)
    assert (s.micro_batch_size, s.grad_accum) == (2, 8)
    s1 = smaller_plan(k.replace(micro_batch_size=1))
    assert s1.grad_checkpointing
    s2 = smaller_plan(s1)
    assert s2.cutoff_len < s1.cutoff_len and s2.cutoff_len % 64 == 0


def test_memory_bound_plan_names_its_step_up_which_the_estimate_says_would_not_fit():
    budget = budget_bytes(24)
    a = advise(LLAMA, TrainingKnobs(cutoff_len=2048), budget)
    assert a.fits and a.held_back and a.step_up is not None
    up = a.step_up
    assert (up.micro_batch_size, up.grad_checkpointing) in {(a.knobs.micro_batch_size * 2, a.knobs.grad_checkpointing),
                                                            (a.knobs.micro_batch_size, False)}
    assert up.micro_batch_size * up.grad_accum >= 16  # same effective-batch target
    assert estimate_memory(LLAMA, up).peak_bytes > budget


def test_unbound_plan_has_no_step_up():
    a = advise(resolve_model("Qwen/Qwen2.5-0.5B"), TrainingKnobs(cutoff_len=256), budget_bytes(80))
    assert not a.knobs.grad_checkpointing and a.knobs.micro_batch_size == 16
    assert a.held_back == () and a.step_up is None


def test_fixed_micro_batch_steps_up_by_dropping_checkpointing():
    a = advise(LLAMA, TrainingKnobs(cutoff_len=4096, micro_batch_size=2), budget_bytes(24),
               fixed={"micro_batch_size"})
    assert a.knobs.grad_checkpointing and a.held_back == ("gradient checkpointing off",)
    assert a.step_up is not None and a.step_up.micro_batch_size == 2 and not a.step_up.grad_checkpointing


def test_gemma2_plans_eager_attention_because_transformers_has_no_sdpa_for_it():
    g = resolve_model("google/gemma-2-2b")
    a = advise(g, TrainingKnobs(cutoff_len=1024), budget_bytes(24))
    assert a.knobs.attn == "eager" and any("no SDPA" in r for r in a.reasons)
    held = advise(g, TrainingKnobs(cutoff_len=1024, attn="sdpa"), budget_bytes(24), fixed={"attn"})
    assert held.knobs.attn == "sdpa" and any("eager" in w for w in held.warnings)
    assert advise(LLAMA, TrainingKnobs(), budget_bytes(24)).knobs.attn == "sdpa"


def test_moe_plans_have_no_lora_dropout_which_peft_refuses_on_fused_experts():
    from tuiwiz.models import spec_from_config

    moe = spec_from_config(dict(model_type="qwen3_moe", num_hidden_layers=48, vocab_size=151936, hidden_size=2048,
                                intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                                num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                max_position_embeddings=40960), "qwen3-moe-like", "test")
    assert moe.is_moe
    a = advise(moe, TrainingKnobs(cutoff_len=1024), budget_bytes(80))
    assert a.knobs.lora_dropout == 0.0 and any("dropout" in r for r in a.reasons)
    held = advise(moe, TrainingKnobs(cutoff_len=1024, lora_dropout=0.1), budget_bytes(80), fixed={"lora_dropout"})
    assert held.knobs.lora_dropout == 0.1 and any("LoRA dropout to 0" in w for w in held.warnings)
