"""The trainer that runs a plan, and what its stack does to memory.

A plan exported to LLaMA-Factory or Axolotl runs on that trainer's own code, not on tuiwiz's
worker, so its memory is estimated for that stack (`TrainingKnobs.trainer`). Three things
differ, each read in the trainer's source (file and commit in `tests/test_exports_stack.py`):

- **the residual stream.** With `residual: fp32` tuiwiz's worker runs peft's
  `prepare_model_for_kbit_training`, which upcasts embeddings, norms and the head of a k-bit
  base to fp32, so the residual stream and the MLP's intermediates are fp32. By default
  (`residual: bf16`, chosen by `bench/bench_residual.py`: 25% less kept for backward, loss
  curves within 0.0005 over 300 steps) it keeps them in the compute dtype. LLaMA-Factory never
  calls it (its `upcast_layernorm` is off by default); Axolotl calls it and then casts norms,
  embeddings and head back to bf16 for any LoRA/QLoRA adapter (`ModelLoader._resize_token_embeddings`). Both
  keep the stream in bf16.
- **the adapters' dtype.** trl's SFTTrainer casts the LoRA weights of a k-bit base to bf16;
  LLaMA-Factory casts trainable parameters to fp32 (`model/adapter.py`), and Axolotl keeps
  peft's fp32 (`autocast_adapter_dtype`). fp32 adapters double the adapter, gradient and
  AdamW-state bytes and add autocast's bf16 weight copies.
- **the loss.** `loss: chunked` means the trainer's own fused loss: trl's chunked log-probs in
  tuiwiz, Liger's fused linear cross-entropy in the other two (LLaMA-Factory's
  `enable_liger_kernel`, Axolotl's LigerPlugin; liger-kernel is an Axolotl dependency, while
  its cut cross-entropy needs a git-only fork). Liger patches only the model types it knows;
  for any other the run computes the full logits, and the plan says so. `loss: standard` is
  the model's own cross-entropy over the full logits, in every trainer. LLaMA-Factory has one
  switch for the fused loss and Liger's other kernels, so there `liger` follows `loss`.

Pure data and functions: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuiwiz.planning.knobs import TrainingKnobs

#: Model types Liger patches: liger-kernel's `MODEL_TYPE_TO_APPLY_LIGER_FN` (Axolotl's LigerPlugin
#: looks types up there) and LLaMA-Factory 0.9.5's `model/model_utils/liger_kernel.py` list,
#: intersected with the architectures tuiwiz plans for.
LIGER_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2",
                               "phi3"})


@dataclass(frozen=True)
class Stack:
    """What one trainer does that changes a run's memory."""

    name: str
    label: str
    #: residual dtypes it can run a k-bit base with (the first is what it does by default)
    residuals: tuple[str, ...]
    #: trainable LoRA weights kept in fp32 (else trl's bf16 cast on a k-bit base)
    fp32_adapters: bool
    #: what `loss: chunked` is in this trainer
    fused_loss: str
    #: model types that fused loss exists for (None: every model)
    fused_model_types: frozenset[str] | None


STACKS: dict[str, Stack] = {
    "tuiwiz": Stack("tuiwiz", "tuiwiz", ("bf16", "fp32"), False, "trl's chunked log-probs", None),
    "llamafactory": Stack("llamafactory", "LLaMA-Factory 0.9.5", ("bf16",), True,
                          "Liger's fused linear cross-entropy (enable_liger_kernel)", LIGER_MODEL_TYPES),
    "axolotl": Stack("axolotl", "Axolotl 0.19.0", ("bf16",), True,
                     "Liger's fused linear cross-entropy (LigerPlugin)", LIGER_MODEL_TYPES),
}


def stack_of(knobs: TrainingKnobs) -> Stack:
    return STACKS[knobs.trainer]


def kbit(knobs: TrainingKnobs) -> bool:
    return knobs.quant_bits in (4, 8)


def residual_fp32(knobs: TrainingKnobs) -> bool:
    """An fp32 residual stream: a k-bit base prepared with peft's upcast (`residual: fp32`)."""
    return kbit(knobs) and knobs.residual == "fp32"


def adapters_fp32(knobs: TrainingKnobs) -> bool:
    """fp32 LoRA weights on a bf16 stream: a 16-bit base (peft's autocast_adapter_dtype) or a
    trainer that keeps them fp32. (tuiwiz's own fp32 adapters under fp16 compute are counted
    by `memory.lora_param_bytes`.)"""
    return not kbit(knobs) or stack_of(knobs).fp32_adapters


def fused_loss_for(trainer: str, model_type: str | None) -> bool:
    """Whether `trainer` has a fused/chunked loss for this model type."""
    types = STACKS[trainer].fused_model_types
    return types is None or model_type in types


def liger_loss(knobs: TrainingKnobs) -> bool:
    """The head runs Liger's fused linear cross-entropy (a consumer's `loss: chunked`)."""
    return knobs.loss == "chunked" and knobs.trainer != "tuiwiz"


def fit_to_trainer(knobs: TrainingKnobs, model_type: str | None) -> tuple[TrainingKnobs, list[str]]:
    """The knobs as `knobs.trainer` will really run them, with one reason per change.

    A consumer's residual stream is what its code does (no knob of its own changes it), and
    its fused loss exists only for the model types Liger patches.
    """
    stack, reasons = stack_of(knobs), []
    if knobs.residual not in stack.residuals:
        knobs = knobs.replace(residual=stack.residuals[0])
        reasons.append(f"residual stream {knobs.residual}: {stack.label} keeps embeddings, norms and head "
                       "in the compute dtype (no fp32 upcast of a k-bit base)")
    if knobs.loss == "chunked" and not fused_loss_for(knobs.trainer, model_type):
        knobs = knobs.replace(loss="standard")
        reasons.append(f"loss standard (full logits): {stack.label} has no fused loss for {model_type} models")
    if knobs.trainer == "llamafactory" and knobs.liger != (knobs.loss == "chunked"):
        # one switch, enable_liger_kernel: the fused loss and the RMSNorm/SwiGLU/RoPE kernels together
        knobs = knobs.replace(liger=knobs.loss == "chunked")
        reasons.append(f"Liger kernels {'on' if knobs.liger else 'off'}: {stack.label}'s enable_liger_kernel "
                       "switches them together with its fused loss")
    return knobs, reasons


def residual_conflict(trainer: str, residual: str) -> str | None:
    """Why `trainer` cannot run `residual` (None when it can): for a front end to refuse a value
    the user typed rather than silently replace it."""
    stack = STACKS[trainer]
    if residual in stack.residuals:
        return None
    return (f"{stack.label} keeps the residual stream of a quantized base in {stack.residuals[0]}; "
            f"it has no option for {residual}")
