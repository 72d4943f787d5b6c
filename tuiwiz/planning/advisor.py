"""The advisor: the fastest plan that fits the budget, with a one-line reason for each choice.

Search order (each step only when the user did not fix that knob):
1. LoRA rank 16 and alpha = 2 x rank (see `RANK_RULE`); with more than one GPU, the strategy:
   ddp when a whole copy fits one GPU, else FSDP-QLoRA, else FSDP offloading to host RAM;
2. the batching, from the dataset profile and the attention: padded when padding would waste
   little, else packed (flash-attention, short samples) or padding-free (see `_choose_batching`);
3. gradient checkpointing off if any micro-batch fits without it (it costs ~30% more compute);
4. the largest power-of-two micro-batch that fits, up to the target effective batch;
5. gradient accumulation to reach the target effective batch.
When nothing fits, the planner says what would (`tuiwiz.planner.suggestions_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tuiwiz.models import ModelSpec
from tuiwiz.planning.knobs import TrainingKnobs, attn_for_model
from tuiwiz.planning.memory import GIB, MemoryEstimate, estimate_memory, liger_saving_bytes
from tuiwiz.planning.stacks import LIGER_MODEL_TYPES, fit_to_trainer
from tuiwiz.planning.strategy import (AUTO_ORDER, SHARDED_OPTIM, choice_reason, host_ram, is_sharded, offloads,
                                      strategy_problem)

if TYPE_CHECKING:
    from tuiwiz.data.profile import LengthProfile
    from tuiwiz.planning.calibration import Calibration

DEFAULT_HEADROOM = 0.10
DEFAULT_EFFECTIVE_BATCH = 16
DEFAULT_RANK = 16
RANK_RULE = ("rank 16, alpha 32: with every linear layer adapted, ranks 8-64 reach the same quality "
             "in the QLoRA paper's ablations; 16 is the common default and costs little memory")
CHECKPOINTING_COST = "about 30% more compute per step (each layer's forward runs twice)"
#: Padded micro-batches at least this full (real tokens / slots) keep padding: nothing to gain.
PADDED_GOOD_ENOUGH = 0.95
#: Pack (with flash-attention) when a cutoff-long row holds at least this many samples on average.
PACK_MIN_SAMPLES = 2.0


@dataclass(frozen=True)
class Advice:
    knobs: TrainingKnobs
    estimate: MemoryEstimate
    budget_bytes: int
    gpus: int
    reasons: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())
    #: The knob changes the advisor wanted but memory refused, most wanted first (e.g. a doubled
    #: micro-batch). Empty when memory did not bind: the plan is as fast as the knobs allow.
    held_back: tuple[str, ...] = field(default=())
    #: The plan it would have chosen with a little more memory (None when nothing was held back).
    #: A GPU check runs both: the plan must fit, and if this one also fits for real, the
    #: estimate was conservative enough to cost speed.
    step_up: TrainingKnobs | None = None

    @property
    def fits(self) -> bool:
        return self.estimate.peak_bytes <= self.budget_bytes

    @property
    def budget_gib(self) -> float:
        return self.budget_bytes / GIB

    @property
    def effective_batch(self) -> int:
        return self.knobs.effective_batch(self.gpus)


def budget_bytes(free_gib: float, headroom: float = DEFAULT_HEADROOM) -> int:
    """Usable memory per GPU: the free memory of the tightest chosen GPU minus the headroom."""
    return int(free_gib * (1.0 - headroom) * GIB)


def _accum_for(target_effective_batch: int, micro_batch: int, gpus: int) -> int:
    """Accumulation steps that reach the target effective batch."""
    return max(1, math.ceil(target_effective_batch / (micro_batch * gpus)))


def _pow2_up_to(n: int) -> list[int]:
    out, b = [], 1
    while b <= max(1, n):
        out.append(b)
        b *= 2
    return out


def _largest_fitting_batch(spec: ModelSpec, knobs: TrainingKnobs, budget: int, cap: int, gpus: int,
                           cal: Calibration | None = None) -> int | None:
    best = None
    for b in _pow2_up_to(cap):
        if estimate_memory(spec, knobs.replace(micro_batch_size=b), gpus, cal).peak_bytes <= budget:
            best = b
        else:
            break  # memory is monotone in batch
    return best


@dataclass
class _Choice:
    """The advisor's working state while it walks its steps: the knobs so far and what it said."""

    knobs: TrainingKnobs
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    held_back: list[str] = field(default_factory=list)
    step_up: TrainingKnobs | None = None
    #: samples per micro-batch unit: 1, or the samples a packed row holds on average
    per_row: float = 1.0


def _fit_model_limits(c: _Choice, spec: ModelSpec, fixed: frozenset[str]) -> None:
    """What the model itself forbids: SDPA on Gemma 2, LoRA dropout on fused MoE experts."""
    c.knobs, stack_reasons = fit_to_trainer(c.knobs, spec.model_type)  # the trainer's own stack
    c.reasons.extend(stack_reasons)
    k = c.knobs
    if k.cutoff_len > spec.max_positions:
        c.warnings.append(f"cutoff {k.cutoff_len} exceeds the model's {spec.max_positions} positions")
    runs_with = attn_for_model(spec.model_type, k.attn)
    if runs_with != k.attn:
        if "attn" in fixed:
            c.warnings.append(f"{spec.id}: transformers has no {k.attn} attention for {spec.model_type}; "
                              f"the run will use {runs_with} (the estimate assumes it)")
        else:
            c.knobs = k.replace(attn=runs_with)
            c.reasons.append(f"attention {runs_with}: transformers has no SDPA for {spec.model_type}")
    if spec.is_moe and c.knobs.lora_dropout > 0:
        if "lora_dropout" in fixed:
            c.warnings.append(f"LoRA dropout {c.knobs.lora_dropout} will fail on {spec.id}: peft's LoRA on fused "
                              "MoE expert weights does not support dropout; set LoRA dropout to 0")
        else:
            c.knobs = c.knobs.replace(lora_dropout=0.0)
            c.reasons.append("LoRA dropout 0: peft's LoRA on fused MoE expert weights does not support dropout")


def _choose_batching(c: _Choice, spec: ModelSpec, profile: LengthProfile | None, cap: int,
                     fixed: frozenset[str]) -> None:
    """Padded, packed or padding-free, from the profile and the attention, with the reason.

    packed and padding_free flatten each micro-batch into one row with position ids. Every
    attention keeps the samples apart then (flash-attention's varlen kernel; sdpa and eager get
    transformers' block-diagonal mask, tests/test_batching.py), but eager scores every pair of the
    row, so it stays padded. Packed rows are cutoff-long and full, so a micro-batch carries as many
    real tokens as memory allows; that pays with flash-attention, which skips the blocks between
    samples that sdpa computes and masks, so sdpa runs padding-free (as many samples as planned).
    """
    if "batching" in fixed:
        if c.knobs.batching == "packed" and profile is not None and profile.samples:
            c.per_row = _samples_per_row(profile, c.knobs.cutoff_len)
        return
    if profile is None or not profile.samples:
        return
    attn = attn_for_model(spec.model_type, c.knobs.attn)
    padded = profile.at_cutoff(c.knobs.cutoff_len, cap, "padded").efficiency
    per_row = _samples_per_row(profile, c.knobs.cutoff_len)
    if attn == "eager":
        choice, why = "padded", "eager attention would score every pair of tokens in a flattened micro-batch"
    elif padded >= PADDED_GOOD_ENOUGH:
        choice, why = "padded", f"only {1 - padded:.0%} of token slots are padding at micro-batch {cap}"
    elif attn == "flash_attention_2" and per_row >= PACK_MIN_SAMPLES:
        choice, why = "packed", (f"a {c.knobs.cutoff_len}-token row holds {per_row:.1f} samples; rows are "
                                 "flattened with position ids, so no slot is padding and samples stay apart")
    else:
        choice, why = "padding_free", (f"padded micro-batches of {cap} would be {1 - padded:.0%} padding; flattened with "
                                       "position ids, no slot is padding and samples stay apart")
    c.knobs = c.knobs.replace(batching=choice)
    c.per_row = per_row if choice == "packed" else 1.0
    c.reasons.append(f"batching {choice.replace('_', '-')}: {why}")


def _samples_per_row(profile: LengthProfile, cutoff: int) -> float:
    """Samples a packed row of `cutoff` tokens holds on average (trl's best-fit decreasing)."""
    rows = profile.at_cutoff(cutoff, 1, "packed").sequences
    return profile.samples / rows if rows else 1.0


def _settle_batching(c: _Choice, fixed: frozenset[str]) -> None:
    """Padding-free at micro-batch 1 has nothing to remove (trl warns): run it padded."""
    if "batching" not in fixed and c.knobs.batching == "padding_free" and c.knobs.micro_batch_size == 1:
        c.knobs = c.knobs.replace(batching="padded")
        c.reasons.append("batching padded: micro-batch 1 has no padding to remove")


def _say_liger(c: _Choice, spec: ModelSpec, gpus: int) -> None:
    """What Liger's kernels save in this plan, when it asks for them."""
    if not c.knobs.liger:
        return
    if spec.model_type not in LIGER_MODEL_TYPES:
        c.warnings.append(f"Liger has no kernels for {spec.model_type} models: the run goes without them")
        return
    saved = liger_saving_bytes(spec, c.knobs, gpus)
    c.reasons.append(f"Liger kernels save {saved / GIB:.2f} GiB: SwiGLU keeps 2 of its 3 MLP tensors, RMSNorm "
                     "its input in its own dtype; RoPE runs in place; the loss stays trl's chunked head")


def _choose_lora(c: _Choice, fixed: frozenset[str]) -> None:
    if "lora_rank" not in fixed:
        c.knobs = c.knobs.replace(lora_rank=DEFAULT_RANK)
        c.reasons.append(f"LoRA {RANK_RULE}")
    if "lora_alpha" not in fixed:
        c.knobs = c.knobs.replace(lora_alpha=2 * c.knobs.lora_rank)
        if "lora_rank" in fixed:
            c.reasons.append(f"LoRA alpha {2 * c.knobs.lora_rank} = 2 x rank")


def _choose_checkpointing(c: _Choice, spec: ModelSpec, budget: int, cap: int, gpus: int,
                          fixed: frozenset[str], cal: Calibration | None = None) -> None:
    """Off when some micro-batch fits without it: recomputing every layer costs ~30% compute."""
    if "grad_checkpointing" in fixed:
        return
    off = c.knobs.replace(grad_checkpointing=False)
    if "micro_batch_size" in fixed:
        use_ckpt = estimate_memory(spec, off, gpus, cal).peak_bytes > budget
    else:
        use_ckpt = _largest_fitting_batch(spec, off, budget, cap, gpus, cal) is None
    c.knobs = c.knobs.replace(grad_checkpointing=use_ckpt)
    if use_ckpt:
        c.held_back.append("gradient checkpointing off")
    c.reasons.append(f"gradient checkpointing on: needed to fit; costs {CHECKPOINTING_COST}" if use_ckpt
                     else "gradient checkpointing off: the run fits without it, which saves about 30% compute")


def _for_strategy(c: _Choice, strategy: str, fixed: frozenset[str]) -> tuple[TrainingKnobs, list[str]]:
    """The knobs a strategy runs with: a sharded run keeps the k-bit base's residual stream in bf16
    (FSDP's flat parameters need one dtype) and uses torch's AdamW (PEFT's guide: paged 8-bit AdamW
    fails to save an FSDP checkpoint); only what the user left free changes."""
    k, why = c.knobs.replace(strategy=strategy), []
    if is_sharded(strategy):
        if "residual" not in fixed and k.residual != "bf16" and k.quant_bits in (4, 8):
            k = k.replace(residual="bf16")
            why.append("residual stream bf16: a sharded run keeps one dtype per layer (no fp32 upcast)")
        if "optim" not in fixed and "8bit" in k.optim:
            k = k.replace(optim=SHARDED_OPTIM)
            why.append(f"optimizer {SHARDED_OPTIM}: 8-bit paged AdamW fails to save sharded checkpoints, and the "
                       "adapters' optimizer state is sharded anyway")
    return k, why


def _floor(spec: ModelSpec, knobs: TrainingKnobs, gpus: int, fixed: frozenset[str],
           cal: Calibration | None) -> int:
    """Peak of the smallest step these knobs allow: micro-batch 1 and checkpointing, unless held."""
    small = {n: v for n, v in (("micro_batch_size", 1), ("grad_checkpointing", True)) if n not in fixed}
    return estimate_memory(spec, knobs.replace(**small), gpus, cal).peak_bytes


def _choose_strategy(c: _Choice, spec: ModelSpec, budget: int, gpus: int, per_node: int,
                     fixed: frozenset[str], cal: Calibration | None = None) -> None:
    """The fastest strategy whose smallest step fits (ddp, then FSDP-QLoRA, then FSDP with its shards in
    host RAM), said in one line. One GPU has nothing to share the model with: ddp (a plain run)."""
    if "strategy" in fixed:
        c.knobs, why = _for_strategy(c, c.knobs.strategy, fixed)
        c.reasons.extend(why)
        if is_sharded(c.knobs.strategy) and gpus < 2 and not offloads(c.knobs.strategy):
            c.warnings.append(f"strategy {c.knobs.strategy} on one GPU shards nothing; ddp runs the same faster")
        return
    if gpus < 2:
        return
    single = _floor(spec, c.knobs.replace(strategy="ddp"), gpus, fixed, cal)
    tried = []
    for strategy in AUTO_ORDER:
        k, why = _for_strategy(c, strategy, fixed)
        if strategy_problem(k) is None:
            tried.append((_floor(spec, k, gpus, fixed, cal), strategy, k, why))
    if not tried:
        return
    fitting = [t for t in tried if t[0] <= budget]
    peak, strategy, k, why = fitting[0] if fitting else min(tried, key=lambda t: t[0])
    c.knobs = k
    ram = host_ram(spec, k, gpus, per_node).peak_gib if offloads(strategy) else None
    line = choice_reason(strategy, gpus, single / GIB, peak / GIB, budget / GIB, ram)
    c.reasons.append(line if fitting else f"{line}; nothing fits, this comes closest")
    c.reasons.extend(why)


def _choose_micro_batch(c: _Choice, spec: ModelSpec, budget: int, cap: int, gpus: int,
                        fixed: frozenset[str], cal: Calibration | None = None) -> None:
    """The largest power of two that fits, up to the target effective batch."""
    if "micro_batch_size" not in fixed:
        b = _largest_fitting_batch(spec, c.knobs, budget, cap, gpus, cal)
        c.knobs = c.knobs.replace(micro_batch_size=b or 1)
        if b:
            more = "" if b >= cap else f"; {b * 2} would not fit"
            c.reasons.append(f"micro-batch {b}: the largest power of two that fits{more}")
        if (b or 1) < cap:
            c.held_back.insert(0, f"micro-batch {(b or 1) * 2}")
            c.step_up = c.knobs.replace(micro_batch_size=(b or 1) * 2)
    if c.step_up is None and c.held_back:
        c.step_up = c.knobs.replace(grad_checkpointing=False)


def _choose_accumulation(c: _Choice, target: int, gpus: int, fixed: frozenset[str]) -> None:
    """Accumulate to the target effective batch, in samples: packed rows count as the samples they hold."""
    if "grad_accum" in fixed:
        return
    rows = _rows_for(target, c.per_row)
    accum = _accum_for(rows, c.knobs.micro_batch_size, gpus)
    c.knobs = c.knobs.replace(grad_accum=accum)
    got = c.knobs.effective_batch(gpus)
    said = (f"effective batch {got}" if c.per_row == 1.0
            else f"{got} packed rows, about {round(got * c.per_row)} samples")
    c.reasons.append(f"gradient accumulation {accum}: {c.knobs.micro_batch_size} x {accum}"
                     + (f" x {gpus} GPUs" if gpus > 1 else "") + f" = {said} (target {target})")
    if c.step_up is not None:
        c.step_up = c.step_up.replace(grad_accum=_accum_for(rows, c.step_up.micro_batch_size, gpus))


def _rows_for(target: int, per_row: float) -> int:
    """Micro-batch units (samples, or packed rows) that make `target` samples."""
    return max(1, round(target / per_row))


def advise(
    spec: ModelSpec,
    base: TrainingKnobs,
    budget: int,
    *,
    gpus: int = 1,
    target_effective_batch: int = DEFAULT_EFFECTIVE_BATCH,
    fixed: frozenset[str] | set[str] = frozenset(),
    calibration: Calibration | None = None,
    gpus_per_node: int | None = None,
    profile: LengthProfile | None = None,
) -> Advice:
    """Choose the knobs the user left free so the run fits `budget` bytes per GPU.

    `gpus` counts the run's GPUs over all nodes (`gpus_per_node` of them share a host: what an
    offloading strategy needs in host RAM is per node).

    `base` carries the user's values; names in `fixed` are never changed. What would fit when
    nothing does is the planner's job (`tuiwiz.planner.suggestions_for`): it re-plans each idea.
    With a `calibration` every estimate it compares with the budget is the calibrated one. The
    dataset's `profile` (pure queries only) decides the batching; without one it is left as given.
    """
    fixed = frozenset(fixed)
    c = _Choice(base)
    _fit_model_limits(c, spec, fixed)
    _choose_lora(c, fixed)
    _choose_strategy(c, spec, budget, gpus, gpus_per_node or gpus, fixed, calibration)
    per_step = gpus * (c.knobs.grad_accum if "grad_accum" in fixed else 1)
    cap = c.knobs.micro_batch_size if "micro_batch_size" in fixed else max(1, target_effective_batch // per_step)
    _choose_batching(c, spec, profile, cap, fixed)
    if c.per_row != 1.0 and "micro_batch_size" not in fixed:  # packed: the micro-batch counts rows
        cap = max(1, _rows_for(target_effective_batch, c.per_row) // per_step)
    _choose_checkpointing(c, spec, budget, cap, gpus, fixed, calibration)
    _choose_micro_batch(c, spec, budget, cap, gpus, fixed, calibration)
    _settle_batching(c, fixed)
    _choose_accumulation(c, target_effective_batch, gpus, fixed)
    _say_liger(c, spec, gpus)
    est = estimate_memory(spec, c.knobs, gpus, calibration)
    return Advice(c.knobs, est, budget, gpus, tuple(c.reasons), tuple(c.warnings), tuple(c.held_back), c.step_up)


def smaller_plan(knobs: TrainingKnobs) -> TrainingKnobs:
    """The plan to retry after an out-of-memory error: the same effective batch in smaller steps.

    Halves the micro-batch and doubles accumulation; at micro-batch 1 it turns checkpointing on,
    and with checkpointing already on it shortens the cutoff by a quarter (to a multiple of 64).
    """
    if knobs.micro_batch_size > 1:
        return knobs.replace(micro_batch_size=knobs.micro_batch_size // 2, grad_accum=knobs.grad_accum * 2)
    if not knobs.grad_checkpointing:
        return knobs.replace(grad_checkpointing=True)
    return knobs.replace(cutoff_len=max(64, (knobs.cutoff_len * 3 // 4) // 64 * 64))
