"""Activation and logits terms: what one training step keeps alive for backward.

Every shape law here was measured, tensor by tensor, on the real stack as installed
(transformers 5.23 + peft 0.21 + trl 1.16 + bitsandbytes 0.50, torch autocast bf16) by
`tests/test_activations.py`, which counts the storages a forward pass leaves alive on tiny
models of each family and checks these formulas to within 2%. What that showed, per token:

- `prepare_model_for_kbit_training` upcasts embeddings and norms to fp32, so with a quantized
  base the residual stream, the norm outputs and everything the 4-bit linears return (they cast
  back to their input's dtype) are fp32: 4 bytes. Only attention runs in bf16.
- bitsandbytes' MatMul4Bit keeps nothing per token: its ctx holds only the packed weight.
- Each RMSNorm keeps its fp32 input (or an fp32 copy of a 16-bit one) and a 4-byte rsqrt.
- Each LoRA module keeps the bf16 input of lora_A (a fresh cast per module: q, k and v do not
  share one), lora_A's rank-wide output, and with dropout > 0 a 1-byte mask. SFTTrainer casts
  adapters of a quantized base to bf16; on a 16-bit base they stay fp32 and autocast keeps bf16
  copies of A and B (a per-layer constant).
- SDPA keeps q, k, v (k and v NOT expanded for GQA: transformers passes `enable_gqa`), its
  output and an fp32 log-sum-exp per head. Eager keeps q and the head-expanded k and v in bf16,
  the fp32 softmax and its bf16 copy (`heads x seq` per token), and, for Gemma 2's logit
  softcapping, the tanh output. Gemma 2 cannot use SDPA in this transformers: it is always eager.
- The MLP keeps the gate output, the activation output and the up output, in the residual dtype.
- trl's fused LM head keeps the scored tokens' final hidden states (a gathered copy), the
  int64 targets, the fp32 log-normaliser and the label mask; never `batch x seq x vocab`.

`tests/test_step_peak.py` then follows the whole step (forward and backward) op by op: on top
of what is kept, the busiest decoder layer adds two MLP-wide tensors (`layer_transient_bytes_per_token`),
and the head's backward tiles (`head_work_bytes`) are freed before any layer's backward starts,
so the step's peak is one or the other (`memory.estimate_memory` takes the larger).

All functions return bytes for ONE micro-batch on one GPU. `tokens = micro_batch * seq_len`.
"""

from __future__ import annotations

from tuiwiz.models import ModelSpec
from tuiwiz.planning.knobs import TrainingKnobs, attn_for_model

#: trl's chunked log-prob kernel tiles: TOKEN_CHUNK_SIZE x vocab chunk (trl/kernels/chunked_logprob.py).
TRL_TOKEN_CHUNK = 4096
TRL_VOCAB_CHUNK = 32768
#: An RMSNorm's rsqrt(mean(x^2)): one fp32 per token.
RSQRT_BYTES = 4
#: trl's fused head per scored token: int64 target, fp32 log-normaliser, fp32 entropy (SFTTrainer
#: asks for it, for logging), bool label mask.
HEAD_PER_TOKEN_BYTES = 8 + 4 + 4 + 1


def residual_bytes(knobs: TrainingKnobs) -> int:
    """Bytes per element of the residual stream: fp32 after k-bit preparation, else the compute dtype."""
    return 4 if knobs.quant_bits in (4, 8) else 2


#: Bytes per element of what autocast computes in (bf16 or fp16).
COMPUTE_BYTES = 2


def effective_attn(spec: ModelSpec, knobs: TrainingKnobs) -> str:
    """The attention the worker really gets: transformers refuses SDPA for Gemma 2."""
    return attn_for_model(spec.model_type, knobs.attn)


def _mlp_width(spec: ModelSpec) -> int:
    """The MLP's intermediate width one token goes through (an MoE token: its experts' together)."""
    return spec.moe_intermediate * spec.experts_per_token if spec.is_moe else spec.intermediate


def _targets(spec: ModelSpec, knobs: TrainingKnobs) -> dict[str, tuple[int, int]]:
    t = knobs.target_modules if not isinstance(knobs.target_modules, list) else tuple(knobs.target_modules)
    return spec.resolve_targets(t)


def _lora_saved(name: str, d_in: int, spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """One LoRA branch per token: lora_B's rank-wide bf16 input, plus lora_A's bf16 input.

    With dropout the mask (1 byte, CUDA's fused dropout) and the dropout output are new tensors.
    Without it lora_A still keeps a bf16 input of its own per module (measured: q, k and v do not
    share one, on quantized and 16-bit bases alike), except o_proj on a quantized base with SDPA,
    whose input is the SDPA output that SDPA keeps anyway.
    """
    c = COMPUTE_BYTES
    per = c * knobs.lora_rank
    if knobs.lora_dropout > 0:
        return per + d_in + c * d_in
    if name == "o_proj" and knobs.quant_bits in (4, 8) and effective_attn(spec, knobs) != "eager":
        return per
    return per + c * d_in


def layer_saved_bytes_per_token(spec: ModelSpec, knobs: TrainingKnobs, seq_len: int) -> int:
    """Bytes one decoder layer creates and leaves alive for backward, per token (no checkpointing).

    Counted by the layer that creates them, so a layer's output (kept by the next layer's norm)
    belongs to it and its input does not.
    """
    c = COMPUTE_BYTES
    h, q, kv, i, heads = spec.hidden, spec.q_dim, spec.kv_dim, spec.intermediate, spec.heads
    total = spec.norms_per_layer * (4 * h + RSQRT_BYTES)
    attn = effective_attn(spec, knobs)
    if attn == "eager":
        total += 3 * c * q + (4 + c) * heads * seq_len  # q, expanded k and v; fp32 softmax + bf16 copy
        if spec.config.get("attn_logit_softcapping"):
            total += c * heads * seq_len  # tanh(scores / cap)
    else:
        total += c * (2 * q + 2 * kv) + 4 * heads  # q, k, v, output; fp32 log-sum-exp per head

    if not spec.is_moe:
        total += 3 * residual_bytes(knobs) * i  # gate out, activation out, up out

    for name, (d_in, _) in _targets(spec, knobs).items():
        total += _lora_saved(name, d_in, spec, knobs)
    return total


def layer_saved_fixed_bytes(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """Per layer, independent of tokens: autocast's bf16 copies of fp32 LoRA weights (16-bit
    bases only: on a quantized base SFTTrainer casts the adapters to bf16, so no copy is made),
    and Gemma 2's fp32 `1 + weight` per norm."""
    c = COMPUTE_BYTES
    total = 0
    if knobs.quant_bits == 16:
        total += sum(c * knobs.lora_rank * (d_in + d_out) for d_in, d_out in _targets(spec, knobs).values())
    if spec.model_type == "gemma2":
        total += spec.norms_per_layer * 4 * spec.hidden
    return total


def checkpoint_bytes_per_token(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """With gradient checkpointing each layer keeps only its output (the next layer's input)."""
    return residual_bytes(knobs) * spec.hidden


def _mask_bytes(spec: ModelSpec, knobs: TrainingKnobs, micro_batch: int, seq_len: int) -> int:
    """Eager attention gets a `batch x seq x seq` additive mask (Gemma 2: full and sliding)."""
    if effective_attn(spec, knobs) != "eager":
        return 0  # SDPA/flash run causal without a mask when nothing is padded
    kinds = 2 if spec.model_type == "gemma2" else 1
    return kinds * micro_batch * seq_len * seq_len * residual_bytes(knobs)


def outside_saved_bytes(spec: ModelSpec, knobs: TrainingKnobs, micro_batch: int, seq_len: int) -> int:
    """Kept outside the decoder layers: rotary tables, the final norm, trl's fused head; with
    checkpointing also the embedding output, the position ids and eager's mask."""
    tokens = micro_batch * seq_len
    a = residual_bytes(knobs)
    total = 2 * seq_len * spec.head_dim * a  # cos and sin, shared by the batch and the layers
    total += tokens * (RSQRT_BYTES + (0 if a == 4 else 4 * spec.hidden))  # final norm (fp32 copy if 16-bit)
    if spec.model_type == "gemma2":
        total += 4 * spec.hidden
    scored = micro_batch * (seq_len - 1)  # worst case: every next token is trained on
    total += scored * (a * spec.hidden + HEAD_PER_TOKEN_BYTES)
    if knobs.grad_checkpointing:
        total += tokens * a * spec.hidden + 8 * seq_len + _mask_bytes(spec, knobs, micro_batch, seq_len)
    return total


def _eager_backward_moment_per_token(spec: ModelSpec, knobs: TrainingKnobs, seq_len: int) -> int:
    """Alive from one layer when eager attention runs its softmax backward: the attention half of
    what it saved (input norm, q and the head-expanded k and v, the fp32 probabilities, the LoRA
    inputs of q/k/v), plus two fp32 `heads x seq` gradients (of the probabilities, and of the
    softmax). The MLP's saved tensors and the probabilities' bf16 copy are freed by then."""
    c, h = COMPUTE_BYTES, spec.hidden
    keep = 4 * h + RSQRT_BYTES + 3 * c * spec.q_dim + 4 * spec.heads * seq_len
    keep += sum(_lora_saved(name, d_in, spec, knobs) for name, (d_in, _) in _targets(spec, knobs).items()
                if name in ("q_proj", "k_proj", "v_proj", "qkv_proj"))
    return keep + 8 * spec.heads * seq_len


def layer_transient_bytes_per_token(spec: ModelSpec, knobs: TrainingKnobs, seq_len: int) -> int:
    """Beyond what a decoder layer saves, what is alive at its busiest moment, per token.

    Measured op by op on CPU (`tests/test_step_peak.py`). The busiest moment is usually in the
    MLP: in forward the gate x up product that feeds down_proj plus its LoRA-dropout copy, in
    backward the gradients of the gate and up outputs; either way two tensors of the
    intermediate width in the residual dtype, plus one bf16 hidden-width tensor. On a 16-bit
    base the adapters are fp32, so the LoRA branch's inputs and gradients are fp32 too: measured
    8 bytes per intermediate unit, 11.5 with dropout, taken as 8 and 12.

    With eager attention at long sequences the softmax backward is the busier moment (see
    `_eager_backward_moment_per_token`); the result is then relative to the layer's saved bytes.
    """
    a, c, i = residual_bytes(knobs), COMPUTE_BYTES, _mlp_width(spec)
    if knobs.quant_bits == 16:
        mlp = (12 if knobs.lora_dropout > 0 else 8) * i
    else:
        mlp = 2 * a * i + c * spec.hidden
    if effective_attn(spec, knobs) == "eager":
        eager = _eager_backward_moment_per_token(spec, knobs, seq_len) - layer_saved_bytes_per_token(spec, knobs, seq_len)
        return max(mlp, eager)
    return mlp


def kept_layer_bytes(spec: ModelSpec, knobs: TrainingKnobs, micro_batch: int, seq_len: int) -> int:
    """What the decoder layers keep from forward until backward reaches them: every layer's
    saved tensors, or with checkpointing only each layer's output (the next layer's input).
    Without checkpointing eager's `b x s x s` mask lives through the step as well."""
    tokens = micro_batch * seq_len
    if knobs.grad_checkpointing:
        return spec.layers * tokens * checkpoint_bytes_per_token(spec, knobs)
    per_layer = tokens * layer_saved_bytes_per_token(spec, knobs, seq_len) + layer_saved_fixed_bytes(spec, knobs)
    return spec.layers * per_layer + _mask_bytes(spec, knobs, micro_batch, seq_len)


def _recomputed_layer_bytes(spec: ModelSpec, knobs: TrainingKnobs, micro_batch: int, seq_len: int) -> int:
    """With checkpointing, what one recomputed layer saves again during backward (else 0: the
    layer's saved tensors are already in `kept_layer_bytes`)."""
    if not knobs.grad_checkpointing:
        return 0
    tokens = micro_batch * seq_len
    return tokens * layer_saved_bytes_per_token(spec, knobs, seq_len) + layer_saved_fixed_bytes(spec, knobs)


def busiest_layer_bytes(spec: ModelSpec, knobs: TrainingKnobs, micro_batch: int, seq_len: int) -> int:
    """One decoder layer at its busiest, on top of `kept_layer_bytes`: its transient tensors,
    and with checkpointing also everything its recomputed forward saves (one layer at a time)."""
    tokens = micro_batch * seq_len
    return (tokens * layer_transient_bytes_per_token(spec, knobs, seq_len)
            + _recomputed_layer_bytes(spec, knobs, micro_batch, seq_len))


def base_matmul_moment_bytes(spec: ModelSpec, knobs: TrainingKnobs, micro_batch: int, seq_len: int) -> int:
    """The same layer around a base matmul instead, where of the transients only the matmul's
    intermediate-width input is alive; the dequantized weight (`memory.dequant_workspace_bytes`)
    sits beside it and is not counted here."""
    tokens = micro_batch * seq_len
    return tokens * residual_bytes(knobs) * _mlp_width(spec) + _recomputed_layer_bytes(spec, knobs, micro_batch, seq_len)


def head_work_bytes(spec: ModelSpec, knobs: TrainingKnobs, micro_batch: int, seq_len: int) -> int:
    """The output head and loss at their busiest (the first tile of backward), beyond what is
    kept outside the layers.

    chunked (trl's fused LM head): an fp32 gradient for the scored hidden states, the bf16 tile
    buffer, which trl allocates `min(tokens, 4096) x 32768` whatever the vocabulary, and on a
    k-bit base (fp32 head and hidden states) the bf16 copies of one 32768-row slice of the head
    weight and of one 4096-token slice of the hidden states. Measured exactly on CPU with the
    CUDA path's in-place folds.
    standard: bf16 logits, the fp32 log-softmax saved by cross-entropy, and its fp32 gradient
    in and out: 14 bytes per logit, `batch x seq x vocab` of them.
    """
    tokens = micro_batch * seq_len
    c = COMPUTE_BYTES
    if knobs.loss == "chunked":
        scored = micro_batch * (seq_len - 1)
        rows = min(scored, TRL_TOKEN_CHUNK)
        total = rows * TRL_VOCAB_CHUNK * c + scored * spec.hidden * 4
        if residual_bytes(knobs) != c:  # fp32 head and hidden states (k-bit base): cast copies per tile
            total += min(spec.vocab, TRL_VOCAB_CHUNK) * spec.hidden * c + rows * spec.hidden * c
        return total
    return tokens * spec.vocab * 14


def logits_bytes(spec: ModelSpec, knobs: TrainingKnobs, micro_batch: int, seq_len: int) -> int:
    """The head and loss at their busiest plus what is kept outside the decoder layers."""
    return outside_saved_bytes(spec, knobs, micro_batch, seq_len) + head_work_bytes(spec, knobs, micro_batch, seq_len)
