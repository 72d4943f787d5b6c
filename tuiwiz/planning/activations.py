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

All functions return bytes for ONE micro-batch on one GPU, given as `micro_batch` rows of
`seq_len` tokens (`micro_batch_shape`: a flattened batching is one long row). `tokens = micro_batch * seq_len`.
"""

from __future__ import annotations

from tuiwiz.models import ModelSpec
from tuiwiz.planning.knobs import TrainingKnobs, attn_for_model
from tuiwiz.planning.stacks import LIGER_MODEL_TYPES, adapters_fp32, liger_loss, residual_fp32

#: trl's chunked log-prob kernel tiles: TOKEN_CHUNK_SIZE x vocab chunk (trl/kernels/chunked_logprob.py).
TRL_TOKEN_CHUNK = 4096
TRL_VOCAB_CHUNK = 32768
#: An RMSNorm's rsqrt(mean(x^2)): one fp32 per token.
RSQRT_BYTES = 4
#: trl's fused head per scored token: int64 target, fp32 log-normaliser, fp32 entropy (SFTTrainer
#: asks for it, for logging), bool label mask.
HEAD_PER_TOKEN_BYTES = 8 + 4 + 4 + 1


def residual_bytes(knobs: TrainingKnobs) -> int:
    """Bytes per element of the residual stream: fp32 after peft's k-bit preparation (tuiwiz's
    `residual: fp32`), else the compute dtype (a 16-bit base, LLaMA-Factory, Axolotl: see
    `tuiwiz.planning.stacks`)."""
    return 4 if residual_fp32(knobs) else 2


#: Bytes per element of what autocast computes in (bf16 or fp16).
COMPUTE_BYTES = 2


def micro_batch_shape(knobs: TrainingKnobs) -> tuple[int, int]:
    """(rows, tokens per row) of the largest micro-batch the model is handed: what every per-token
    term here multiplies. Memory is set by tokens: at most `micro_batch x cutoff` of them in all three.

    padded: `micro_batch` rows padded to the longest, at worst the cutoff. packed and padding_free
    run flattened: trl's collator concatenates the micro-batch into ONE row (trl/trainer/sft_trainer.py
    DataCollatorForLanguageModeling.torch_call, `padding_free`), of packed rows of up to `cutoff`
    tokens each, or of whole samples of up to `cutoff`.
    """
    b, s = knobs.micro_batch_size, knobs.cutoff_len
    return (b, s) if knobs.batching == "padded" else (1, b * s)


def samples_share_a_row(knobs: TrainingKnobs) -> bool:
    """Several samples in one row: transformers then builds a block-diagonal mask from the position
    ids for sdpa and eager (masking_utils.find_packed_sequence_indices); one sample needs none."""
    return knobs.batching == "packed" or (knobs.batching == "padding_free" and knobs.micro_batch_size > 1)


def liger_on(spec: ModelSpec, knobs: TrainingKnobs) -> bool:
    """Liger's layer kernels replace this model's RMSNorm and SwiGLU (it patches only the model
    types it knows, `MODEL_TYPE_TO_APPLY_LIGER_FN`)."""
    return knobs.liger and spec.model_type in LIGER_MODEL_TYPES


def effective_attn(spec: ModelSpec, knobs: TrainingKnobs) -> str:
    """The attention the worker really gets: transformers refuses SDPA for Gemma 2."""
    return attn_for_model(spec.model_type, knobs.attn)


def _mlp_width(spec: ModelSpec) -> int:
    """The MLP's intermediate width one token goes through (an MoE token: its experts' together)."""
    return spec.moe_intermediate * spec.experts_per_token if spec.is_moe else spec.intermediate


def _targets(spec: ModelSpec, knobs: TrainingKnobs) -> dict[str, tuple[int, int]]:
    t = knobs.target_modules if not isinstance(knobs.target_modules, list) else tuple(knobs.target_modules)
    return spec.resolve_targets(t)


#: LoRA targets that read the same tensor: the attention norm's output, and the MLP norm's.
_SAME_INPUT = ({"q_proj", "k_proj", "v_proj", "qkv_proj"}, {"gate_proj", "up_proj", "gate_up_proj"})


def _lora_input_uncast(knobs: TrainingKnobs) -> bool:
    """lora_A reads the very tensor the base layer reads: a 16-bit stream into bf16 adapters with
    no dropout. (An fp32 stream gets an autocast copy per module; fp32 adapters make peft cast
    the input to fp32 first; dropout makes a new tensor per module.)"""
    return not residual_fp32(knobs) and not adapters_fp32(knobs) and knobs.lora_dropout == 0


def _lora_saved(name: str, d_in: int, spec: ModelSpec, knobs: TrainingKnobs, *, shared: bool = False) -> int:
    """One LoRA branch per token: lora_B's rank-wide bf16 input, plus lora_A's bf16 input.

    With dropout the mask (1 byte, CUDA's fused dropout) and the dropout output are new tensors.
    Without it lora_A keeps a bf16 input of its own per module on an fp32 stream or with fp32
    adapters (measured: q, k and v do not share one then). On a 16-bit stream into bf16
    adapters it keeps the tensor the base layer reads, so modules reading the same one
    (`shared`: not the first of `_SAME_INPUT`'s group) add nothing. o_proj on a quantized base
    with SDPA reads the SDPA output, which SDPA keeps anyway.
    """
    c = COMPUTE_BYTES
    per = c * knobs.lora_rank
    if knobs.lora_dropout > 0:
        return per + d_in + c * d_in
    if name == "o_proj" and not adapters_fp32(knobs) and effective_attn(spec, knobs) != "eager":
        return per
    if shared and _lora_input_uncast(knobs):
        return per
    return per + c * d_in


def _lora_saved_per_token(spec: ModelSpec, knobs: TrainingKnobs, names: set[str] | None = None) -> int:
    """`_lora_saved` over the layer's targets (or those in `names`), each shared input counted once."""
    seen: set[int] = set()
    total = 0
    for name, (d_in, _) in _targets(spec, knobs).items():
        if names is not None and name not in names:
            continue
        group = next((i for i, g in enumerate(_SAME_INPUT) if name in g), None)
        total += _lora_saved(name, d_in, spec, knobs, shared=group in seen)
        if group is not None:
            seen.add(group)
    return total


def _fused_qkv_extra(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """Phi-3's fused qkv_proj on a 16-bit stream: v is a slice of the qkv output and reaches the
    attention without a copy (no autocast cast, no GQA expansion), so what the attention keeps
    of v keeps the whole qkv output alive: q and k's part on top, per token."""
    if spec.model_type != "phi3" or residual_fp32(knobs):
        return 0
    if effective_attn(spec, knobs) == "eager" and spec.heads != spec.kv_heads:
        return 0  # repeat_kv copies v
    return COMPUTE_BYTES * (spec.q_dim + spec.kv_dim)


def layer_saved_bytes_per_token(spec: ModelSpec, knobs: TrainingKnobs, seq_len: int) -> int:
    """Bytes one decoder layer creates and leaves alive for backward, per token (no checkpointing).

    Counted by the layer that creates them, so a layer's output (kept by the next layer's norm)
    belongs to it and its input does not.
    """
    c = COMPUTE_BYTES
    h, q, kv, i, heads = spec.hidden, spec.q_dim, spec.kv_dim, spec.intermediate, spec.heads
    total = spec.norms_per_layer * (_norm_saved_per_unit(spec, knobs) * h + RSQRT_BYTES)
    attn = effective_attn(spec, knobs)
    if attn == "eager":
        total += 3 * c * q + (4 + c) * heads * seq_len  # q, expanded k and v; fp32 softmax + bf16 copy
        if spec.config.get("attn_logit_softcapping"):
            total += c * heads * seq_len  # tanh(scores / cap)
    else:
        total += c * (2 * q + 2 * kv) + 4 * heads  # q, k, v, output; fp32 log-sum-exp per head
        if attn == "sdpa" and samples_share_a_row(knobs):
            total += c * seq_len  # sdpa's own compute-dtype copy of the block-diagonal mask (measured)

    if not spec.is_moe:
        total += _mlp_saved_tensors(spec, knobs) * residual_bytes(knobs) * i

    return total + _fused_qkv_extra(spec, knobs) + _lora_saved_per_token(spec, knobs)


def _norm_saved_per_unit(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """Bytes an RMSNorm keeps per hidden unit: transformers' keeps an fp32 copy of its input (the
    input itself when that is fp32); Liger's keeps its input in its own dtype
    (liger_kernel/ops/rms_norm.py: `ctx.save_for_backward(X, W, RSTD)`)."""
    return residual_bytes(knobs) if liger_on(spec, knobs) else 4


def _mlp_saved_tensors(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """Intermediate-width tensors the MLP keeps: gate out, activation out and up out; Liger's SwiGLU
    keeps only gate and up and recomputes the activation in backward (liger_kernel/ops/swiglu.py,
    `LigerSiLUMulFunction`)."""
    return 2 if liger_on(spec, knobs) else 3


def layer_saved_fixed_bytes(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """Per layer, independent of tokens: autocast's bf16 copies of fp32 LoRA weights (16-bit
    bases, and trainers that keep adapters fp32: on a quantized base trl's SFTTrainer casts them
    to bf16, so no copy is made), and Gemma 2's fp32 `1 + weight` per norm."""
    c = COMPUTE_BYTES
    total = 0
    if adapters_fp32(knobs):
        total += sum(c * knobs.lora_rank * (d_in + d_out) for d_in, d_out in _targets(spec, knobs).values())
    if spec.model_type == "gemma2":
        total += spec.norms_per_layer * 4 * spec.hidden
    return total


def checkpoint_bytes_per_token(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """With gradient checkpointing each layer keeps only its output (the next layer's input)."""
    return residual_bytes(knobs) * spec.hidden


def checkpointed_layers_kept(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """How many layer outputs checkpointing keeps: every layer's; on a 16-bit stream all but the
    last, whose output only the final norm reads, and that keeps its own fp32 copy instead
    (`outside_saved_bytes`)."""
    return spec.layers if residual_bytes(knobs) == 4 else max(0, spec.layers - 1)


def _mask_bytes(spec: ModelSpec, knobs: TrainingKnobs, micro_batch: int, seq_len: int) -> int:
    """Eager attention gets a `batch x seq x seq` additive mask (Gemma 2: full and sliding)."""
    if effective_attn(spec, knobs) != "eager":
        return 0  # SDPA/flash run causal without a mask when nothing is padded
    kinds = 2 if spec.model_type == "gemma2" else 1
    return kinds * micro_batch * seq_len * seq_len * residual_bytes(knobs)


def _row_mask_bytes(spec: ModelSpec, knobs: TrainingKnobs, micro_batch: int, seq_len: int) -> int:
    """The mask the model builds once per step: eager's additive one, or for sdpa the boolean
    block-diagonal mask of a flattened row (1 byte a pair; each layer converts its own copy)."""
    if effective_attn(spec, knobs) == "sdpa" and samples_share_a_row(knobs):
        return micro_batch * seq_len * seq_len
    return _mask_bytes(spec, knobs, micro_batch, seq_len)


def outside_saved_bytes(spec: ModelSpec, knobs: TrainingKnobs, micro_batch: int, seq_len: int) -> int:
    """Kept outside the decoder layers: rotary tables, the final norm, trl's fused head; with
    checkpointing also the embedding output, the position ids and eager's mask."""
    tokens = micro_batch * seq_len
    a = residual_bytes(knobs)
    total = 2 * seq_len * spec.head_dim * a  # cos and sin, shared by the batch and the layers
    final_copy = _norm_saved_per_unit(spec, knobs) * spec.hidden
    total += tokens * (RSQRT_BYTES + (0 if a == 4 else final_copy))  # final norm (fp32 copy if 16-bit)
    if spec.model_type == "gemma2":
        total += 4 * spec.hidden
    scored = micro_batch * (seq_len - 1)  # worst case: every next token is trained on
    total += scored * (a * spec.hidden + HEAD_PER_TOKEN_BYTES)
    if knobs.grad_checkpointing:
        total += tokens * a * spec.hidden + 8 * seq_len + _row_mask_bytes(spec, knobs, micro_batch, seq_len)
    return total


def _eager_backward_moment_per_token(spec: ModelSpec, knobs: TrainingKnobs, seq_len: int) -> int:
    """Alive from one layer when eager attention runs its softmax backward: the attention half of
    what it saved (input norm, q and the head-expanded k and v, the fp32 probabilities, the LoRA
    inputs of q/k/v), plus two fp32 `heads x seq` gradients (of the probabilities, and of the
    softmax). The MLP's saved tensors and the probabilities' bf16 copy are freed by then."""
    c, h = COMPUTE_BYTES, spec.hidden
    keep = 4 * h + RSQRT_BYTES + 3 * c * spec.q_dim + 4 * spec.heads * seq_len
    keep += _lora_saved_per_token(spec, knobs, _SAME_INPUT[0])
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
    if adapters_fp32(knobs):  # a 16-bit base, or a trainer that keeps fp32 adapters on a bf16 stream
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
        return checkpointed_layers_kept(spec, knobs) * tokens * checkpoint_bytes_per_token(spec, knobs)
    per_layer = tokens * layer_saved_bytes_per_token(spec, knobs, seq_len) + layer_saved_fixed_bytes(spec, knobs)
    return spec.layers * per_layer + _row_mask_bytes(spec, knobs, micro_batch, seq_len)


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
    chunked in LLaMA-Factory / Axolotl (Liger's fused linear cross-entropy,
    `liger_kernel/ops/fused_linear_cross_entropy.py`): the whole head runs in forward, one
    chunk of `next_pow2(tokens / ceil(vocab / hidden))` rows at a time: that chunk's logits and
    its hidden-width gradient, in the compute dtype. Its gradient for the hidden states is kept
    until backward, like trl's scored copy in `outside_saved_bytes`.
    standard: bf16 logits, the fp32 log-softmax saved by cross-entropy, and its fp32 gradient
    in and out: 14 bytes per logit, `batch x seq x vocab` of them.
    """
    tokens = micro_batch * seq_len
    c = COMPUTE_BYTES
    if liger_loss(knobs):
        rows = liger_chunk_rows(spec, tokens)
        return rows * spec.vocab * c + rows * spec.hidden * c
    if knobs.loss == "chunked":
        scored = micro_batch * (seq_len - 1)
        rows = min(scored, TRL_TOKEN_CHUNK)
        total = rows * TRL_VOCAB_CHUNK * c + scored * spec.hidden * 4
        if residual_bytes(knobs) != c:  # fp32 head and hidden states (k-bit base): cast copies per tile
            total += min(spec.vocab, TRL_VOCAB_CHUNK) * spec.hidden * c + rows * spec.hidden * c
        return total
    return tokens * spec.vocab * 14


def liger_chunk_rows(spec: ModelSpec, tokens: int) -> int:
    """Rows per chunk of Liger's fused linear cross-entropy: `next_power_of_2(cdiv(BT, cdiv(V, H)))`."""
    per = -(-tokens // -(-spec.vocab // spec.hidden))
    return 1 << max(0, (per - 1).bit_length())


def logits_bytes(spec: ModelSpec, knobs: TrainingKnobs, micro_batch: int, seq_len: int) -> int:
    """The head and loss at their busiest plus what is kept outside the decoder layers."""
    return outside_saved_bytes(spec, knobs, micro_batch, seq_len) + head_work_bytes(spec, knobs, micro_batch, seq_len)
