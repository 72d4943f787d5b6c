"""The activation and head terms match what the real training step keeps for backward.

Tiny random models of each supported family go through the worker's steps on CPU (bitsandbytes
NF4, k-bit preparation, peft LoRA, trl's fused LM head, bf16 autocast); `tests/_accounting.py`
counts the storages the forward leaves alive, per decoder layer. The estimator's formulas are
evaluated for the same dimensions, batch and length and must agree within 2%.

The default run checks six representative setups; `pytest --full` checks all 27, the k-bit
ones with both residual streams (see tests/conftest.py).
`python bench/accounting.py` prints the measured-vs-estimated table.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("trl")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _accounting import account_forward, build_qlora, case_id, case_knobs, tiny_config  # noqa: E402
from lanes import lane  # noqa: E402

from tuiwiz.models import spec_from_config  # noqa: E402
from tuiwiz.planning import activations as act  # noqa: E402
from tuiwiz.planning.knobs import TrainingKnobs  # noqa: E402

TOL = 0.02
pytestmark = pytest.mark.slow
BATCH, SEQ = 2, 40

CASES = [
    # family, attn, grad_checkpointing, rank, dropout, targets, quant_bits
    ("llama", "sdpa", False, 8, 0.05, "all-linear", 4),
    ("llama", "sdpa", True, 8, 0.05, "all-linear", 4),
    ("llama", "eager", False, 64, 0.0, "all-linear", 4),
    ("llama", "eager", True, 8, 0.05, "all-linear", 4),
    ("mistral", "sdpa", False, 16, 0.0, "attn", 4),
    ("qwen2", "sdpa", False, 64, 0.05, "all-linear", 4),
    ("qwen2", "sdpa", True, 16, 0.0, "all-linear", 4),
    ("qwen2", "eager", False, 8, 0.0, ["q_proj", "v_proj"], 4),
    ("gemma2", "eager", False, 8, 0.05, "all-linear", 4),
    ("gemma2", "eager", True, 8, 0.05, "all-linear", 4),
    ("phi3", "sdpa", False, 8, 0.05, "all-linear", 4),
    ("phi3", "sdpa", True, 64, 0.0, "attn", 4),
    ("llama", "sdpa", False, 8, 0.05, "all-linear", 16),
    ("llama", "sdpa", False, 8, 0.0, "all-linear", 16),
    ("qwen2", "eager", False, 8, 0.05, "attn", 16),
]
#: The k-bit setups again with peft's fp32 residual stream (`residual: fp32`; the rest run the default).
CASES += [(*c, "fp32") for c in CASES if c[6] == 4]
#: The default lane: every saved-tensor law of a layer without checkpointing, SDPA and eager
#: (Gemma 2's softcapping), the checkpointed layer, shared LoRA inputs and Phi-3's fused qkv on a
#: 16-bit stream, and the fp32 stream.
QUICK = [CASES[0], CASES[2], CASES[6], CASES[8], CASES[10], CASES[15]]


@pytest.fixture(scope="module", params=lane(CASES, QUICK, case_id))
def measured(request):
    return measure_saved(request.param)


def measure_saved(case: tuple) -> tuple:
    """(spec, knobs, the forward's accounting) for one case."""
    fam, attn, gc, rank, dropout, targets, qb, *rest = case
    cfg = tiny_config(fam)
    spec = spec_from_config(cfg, f"tiny-{fam}", "test")
    names = list(spec.resolve_targets(targets if isinstance(targets, str) else tuple(targets)))
    knobs = case_knobs(case, micro_batch_size=BATCH, cutoff_len=SEQ)
    model = build_qlora(cfg, rank=rank, dropout=dropout, targets=names, attn=attn, grad_checkpointing=gc,
                        quant_bits=qb, residual=knobs.residual)
    acc = account_forward(model, BATCH, SEQ, cfg["vocab_size"])
    return spec, knobs, acc


def _close(measured_bytes: int, estimated: int) -> bool:
    return abs(estimated - measured_bytes) <= TOL * measured_bytes


def test_each_decoder_layer_keeps_what_the_estimator_says(measured):
    spec, knobs, acc = measured
    tokens = BATCH * SEQ
    if knobs.grad_checkpointing:
        expected = tokens * act.checkpoint_bytes_per_token(spec, knobs)
        kept = act.checkpointed_layers_kept(spec, knobs)
        assert all(got == 0 for got in acc.per_layer[kept:]), acc.per_layer  # the last, on a 16-bit stream
        layers = acc.per_layer[:kept]
    else:
        expected = (tokens * act.layer_saved_bytes_per_token(spec, knobs, SEQ)
                    + act.layer_saved_fixed_bytes(spec, knobs))
        # Layer 0's input (the frozen embedding's output) needs no gradient, so its first norm and
        # its q/k/v dropout masks are never saved: every later layer is the general case.
        layers = acc.per_layer[1:]
        assert acc.per_layer[0] <= expected
    for i, got in enumerate(layers):
        assert _close(got, expected), f"layer {i}: measured {got} B, estimated {expected} B"


def test_what_lives_outside_the_layers_matches_the_estimate(measured):
    spec, knobs, acc = measured
    expected = act.outside_saved_bytes(spec, knobs, BATCH, SEQ)
    assert _close(acc.other, expected), f"measured {acc.other} B, estimated {expected} B"


def test_fused_head_never_materialises_full_logits(measured):
    spec, knobs, acc = measured
    assert all(spec.vocab not in shape for _, _, _, shape in acc.details)


def test_gemma2_attention_is_always_eager_in_the_estimate():
    spec = spec_from_config(tiny_config("gemma2"), "tiny-gemma2", "test")
    assert act.effective_attn(spec, TrainingKnobs(attn="sdpa")) == "eager"
