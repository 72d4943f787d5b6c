"""The advisor: the fastest plan that fits the budget, with a one-line reason for each choice.

Search order (each step only when the user did not fix that knob):
1. LoRA rank 16 and alpha = 2 x rank (see `RANK_RULE`);
2. gradient checkpointing off if any micro-batch fits without it (it costs ~30% more compute);
3. the largest power-of-two micro-batch that fits, up to the target effective batch;
4. gradient accumulation to reach the target effective batch.
When nothing fits, the planner says what would (`tuiwiz.planner.suggestions_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tuiwiz.models import ModelSpec
from tuiwiz.planning.knobs import TrainingKnobs, attn_for_model
from tuiwiz.planning.memory import GIB, MemoryEstimate, estimate_memory

if TYPE_CHECKING:
    from tuiwiz.planning.calibration import Calibration

DEFAULT_HEADROOM = 0.10
DEFAULT_EFFECTIVE_BATCH = 16
DEFAULT_RANK = 16
RANK_RULE = ("rank 16, alpha 32: with every linear layer adapted, ranks 8-64 reach the same quality "
             "in the QLoRA paper's ablations; 16 is the common default and costs little memory")
CHECKPOINTING_COST = "about 30% more compute per step (each layer's forward runs twice)"


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


def _fit_model_limits(c: _Choice, spec: ModelSpec, fixed: frozenset[str]) -> None:
    """What the model itself forbids: SDPA on Gemma 2, LoRA dropout on fused MoE experts."""
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
    if "grad_accum" in fixed:
        return
    accum = _accum_for(target, c.knobs.micro_batch_size, gpus)
    c.knobs = c.knobs.replace(grad_accum=accum)
    c.reasons.append(f"gradient accumulation {accum}: {c.knobs.micro_batch_size} x {accum}"
                     + (f" x {gpus} GPUs" if gpus > 1 else "")
                     + f" = effective batch {c.knobs.effective_batch(gpus)} (target {target})")
    if c.step_up is not None:
        c.step_up = c.step_up.replace(grad_accum=_accum_for(target, c.step_up.micro_batch_size, gpus))


def advise(
    spec: ModelSpec,
    base: TrainingKnobs,
    budget: int,
    *,
    gpus: int = 1,
    target_effective_batch: int = DEFAULT_EFFECTIVE_BATCH,
    fixed: frozenset[str] | set[str] = frozenset(),
    calibration: Calibration | None = None,
) -> Advice:
    """Choose the knobs the user left free so the run fits `budget` bytes per GPU.

    `base` carries the user's values; names in `fixed` are never changed. What would fit when
    nothing does is the planner's job (`tuiwiz.planner.suggestions_for`): it re-plans each idea.
    With a `calibration` every estimate it compares with the budget is the calibrated one.
    """
    fixed = frozenset(fixed)
    c = _Choice(base)
    _fit_model_limits(c, spec, fixed)
    _choose_lora(c, fixed)
    per_step = gpus * (c.knobs.grad_accum if "grad_accum" in fixed else 1)
    cap = c.knobs.micro_batch_size if "micro_batch_size" in fixed else max(1, target_effective_batch // per_step)
    _choose_checkpointing(c, spec, budget, cap, gpus, fixed, calibration)
    _choose_micro_batch(c, spec, budget, cap, gpus, fixed, calibration)
    _choose_accumulation(c, target_effective_batch, gpus, fixed)
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
