"""GPU calibration grid for the memory estimate, safe to run in 10-minute slices on fresh machines.

    .venv/bin/python bench/memory_grid.py --list                   # points, predicted seconds, total
    .venv/bin/python bench/memory_grid.py --deadline 500           # run what fits in 500 s, resume later
    .venv/bin/python bench/memory_grid.py --summarise              # rebuild json/csv/md from the jsonl
    .venv/bin/python bench/memory_grid.py --device cpu --tiny      # the same code path on CPU (CI)

Each point builds a randomly initialised model of a real catalog architecture (no download)
with the worker's own builder (`tuiwiz.train.build`: NF4 + double quant, k-bit preparation,
peft LoRA, trl SFTTrainer with its fused LM head) and trains a few steps on synthetic
full-length rows (every token scored). It records torch's max allocated and max reserved, the
NVML peak of the process and the estimate. Points:

- grid: fixed knobs covering 0.5B-14B, cutoffs 512-8192, micro-batch 1-8, ranks 8-64,
  checkpointing on/off, sdpa/eager, paged 8-bit and 32-bit AdamW (`GRID`).
- plan / step_up (the plan check, every grid model): the plan `advise` makes for an 80 GB
  card (H100 80GB) and a simulated 24 GB card (RTX 4090), exactly as the planner does
  (`advise(spec, TrainingKnobs(cutoff_len=C), budget_bytes(card_gib))`, 10% headroom), at a
  cutoff C where memory binds (`Advice.held_back` non-empty). The allocator is capped to the
  card minus the CUDA context measured at start-up (`torch.cuda.set_per_process_memory_fraction`
  does not cover the context). The plan must run without OOM within the card and should use
  >= 85% of the advisor's budget at the NVML level. `Advice.step_up` (one notch bigger, which
  the estimate refused) runs under the same cap: if it also runs within the card, the
  estimate was too conservative for that model ("tightness").

How it runs: the parent imports torch/transformers/peft/trl/bitsandbytes/datasets once and
never initialises CUDA; each point runs in a forked child (a clean CUDA context each), while
the parent polls NVML for the child's pid (fallback: device used minus the baseline before
the child started; `nvml_source` says which). Random checkpoints are drawn on the GPU in a
child, written to /dev/shm when it has room (else --scratch) and removed after the model's
points. A point that fails (error, OOM, crash, timeout) is recorded and the grid goes on.

Resuming: every finished point is appended to RESULTS/memory_grid.jsonl under a stable id
(kind, model, card, knobs). On start the points already there are skipped (`--redo` ignores
them, `--retry-errors` re-runs failed ones). `--deadline S` never starts a point whose
predicted time would pass S seconds from start: it prints how many points remain and exits 0.
The predicted times are a rough prior (see `predict_point_s`), rescaled by the measured/
predicted ratio of the points already recorded on the same GPU.

Only physically fixed terms are calibrated: the summary fits the CUDA context as
median(NVML peak - torch max reserved) and recomputes the NVML error with it; the measured
reserved/allocated ratio is reported, not fitted. docs/gpu_grid.md has the device procedure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tuiwiz.planning.knobs import TrainingKnobs  # noqa: E402  (pydantic only: no torch)

RESULTS = REPO / "bench" / "results"
JSONL = "memory_grid.jsonl"
GIB = 1024**3
GRID_STEPS = 3  # optimizer steps per grid point (state exists from step 2 on)
PLAN_STEPS = 2
PLAN_MAX_ACCUM = 2  # plans run with min(their accumulation, 2): gradients are held across micro-steps
#: Card sizes of the plan check -> the catalog card whose NVML total the planner would budget against.
CARDS: dict[int, str] = {80: "H100 80GB", 24: "GeForce RTX 4090"}
#: Cutoffs tried for the plan check, in order of preference: the first where memory binds is used.
PLAN_CUTOFFS = (2048, 4096, 1024, 8192, 512)
DONE = ("ok", "oom", "error", "crash", "timeout")  # statuses that count as recorded
FAILED = ("error", "crash", "timeout")
TARGET_MEDIAN, TARGET_MAX = 0.05, 0.12  # docs/memory.md: the estimate's accuracy target
UTILISATION_TARGET = 0.85

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

#: Rough prior for the time of a point on an H100-class GPU, in seconds. Not a measurement:
#: it only decides what fits in a slice, and is rescaled by what earlier slices measured.
PRIOR = {
    "parent_s": 20.0,  # per slice: interpreter start, heavy imports, NVML
    "point_s": 7.0,  # per point: fork, CUDA context, trainer build, first-step warm-up
    "load_s_per_gb": 0.6,  # bf16 checkpoint GB -> quantized model on the GPU
    "ckpt_s": 4.0, "ckpt_s_per_gb": 0.5,  # random init on the GPU + safetensors write (per model)
    "step_s": 0.15, "step_s_per_layer": 0.004,  # launch/dequant overhead per micro-step
    "flops_per_s": 2.5e14,  # effective bf16 throughput of a QLoRA step
    "eager_attention": 2.5,  # eager attention vs SDPA's fused kernel
    "tiny_point_s": 8.0,  # --tiny (CPU or GPU): load + two steps of a 2-layer model
}


# ---- points ------------------------------------------------------------------------------------

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
    note: str | None = None  # what the run changed from the advised plan, and why
    tiny: bool = False

    @property
    def id(self) -> str:
        k = self.knobs
        t = k.target_modules if isinstance(k.target_modules, str) else "+".join(k.target_modules)
        parts = [f"c{k.cutoff_len}", f"b{k.micro_batch_size}", f"ga{k.grad_accum}", f"r{k.lora_rank}",
                 f"a{k.lora_alpha}", f"d{k.lora_dropout:g}", t, f"gc{int(k.grad_checkpointing)}", k.attn, k.optim,
                 k.loss, f"q{k.quant_bits}", f"s{k.max_steps}"]
        card = f"{self.card_gb}GB" if self.card_gb else "-"
        return f"{'tiny-' if self.tiny else ''}{self.kind}:{self.model}:{card}:{'-'.join(parts)}"

    @property
    def group(self) -> str | None:
        """Plan and step-up of one (model, card) share this key."""
        return f"{self.model}:{self.card_gb}GB" if self.card_gb else None


def catalog_spec(model_id: str):
    from tuiwiz.model_catalog import lookup
    from tuiwiz.models import spec_from_config

    entry = lookup(model_id)
    if entry is None:
        raise SystemExit(f"memory_grid: {model_id} is not in the catalog (tuiwiz/model_catalog.py)")
    return spec_from_config(entry.config, entry.hub_id, "catalog")


def catalog_config(model_id: str) -> dict[str, Any]:
    from tuiwiz.model_catalog import lookup

    return dict(lookup(model_id).config)  # type: ignore[union-attr]


def grid_knobs(point: tuple[int, int, int, bool, str, str]) -> TrainingKnobs:
    cutoff, mb, rank, gc, attn, optim = point
    return TrainingKnobs(cutoff_len=cutoff, micro_batch_size=mb, lora_rank=rank, lora_alpha=2 * rank,
                         grad_checkpointing=gc, attn=attn, optim=optim, grad_accum=1, max_steps=GRID_STEPS,
                         logging_steps=1, save_steps=10_000, val_ratio=0.0, warmup_ratio=0.0)


def run_knobs(planned: TrainingKnobs) -> TrainingKnobs:
    """A planned run shortened to PLAN_STEPS optimizer steps; everything that shapes memory kept."""
    return planned.replace(max_steps=PLAN_STEPS, grad_accum=min(planned.grad_accum, PLAN_MAX_ACCUM),
                           save_steps=10_000, val_ratio=0.0, logging_steps=1, warmup_ratio=0.0)


def plan_points(model_id: str, card_gb: int) -> list[Point]:
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
        adv = advise(spec, TrainingKnobs(cutoff_len=cutoff), budget)
        if not adv.held_back or not adv.fits or adv.step_up is None:
            continue
        plan, up, note = adv.knobs, adv.step_up, None  # Gemma 2: the advisor itself plans eager
        common = dict(model=model_id, card_gb=card_gb, plan_cutoff=cutoff, held_back=adv.held_back, note=note)
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
                out += [Point(**{**_fields(p), "tiny": tiny}) for p in plan_points(model_id, gb)]
    return out


def _fields(p: Point) -> dict[str, Any]:
    return {f: getattr(p, f) for f in Point.__dataclass_fields__}


# ---- tiny mode ---------------------------------------------------------------------------------

TINY_CUTOFF, TINY_BATCH, TINY_STEPS = 64, 2, 2


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


def tiny_knobs(k: TrainingKnobs) -> TrainingKnobs:
    return k.replace(cutoff_len=min(k.cutoff_len, TINY_CUTOFF), micro_batch_size=min(k.micro_batch_size, TINY_BATCH),
                     grad_accum=1, max_steps=TINY_STEPS)


def point_config(p: Point) -> dict[str, Any]:
    cfg = catalog_config(p.model)
    return tiny_config(cfg) if p.tiny else cfg


def point_run_knobs(p: Point) -> TrainingKnobs:
    return tiny_knobs(p.knobs) if p.tiny else p.knobs


def estimate_fields(p: Point) -> dict[str, Any]:
    """The estimate of exactly what runs (the tiny architecture in --tiny)."""
    from tuiwiz.models import spec_from_config
    from tuiwiz.planning.memory import estimate_memory

    spec = spec_from_config(point_config(p), p.model, "catalog")
    est = estimate_memory(spec, point_run_knobs(p))
    return {"est_allocated": est.allocated_bytes, "est_reserved": est.reserved_bytes, "est_peak": est.peak_bytes,
            "est_breakdown_gib": est.breakdown_gib()}


# ---- predicted time ----------------------------------------------------------------------------

def model_bytes_bf16(model_id: str) -> int:
    return 2 * catalog_spec(model_id).total_params


def predict_ckpt_s(model_id: str, tiny: bool = False) -> float:
    if tiny:
        return 2.0
    return PRIOR["ckpt_s"] + PRIOR["ckpt_s_per_gb"] * model_bytes_bf16(model_id) / 1e9


def predict_point_s(p: Point) -> float:
    """A rough prior (H100): fixed per-point overhead + load time proportional to the checkpoint's
    bf16 bytes + micro-steps x (launch overhead + FLOPs / effective throughput). FLOPs: (4, or 6
    with checkpointing's recompute) x params x tokens for the frozen base, plus causal attention."""
    if p.tiny:
        return PRIOR["tiny_point_s"]
    spec = catalog_spec(p.model)
    k = p.knobs
    micro_steps = (k.max_steps or 1) * k.grad_accum
    tokens = k.micro_batch_size * k.cutoff_len
    dense = (6 if k.grad_checkpointing else 4) * spec.total_params * tokens
    passes = 1 + 2.5 + (1 if k.grad_checkpointing else 0)
    attn = 0.5 * 4 * spec.layers * k.micro_batch_size * k.cutoff_len**2 * spec.q_dim * passes
    attn *= PRIOR["eager_attention"] if k.attn == "eager" else 1.0
    step = PRIOR["step_s"] + PRIOR["step_s_per_layer"] * spec.layers + (dense + attn) / PRIOR["flops_per_s"]
    return PRIOR["point_s"] + PRIOR["load_s_per_gb"] * 2 * spec.total_params / 1e9 + micro_steps * step


def time_scale(records: Iterable[dict[str, Any]], gpu: str | None) -> float:
    """measured / predicted over finished points on this GPU (1 with fewer than 3), clamped to [0.5, 4]."""
    ratios = [r["wall_s"] / r["pred_s"] for r in records
              if r.get("status") in ("ok", "oom") and r.get("wall_s") and r.get("pred_s") and not r.get("tiny")
              and (gpu is None or r.get("gpu") == gpu)]
    if len(ratios) < 3:
        return 1.0
    return min(4.0, max(0.5, statistics.median(ratios)))


# ---- the slice loop (pure: clock, runners and checkpoint builder are injected) ---------------

@dataclass
class SliceResult:
    ran: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # not started: predicted past the deadline
    interrupted: list[str] = field(default_factory=list)


def run_slice(points: list[Point], predict: Callable[[Point], float], predict_ckpt: Callable[[str], float],
              deadline_s: float | None, elapsed: Callable[[], float],
              ensure_ckpt: Callable[[str], str | None], run_point: Callable[[Point], dict[str, Any]],
              release_ckpt: Callable[[str], None], on_record: Callable[[Point, dict[str, Any]], None]) -> SliceResult:
    """Run `points` (grouped by model) in order, never starting one whose predicted time (plus its
    model's checkpoint, when not built yet) would end past `deadline_s`, with `elapsed()` the seconds
    since the deadline's origin. Points that do not fit are left for the next slice; smaller ones
    after them still run if they fit.

    `ensure_ckpt(model)` builds the checkpoint (returns an error string or None), `run_point`
    returns the record (status "interrupted" when the deadline killed it), `release_ckpt` runs
    after the last point of a model when none of its points was left over.
    """
    res = SliceResult()
    by_model: dict[str, list[Point]] = {}
    for p in points:
        by_model.setdefault(p.model, []).append(p)
    for model, pts in by_model.items():
        ready, ckpt_error, all_done = False, None, True
        for p in pts:
            need = predict(p) + (0.0 if ready else predict_ckpt(model))
            if deadline_s is not None and elapsed() + need > deadline_s:
                res.left.append(p.id)
                all_done = False
                continue
            if not ready and ckpt_error is None:
                ckpt_error = ensure_ckpt(model)
                ready = ckpt_error is None
            rec = run_point(p) if ready else {"status": "error", "error": f"checkpoint: {ckpt_error}"}
            if rec.get("status") == "interrupted":
                res.interrupted.append(p.id)
                all_done = False
            else:
                res.ran.append(p.id)
            on_record(p, rec)
        if ready and all_done:
            release_ckpt(model)
    return res


# ---- records -----------------------------------------------------------------------------------

def read_records(path: Path) -> list[dict[str, Any]]:
    """Every parseable line of a jsonl (a torn last line from a killed run is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"memory_grid: skipping an unreadable line in {path}", file=sys.stderr)
    return out


def latest_by_id(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if "id" in r:
            out[r["id"]] = r
    return out


def done_ids(records: Iterable[dict[str, Any]], retry_errors: bool = False) -> set[str]:
    keep = tuple(s for s in DONE if not (retry_errors and s in FAILED))
    return {i for i, r in latest_by_id(records).items() if r.get("status") in keep}


def append_record(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(rec, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _advised(p: Point) -> str | None:
    """The advisor's plan in short (full scale, its own accumulation), for the plan-check table."""
    if p.kind == "grid":
        return None
    k = p.knobs
    return (f"c{k.cutoff_len} b{k.micro_batch_size} ga{p.plan_grad_accum} r{k.lora_rank} "
            f"gc{int(k.grad_checkpointing)} {k.attn}")


#: The knobs a record keeps: everything that shapes memory (the schedule's knobs do not).
KNOB_FIELDS = {"cutoff_len", "micro_batch_size", "grad_accum", "lora_rank", "lora_alpha", "lora_dropout",
               "target_modules", "grad_checkpointing", "attn", "optim", "loss", "quant_bits", "double_quant",
               "compute_dtype", "packing", "max_steps"}


def re_estimate(rec: dict[str, Any]) -> dict[str, Any]:
    """The record with its estimate fields recomputed by the current estimate code (the
    measurements are kept): a GPU run's data re-checks a changed estimate without a GPU."""
    from tuiwiz.models import spec_from_config
    from tuiwiz.planning.memory import estimate_memory

    out = dict(rec)
    cfg = catalog_config(rec["model"])
    knobs = TrainingKnobs(**{k: rec[k] for k in KNOB_FIELDS if k in rec})
    est = estimate_memory(spec_from_config(tiny_config(cfg) if rec.get("tiny") else cfg, rec["model"], "catalog"),
                          knobs)
    out.update(est_allocated=est.allocated_bytes, est_reserved=est.reserved_bytes, est_peak=est.peak_bytes,
               est_breakdown_gib=est.breakdown_gib(), estimate="re-estimated by the current code")
    if rec.get("advisor_est_peak") and rec.get("plan_grad_accum") and not rec.get("tiny"):
        # the advised knobs are the run's but for the accumulation (tiny runs shrank them: kept)
        full = knobs.replace(grad_accum=rec["plan_grad_accum"], max_steps=None)
        out["advisor_est_peak"] = estimate_memory(spec_from_config(cfg, rec["model"], "catalog"), full).peak_bytes
    return out


def base_record(p: Point) -> dict[str, Any]:
    from tuiwiz.hardware import catalog_gpu
    from tuiwiz.planning.advisor import budget_bytes

    k = point_run_knobs(p)
    rec: dict[str, Any] = {
        "id": p.id, "model": p.model, "kind": p.kind, "tiny": p.tiny, "group": p.group,
        "card_gb": p.card_gb, "card": CARDS.get(p.card_gb) if p.card_gb else None,
        "card_bytes": None, "budget_bytes": None, "plan_cutoff": p.plan_cutoff,
        "plan_grad_accum": p.plan_grad_accum, "held_back": list(p.held_back) or None,
        "advisor_est_peak": p.advisor_est_peak, "note": p.note, "advised": _advised(p),
        **k.model_dump(include=KNOB_FIELDS),
    }
    if p.card_gb:
        gib = catalog_gpu(CARDS[p.card_gb]).memory_gib
        rec["card_bytes"] = int(gib * GIB)
        rec["budget_bytes"] = budget_bytes(gib)
    rec.update(estimate_fields(p))
    return rec


# ---- summary (pure, from records alone) -----------------------------------------------------------

LEVELS = (("allocated", "max_allocated", "est_allocated"), ("reserved", "max_reserved", "est_reserved"),
          ("nvml", "nvml_peak", "est_peak"))


def _err_stats(pairs: list[tuple[float, float]]) -> dict[str, Any] | None:
    """Signed error est/measured - 1 (positive: the estimate is above the measurement)."""
    errs = [est / got - 1 for got, est in pairs if got]
    if not errs:
        return None
    abs_errs = [abs(e) for e in errs]
    med, worst = round(statistics.median(abs_errs), 4), round(max(abs_errs), 4)
    return {"n": len(errs), "median_abs": med, "max_abs": worst, "median_signed": round(statistics.median(errs), 4),
            "worst_under": round(min(errs), 4), "meets_target": med <= TARGET_MEDIAN and worst <= TARGET_MAX}


def measured(r: dict[str, Any]) -> bool:
    return r.get("status") == "ok" and bool(r.get("max_allocated"))


def plan_check_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, card): did the advisor's plan run within the card, how much of the
    budget it used at the NVML level, and whether the step-up it refused would have run."""
    recs = list(latest_by_id(records).values())
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for r in recs:
        if r.get("kind") in ("plan", "step_up") and r.get("group"):
            groups.setdefault(r["group"], {})[r["kind"]] = r
    rows = []
    for group, g in groups.items():
        plan, up = g.get("plan"), g.get("step_up")
        any_r = plan or up
        budget, card = any_r.get("budget_bytes"), any_r.get("card_bytes")
        row: dict[str, Any] = {"group": group, "model": any_r["model"], "card_gb": any_r.get("card_gb"),
                               "tiny": bool(any_r.get("tiny")), "budget_bytes": budget, "card_bytes": card,
                               "cutoff": any_r.get("plan_cutoff")}
        row.update(_plan_side("plan", plan, budget, card))
        row.update(_plan_side("step_up", up, budget, card))
        # The two criteria, reported separately so that neither hides the other:
        # fits (no OOM under the cap and the NVML peak within the card) and >= 85% of the budget.
        st, within = row["plan_status"], row["plan_within_card"]
        row["plan_fits"] = False if st == "oom" or (st == "ok" and within is False) else (
            True if st == "ok" and within else None)  # None: not judged (no NVML reading, error, not run)
        row["meets_85"] = (None if row["plan_used_of_budget"] is None
                           else row["plan_used_of_budget"] >= UTILISATION_TARGET)
        row["tightness"] = _tightness(row)
        row["note"] = _plan_note(row)
        rows.append(row)
    rows.sort(key=lambda r: (r["tiny"], r["card_gb"] or 0, r["model"]))
    return rows


def _plan_side(name: str, r: dict[str, Any] | None, budget: int | None, card: int | None) -> dict[str, Any]:
    if r is None:
        return {f"{name}_{k}": None for k in ("knobs", "status", "nvml_peak", "used_of_budget", "used_of_card",
                                              "est_used_of_budget", "within_card", "error")}
    peak = r.get("nvml_peak_all") or r.get("nvml_peak")
    knobs = r.get("advised") or (f"c{r.get('cutoff_len')} b{r.get('micro_batch_size')} "
                                 f"ga{r.get('plan_grad_accum')} r{r.get('lora_rank')}")
    return {
        f"{name}_knobs": knobs, f"{name}_status": r.get("status"), f"{name}_nvml_peak": peak,
        f"{name}_used_of_budget": round(peak / budget, 3) if peak and budget else None,
        f"{name}_used_of_card": round(peak / card, 3) if peak and card else None,
        f"{name}_est_used_of_budget": (round(r["advisor_est_peak"] / budget, 3)
                                       if r.get("advisor_est_peak") and budget else None),
        f"{name}_within_card": (None if not (peak and card) else peak <= card),
        f"{name}_error": r.get("error"),
    }


def _tightness(row: dict[str, Any]) -> str:
    st = row["step_up_status"]
    if st is None:
        return "not run"
    if st == "oom" or (st == "ok" and row["step_up_within_card"] is False):
        return "tight"
    if st == "ok" and row["step_up_within_card"]:
        return "too conservative"
    return "unknown"  # error, crash, timeout, or no NVML reading (CPU)


def _plan_note(row: dict[str, Any]) -> str:
    notes = []
    if row["plan_status"] not in (None, "ok"):
        notes.append(f"plan {row['plan_status']}: {(row['plan_error'] or '')[:120]}")
    if row["plan_within_card"] is False:
        notes.append("plan exceeded the card at the NVML level")
    if row["meets_85"] is False and row["plan_est_used_of_budget"] is not None:
        if row["plan_est_used_of_budget"] < UTILISATION_TARGET:
            notes.append(f"85% unreachable at this notch: the estimate itself gives "
                         f"{row['plan_est_used_of_budget']:.0%} and the next one "
                         f"{row['step_up_est_used_of_budget'] or 0:.0%}")
        else:
            notes.append("uses less than the estimate said")
    if row["plan_used_of_budget"] and row["plan_used_of_budget"] > 1:
        notes.append("over the budget (ate the 10% headroom)")
    if row["tightness"] == "too conservative":
        within = row["step_up_used_of_budget"] is not None and row["step_up_used_of_budget"] <= 1
        notes.append("step-up ran within the card" + (" and within the budget" if within else " (not the budget)"))
    return "; ".join(notes)


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of memory_grid.json, from the records alone (no GPU needed)."""
    from tuiwiz.planning.memory import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES

    recs = list(latest_by_id(records).values())
    statuses: dict[str, int] = {}
    for r in recs:
        statuses[r.get("status", "?")] = statuses.get(r.get("status", "?"), 0) + 1
    out: dict[str, Any] = {
        "gpus": sorted({r["gpu"] for r in recs if r.get("gpu")}),
        "versions": _versions_seen(recs), "records": len(recs), "statuses": statuses,
        "cuda_context_prior_bytes": CUDA_CONTEXT_BYTES, "allocator_slack_prior": ALLOCATOR_SLACK,
        "target": {"median_abs": TARGET_MEDIAN, "max_abs": TARGET_MAX},
    }
    grid = [r for r in recs if r.get("kind") == "grid" and measured(r)]
    capped = [r for r in recs if r.get("kind") in ("plan", "step_up") and measured(r)]
    out["grid_points_measured"] = len(grid)
    out["error"] = {level: _err_stats([(r.get(got), r.get(est)) for r in grid if r.get(got)])
                    for level, got, est in LEVELS}
    # Plan-check runs are capped (the allocator frees its cache near the cap), so only their
    # allocated level is comparable; reported apart from the grid.
    out["error_capped_runs_allocated"] = _err_stats([(r["max_allocated"], r["est_allocated"]) for r in capped])
    ctx_pts = [r for r in grid if r.get("nvml_peak") and r.get("max_reserved")]
    process_level = [r for r in ctx_pts if str(r.get("nvml_source", "")).startswith("process")]
    use = process_level or ctx_pts
    if use:
        ctx = int(statistics.median(r["nvml_peak"] - r["max_reserved"] for r in use))
        out["fitted_cuda_context_bytes"] = ctx
        out["fitted_cuda_context_gib"] = round(ctx / GIB, 3)
        out["fitted_cuda_context_source"] = ("process" if process_level
                                             else "device-minus-baseline (pids not visible to NVML)")
        out["error_nvml_with_fitted_context"] = _err_stats([(r["nvml_peak"], r["est_reserved"] + ctx) for r in use])
    inits = [r["ctx_at_init"] for r in recs if r.get("ctx_at_init")]
    if inits:
        out["cuda_context_at_init_median_bytes"] = int(statistics.median(inits))
    ratios = [r["max_reserved"] / r["max_allocated"] for r in grid if r.get("max_reserved")]
    if ratios:
        out["reserved_over_allocated"] = {"median": round(statistics.median(ratios), 4),
                                          "min": round(min(ratios), 4), "max": round(max(ratios), 4),
                                          "prior": 1 + ALLOCATOR_SLACK, "note": "measured, not fitted"}
    rows = plan_check_rows(recs)
    out["plan_check"] = rows
    judged = [r for r in rows if r["plan_fits"] is not None]
    out["plan_check_totals"] = {
        "rows": len(rows), "plans_fit": sum(bool(r["plan_fits"]) for r in judged),
        "plans_judged": len(judged), "meet_85": sum(bool(r["meets_85"]) for r in rows),
        "meet_85_judged": sum(r["meets_85"] is not None for r in rows),
        "too_conservative": sum(r["tightness"] == "too conservative" for r in rows),
        "tight": sum(r["tightness"] == "tight" for r in rows)}
    timed = [r for r in recs if r.get("wall_s")]
    out["wall_s_total"] = round(sum(r["wall_s"] for r in timed), 1)
    out["measured_over_predicted_time"] = round(time_scale(recs, None), 3)
    return out


def _versions_seen(recs: list[dict[str, Any]]) -> dict[str, Any]:
    seen: dict[str, set[str]] = {}
    for r in recs:
        for k, v in (r.get("versions") or {}).items():
            seen.setdefault(k, set()).add(str(v))
    return {k: (sorted(v)[0] if len(v) == 1 else sorted(v)) for k, v in sorted(seen.items())}


CSV_COLUMNS = ["id", "model", "kind", "tiny", "card_gb", "cutoff_len", "micro_batch_size", "grad_accum",
               "plan_grad_accum", "lora_rank", "grad_checkpointing", "attn", "optim", "status", "error",
               "max_allocated", "est_allocated", "err_allocated", "max_reserved", "est_reserved", "err_reserved",
               "nvml_peak", "nvml_peak_all", "est_peak", "err_nvml", "nvml_source", "ctx_at_init", "cap_bytes",
               "budget_bytes", "card_bytes", "advisor_est_peak", "train_s", "s_per_step", "load_s", "wall_s", "pred_s",
               "gpu", "child_mode"]


def _with_errors(r: dict[str, Any]) -> dict[str, Any]:
    row = dict(r)
    for level, got, est in LEVELS:
        row[f"err_{level}"] = round(r[est] / r[got] - 1, 4) if r.get(got) and r.get(est) else None
    return row


def write_outputs(results: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """memory_grid.json (summary + records), .csv and .md, rebuilt from `records`."""
    recs = [_with_errors(r) for r in latest_by_id(records).values()]
    summary = summarise(recs)
    results.mkdir(parents=True, exist_ok=True)
    (results / "memory_grid.json").write_text(json.dumps({"summary": summary, "records": recs}, indent=1,
                                                         default=str) + "\n", encoding="utf-8")
    with (results / "memory_grid.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(recs)
    (results / "memory_grid.md").write_text(markdown(summary, recs), encoding="utf-8")
    return summary


def _gib(v: Any) -> str:
    return "-" if not v else f"{v / GIB:.2f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:+.1%}"


def markdown(summary: dict[str, Any], recs: list[dict[str, Any]]) -> str:
    lines = ["# Memory grid", "",
             f"GPU: {', '.join(summary['gpus']) or 'none'}; records: {summary['records']} {summary['statuses']}; "
             f"versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()), ""]
    levels = [(lv, st) for lv, st in list(summary["error"].items())
              + [("nvml, fitted context", summary.get("error_nvml_with_fitted_context"))] if st]
    if levels:
        lines += [f"Error of the estimate over {summary['grid_points_measured']} grid points (target: median "
                  f"<= {TARGET_MEDIAN:.0%}, max <= {TARGET_MAX:.0%}):", "",
                  "| level | n | median abs | max abs | median signed | worst under | target met |",
                  "|---|---|---|---|---|---|---|"]
    else:
        lines.append("No GPU measurements in these records (a CPU --tiny run records no peaks).")
    for level, st in levels:
        if st:
            met = "yes" if st["meets_target"] else "no"
            lines.append(f"| {level} | {st['n']} | {st['median_abs']:.1%} | {st['max_abs']:.1%} | "
                         f"{st['median_signed']:+.1%} | {st['worst_under']:+.1%} | {met} |")
    if "fitted_cuda_context_gib" in summary:
        prior = summary["cuda_context_prior_bytes"] / GIB
        lines += ["", f"Fitted CUDA context: {summary['fitted_cuda_context_gib']} GiB "
                      f"({summary['fitted_cuda_context_source']}); prior {prior:.2f} GiB."]
    if "reserved_over_allocated" in summary:
        ro = summary["reserved_over_allocated"]
        lines.append(f"Reserved/allocated: median {ro['median']} (min {ro['min']}, max {ro['max']}); "
                     f"prior {ro['prior']} (measured, not fitted).")
    lines += ["", "## Points (GiB; error = estimate / measured - 1)", "",
              "| kind | model | card | c | b | ga | r | gc | attn | optim | status | alloc | est | err "
              "| reserved | est | err | NVML | est | err |", "|---" * 20 + "|"]
    for r in sorted(recs, key=lambda r: (r.get("tiny", False), r["model"], r["kind"], r.get("card_gb") or 0)):
        lines.append(
            f"| {'tiny-' if r.get('tiny') else ''}{r['kind']} | {r['model']} | {r.get('card_gb') or '-'} | "
            f"{r.get('cutoff_len')} | {r.get('micro_batch_size')} | {r.get('grad_accum')} | {r.get('lora_rank')} | "
            f"{int(bool(r.get('grad_checkpointing')))} | {r.get('attn')} | {r.get('optim')} | {r.get('status')} | "
            f"{_gib(r.get('max_allocated'))} | {_gib(r.get('est_allocated'))} | {_pct(r.get('err_allocated'))} | "
            f"{_gib(r.get('max_reserved'))} | {_gib(r.get('est_reserved'))} | {_pct(r.get('err_reserved'))} | "
            f"{_gib(r.get('nvml_peak'))} | {_gib(r.get('est_peak'))} | {_pct(r.get('err_nvml'))} |")
    lines += ["", "## Plan check (NVML peak over the whole run / the advisor's budget)", "",
              "| model | card | plan | status | used of budget | est. | fits | >=85% | step-up | status "
              "| used of card | tightness | note |", "|---" * 13 + "|"]
    yn = {True: "yes", False: "NO", None: "-"}
    for row in summary["plan_check"]:
        lines.append(
            f"| {'tiny ' if row['tiny'] else ''}{row['model']} | {row['card_gb']} GB | {row['plan_knobs']} | "
            f"{row['plan_status']} | {_ratio(row['plan_used_of_budget'])} | {_ratio(row['plan_est_used_of_budget'])} | "
            f"{yn[row['plan_fits']]} | {yn[row['meets_85']]} | {row['step_up_knobs']} | {row['step_up_status']} | "
            f"{_ratio(row['step_up_used_of_card'])} | {row['tightness']} | {row['note']} |")
    t = summary["plan_check_totals"]
    lines += ["", f"Plans that fit: {t['plans_fit']}/{t['plans_judged']}; >= 85% of budget: "
                  f"{t['meet_85']}/{t['meet_85_judged']} (rows: {t['rows']}); "
                  f"step-up verdicts: {t['tight']} tight, {t['too_conservative']} too conservative.", ""]
    return "\n".join(lines)


def _ratio(v: Any) -> str:
    return "-" if v is None else f"{v:.0%}"


# ---- parent: imports, NVML, children -------------------------------------------------------------

def nvml_capability(index: int = 0) -> tuple[int, int] | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(pynvml.nvmlDeviceGetHandleByIndex(index))
        return int(major), int(minor)
    except Exception:  # noqa: BLE001
        return None


def import_stack(device: str, model_types: Iterable[str]) -> list[str]:
    """Import the training stack in the parent without creating a CUDA context, so forked children
    start warm. bitsandbytes asks torch for the compute capability while choosing its native
    library, which would initialise CUDA: NVML answers instead during that import. Returns notes."""
    import importlib

    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # torch.cuda.is_available() via NVML
    import torch

    notes = []
    cap = nvml_capability() if device.startswith("cuda") else None
    original = torch.cuda.get_device_capability
    if cap is not None:
        torch.cuda.get_device_capability = lambda device=None: cap  # type: ignore[assignment]
    try:
        import bitsandbytes  # noqa: F401
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
        from trl import SFTConfig, SFTTrainer  # noqa: F401

        from tuiwiz.train import build  # noqa: F401

        for mt in sorted(set(model_types)):
            try:
                importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
            except ImportError as e:
                notes.append(f"could not pre-import {mt}: {e}")
        for mod in ("transformers.integrations.bitsandbytes", "transformers.quantizers.quantizer_bnb_4bit",
                    "peft.tuners.lora.bnb", "bitsandbytes.optim"):
            try:
                importlib.import_module(mod)
            except ImportError as e:
                notes.append(f"could not pre-import {mod}: {e}")
    finally:
        torch.cuda.get_device_capability = original  # type: ignore[assignment]
    return notes


def parent_cuda_initialised() -> bool:
    import torch

    return bool(torch.cuda.is_initialized())


class NvmlProbe:
    """The parent's view of a child's GPU memory: NVML's per-process figure for the child's pid,
    else the only compute process on the device (containers show host pids), else the device's
    used memory minus the baseline taken before the child started."""

    def __init__(self, index: int = 0):
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.baseline = self.device_used()

    def device_used(self) -> int:
        return int(self.nv.nvmlDeviceGetMemoryInfo(self.handle).used)

    def reset_baseline(self) -> None:
        self.baseline = self.device_used()

    def sample(self, pid: int) -> tuple[int, str]:
        procs = self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle)
        for p in procs:
            if p.pid == pid and p.usedGpuMemory:
                return int(p.usedGpuMemory), "process"
        if len(procs) == 1 and procs[0].usedGpuMemory:
            return int(procs[0].usedGpuMemory), "process-single"
        return self.device_used() - self.baseline, "device-minus-baseline"


def gpu_info() -> dict[str, Any]:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        drv = pynvml.nvmlSystemGetDriverVersion()
        return {"gpu": name.decode() if isinstance(name, bytes) else name,
                "driver": drv.decode() if isinstance(drv, bytes) else drv,
                "gpu_total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total)}
    except Exception as e:  # noqa: BLE001
        return {"gpu": None, "nvml_error": f"{type(e).__name__}: {e}"}


def versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "pyarrow",
                 "huggingface_hub", "tokenizers", "safetensors", "pydantic"):
        mod = sys.modules.get(name)
        v = getattr(mod, "__version__", None) if mod else None
        if v is None:
            try:
                v = md.version(name)
            except md.PackageNotFoundError:
                v = "missing"
        out[name] = str(v)
    torch = sys.modules.get("torch")
    if torch is not None:
        out["cuda"] = str(torch.version.cuda)
    return out


# ---- child -----------------------------------------------------------------------------------

def _child_main(job: dict[str, Any], conn: Any) -> None:
    """Entry point of a child process (fork or spawn): one point, one result message."""
    try:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    except OSError:
        pass
    rec: dict[str, Any] = {}  # filled in place, so an exception keeps what was measured (and the phase)
    try:
        if job["task"] == "checkpoint":
            rec.update(_child_checkpoint(job))
        elif job["task"] == "probe":
            rec.update(_child_probe(job))
        else:
            _child_point(job, conn, rec)
    except BaseException as e:  # noqa: BLE001 - everything goes into the record
        oom = "out of memory" in str(e).lower()
        rec.update(status="oom" if oom else "error", oom=oom, error=f"{type(e).__name__}: {str(e)[:400]}",
                   traceback=traceback.format_exc()[-3000:])
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        conn.send(("result", rec))
        conn.close()
    finally:
        os._exit(0)


def _child_checkpoint(job: dict[str, Any]) -> dict[str, Any]:
    from tuiwiz.train.build import random_checkpoint

    t0 = time.monotonic()
    tmp = Path(job["path"] + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    device = "cuda:0" if job["device"].startswith("cuda") else "cpu"
    random_checkpoint(job["config"], tmp, device=device)
    os.replace(tmp, job["path"])
    return {"status": "ok", "ckpt_s": round(time.monotonic() - t0, 2)}


def _child_probe(job: dict[str, Any]) -> dict[str, Any]:
    """Can a child forked from this parent start CUDA? (The parent's imports may have initialised
    the driver without creating a context, which NVML cannot see.)"""
    import torch

    torch.cuda.init()
    x = torch.ones(16, device="cuda:0")
    return {"status": "ok" if float(x.sum().item()) == 16.0 else "error"}


def _dummy_tokenizer() -> Any:
    """A fast tokenizer for padding only (rows are pre-tokenized): pad 1, eos 2, bos 3."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t1", eos_token="t2", bos_token="t3")


def _child_point(job: dict[str, Any], conn: Any, rec: dict[str, Any]) -> None:
    import torch
    from transformers import TrainerCallback

    from tuiwiz.planning.memory import CUDA_CONTEXT_BYTES
    from tuiwiz.train.build import build_model, build_trainer

    knobs = TrainingKnobs.model_validate(job["knobs"])
    device = job["device"]
    on_gpu = device.startswith("cuda")
    rec["phase"] = "init"
    if on_gpu:
        torch.cuda.set_device(0)
        x = torch.ones((256, 256), device=device, dtype=torch.bfloat16)
        (x @ x).sum().item()  # context, cuBLAS handle
        torch.cuda.synchronize()
        reserved = torch.cuda.memory_reserved()
        conn.send(("ready", {"reserved": reserved}))
        reply = conn.recv()  # ("nvml", bytes | None): the parent's reading of this process
        nvml_now = reply[1] if reply and reply[0] == "nvml" else None
        rec["ctx_at_init"] = int(nvml_now - reserved) if nvml_now else None
        total = torch.cuda.get_device_properties(0).total_memory
        rec["total_memory"] = int(total)
        if job.get("card_bytes"):
            ctx = rec["ctx_at_init"] if rec["ctx_at_init"] and rec["ctx_at_init"] > 0 else CUDA_CONTEXT_BYTES
            cap = min(total, job["card_bytes"] - ctx)
            frac = max(0.01, min(1.0, cap / total))
            torch.cuda.set_per_process_memory_fraction(frac, 0)
            rec.update(cap_bytes=int(cap), cap_fraction=round(frac, 5))
        del x
    try:
        rec["phase"] = "load"
        t0 = time.monotonic()
        model = build_model(job["checkpoint"], knobs, device=device)
        rec["load_s"] = round(time.monotonic() - t0, 2)
        if on_gpu:
            rec["after_load_allocated"] = int(torch.cuda.memory_allocated())
            rec["after_load_reserved"] = int(torch.cuda.memory_reserved())
        vocab = int(model.config.vocab_size)
        n_rows = knobs.micro_batch_size * knobs.grad_accum * (knobs.max_steps or 1)
        g = torch.Generator().manual_seed(0)
        rows = [{"input_ids": torch.randint(10, max(11, vocab - 10), (knobs.cutoff_len,), generator=g).tolist(),
                 "completion_mask": [1] * knobs.cutoff_len} for _ in range(n_rows)]
        times: list[float] = []

        class StepTimer(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):  # type: ignore[override]
                if on_gpu:
                    torch.cuda.synchronize()
                times.append(time.monotonic())

        rec["phase"] = "trainer"
        trainer = build_trainer(model, _dummy_tokenizer(), knobs, rows, [], job["out_dir"], device=device,
                                callbacks=[StepTimer()])
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        conn.send(("train", {}))
        rec["phase"] = "train"
        t0 = time.monotonic()
        trainer.train()
        if on_gpu:
            torch.cuda.synchronize()
        rec["train_s"] = round(time.monotonic() - t0, 2)
        if len(times) >= 2:
            rec["s_per_step"] = round((times[-1] - times[0]) / (len(times) - 1), 3)
        rec.update(status="ok", oom=False)
    except torch.OutOfMemoryError as e:
        rec.update(status="oom", oom=True, error=str(e).splitlines()[0][:300])
    if on_gpu:
        rec["max_allocated"] = int(torch.cuda.max_memory_allocated())
        rec["max_reserved"] = int(torch.cuda.max_memory_reserved())
    else:
        rec.update(max_allocated=None, max_reserved=None)


class Runner:
    """Starts children and watches them (the parent side)."""

    def __init__(self, device: str, scratch: Path, mode: str, probe: NvmlProbe | None, deadline_at: float | None,
                 point_timeout: float):
        import multiprocessing as mp

        self.mp = mp
        self.device, self.scratch, self.mode, self.probe = device, scratch, mode, probe
        self.deadline_at, self.point_timeout = deadline_at, point_timeout
        self.logs = scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def child(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        ctx = self.mp.get_context(self.mode)
        self.n += 1
        job = {**job, "log": str(self.logs / f"{self.n:03d}-{job['task']}.log")}
        parent_conn, child_conn = ctx.Pipe()
        if self.probe:
            self.probe.reset_baseline()
        proc = ctx.Process(target=_child_main, args=(job, child_conn), daemon=True)
        t0 = time.monotonic()
        proc.start()
        child_conn.close()
        peak_all = peak_train = 0
        src_all = src_train = None
        phase, result, killed = "start", None, None
        while True:
            try:
                if parent_conn.poll(0.005):
                    kind, payload = parent_conn.recv()
                    if kind == "ready":
                        reading = self._read(proc.pid, samples=3)
                        parent_conn.send(("nvml", reading[0] if reading else None))
                    elif kind == "train":
                        phase = "train"
                    elif kind == "result":
                        result = payload
            except (EOFError, OSError):
                pass
            reading = self._read(proc.pid)
            if reading:
                v, src = reading
                if v > peak_all:
                    peak_all, src_all = v, src
                if phase == "train" and v > peak_train:
                    peak_train, src_train = v, src
            if result is not None or not proc.is_alive():
                break
            now = time.monotonic()
            if now - t0 > timeout:
                killed = "timeout"
            elif self.deadline_at is not None and now > self.deadline_at:
                killed = "interrupted"
            if killed:
                proc.kill()
                break
        while result is None and killed is None:  # a result sent just before the child exited
            try:
                if not parent_conn.poll(0.2):
                    break
                kind, payload = parent_conn.recv()
                if kind == "result":
                    result = payload
            except (EOFError, OSError):
                break
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        wall = round(time.monotonic() - t0, 2)
        if result is None:
            if killed == "timeout":
                result = {"status": "timeout", "error": f"killed after {timeout:.0f} s"}
            elif killed == "interrupted":
                result = {"status": "interrupted", "error": "the slice's deadline passed while it ran"}
            else:
                result = {"status": "crash", "error": f"child exited with code {proc.exitcode} and no result"}
        if result.get("status") != "ok" or job["task"] == "checkpoint":
            result["log_tail"] = _tail(Path(job["log"]), 2500)
        if self.probe:
            result.update(nvml_peak=peak_train or None, nvml_peak_all=peak_all or None,
                          nvml_source=src_train or src_all)
        else:
            result.update(nvml_peak=None, nvml_peak_all=None, nvml_source=None)
        result["wall_s"] = wall
        return result

    def _read(self, pid: int, samples: int = 1) -> tuple[int, str] | None:
        if not self.probe:
            return None
        best = None
        for i in range(samples):
            try:
                r = self.probe.sample(pid)
            except Exception:  # noqa: BLE001
                return best
            best = r if best is None or r[0] > best[0] else best
            if i + 1 < samples:
                time.sleep(0.01)
        return best


def _tail(path: Path, n: int) -> str:
    try:
        data = path.read_bytes()[-n:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace")


def _looks_like_fork_failure(rec: dict[str, Any]) -> bool:
    text = f"{rec.get('error', '')} {rec.get('log_tail', '')}".lower()
    return any(s in text for s in ("forked subprocess", "initialization error", "cuda_error_not_initialized",
                                   "cudaerrorinitializationerror"))


def scratch_dir(requested: Path, need_bytes: int) -> Path:
    """/dev/shm when it has room for the checkpoint (plus 2 GiB), else `requested`. The /dev/shm
    folder is named after `requested`, so runs with different --scratch never share checkpoints."""
    import hashlib

    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes + 2 * GIB:
            tag = hashlib.sha1(str(requested.resolve()).encode()).hexdigest()[:8]
            return shm / f"tuiwiz-grid-{tag}"
    except OSError:
        pass
    return requested


# ---- main --------------------------------------------------------------------------------------

def select(points: list[Point], only: str | None, limit: int | None, per_kind: int | None) -> list[Point]:
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


def print_list(points: list[Point], done: set[str], scale: float) -> None:
    models_left: dict[str, bool] = {}
    total_left = total = 0.0
    print(f"{'predicted_s':>11}  {'state':7}  id")
    for p in points:
        pred = predict_point_s(p) * scale
        left = p.id not in done
        total += pred
        total_left += pred if left else 0.0
        models_left[p.model] = models_left.get(p.model, False) or left
        print(f"{pred:11.1f}  {'todo' if left else 'done':7}  {p.id}")
    ckpt_all = sum(predict_ckpt_s(m, points[0].tiny) for m in models_left) if points else 0.0
    ckpt_left = sum(predict_ckpt_s(m, points[0].tiny) for m, left in models_left.items() if left) if points else 0.0
    print(f"\n{len(points)} points ({len(points) - len([p for p in points if p.id not in done])} recorded), "
          f"{len(models_left)} models; time scale {scale:.2f} (measured/predicted; rough prior)")
    print(f"predicted: points {total:.0f} s + checkpoints {ckpt_all:.0f} s + one slice's start-up "
          f"{PRIOR['parent_s']:.0f} s = {total + ckpt_all + PRIOR['parent_s']:.0f} s "
          f"({(total + ckpt_all + PRIOR['parent_s']) / 60:.1f} min)")
    print(f"left to run: {total_left + ckpt_left:.0f} s ({(total_left + ckpt_left) / 60:.1f} min) plus "
          f"{PRIOR['parent_s']:.0f} s per slice")


class StopGrid(Exception):
    """Too many failures in a row: stop the slice rather than record every point as failed."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="docs/gpu_grid.md: how to run it on a lent GPU in slices")
    ap.add_argument("--results", type=Path, default=None,
                    help="folder of memory_grid.jsonl (default bench/results; with --tiny SCRATCH/results-tiny)")
    ap.add_argument("--list", action="store_true", help="print the points, predicted seconds and the total")
    ap.add_argument("--summarise", "--summarize", action="store_true", help="rebuild json/csv/md from the jsonl")
    ap.add_argument("--re-estimate", action="store_true",
                    help="with --summarise: recompute the estimates with the current code (measurements kept; "
                         "the jsonl is not changed)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds from start; no point starts past it")
    ap.add_argument("--grace", type=float, default=15.0,
                    help="a point still running this many seconds after the deadline is killed (interrupted)")
    ap.add_argument("--redo", action="store_true", help="ignore recorded points")
    ap.add_argument("--retry-errors", action="store_true", help="re-run points recorded as error/crash/timeout")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="shrink each architecture to 2 layers (CI, smoke tests)")
    ap.add_argument("--no-plan-check", action="store_true")
    ap.add_argument("--only", help="regular expression on point ids")
    ap.add_argument("--limit", type=int, help="at most this many points")
    ap.add_argument("--per-kind", type=int, help="at most this many points of each kind (grid/plan/step_up)")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/tuiwiz-grid"),
                    help="checkpoints when /dev/shm lacks room, logs")
    ap.add_argument("--child-mode", choices=("auto", "fork", "spawn"), default="auto")
    ap.add_argument("--point-timeout", type=float, default=120.0, help="minimum per-point timeout (s); "
                    "the timeout is max(this, 4 x predicted)")
    ap.add_argument("--max-failures", type=int, default=3,
                    help="stop after this many consecutive errors/crashes/timeouts (a broken stack; 0: never)")
    args = ap.parse_args(argv)
    if args.results is None:
        args.results = args.scratch / "results-tiny" if args.tiny else RESULTS
    started = time.monotonic()
    jsonl = args.results / JSONL

    if args.summarise:
        records = read_records(jsonl)
        if not records:
            print(f"memory_grid: no records in {jsonl}", file=sys.stderr)
            return 1
        if args.re_estimate:
            records = [re_estimate(r) if r.get("model") and "cutoff_len" in r else r for r in records]
        summary = write_outputs(args.results, records)
        print(json.dumps({k: v for k, v in summary.items() if k != "plan_check"}, indent=1, default=str))
        print(f"wrote {args.results}/memory_grid.{{json,csv,md}}")
        return 0

    records = read_records(jsonl)
    points = select(all_points(args.tiny, not args.no_plan_check), args.only, args.limit, args.per_kind)
    done = set() if args.redo else done_ids(records, args.retry_errors)
    gpu = gpu_info() if args.device.startswith("cuda") else {"gpu": "cpu"}
    scale = time_scale(records, gpu.get("gpu"))
    if args.list:
        print_list(points, done, scale)
        return 0
    interrupted_s = {r["id"]: r.get("wall_s", 0) for r in records if r.get("status") == "interrupted"}

    def predict(p: Point) -> float:
        return max(predict_point_s(p) * scale, 1.25 * interrupted_s.get(p.id, 0.0))

    todo = [p for p in points if p.id not in done]
    print(f"memory_grid: {len(points)} points selected, {len(points) - len(todo)} already in {jsonl}, "
          f"{len(todo)} to run (predicted {sum(map(predict, todo)):.0f} s)", flush=True)
    if not todo:
        if records:
            write_outputs(args.results, records)
        return 0

    if args.deadline is not None and time.monotonic() - started + min(map(predict, todo)) > args.deadline:
        print(f"memory_grid: no point fits in the {args.deadline:.0f} s deadline\nmemory_grid: REMAINING {len(todo)}",
              flush=True)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not gpu.get("gpu"):
        print(f"memory_grid: no GPU visible through NVML ({gpu.get('nvml_error')}); use --device cpu --tiny",
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    notes = import_stack(args.device, {catalog_config(p.model)["model_type"] for p in todo})
    mode = args.child_mode
    probe = NvmlProbe() if on_gpu else None
    if mode == "auto":
        mode = "fork"
        if on_gpu and parent_cuda_initialised():
            mode = "spawn"
            notes.append("the parent's imports initialised CUDA: children are spawned (slower), not forked")
        elif on_gpu:
            res = Runner(args.device, args.scratch, "fork", probe, None, 60).child({"task": "probe"}, timeout=60)
            if res.get("status") != "ok":
                mode = "spawn"
                notes.append(f"a forked child could not start CUDA ({res.get('error')}): children are spawned")
    env = {**gpu, "versions": versions(), "child_mode": mode}
    print(f"memory_grid: imports {time.monotonic() - t0:.1f} s; {json.dumps(env)}", flush=True)
    for n in notes:
        print(f"memory_grid: note: {n}", flush=True)

    deadline_at = started + args.deadline + args.grace if args.deadline is not None else None
    runner = Runner(args.device, args.scratch, mode, probe, deadline_at, args.point_timeout)
    ckpts: dict[str, Path] = {}
    ckpt_s: dict[str, float] = {}

    def ensure_ckpt(model: str) -> str | None:
        tiny = todo[0].tiny
        cfg = tiny_config(catalog_config(model)) if tiny else catalog_config(model)
        root = scratch_dir(args.scratch, 2 * catalog_spec(model).total_params if not tiny else 0)
        path = root / (("tiny-" if tiny else "") + model.replace("/", "__"))
        ckpts[model] = path
        if (path / "config.json").is_file():
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        res = runner.child({"task": "checkpoint", "config": cfg, "path": str(path), "device": args.device},
                           timeout=max(120.0, 6 * predict_ckpt_s(model, tiny)))
        if res.get("status") != "ok":
            print(f"memory_grid: checkpoint for {model} failed: {res.get('error')}\n{res.get('log_tail', '')}",
                  flush=True)
            return f"{res.get('status')}: {res.get('error')}"
        ckpt_s[model] = res.get("ckpt_s", res["wall_s"])
        print(f"memory_grid: checkpoint {model} -> {path} in {res['wall_s']:.1f} s", flush=True)
        return None

    def release_ckpt(model: str) -> None:
        if model in ckpts:
            shutil.rmtree(ckpts[model], ignore_errors=True)

    def run_point(p: Point) -> dict[str, Any]:
        nonlocal mode
        rec = base_record(p)
        pred = predict_point_s(p)
        job = {"task": "point", "knobs": point_run_knobs(p).model_dump(mode="json"), "device": args.device,
               "checkpoint": str(ckpts[p.model]), "card_bytes": rec["card_bytes"] if on_gpu else None,
               "out_dir": str(args.scratch / "out")}
        res = runner.child(job, timeout=max(args.point_timeout, 4 * pred * scale))
        if mode == "fork" and args.child_mode == "auto" and res.get("status") in ("error", "crash") \
                and _looks_like_fork_failure(res):
            print("memory_grid: CUDA failed in a forked child; switching to spawned children", flush=True)
            mode = runner.mode = "spawn"
            res = runner.child(job, timeout=max(args.point_timeout, 4 * pred * scale))
        rec.update(res)
        rec.update(env)
        rec.update(pred_s=round(pred, 1), ckpt_s=ckpt_s.pop(p.model, None), child_mode=runner.mode,
                   device=args.device, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return rec

    failures = 0

    def on_record(p: Point, rec: dict[str, Any]) -> None:
        nonlocal failures
        if "id" not in rec:  # a checkpoint failure: the point still gets its record
            rec = {**base_record(p), **rec, **env}
        append_record(jsonl, rec)
        records.append(rec)
        brief = {k: rec.get(k) for k in ("status", "wall_s", "pred_s")}
        for level, got, est in LEVELS:
            if rec.get(got) and rec.get(est):
                brief[f"err_{level}"] = f"{rec[est] / rec[got] - 1:+.1%}"
        if rec.get("error"):
            brief["error"] = str(rec["error"])[:200]
        print(f"memory_grid: {p.id} {json.dumps(brief)}", flush=True)
        failures = failures + 1 if rec.get("status") in FAILED else 0
        if args.max_failures and failures >= args.max_failures:
            print(f"memory_grid: log of the last failure:\n{rec.get('log_tail') or rec.get('traceback') or ''}",
                  flush=True)
            raise StopGrid(f"{failures} failures in a row: the stack looks broken. Fix it, then re-run with "
                           "--retry-errors (recorded failures are otherwise skipped).")

    try:
        res = run_slice(todo, predict, lambda m: predict_ckpt_s(m, todo[0].tiny) * scale, args.deadline,
                        lambda: time.monotonic() - started, ensure_ckpt, run_point, release_ckpt, on_record)
    except StopGrid as e:
        write_outputs(args.results, records)
        print(f"memory_grid: STOPPED: {e}", flush=True)
        return 3
    finally:
        for root in {p.parent for p in ckpts.values()}:
            try:
                root.rmdir()  # only when empty: a checkpoint left for the next slice stays
            except OSError:
                pass
    summary = write_outputs(args.results, records)
    left = len(res.left) + len(res.interrupted)
    print(f"memory_grid: ran {len(res.ran)} points in {time.monotonic() - started:.0f} s; "
          f"{left} left for the next slice ({len(res.interrupted)} interrupted by the deadline); "
          f"{summary['records']} records in {jsonl}", flush=True)
    if left:
        print(f"memory_grid: REMAINING {left}", flush=True)
    else:
        print("memory_grid: COMPLETE: every selected point is recorded", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
