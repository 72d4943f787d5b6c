"""The step's peak: what the estimate says is alive at the busiest moment of a training step.

`tests/test_activations.py` checks what the forward saves; this checks the whole micro-step,
forward and backward, op by op (`_accounting.account_step`): the peak of live non-weight bytes
(saved tensors, recomputed layers, gradients in flight, the head's tiles, the LoRA gradients of
an accumulation) against the estimate's non-static terms (activations, dequantized weight,
logits and loss, LoRA gradients) for the same dimensions.

The models are tiny in depth but run 1,024 tokens through layers 512 wide, so that per-token
terms dominate as they do in real training (at 4 layers and 40 tokens the fixed-size terms,
a dequantized weight or the head's tile, would swamp them). trl's logits tile is 32,768
columns whatever the vocabulary; it is shrunk to the tiny vocabulary on both sides so the head
does not hide the layers.

The default run checks four representative setups (checkpointing on and off, SDPA and eager,
Gemma 2's softcapping, the fp32 stream); `pytest --full` checks all 17, the k-bit ones with both
residual streams (see tests/conftest.py).
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

from _accounting import account_step, build_qlora, case_id, case_knobs, tiny_config  # noqa: E402
from lanes import lane  # noqa: E402

from tuiwiz.models import spec_from_config  # noqa: E402
from tuiwiz.planning import activations as act  # noqa: E402
from tuiwiz.planning.memory import estimate_memory  # noqa: E402

TOL = 0.06
BATCH, SEQ, VOCAB, WIDEN = 2, 512, 4096, 4
DYNAMIC = ("activations", "dequant_workspace", "logits", "lora_gradients")

CASES = [
    # family, attn, grad_checkpointing, rank, dropout, targets, quant_bits
    ("llama", "sdpa", False, 8, 0.05, "all-linear", 4),
    ("llama", "sdpa", True, 8, 0.05, "all-linear", 4),
    ("llama", "eager", True, 64, 0.0, "all-linear", 4),
    ("mistral", "sdpa", True, 16, 0.0, "attn", 4),
    ("qwen2", "sdpa", False, 16, 0.0, "all-linear", 4),
    ("qwen2", "eager", True, 8, 0.0, ["q_proj", "v_proj"], 4),
    ("gemma2", "eager", True, 8, 0.05, "all-linear", 4),
    ("phi3", "sdpa", True, 8, 0.05, "all-linear", 4),
    ("llama", "sdpa", True, 8, 0.05, "all-linear", 16),
]
#: The k-bit setups again with peft's fp32 residual stream (`residual: fp32`; the rest run the default).
CASES += [(*c, "fp32") for c in CASES if c[6] == 4]
#: The default lane: one setup per code path the estimate distinguishes most.
QUICK = [CASES[1], CASES[4], CASES[6], CASES[9]]


def wide_config(family: str) -> dict:
    cfg = tiny_config(family, layers=3, vocab=VOCAB)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        cfg[key] *= WIDEN
    return cfg


def measure(case) -> tuple:
    """(measured StepPeak, the estimate's non-static terms in bytes) for one setup."""
    fam, attn, gc, rank, dropout, targets, qb, *rest = case
    cfg = wide_config(fam)
    spec = spec_from_config(cfg, f"wide-{fam}", "test")
    names = list(spec.resolve_targets(targets if isinstance(targets, str) else tuple(targets)))
    knobs = case_knobs(case, micro_batch_size=BATCH, cutoff_len=SEQ)
    model = build_qlora(cfg, rank=rank, dropout=dropout, targets=names, attn=attn, grad_checkpointing=gc,
                        quant_bits=qb, residual=knobs.residual)
    measured = account_step(model, BATCH, SEQ, VOCAB, vocab_chunk=VOCAB)
    chunk, act.TRL_VOCAB_CHUNK = act.TRL_VOCAB_CHUNK, VOCAB  # the same tile width as the measured step
    try:
        est = estimate_memory(spec, knobs)
    finally:
        act.TRL_VOCAB_CHUNK = chunk
    return measured, sum(est.term(k).bytes for k in DYNAMIC)


@pytest.mark.slow
@pytest.mark.parametrize("case", lane(CASES, QUICK, case_id))
def test_step_peak_matches_the_estimate(case):
    measured, estimated = measure(case)
    err = estimated / measured.peak - 1
    assert abs(err) <= TOL, (f"measured peak {measured.peak:,} B at {measured.peak_phase} ({measured.peak_op}), "
                             f"estimated {estimated:,} B ({err:+.1%})")
    # the peak is in backward or at the end of forward, never early in forward
    assert measured.peak >= measured.forward_end
