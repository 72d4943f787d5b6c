"""One call from user inputs to a whole plan: hardware, model, dataset profile, advice.

Shared by `tuiwiz --auto`, the TUI and preset regeneration, so every front end plans the
same way. Pure planning: no torch, no Textual, no network.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from tuiwiz.errors import UserError
from tuiwiz.hardware import GpuInfo, HardwareInventory, catalog_gpu, detect_hardware
from tuiwiz.model_catalog import CATALOG, DEFAULT_MODEL
from tuiwiz.models import ModelSpec, resolve_model, spec_from_config
from tuiwiz.planning.advisor import DEFAULT_EFFECTIVE_BATCH, DEFAULT_HEADROOM, Advice, advise, budget_bytes
from tuiwiz.planning.knobs import TrainingKnobs
from tuiwiz.preset import DatasetRef, EstimateInfo, HardwareRef, ModelRef, Preset


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for. `fixed` names the knobs they set themselves (held by the advisor)."""

    model: str = DEFAULT_MODEL
    model_path: str | None = None
    tokenizer: str | None = None
    dataset: DatasetRef | None = None
    gpu: str | None = None  # catalog name / size, or None/"auto" to detect
    gpu_indices: tuple[int, ...] | None = None
    gpu_count: int = 1  # for catalog cards
    knobs: TrainingKnobs = field(default_factory=TrainingKnobs)
    fixed: frozenset[str] = frozenset()
    effective_batch: int = DEFAULT_EFFECTIVE_BATCH
    headroom: float = DEFAULT_HEADROOM
    percentile: float = 99.0
    sample: int | None = None
    strict: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    hardware: HardwareInventory
    gpus: tuple[GpuInfo, ...]
    spec: ModelSpec
    advice: Advice
    profile: Any = None  # tuiwiz.data.LengthProfile | None
    warnings: tuple[str, ...] = ()

    @property
    def knobs(self) -> TrainingKnobs:
        return self.advice.knobs

    def to_json(self) -> dict[str, Any]:
        """The `--json` contract (tests/test_cli.py checks it)."""
        k, est = self.advice.knobs, self.advice.estimate
        dataset = None
        if self.profile is not None:
            dataset = self.profile.to_json()
            dataset["truncated_at_cutoff"] = self.profile.at_cutoff(k.cutoff_len, k.micro_batch_size,
                                                                    k.packing).truncated
        return {
            "hardware": {
                "source": self.hardware.source,
                "note": self.hardware.note,
                "gpus": [{"index": g.index, "name": g.name, "total_gib": round(g.total_gib, 2),
                          "free_gib": round(g.free_gib, 2), "bf16": g.bf16} for g in self.gpus],
                "host": {"cpu_cores": self.hardware.host.cpu_cores,
                         "ram_total_gib": round(self.hardware.host.ram_total_gib, 1),
                         "ram_available_gib": round(self.hardware.host.ram_available_gib, 1),
                         "disk_free_gib": None if self.hardware.host.disk_free_gib is None
                         else round(self.hardware.host.disk_free_gib, 1)},
            },
            "model": {"id": self.spec.id, "params_b": round(self.spec.params_b, 3), "layers": self.spec.layers,
                      "hidden": self.spec.hidden, "vocab": self.spec.vocab, "source": self.spec.source},
            "dataset": dataset,
            "plan": {
                "cutoff_len": k.cutoff_len, "micro_batch_size": k.micro_batch_size, "grad_accum": k.grad_accum,
                "effective_batch": k.effective_batch(len(self.gpus)), "lora_rank": k.lora_rank,
                "lora_alpha": k.lora_alpha, "target_modules": k.target_modules,
                "grad_checkpointing": k.grad_checkpointing, "optim": k.optim, "quant_bits": k.quant_bits,
                "attn": k.attn, "loss": k.loss, "packing": k.packing, "gpus": len(self.gpus),
                "lora_params": est.lora_params,
            },
            "memory": {
                "peak_gib": round(est.peak_gib, 3), "allocated_gib": round(est.allocated_gib, 3),
                "reserved_gib": round(est.reserved_gib, 3), "budget_gib": round(self.advice.budget_gib, 3),
                "fits": self.advice.fits, "breakdown_gib": est.breakdown_gib(),
                "terms": [{"key": t.key, "label": t.label, "group": t.group, "gib": round(t.gib, 4), "why": t.why}
                          for t in est.terms],
                "assumptions": list(est.assumptions),
                "peak_at": est.peak_at,
            },
            "reasons": list(self.advice.reasons),
            "suggestions": list(self.advice.suggestions),
            "warnings": list(self.warnings) + list(self.advice.warnings),
        }

    def to_preset(self, name: str | None = None) -> Preset:
        est, k = self.advice.estimate, self.advice.knobs
        g = self.gpus[0]
        return Preset(
            name=name,
            model=ModelRef(id=self.spec.id if self.request.model_path is None else self.request.model,
                           path=self.request.model_path, tokenizer=self.request.tokenizer,
                           trust_remote_code=self.request.trust_remote_code),
            dataset=self.request.dataset,
            hardware=HardwareRef(gpu=g.name, memory_gib=round(g.total_gib, 2), count=len(self.gpus),
                                 indices=list(self.request.gpu_indices) if self.request.gpu_indices else None,
                                 bf16=all(x.bf16 for x in self.gpus)),
            training=k,
            estimate=EstimateInfo(peak_gib=round(est.peak_gib, 3), allocated_gib=round(est.allocated_gib, 3),
                                  budget_gib=round(self.advice.budget_gib, 3), fits=self.advice.fits,
                                  breakdown_gib=est.breakdown_gib()),
        )


def catalog_specs() -> tuple[ModelSpec, ...]:
    """Every catalog model as a spec (for 'a smaller model would fit' suggestions)."""
    return tuple(spec_from_config(e.config, e.hub_id, "catalog") for e in CATALOG)


def _preset_card(name: str | None, memory_gib: float) -> str:
    """The card a preset names, when the catalog knows it at that size; else a card of its size."""
    if name:
        try:
            card = catalog_gpu(name)
        except UserError:
            card = None
        if card is not None and not card.name.startswith("generic") and abs(card.memory_gib - memory_gib) < 0.05:
            return name
    return f"{memory_gib}GB"


def request_from_preset(preset: Preset, **overrides: Any) -> PlanRequest:
    """A request that re-plans a preset: every knob in it is held fixed."""
    hw = preset.hardware
    fields = dict(
        model=preset.model.id, model_path=preset.model.path, tokenizer=preset.model.tokenizer,
        dataset=preset.dataset, gpu=_preset_card(hw.gpu, hw.memory_gib) if hw.indices is None else None,
        gpu_indices=tuple(hw.indices) if hw.indices else None, gpu_count=hw.count, knobs=preset.training,
        fixed=frozenset(TrainingKnobs.model_fields), trust_remote_code=preset.model.trust_remote_code,
    )
    fields.update(overrides)
    return PlanRequest(**fields)


def make_plan(
    req: PlanRequest,
    *,
    hardware: HardwareInventory | None = None,
    profile: Any = None,
    progress: Callable[[int, int | None], None] | None = None,
    cancel: threading.Event | None = None,
) -> Plan:
    """Plan a run. Pass `hardware` or `profile` to reuse readings (the TUI does, and tests inject fakes)."""
    if req.effective_batch < 1:
        raise UserError("--effective-batch must be at least 1.")
    if not 0 <= req.headroom < 1:
        raise UserError(f"--headroom must be a fraction in [0, 1), got {req.headroom}.")
    hw = hardware or detect_hardware(req.gpu, req.gpu_count)
    gpus = hw.selected(list(req.gpu_indices) if req.gpu_indices else None) if hw.source == "nvml" else hw.gpus
    if hw.source == "nvml" and req.gpu_indices is None:
        gpus = gpus[:1] if req.gpu_count == 1 else gpus[: req.gpu_count]
    spec = resolve_model(req.model_path or req.model)
    warnings: list[str] = []
    knobs = req.knobs
    fixed = set(req.fixed)
    if hw.note:
        warnings.append(hw.note)
    if not all(g.bf16 for g in gpus) and knobs.compute_dtype == "bf16":
        knobs = knobs.replace(compute_dtype="fp16")
        warnings.append(f"{gpus[0].name} has no bf16: computing in fp16")

    if req.dataset is not None and profile is None:
        from tuiwiz.data import load_tokenizer, profile_dataset

        tok = load_tokenizer(req.tokenizer or req.model_path, model_id=req.model)
        profile = profile_dataset(req.dataset, tok, percentile=req.percentile, max_positions=spec.max_positions,
                                  micro_batch=knobs.micro_batch_size, packing=knobs.packing, sample=req.sample,
                                  progress=progress, cancel=cancel, strict=req.strict)
    if profile is not None:
        if getattr(profile, "approximate", False):
            warnings.append(f"token counts are approximate ({profile.tokenizer}); pass --tokenizer PATH "
                            "(a folder with tokenizer.json) for exact counts")
        if "cutoff_len" not in fixed:
            knobs = knobs.replace(cutoff_len=profile.suggested_cutoff)
            fixed.add("cutoff_len")
    if knobs.cutoff_len > spec.max_positions:
        warnings.append(f"cutoff {knobs.cutoff_len} exceeds {spec.id}'s {spec.max_positions} positions")

    free = min(g.free_gib for g in gpus)
    advice = advise(spec, knobs, budget_bytes(free, req.headroom), gpus=len(gpus),
                    target_effective_batch=req.effective_batch, fixed=frozenset(fixed),
                    alternatives=catalog_specs())
    if not advice.fits:
        warnings.append(f"does not fit: needs {advice.estimate.peak_gib:.1f} GiB, budget {advice.budget_gib:.1f} GiB")
    return Plan(req, hw, tuple(gpus), spec, advice, profile, tuple(warnings))
