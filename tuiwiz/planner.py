"""From user inputs to a whole plan, in two calls: read (I/O), then plan (pure).

`read_inputs` / `profile_for` do the I/O: hardware, the model's config, the tokenizer and the
dataset profile. `make_plan(request, hardware, spec, profile)` is a pure function of what was
read. `tuiwiz --auto`, the TUI and preset regeneration call the same two, so every front end
plans the same way. No torch, no Textual, no network.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pathlib import Path

from tuiwiz.errors import BadValue, UserError
from tuiwiz.hardware import (MAX_GPUS_PER_NODE, MAX_NODES, GpuInfo, HardwareInventory, catalog_gpu, detect_hardware,
                             gpus_from_catalog)
from tuiwiz.model_catalog import CATALOG, DEFAULT_MODEL
from tuiwiz.models import ModelSpec, resolve_model, spec_from_config
from tuiwiz.planning.advisor import DEFAULT_EFFECTIVE_BATCH, DEFAULT_HEADROOM, Advice, advise, budget_bytes
from tuiwiz.planning.calibration import Calibration, read_calibration
from tuiwiz.planning.memory import GIB, estimate_memory
from tuiwiz.planning.knobs import KNOB_BY_NAME, TrainingKnobs, format_knob
from tuiwiz.planning.strategy import TITLES, HostRam, host_ram, offloads, strategy_problem
from tuiwiz.preset import DatasetRef, EstimateInfo, HardwareRef, ModelRef, Preset

if TYPE_CHECKING:
    from tuiwiz.data import CountingTokenizer, LengthProfile


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for. `fixed` names the knobs they set themselves (held by the advisor)."""

    model: str = DEFAULT_MODEL
    model_path: str | None = None
    tokenizer: str | None = None
    dataset: DatasetRef | None = None
    gpu: str | None = None  # catalog name / size, or None/"auto" to detect
    gpu_indices: tuple[int, ...] | None = None
    gpu_count: int = 1  # GPUs per node: catalog cards, or the first N this machine has
    nodes: int = 1  # machines of that shape (a multi-node run is exported, not launched here)
    knobs: TrainingKnobs = field(default_factory=TrainingKnobs)
    fixed: frozenset[str] = frozenset()
    effective_batch: int = DEFAULT_EFFECTIVE_BATCH
    headroom: float = DEFAULT_HEADROOM
    percentile: float = 99.0
    sample: int | None = None
    strict: bool = False
    trust_remote_code: bool = False


#: Request fields that are not knobs, and the flag each has (knob flags live on the knobs).
REQUEST_FLAGS: dict[str, str] = {
    "model": "--model", "tokenizer": "--tokenizer", "dataset": "--dataset", "layout": "--layout",
    "gpu": "--gpu", "gpus": "--gpus", "gpu_count": "--num-gpus", "nodes": "--nodes",
    "effective_batch": "--effective-batch", "headroom": "--headroom",
    "percentile": "--percentile", "sample": "--sample", "strict": "--strict",
    "trust_remote_code": "--trust-remote-code",
}


def flag_for(field: str) -> str:
    """The CLI flag that sets a knob or request field (the field name itself when none does)."""
    info = KNOB_BY_NAME.get(field)
    return info.flag if info is not None else REQUEST_FLAGS.get(field, field)


@dataclass(frozen=True)
class Suggestion:
    """A change that makes the plan fit: its words, and the flags that, added to the same command, do it."""

    text: str
    flags: tuple[str, ...]
    peak_gib: float


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    hardware: HardwareInventory
    gpus: tuple[GpuInfo, ...]
    spec: ModelSpec
    advice: Advice
    profile: LengthProfile | None = None
    warnings: tuple[str, ...] = ()
    #: When the plan does not fit: changes that do, each checked by re-planning, cheapest first.
    suggestions: tuple[Suggestion, ...] = ()
    #: This GPU's measured runs, when the plan was made with them (re-planned suggestions reuse it).
    calibration: Calibration | None = None

    @property
    def knobs(self) -> TrainingKnobs:
        return self.advice.knobs

    @property
    def nodes(self) -> int:
        return self.request.nodes

    @property
    def world_size(self) -> int:
        """GPUs in the whole run: this plan's GPUs on every node (the nodes are alike)."""
        return len(self.gpus) * self.request.nodes

    @property
    def host_ram(self) -> HostRam:
        """Host RAM one node needs for this plan (loading, and the shards when offloading)."""
        return host_ram(self.spec, self.knobs, self.world_size, len(self.gpus))

    def all_warnings(self) -> list[str]:
        """Every warning in the CLI's words: `warnings` and the advisor's, then the two the TUI
        shows its own way (approximate counts, a plan that does not fit)."""
        out = [*self.warnings, *self.advice.warnings]
        if self.profile is not None and self.profile.approximate:
            out.append(f"token counts are approximate ({self.profile.tokenizer}): give the model's tokenizer "
                       "(a folder with tokenizer.json) for exact counts")
        if not self.advice.fits:
            out.append(f"does not fit: needs {self.advice.estimate.peak_gib:.1f} GiB, "
                       f"budget {self.advice.budget_gib:.1f} GiB")
        return out

    def to_json(self) -> dict[str, Any]:
        """The `--json` contract (tests/test_cli.py checks it)."""
        k, est = self.advice.knobs, self.advice.estimate
        dataset = None
        if self.profile is not None:
            dataset = self.profile.to_json()
            at = self.profile.at_cutoff(k.cutoff_len, k.micro_batch_size, k.batching)
            dataset["truncated_at_cutoff"] = at.truncated
            dataset["slot_efficiency"] = round(at.efficiency, 4)  # real tokens / token slots, under this plan
        return {
            "hardware": {
                "source": self.hardware.source,
                "count": len(self.gpus), "nodes": self.nodes,
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
            "plan": {**k.model_dump(mode="json"), "effective_batch": k.effective_batch(self.world_size),
                     "gpus": self.world_size, "nodes": self.nodes, "gpus_per_node": len(self.gpus),
                     "lora_params": est.lora_params},
            "memory": {
                "peak_gib": round(est.peak_gib, 3), "allocated_gib": round(est.allocated_gib, 3),
                "reserved_gib": round(est.reserved_gib, 3), "budget_gib": round(self.advice.budget_gib, 3),
                "fits": self.advice.fits, "breakdown_gib": est.breakdown_gib(),
                "terms": [{"key": t.key, "label": t.label, "group": t.group, "gib": round(t.gib, 4), "why": t.why}
                          for t in est.terms],
                "assumptions": list(est.assumptions),
                "peak_at": est.peak_at,
                "calibration": est.calibration.to_json() if est.calibration is not None else None,
                "per": "gpu",
                "host_ram": _host_ram_json(self.host_ram, offloads(k.strategy)),
            },
            "reasons": list(self.advice.reasons),
            "suggestions": [{"text": x.text, "flags": list(x.flags)} for x in self.suggestions],
            "warnings": self.all_warnings(),
        }

    def to_preset(self, name: str | None = None) -> Preset:
        """The plan as a preset. Local paths are made absolute here, against the directory the
        plan is made in, so the preset launches from anywhere (a run starts in its own folder)."""
        est, k, req = self.advice.estimate, self.advice.knobs, self.request
        g = self.gpus[0]
        dataset = req.dataset
        if dataset is not None:
            dataset = dataset.model_copy(update={"path": absolute(dataset.path)})
        return Preset(
            name=name,
            model=ModelRef(id=self.spec.id, path=absolute(req.model_path), tokenizer=absolute(req.tokenizer),
                           trust_remote_code=req.trust_remote_code),
            dataset=dataset,
            hardware=HardwareRef(gpu=g.name, memory_gib=round(g.total_gib, 2), count=len(self.gpus), nodes=self.nodes,
                                 indices=list(self.request.gpu_indices) if self.request.gpu_indices else None,
                                 bf16=all(x.bf16 for x in self.gpus)),
            training=k,
            estimate=EstimateInfo(peak_gib=round(est.peak_gib, 3), allocated_gib=round(est.allocated_gib, 3),
                                  budget_gib=round(self.advice.budget_gib, 3), fits=self.advice.fits,
                                  breakdown_gib=est.breakdown_gib()),
        )


def _host_ram_json(ram: HostRam, offloading: bool) -> dict[str, Any]:
    """Host RAM per node: the peak and its terms; `offloading` says the shards live there."""
    return {"per": "node", "peak_gib": round(ram.peak_gib, 1), "offloading": offloading,
            "terms": [{"key": t.key, "label": t.label, "gib": round(t.gib, 2), "why": t.why} for t in ram.terms]}


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
        gpu_indices=tuple(hw.indices) if hw.indices else None, gpu_count=hw.count, nodes=hw.nodes,
        knobs=preset.training,
        fixed=frozenset(TrainingKnobs.model_fields), trust_remote_code=preset.model.trust_remote_code,
    )
    fields.update(overrides)
    return PlanRequest(**fields)


def absolute(path: str | None) -> str | None:
    """A local path (model folder, tokenizer, dataset) made absolute, with ~ expanded."""
    return None if path is None else str(Path(path).expanduser().resolve())


def check_request(req: PlanRequest) -> None:
    """Values a request can hold that no plan can use; raises `BadValue` naming the field."""
    if not 1 <= req.effective_batch <= 1_000_000:
        raise BadValue("effective_batch", req.effective_batch, "must be between 1 and 1,000,000")
    if not 0 <= req.headroom < 1:
        raise BadValue("headroom", req.headroom, "must be a fraction in [0, 1)")
    if req.gpu_indices is not None and any(i < 0 for i in req.gpu_indices):
        raise BadValue("gpus", req.gpu_indices, "GPU indices are 0 or more")
    if not 1 <= req.gpu_count <= MAX_GPUS_PER_NODE:
        raise BadValue("gpu_count", req.gpu_count, f"GPUs per node must be between 1 and {MAX_GPUS_PER_NODE}")
    if not 1 <= req.nodes <= MAX_NODES:
        raise BadValue("nodes", req.nodes, f"must be between 1 and {MAX_NODES}")


def read_hardware(req: PlanRequest) -> HardwareInventory:
    """This machine's GPUs (NVML) or the catalog card the request names."""
    return detect_hardware(req.gpu, req.gpu_count)


def read_model(req: PlanRequest) -> ModelSpec:
    """The model's shape from a local folder, the HF cache or the catalog (offline)."""
    return resolve_model(req.model_path or req.model)


def tokenizer_for(req: PlanRequest) -> CountingTokenizer:
    """The tokenizer the profile counts with: the given one, the model's own, or a labelled heuristic."""
    from tuiwiz.data import load_tokenizer

    return load_tokenizer(req.tokenizer or req.model_path, model_id=req.model)


def profile_for(
    req: PlanRequest,
    spec: ModelSpec,
    tokenizer: CountingTokenizer | None = None,
    *,
    progress: Callable[[int, int | None], None] | None = None,
    cancel: threading.Event | None = None,
) -> LengthProfile | None:
    """Read and profile the request's dataset (None without one). The slow, I/O half of planning."""
    if req.dataset is None:
        return None
    from tuiwiz.data import profile_dataset

    tok = tokenizer if tokenizer is not None else tokenizer_for(req)
    return profile_dataset(req.dataset, tok, percentile=req.percentile, max_positions=spec.max_positions,
                           micro_batch=req.knobs.micro_batch_size, batching=req.knobs.batching, sample=req.sample,
                           progress=progress, cancel=cancel, strict=req.strict)


def plan_request(
    req: PlanRequest,
    *,
    progress: Callable[[int, int | None], None] | None = None,
    cancel: threading.Event | None = None,
    calibrate: bool = False,
) -> Plan:
    """Read everything the request names, then plan: what `tuiwiz --auto` and presets run.

    `calibrate` also reads this machine's calibration store (the user's measured runs); it is
    off unless a front end asks, so shipped presets and tests never depend on a local store.
    """
    check_request(req)
    hw = read_hardware(req)
    spec = read_model(req)
    profile = profile_for(req, spec, progress=progress, cancel=cancel)
    calibration = read_calibration(select_gpus(req, hw)) if calibrate else None
    return make_plan(req, hw, spec, profile, calibration=calibration)


def select_gpus(req: PlanRequest, hw: HardwareInventory) -> tuple[GpuInfo, ...]:
    """The GPUs the plan is for: the chosen NVML devices, or the catalog cards."""
    if hw.source != "nvml":
        if req.gpu_indices:
            raise BadValue("gpus", ",".join(map(str, req.gpu_indices)),
                           "no GPU is visible on this machine (no NVML); name a catalog card to plan for instead")
        return hw.gpus
    if req.gpu_indices:
        return hw.selected(list(req.gpu_indices))
    if req.gpu_count > len(hw.gpus):
        raise BadValue("gpu_count", req.gpu_count, f"this machine has {len(hw.gpus)} GPU(s); name a catalog card "
                       "to plan for more")
    return hw.gpus[: max(1, req.gpu_count)]


def make_plan(req: PlanRequest, hw: HardwareInventory, spec: ModelSpec, profile: LengthProfile | None, *,
              with_suggestions: bool = True, calibration: Calibration | None = None) -> Plan:
    """Plan a run from what was read: a pure function (no I/O), about a millisecond.

    A `calibration` applies only when it was measured on the plan's card."""
    check_request(req)
    gpus = select_gpus(req, hw)
    if calibration is not None and not all(calibration.matches(g) for g in gpus):
        calibration = None
    warnings: list[str] = []
    knobs = req.knobs
    fixed = set(req.fixed)
    if hw.note:
        warnings.append(hw.note)
    if not all(g.bf16 for g in gpus) and knobs.compute_dtype == "bf16":
        knobs = knobs.replace(compute_dtype="fp16")
        warnings.append(f"{gpus[0].name} has no bf16: computing in fp16")
    fp16_upcast = (knobs.compute_dtype == "fp16" and knobs.residual != "fp32" and "residual" not in fixed
                   and knobs.trainer == "tuiwiz")
    if fp16_upcast:
        # the bf16 stream was chosen on bf16 evidence (bench/bench_residual.py); an fp16 stream has
        # 5 exponent bits and can overflow, so fp16 keeps peft's fp32 upcast unless the user holds it
        # (a sharded strategy still needs the 16-bit stream: the advisor says so when it picks one)
        knobs = knobs.replace(residual="fp32")
    if knobs.attn == "flash_attention_2" and not all(g.bf16 for g in gpus):
        warnings.append(f"FlashAttention 2 needs an Ampere (sm80) or newer GPU; {gpus[0].name} is older: "
                        "use sdpa")
    if profile is not None:
        if "cutoff_len" not in fixed:
            knobs = knobs.replace(cutoff_len=profile.suggested_cutoff)
            fixed.add("cutoff_len")
    if knobs.cutoff_len > spec.max_positions:
        warnings.append(f"cutoff {knobs.cutoff_len} exceeds {spec.id}'s {spec.max_positions} positions")

    free = min(g.free_gib for g in gpus)
    advice = advise(spec, knobs, budget_bytes(free, req.headroom), gpus=len(gpus) * req.nodes,
                    target_effective_batch=req.effective_batch, fixed=frozenset(fixed), calibration=calibration,
                    profile=profile, gpus_per_node=len(gpus))
    problem = strategy_problem(advice.knobs)
    if problem:
        raise BadValue("strategy", advice.knobs.strategy, problem)
    if fp16_upcast and advice.knobs.residual == "fp32":
        warnings.append("fp16 compute: residual stream fp32 (peft's k-bit preparation), as fp16 activations "
                        "can overflow; hold the residual stream at bf16 to keep it 16-bit")
    plan = Plan(req, hw, tuple(gpus), spec, advice, profile, tuple(warnings), calibration=calibration)
    warnings.extend(_host_ram_warnings(plan))
    plan = dataclasses.replace(plan, warnings=tuple(warnings))
    if advice.fits or not with_suggestions:
        return plan
    return dataclasses.replace(plan, suggestions=suggestions_for(plan))


def _host_ram_warnings(plan: Plan) -> list[str]:
    """What the plan asks of host RAM: an offloading plan always says it, and this machine's RAM
    is checked when the plan is for this machine's GPUs."""
    ram, host = plan.host_ram, plan.hardware.host
    out = []
    if offloads(plan.knobs.strategy):
        where = "this machine" if plan.hardware.source == "nvml" else "each training machine"
        out.append(f"{plan.knobs.strategy} keeps the shards in host RAM: {where} needs about {ram.peak_gib:.0f} GiB "
                   "of RAM")
    if plan.hardware.source == "nvml" and ram.peak_gib > host.ram_total_gib:
        out.append(f"host RAM: the plan needs about {ram.peak_gib:.0f} GiB, this machine has {host.ram_total_gib:.0f}")
    return out


#: Knobs whose value changes peak memory: releasing one the user held may make a plan fit.
MEMORY_KNOBS = ("micro_batch_size", "grad_checkpointing", "lora_rank", "target_modules", "lora_dropout",
                "optim", "attn", "batching")


def _held(req: PlanRequest, **knob_values: Any) -> PlanRequest:
    """The request with these knob values added as flags would: set and held."""
    return dataclasses.replace(req, knobs=req.knobs.replace(**knob_values), fixed=req.fixed | frozenset(knob_values))


def _knob_flags(values: dict[str, Any]) -> tuple[str, ...]:
    return tuple(x for name, v in values.items() for x in (flag_for(name), format_knob(name, v)))


def _checked(plan: Plan, text: str, flags: tuple[str, ...], req: PlanRequest,
             spec: ModelSpec | None = None, hw: HardwareInventory | None = None) -> Suggestion | None:
    """The suggestion if re-planning the changed request really fits, else None."""
    try:
        again = make_plan(req, hw or plan.hardware, spec or plan.spec, plan.profile, with_suggestions=False,
                          calibration=plan.calibration)
    except UserError:
        return None
    if not again.advice.fits:
        return None
    return Suggestion(f"{text}: peak {again.advice.estimate.peak_gib:.1f} GiB", flags, again.advice.estimate.peak_gib)


def _release_held(plan: Plan) -> list[Suggestion | None]:
    """Hand a knob the user held back to the advisor (one at a time, then all of them)."""
    req = plan.request
    held = [n for n in MEMORY_KNOBS if n in req.fixed]
    out: list[Suggestion | None] = []
    for names in [[n] for n in held] + ([held] if len(held) > 1 else []):
        if len(names) > 1 and any(s is not None for s in out):
            break  # releasing all of them at once is only worth saying when no single one is enough
        freed = make_plan(dataclasses.replace(req, fixed=req.fixed - frozenset(names)), plan.hardware, plan.spec,
                          plan.profile, with_suggestions=False, calibration=plan.calibration)
        if not freed.advice.fits:
            continue
        values = {n: getattr(freed.knobs, n) for n in names}
        words = ", ".join(f"{KNOB_BY_NAME[n].label} {format_knob(n, values[n])} (you set "
                          f"{format_knob(n, getattr(req.knobs, n))})" for n in names)
        out.append(_checked(plan, f"let the advisor choose: {words}", _knob_flags(values), _held(req, **values)))
    return out


def _shorter_cutoff(plan: Plan) -> Suggestion | None:
    """The longest cutoff (a multiple of 64) at which the re-planned run fits, by bisection."""
    k, req = plan.knobs, plan.request

    def fits(n: int) -> bool:
        try:
            again = make_plan(_held(req, cutoff_len=n * 64), plan.hardware, plan.spec, plan.profile,
                              with_suggestions=False, calibration=plan.calibration)
        except UserError:
            return False
        return again.advice.fits

    lo, hi = 1, (k.cutoff_len - 1) // 64
    if hi < 1 or not fits(1):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    cut = lo * 64
    lost = ""
    if plan.profile is not None:
        n = plan.profile.at_cutoff(cut, 1, k.batching).truncated
        lost = f" (truncates {n} sample{'s' if n != 1 else ''})"
    return _checked(plan, f"a shorter cutoff, {cut} tokens{lost}", _knob_flags({"cutoff_len": cut}),
                    _held(req, cutoff_len=cut))


def _lighter_stack(plan: Plan) -> list[Suggestion | None]:
    """The fused loss, then a 4-bit base: same model, same data, less memory."""
    k, req = plan.knobs, plan.request
    out: list[Suggestion | None] = []
    if k.loss == "standard":
        out.append(_checked(plan, "the chunked (fused) loss, which never materialises the full logits",
                            _knob_flags({"loss": "chunked"}), _held(req, loss="chunked")))
    if k.quant_bits > 4:
        out.append(_checked(plan, "a 4-bit base", _knob_flags({"quant_bits": 4}), _held(req, quant_bits=4)))
    return out


def _smaller_model(plan: Plan) -> Suggestion | None:
    """The largest catalog model smaller than this one that fits as planned."""
    for alt in sorted(catalog_specs(), key=lambda m: -m.total_params):
        if alt.total_params >= plan.spec.total_params:
            continue
        req = dataclasses.replace(plan.request, model=alt.id, model_path=None)
        found = _checked(plan, f"a smaller model, {alt.id} ({alt.params_b:.1f}B)", ("--model", alt.id), req, spec=alt)
        if found is not None:
            return found
    return None


def _bigger_gpu(plan: Plan) -> Suggestion | None:
    req = plan.request
    smallest = plan.knobs.replace(**{n: v for n, v in (("micro_batch_size", 1), ("grad_checkpointing", True))
                                     if n not in req.fixed})
    floor = estimate_memory(plan.spec, smallest, plan.world_size).peak_bytes
    for gb in range(max(1, math.ceil(floor / GIB / (1 - req.headroom))), 1025):
        card = catalog_gpu(f"{gb}GB")
        hw = HardwareInventory(gpus_from_catalog(card, len(plan.gpus)), plan.hardware.host, "catalog")
        found = _checked(plan, f"a GPU with {gb} GB free (this plan has {plan.advice.budget_gib:.1f} GiB to use)",
                         ("--gpu", f"{gb}GB"), dataclasses.replace(req, gpu=f"{gb}GB", gpu_indices=None), hw=hw)
        if found is not None:
            return found
    return None


#: GPU counts per node a "more GPUs" suggestion tries (the common machine shapes).
MORE_GPUS = (2, 4, 8)


def _card_name(plan: Plan) -> str:
    """The card to ask for more of: the one the user named, else this machine's (by catalog name or size)."""
    if plan.request.gpu and plan.request.gpu.lower() != "auto":
        return plan.request.gpu
    g = plan.gpus[0]
    try:
        card = catalog_gpu(g.name)
    except UserError:
        card = None
    return g.name if card is not None and not card.name.startswith("generic") else f"{round(g.total_gib)}GB"


def _more_gpus(plan: Plan) -> Suggestion | None:
    """The fewest more GPUs of this card per node that fit: sharded (FSDP-QLoRA) when a whole copy
    does not fit one card, each re-planned with the strategy left to the advisor."""
    req, name = plan.request, _card_name(plan)
    for n in (m for m in MORE_GPUS if m > len(plan.gpus)):
        hw = HardwareInventory(gpus_from_catalog(catalog_gpu(name), n), plan.hardware.host, "catalog")
        wider = dataclasses.replace(req, gpu=name, gpu_indices=None, gpu_count=n, fixed=req.fixed - {"strategy"})
        try:
            again = make_plan(wider, hw, plan.spec, plan.profile, with_suggestions=False, calibration=plan.calibration)
        except UserError:
            continue
        if again.advice.fits:
            s = again.knobs.strategy
            flags = ("--gpu", name, "--num-gpus", str(n)) + (("--strategy", s) if "strategy" in req.fixed else ())
            return Suggestion(f"{n} x {name} per node, strategy {s} ({TITLES[s]}): peak "
                              f"{again.advice.estimate.peak_gib:.1f} GiB per GPU", flags, again.advice.estimate.peak_gib)
    return None


def suggestions_for(plan: Plan) -> tuple[Suggestion, ...]:
    """What would fit, cheapest for the user first: release a knob they held, a shorter cutoff, a
    lighter loss or base, more GPUs of the same card (sharded with FSDP-QLoRA when a whole copy is
    too big for one), a smaller model, a bigger GPU. Every one is re-planned before it is offered."""
    found = [*_release_held(plan), _shorter_cutoff(plan), *_lighter_stack(plan), _more_gpus(plan),
             _smaller_model(plan), _bigger_gpu(plan)]
    return tuple(s for s in found if s is not None)
