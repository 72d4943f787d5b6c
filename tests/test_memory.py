"""The estimate's structure: monotone where physics says so, terms that scale as they must."""

from __future__ import annotations

import pytest

from tuiwiz.models import resolve_model
from tuiwiz.planning import activations as act
from tuiwiz.planning.knobs import TrainingKnobs
from tuiwiz.planning.memory import GROUPS, estimate_memory, quantized_weights_bytes

LLAMA = resolve_model("meta-llama/Llama-3.1-8B")


def peak(spec=LLAMA, **kw) -> int:
    return estimate_memory(spec, TrainingKnobs(**kw)).peak_bytes


@pytest.mark.parametrize("ckpt", [True, False])
def test_estimate_is_monotone_in_batch_length_and_rank(ckpt):
    assert peak(micro_batch_size=1, grad_checkpointing=ckpt) < peak(micro_batch_size=2, grad_checkpointing=ckpt) \
        < peak(micro_batch_size=8, grad_checkpointing=ckpt)
    assert peak(cutoff_len=512, grad_checkpointing=ckpt) < peak(cutoff_len=2048, grad_checkpointing=ckpt) \
        < peak(cutoff_len=8192, grad_checkpointing=ckpt)
    assert peak(lora_rank=8, grad_checkpointing=ckpt) < peak(lora_rank=16, grad_checkpointing=ckpt) \
        < peak(lora_rank=64, grad_checkpointing=ckpt)


def test_full_logits_scale_with_vocab():
    small = resolve_model("mistralai/Mistral-7B-v0.1")  # vocab 32000
    big = resolve_model("meta-llama/Meta-Llama-3-8B")  # same body, vocab 128256
    k = TrainingKnobs(loss="standard", cutoff_len=2048)
    ratio = act.logits_bytes(big, k, 1, 2048) / act.logits_bytes(small, k, 1, 2048)
    assert 3.5 < ratio < 4.05  # ~128256/32000 minus the vocab-free hidden-state part
    # a 128k vocabulary's full logits are where the step peaks; they alone are 2048 x 128256 fp32
    est = estimate_memory(big, k)
    assert est.peak_at == "head" and est.term("logits").bytes >= 2048 * 128256 * 4


def test_peak_is_the_larger_phase_and_the_terms_shown_are_the_ones_alive_then():
    """Sizes worked out by hand from the configs (fp32 residual stream on a 4-bit base; trl's
    head tile is 4096 tokens x 32768 columns of bf16), not from the estimator's functions."""
    k = TrainingKnobs(cutoff_len=4096, micro_batch_size=1, grad_checkpointing=True, residual="fp32")
    q = resolve_model("Qwen/Qwen2.5-7B")  # 28 layers, hidden 3584, MLP 18944
    est = estimate_memory(q, k)
    head_tile = 4096 * 32768 * 2
    assert est.peak_at == "layer"  # 18944-wide fp32 MLP tensors outweigh the head's tiles
    checkpointed_inputs = 28 * 4096 * 3584 * 4
    recomputed_mlp = 3 * 4096 * 18944 * 4  # gate, activation and up outputs saved again
    mlp_gradients = 2 * 4096 * 18944 * 4  # the busiest moment's two MLP-wide transients
    assert est.term("activations").bytes >= checkpointed_inputs + recomputed_mlp + mlp_gradients
    assert est.term("logits").bytes < head_tile  # the tiles are freed before the layers' backward
    # a short sequence on a narrow MLP: the head's fixed-size tiles are the larger, and no layer
    # transient or dequantized weight is counted
    g = resolve_model("google/gemma-2-2b")  # 26 layers, hidden 2304, vocab 256000
    est = estimate_memory(g, k.replace(cutoff_len=256))
    assert est.peak_at == "head" and any("output head" in a for a in est.assumptions)
    assert est.term("dequant_workspace").bytes == 0
    assert est.term("activations").bytes == 26 * 256 * 2304 * 4  # only the checkpointed inputs
    assert est.term("logits").bytes >= 32768 * 2304 * 2  # at least the bf16 copy of one fp32 head slice


def test_chunked_loss_is_far_smaller_than_full_logits_at_long_cutoff():
    q = resolve_model("Qwen/Qwen2.5-7B")
    std = estimate_memory(q, TrainingKnobs(loss="standard", cutoff_len=8192)).term("logits").bytes
    chunked = estimate_memory(q, TrainingKnobs(loss="chunked", cutoff_len=8192)).term("logits").bytes
    assert chunked * 5 < std


def test_checkpointing_eager_and_optimizer_effects():
    assert peak(grad_checkpointing=True) < peak(grad_checkpointing=False)
    assert peak(attn="sdpa", cutoff_len=4096) < peak(attn="eager", cutoff_len=4096)
    assert peak(optim="paged_adamw_8bit") < peak(optim="adamw_torch")


def test_nf4_weights_are_about_a_quarter_of_bf16_and_double_quant_helps():
    nf4 = quantized_weights_bytes(LLAMA, TrainingKnobs(quant_bits=4))
    bf16 = quantized_weights_bytes(LLAMA, TrainingKnobs(quant_bits=16))
    assert 0.25 < nf4 / bf16 < 0.27  # 4 bits + ~0.13 bit of constants, over 16 bits
    assert nf4 < quantized_weights_bytes(LLAMA, TrainingKnobs(quant_bits=4, double_quant=False))


def test_breakdown_has_every_group_and_sums_to_reserved_plus_context():
    est = estimate_memory(LLAMA, TrainingKnobs())
    assert set(est.breakdown_bytes()) == set(GROUPS)
    assert sum(est.breakdown_bytes().values()) == est.peak_bytes
    assert est.allocated_bytes < est.reserved_bytes < est.peak_bytes
    assert any("checkpointing" in a for a in est.assumptions)


def test_more_gpus_do_not_shrink_per_gpu_memory():
    k = TrainingKnobs()
    assert estimate_memory(LLAMA, k, gpus=2).peak_bytes >= estimate_memory(LLAMA, k, gpus=1).peak_bytes
