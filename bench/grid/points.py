"""What the grid runs: the points (model, knobs, card), the plan check's choice of knobs, --tiny's
shrinking, and the estimate of exactly what runs. Imports no torch: `--list` stays fast."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuiwiz.planning.knobs import TrainingKnobs

if TYPE_CHECKING:
    from tuiwiz.models import ModelSpec

GIB = 1024**3
GRID_STEPS = 3  # optimizer steps per grid point (state exists from step 2 on)
PLAN_STEPS = 2
PLAN_MAX_ACCUM = 2  # plans run with min(their accumulation, 2): gradients are held across micro-steps
#: Card sizes of the plan check -> the catalog card whose NVML total the planner would budget against.
CARDS: dict[int, str] = {80: "H100 80GB", 24: "GeForce RTX 4090"}
#: Cutoffs tried for the plan check, in order of preference: the first where memory binds is used.
PLAN_CUTOFFS = (2048, 4096, 1024, 8192, 512)
#: --tiny: every point shrunk to these (CPU rehearsal, CI).
TINY_CUTOFF, TINY_BATCH, TINY_STEPS = 64, 2, 2

#: (catalog id, [(cutoff, micro_batch, rank, checkpointing, attn, optim), ...]).
GRID: list[tuple[str, list[tuple[int, int, int, bool, str, str]]]] = [
    ("Qwen/Qwen2.5-0.5B", [(512, 8, 16, False, "sdpa", "paged_adamw_8bit"),
                           (2048, 4, 64, True, "sdpa", "adamw_torch"),
                           (8192, 1, 8, True, "eager", "paged_adamw_8bit")]),
    ("meta-llama/Llama-3.2-1B", [(4096, 2, 16, True, "sdpa", "paged_adamw_8bit"),
                                 (1024, 4, 32, False, "eager", "adamw_torch")]),
    ("Qwen/Qwen2.5-1.5B", [(2048, 4, 16, True, "sdpa", "paged_adamw_8bit"),
                           (8192, 1, 64, True, "sdpa", "adamw_torch"),
                           (512, 8, 8, False, "sdpa", "paged_adamw_8bit")]),
    ("google/gemma-2-2b", [(2048, 2, 16, True, "eager", "paged_adamw_8bit"),
                           (1024, 2, 32, False, "eager", "adamw_torch")]),
    ("meta-llama/Llama-3.2-3B", [(2048, 2, 16, True, "sdpa", "paged_adamw_8bit"),
                                 (1024, 1, 64, False, "eager", "adamw_torch")]),
    ("microsoft/Phi-3-mini-4k-instruct", [(2048, 2, 16, True, "sdpa", "paged_adamw_8bit")]),
    ("meta-llama/Llama-3.1-8B", [(2048, 1, 16, True, "sdpa", "paged_adamw_8bit"),
                                 (8192, 1, 16, True, "sdpa", "paged_adamw_8bit"),
                                 (512, 8, 64, True, "sdpa", "adamw_torch"),
                                 (1024, 2, 8, False, "sdpa", "paged_adamw_8bit")]),
    ("Qwen/Qwen2.5-7B", [(4096, 2, 16, True, "sdpa", "paged_adamw_8bit")]),
    ("Qwen/Qwen2.5-14B", [(2048, 1, 16, True, "sdpa", "paged_adamw_8bit")]),
]


@dataclass(frozen=True)
class Point:
    """One run: a model, the knobs it trains with, and (plan check) the card it must fit."""

    model: str
    kind: str  # "grid" | "plan" | "step_up"
    knobs: TrainingKnobs
    card_gb: int | None = None
    plan_cutoff: int | None = None
    plan_grad_accum: int | None = None  # the advisor's accumulation (the run uses at most PLAN_MAX_ACCUM)
    advisor_est_peak: int | None = None  # the advisor's estimate of these knobs at full scale
    held_back: tuple[str, ...] = field(default=())
    tiny: bool = False

    @property
    def id(self) -> str:
        """The resume key: kind, model, card and every knob that shapes the run."""
        card = f"{self.card_gb}GB" if self.card_gb else "-"
        return f"{'tiny-' if self.tiny else ''}{self.kind}:{self.model}:{card}:{knob_tag(self.knobs)}"

    @property
    def group(self) -> str | None:
        """Plan and step-up of one (model, card) share this key."""
        return f"{self.model}:{self.card_gb}GB" if self.card_gb else None


def knob_tag(k: TrainingKnobs) -> str:
    targets = k.target_modules if isinstance(k.target_modules, str) else "+".join(k.target_modules)
    parts = [f"c{k.cutoff_len}", f"b{k.micro_batch_size}", f"ga{k.grad_accum}", f"r{k.lora_rank}",
             f"a{k.lora_alpha}", f"d{k.lora_dropout:g}", targets, f"gc{int(k.grad_checkpointing)}", k.attn, k.optim,
             k.loss, f"q{k.quant_bits}", f"s{k.max_steps}"]
    return "-".join(parts)


# ---- models ------------------------------------------------------------------------------------

def catalog_config(model_id: str) -> dict[str, Any]:
    """The catalog's config.json of a model (a copy: callers shrink it)."""
    from tuiwiz.model_catalog import lookup

    entry = lookup(model_id)
    if entry is None:
        raise SystemExit(f"memory_grid: {model_id} is not in the catalog (tuiwiz/model_catalog.py)")
    return dict(entry.config)


def model_config(model_id: str, tiny: bool) -> dict[str, Any]:
    """The architecture that runs: the catalog's, or its 2-layer shrink with --tiny."""
    cfg = catalog_config(model_id)
    return tiny_config(cfg) if tiny else cfg


def model_spec(model_id: str, tiny: bool = False) -> ModelSpec:
    from tuiwiz.models import spec_from_config

    return spec_from_config(model_config(model_id, tiny), model_id, "catalog")


def catalog_spec(model_id: str) -> ModelSpec:
    """The full-size model, as the planner sees it."""
    return model_spec(model_id, tiny=False)


def model_bytes_bf16(model_id: str) -> int:
    """The bf16 checkpoint's size: what loading reads and what the scratch space must hold."""
    return 2 * catalog_spec(model_id).total_params


def tiny_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The architecture shrunk to 2 layers, hidden 256, vocab <= 1024 (same model_type and quirks)."""
    c = dict(cfg)
    c.update(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=min(int(c.get("vocab_size", 32000)), 1024))
    if c.get("model_type") == "gemma2":
        c["query_pre_attn_scalar"] = 64
    for key in ("layer_types", "rope_scaling"):
        c.pop(key, None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        # Explicit None, not absent: Phi3Config's defaults (32000) lie outside a tiny vocab too.
        v = c.get(key)
        c[key] = v if isinstance(v, int) and v < c["vocab_size"] else None
    return c


# ---- knobs -------------------------------------------------------------------------------------

def grid_knobs(point: tuple[int, int, int, bool, str, str]) -> TrainingKnobs:
    cutoff, mb, rank, gc, attn, optim = point
    return TrainingKnobs(cutoff_len=cutoff, micro_batch_size=mb, lora_rank=rank, lora_alpha=2 * rank,
                         grad_checkpointing=gc, attn=attn, optim=optim, grad_accum=1, max_steps=GRID_STEPS,
                         logging_steps=1, save_steps=10_000, val_ratio=0.0, warmup_ratio=0.0)


def run_knobs(planned: TrainingKnobs) -> TrainingKnobs:
    """A planned run shortened to PLAN_STEPS optimizer steps; everything that shapes memory kept."""
    return planned.replace(max_steps=PLAN_STEPS, grad_accum=min(planned.grad_accum, PLAN_MAX_ACCUM),
                           save_steps=10_000, val_ratio=0.0, logging_steps=1, warmup_ratio=0.0)


def tiny_knobs(k: TrainingKnobs) -> TrainingKnobs:
    return k.replace(cutoff_len=min(k.cutoff_len, TINY_CUTOFF), micro_batch_size=min(k.micro_batch_size, TINY_BATCH),
                     grad_accum=1, max_steps=TINY_STEPS)


def point_run_knobs(p: Point) -> TrainingKnobs:
    """The knobs the child trains with (shrunk with --tiny; the id keeps the full-size ones)."""
    return tiny_knobs(p.knobs) if p.tiny else p.knobs


# ---- the point list ----------------------------------------------------------------------------

def plan_points(model_id: str, card_gb: int, tiny: bool = False) -> list[Point]:
    """The plan check for one model and card: the advisor's plan at the first memory-bound cutoff
    of PLAN_CUTOFFS, and its step-up. Empty when memory binds at none of them."""
    from tuiwiz.hardware import catalog_gpu
    from tuiwiz.planning.advisor import advise, budget_bytes
    from tuiwiz.planning.memory import estimate_memory

    spec = catalog_spec(model_id)
    budget = budget_bytes(catalog_gpu(CARDS[card_gb]).memory_gib)
    for cutoff in PLAN_CUTOFFS:
        if cutoff > spec.max_positions:
            continue
        adv = advise(spec, TrainingKnobs(cutoff_len=cutoff), budget)  # Gemma 2: the advisor itself plans eager
        if not adv.held_back or not adv.fits or adv.step_up is None:
            continue
        plan, up = adv.knobs, adv.step_up
        common = dict(model=model_id, card_gb=card_gb, plan_cutoff=cutoff, held_back=adv.held_back, tiny=tiny)
        return [Point(kind="plan", knobs=run_knobs(plan), plan_grad_accum=plan.grad_accum,
                      advisor_est_peak=adv.estimate.peak_bytes, **common),
                Point(kind="step_up", knobs=run_knobs(up), plan_grad_accum=up.grad_accum,
                      advisor_est_peak=estimate_memory(spec, adv.step_up).peak_bytes, **common)]
    return []


def all_points(tiny: bool = False, plan_check: bool = True) -> list[Point]:
    """Every point, grouped by model (grid points, then the plan check at 80 and 24 GB)."""
    out: list[Point] = []
    for model_id, pts in GRID:
        out += [Point(model_id, "grid", grid_knobs(p), tiny=tiny) for p in pts]
        if plan_check:
            for gb in CARDS:
                out += plan_points(model_id, gb, tiny)
    return out


def select(points: list[Point], only: str | None, limit: int | None, per_kind: int | None) -> list[Point]:
    """The points that --only, --per-kind and --limit keep, in order."""
    if only:
        rx = re.compile(only)
        points = [p for p in points if rx.search(p.id)]
    if per_kind:
        seen: dict[str, int] = {}
        kept = []
        for p in points:
            if seen.get(p.kind, 0) < per_kind:
                kept.append(p)
                seen[p.kind] = seen.get(p.kind, 0) + 1
        points = kept
    return points[:limit] if limit else points


# ---- the estimate of what runs -----------------------------------------------------------------

def estimate_fields(model_id: str, knobs: TrainingKnobs, tiny: bool) -> dict[str, Any]:
    """The estimate (`estimate_memory`) of exactly what runs: the tiny architecture with --tiny."""
    from tuiwiz.planning.memory import estimate_memory

    est = estimate_memory(model_spec(model_id, tiny), knobs)
    return {"est_allocated": est.allocated_bytes, "est_reserved": est.reserved_bytes, "est_peak": est.peak_bytes,
            "est_breakdown_gib": est.breakdown_gib()}
