"""The advisor: the fastest plan that fits the budget, with a one-line reason for each choice.

Search order (each step only when the user did not fix that knob):
1. LoRA rank 16 and alpha = 2 x rank (see `RANK_RULE`);
2. gradient checkpointing off if any micro-batch fits without it (it costs ~30% more compute);
3. the largest power-of-two micro-batch that fits, up to the target effective batch;
4. gradient accumulation to reach the target effective batch.
When nothing fits, it says what would: a shorter cutoff, the chunked loss, a smaller model,
a bigger GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tuiwiz.models import ModelSpec
from tuiwiz.planning.knobs import TrainingKnobs, attn_for_model
from tuiwiz.planning.memory import GIB, MemoryEstimate, estimate_memory

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
    suggestions: tuple[str, ...] = field(default=())
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


def _largest_fitting_batch(spec: ModelSpec, knobs: TrainingKnobs, budget: int, cap: int, gpus: int) -> int | None:
    best = None
    for b in _pow2_up_to(cap):
        if estimate_memory(spec, knobs.replace(micro_batch_size=b), gpus).peak_bytes <= budget:
            best = b
        else:
            break  # memory is monotone in batch
    return best


def largest_fitting_cutoff(spec: ModelSpec, knobs: TrainingKnobs, budget: int, gpus: int) -> int | None:
    """Longest cutoff (a multiple of 64) at which micro-batch 1 fits, by bisection."""
    lo, hi = 0, min(knobs.cutoff_len, spec.max_positions) // 64
    fits = lambda n: estimate_memory(spec, knobs.replace(cutoff_len=n * 64, micro_batch_size=1), gpus).peak_bytes <= budget  # noqa: E731
    if hi < 1 or not fits(1):
        return None
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo * 64


def advise(
    spec: ModelSpec,
    base: TrainingKnobs,
    budget: int,
    *,
    gpus: int = 1,
    target_effective_batch: int = DEFAULT_EFFECTIVE_BATCH,
    fixed: frozenset[str] | set[str] = frozenset(),
    alternatives: tuple[ModelSpec, ...] = (),
) -> Advice:
    """Choose the knobs the user left free so the run fits `budget` bytes per GPU.

    `base` carries the user's values; names in `fixed` are never changed. `alternatives`
    are smaller models offered when nothing fits.
    """
    reasons: list[str] = []
    warnings: list[str] = []
    k = base
    if base.cutoff_len > spec.max_positions:
        warnings.append(f"cutoff {base.cutoff_len} exceeds the model's {spec.max_positions} positions")

    runs_with = attn_for_model(spec.model_type, k.attn)
    if runs_with != k.attn:
        if "attn" in fixed:
            warnings.append(f"{spec.id}: transformers has no {k.attn} attention for {spec.model_type}; "
                            f"the run will use {runs_with} (the estimate assumes it)")
        else:
            k = k.replace(attn=runs_with)
            reasons.append(f"attention {runs_with}: transformers has no SDPA for {spec.model_type}")
    if spec.is_moe and k.lora_dropout > 0:
        if "lora_dropout" in fixed:
            warnings.append(f"LoRA dropout {k.lora_dropout} will fail on {spec.id}: peft's LoRA on fused MoE "
                            "expert weights does not support dropout; use --lora-dropout 0")
        else:
            k = k.replace(lora_dropout=0.0)
            reasons.append("LoRA dropout 0: peft's LoRA on fused MoE expert weights does not support dropout")

    if "lora_rank" not in fixed:
        k = k.replace(lora_rank=DEFAULT_RANK)
        reasons.append(f"LoRA {RANK_RULE}")
    if "lora_alpha" not in fixed:
        k = k.replace(lora_alpha=2 * k.lora_rank)
        if "lora_rank" in fixed:
            reasons.append(f"LoRA alpha {2 * k.lora_rank} = 2 x rank")

    per_step = gpus * (k.grad_accum if "grad_accum" in fixed else 1)
    cap = max(1, target_effective_batch // per_step)
    if "micro_batch_size" in fixed:
        cap = k.micro_batch_size

    held_back: list[str] = []
    step_up: TrainingKnobs | None = None
    # checkpointing: off when any micro-batch fits without it
    if "grad_checkpointing" not in fixed:
        if "micro_batch_size" in fixed:
            off = k.replace(grad_checkpointing=False)
            use_ckpt = estimate_memory(spec, off, gpus).peak_bytes > budget
        else:
            use_ckpt = _largest_fitting_batch(spec, k.replace(grad_checkpointing=False), budget, cap, gpus) is None
        k = k.replace(grad_checkpointing=use_ckpt)
        if use_ckpt:
            held_back.append("gradient checkpointing off")
        reasons.append(
            f"gradient checkpointing on: needed to fit; costs {CHECKPOINTING_COST}" if use_ckpt
            else "gradient checkpointing off: the run fits without it, which saves about 30% compute"
        )

    if "micro_batch_size" not in fixed:
        b = _largest_fitting_batch(spec, k, budget, cap, gpus)
        k = k.replace(micro_batch_size=b or 1)
        if b:
            more = "" if b >= cap else f"; {b * 2} would not fit"
            reasons.append(f"micro-batch {b}: the largest power of two that fits{more}")
        if (b or 1) < cap:
            held_back.insert(0, f"micro-batch {(b or 1) * 2}")
            step_up = k.replace(micro_batch_size=(b or 1) * 2)
    if step_up is None and held_back:
        step_up = k.replace(grad_checkpointing=False)

    if "grad_accum" not in fixed:
        accum = _accum_for(target_effective_batch, k.micro_batch_size, gpus)
        k = k.replace(grad_accum=accum)
        reasons.append(
            f"gradient accumulation {accum}: {k.micro_batch_size} x {accum}"
            + (f" x {gpus} GPUs" if gpus > 1 else "")
            + f" = effective batch {k.effective_batch(gpus)} (target {target_effective_batch})"
        )

    est = estimate_memory(spec, k, gpus)
    suggestions: list[str] = []
    if est.peak_bytes > budget:
        suggestions = _what_would_fit(spec, k, budget, gpus, alternatives)
    if step_up is not None and "grad_accum" not in fixed:
        step_up = step_up.replace(grad_accum=_accum_for(target_effective_batch, step_up.micro_batch_size, gpus))
    return Advice(k, est, budget, gpus, tuple(reasons), tuple(suggestions), tuple(warnings),
                  tuple(held_back), step_up)


def _what_would_fit(spec: ModelSpec, k: TrainingKnobs, budget: int, gpus: int,
                    alternatives: tuple[ModelSpec, ...]) -> list[str]:
    out = []
    need = estimate_memory(spec, k, gpus).peak_bytes
    minimal = k.replace(micro_batch_size=1, grad_checkpointing=True)
    if k.loss == "standard" and estimate_memory(spec, minimal.replace(loss="chunked"), gpus).peak_bytes <= budget:
        out.append("use the chunked (fused) loss: --loss chunked never materialises the full logits")
    cut = largest_fitting_cutoff(spec, minimal, budget, gpus)
    if cut and cut < k.cutoff_len:
        out.append(f"a shorter cutoff: {cut} tokens fits with micro-batch 1 and checkpointing")
    if k.quant_bits > 4 and estimate_memory(spec, minimal.replace(quant_bits=4), gpus).peak_bytes <= budget:
        out.append("quantize the base to 4 bits (--quant 4)")
    smaller = [m for m in alternatives if m.total_params < spec.total_params
               and estimate_memory(m, minimal, gpus).peak_bytes <= budget]
    if smaller:
        best = max(smaller, key=lambda m: m.total_params)
        out.append(f"a smaller model: {best.id} ({best.params_b:.1f}B) fits at this cutoff")
    floor = estimate_memory(spec, minimal, gpus).peak_bytes
    out.append(f"a GPU with at least {floor / GIB / (1 - DEFAULT_HEADROOM):.0f} GB free "
               f"(this plan needs {need / GIB:.1f} GiB, {floor / GIB:.1f} GiB at its smallest); "
               "more GPUs of the same size do not help: data parallelism copies the model to each")
    return out


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
