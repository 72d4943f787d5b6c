"""How long a point takes: a rough prior that decides what fits in a slice, rescaled by what
earlier slices measured on the same GPU; and `--list`, which shows it."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Iterable

from grid.points import Point, catalog_spec, model_bytes_bf16

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


def predict_ckpt_s(model_id: str, tiny: bool = False) -> float:
    if tiny:
        return 2.0
    return PRIOR["ckpt_s"] + PRIOR["ckpt_s_per_gb"] * model_bytes_bf16(model_id) / 1e9


def predict_point_s(p: Point) -> float:
    """A rough prior (H100): fixed per-point overhead + load time proportional to the checkpoint's
    bf16 bytes + micro-steps x the time of one micro-step."""
    if p.tiny:
        return PRIOR["tiny_point_s"]
    micro_steps = (p.knobs.max_steps or 1) * p.knobs.grad_accum
    load = PRIOR["load_s_per_gb"] * model_bytes_bf16(p.model) / 1e9
    return PRIOR["point_s"] + load + micro_steps * _micro_step_s(p)


def _micro_step_s(p: Point) -> float:
    """Launch overhead + FLOPs / effective throughput. FLOPs: (4, or 6 with checkpointing's
    recompute) x params x tokens for the frozen base, plus causal attention."""
    spec, k = catalog_spec(p.model), p.knobs
    tokens = k.micro_batch_size * k.cutoff_len
    dense = (6 if k.grad_checkpointing else 4) * spec.total_params * tokens
    passes = 1 + 2.5 + (1 if k.grad_checkpointing else 0)
    attn = 0.5 * 4 * spec.layers * k.micro_batch_size * k.cutoff_len**2 * spec.q_dim * passes
    attn *= PRIOR["eager_attention"] if k.attn == "eager" else 1.0
    return PRIOR["step_s"] + PRIOR["step_s_per_layer"] * spec.layers + (dense + attn) / PRIOR["flops_per_s"]


def time_scale(records: Iterable[dict[str, Any]], gpu: str | None) -> float:
    """measured / predicted over finished points on this GPU (1 with fewer than 3), clamped to [0.5, 4]."""
    ratios = [r["wall_s"] / r["pred_s"] for r in records
              if r.get("status") in ("ok", "oom") and r.get("wall_s") and r.get("pred_s") and not r.get("tiny")
              and (gpu is None or r.get("gpu") == gpu)]
    if len(ratios) < 3:
        return 1.0
    return min(4.0, max(0.5, statistics.median(ratios)))


@dataclass(frozen=True)
class Predictor:
    """What a slice expects a point and a checkpoint to take: the prior times the measured scale,
    and never less than 1.25 x what an interrupted earlier try of the same point already ran."""

    scale: float
    interrupted_s: dict[str, float]
    tiny: bool

    @classmethod
    def from_records(cls, records: list[dict[str, Any]], scale: float, tiny: bool) -> Predictor:
        interrupted = {r["id"]: r.get("wall_s", 0) for r in records if r.get("status") == "interrupted"}
        return cls(scale, interrupted, tiny)

    def point(self, p: Point) -> float:
        return max(predict_point_s(p) * self.scale, 1.25 * self.interrupted_s.get(p.id, 0.0))

    def ckpt(self, model_id: str) -> float:
        return predict_ckpt_s(model_id, self.tiny) * self.scale


def print_list(points: list[Point], done: set[str], scale: float, tiny: bool) -> None:
    """`--list`: each point's predicted seconds and state, then the totals."""
    preds = {p.id: predict_point_s(p) * scale for p in points}
    print(f"{'predicted_s':>11}  {'state':7}  id")
    for p in points:
        print(f"{preds[p.id]:11.1f}  {'done' if p.id in done else 'todo':7}  {p.id}")
    todo = [p for p in points if p.id not in done]
    models = list(dict.fromkeys(p.model for p in points))
    models_left = [m for m in models if any(p.model == m for p in todo)]
    total = sum(preds.values())
    ckpt_all = sum(predict_ckpt_s(m, tiny) for m in models)
    left = sum(preds[p.id] for p in todo) + sum(predict_ckpt_s(m, tiny) for m in models_left)
    whole = total + ckpt_all + PRIOR["parent_s"]
    print(f"\n{len(points)} points ({len(points) - len(todo)} recorded), "
          f"{len(models)} models; time scale {scale:.2f} (measured/predicted; rough prior)")
    print(f"predicted: points {total:.0f} s + checkpoints {ckpt_all:.0f} s + one slice's start-up "
          f"{PRIOR['parent_s']:.0f} s = {whole:.0f} s ({whole / 60:.1f} min)")
    print(f"left to run: {left:.0f} s ({left / 60:.1f} min) plus {PRIOR['parent_s']:.0f} s per slice")
