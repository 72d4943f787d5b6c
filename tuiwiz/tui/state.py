"""The wizard's single source of truth, kept free of Textual so it can be tested directly.

Every screen reads and edits this one object, so moving between steps loses nothing: the
request, what was read for it (hardware, model, tokenizer, profile), the plan, and how the
dataset profile is going. Re-planning is the same pure `make_plan` that `tuiwiz --auto`
calls after reading its inputs, so the wizard and the CLI always agree; it takes about a
millisecond.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from tuiwiz.errors import BadValue, UserError
from tuiwiz.hardware import (DEFAULT_CATALOG_GPU, MAX_GPUS_PER_NODE, MAX_NODES, GpuInfo, HardwareInventory, catalog_gpu,
                             gpus_from_catalog)
from tuiwiz.planner import Plan, PlanRequest, check_request, flag_for, make_plan
from tuiwiz.planning.advisor import DEFAULT_EFFECTIVE_BATCH, DEFAULT_HEADROOM
from tuiwiz.planning.knobs import KNOB_BY_NAME, KNOBS, TrainingKnobs, format_knob
from tuiwiz.preset import DatasetRef

if TYPE_CHECKING:
    from tuiwiz.data import CountingTokenizer, LengthProfile
    from tuiwiz.models import ModelSpec

#: Where the dataset profile stands. `approximate`: done, but counted with a stand-in tokenizer.
ProfileState = Literal["idle", "running", "done", "approximate", "failed", "cancelled"]
DEFAULT_PERCENTILE = 99.0
#: Request fields the TUI names differently from their field name (knobs have their own labels).
REQUEST_LABELS = {"effective_batch": "eff. batch", "gpu": "GPU card", "gpus": "GPUs"}


def label_of(field_name: str) -> str:
    """A knob or request field as the TUI names it (its label, never its CLI flag)."""
    info = KNOB_BY_NAME.get(field_name)
    if info is not None:
        return info.label
    return REQUEST_LABELS.get(field_name, field_name.replace("_", " "))


@dataclass(frozen=True)
class ProfileStatus:
    """How the dataset profile is going, in a state the screens colour by and words they show."""

    state: ProfileState
    text: str
    done: int = 0
    total: int | None = None

    @property
    def busy(self) -> bool:
        return self.state == "running"


@dataclass(frozen=True)
class Preview:
    """One sample as the trainer sees it: (token text, trained) pairs, counted by `tokenizer`."""

    index: int
    pieces: tuple[tuple[str, bool], ...]
    where: str
    tokenizer: str


def tokenizer_origin(req: PlanRequest, tok: CountingTokenizer) -> str:
    """Where this tokenizer came from, in words: what auto found, or why it had to estimate."""
    if req.tokenizer:
        return "the tokenizer you chose"
    if not tok.approximate:
        return "the model's own, from its folder" if req.model_path else "the model's own, from the HF cache"
    return f"{req.model}'s own tokenizer was not found (no model folder, not in the HF cache)"


def no_dataset_status() -> ProfileStatus:
    return ProfileStatus("idle", "no dataset: the plan uses the cutoff you set")


@dataclass
class WizardState:
    """What the user chose so far, what was read or computed from it, and how the reads are going."""

    request: PlanRequest
    hardware: HardwareInventory | None = None  # as detected (NVML, or the catalog fallback)
    spec: ModelSpec | None = None
    profile: LengthProfile | None = None
    tokenizer: CountingTokenizer | None = None  # the tokenizer the profile counts (or counted) with
    profile_status: ProfileStatus = field(default_factory=no_dataset_status)
    #: which profiling request is current: a result for an older one is dropped
    profile_generation: int = 0
    preview: Preview | None = None
    plan: Plan | None = None
    plan_error: str | None = None
    plan_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.request.dataset is not None and self.profile_status.state == "idle":
            self.profile_status = ProfileStatus("idle", "waiting to profile")

    # ---- hardware -------------------------------------------------------------------
    @property
    def nvml(self) -> bool:
        return self.hardware is not None and self.hardware.source == "nvml"

    @property
    def catalog_card(self) -> str:
        """The catalog card planned for when NVML is absent or the user picked one."""
        return self.request.gpu or DEFAULT_CATALOG_GPU

    def plan_hardware(self) -> HardwareInventory | None:
        """The inventory the plan is made for: this machine's GPUs, or one catalog card."""
        hw = self.hardware
        if hw is None:
            return None
        if self.nvml and not self.request.gpu:
            return hw
        card = catalog_gpu(self.catalog_card)
        return HardwareInventory(gpus_from_catalog(card, self.request.gpu_count), hw.host, "catalog", note=None)

    def selected_indices(self) -> tuple[int, ...]:
        if self.hardware is None or not self.nvml or self.request.gpu:
            return ()
        if self.request.gpu_indices:
            return self.request.gpu_indices
        return (self.hardware.gpus[0].index,) if self.hardware.gpus else ()

    def toggle_gpu(self, index: int) -> None:
        """Add or drop a GPU from the plan; at least one stays selected."""
        chosen = list(self.selected_indices())
        if index in chosen:
            if len(chosen) == 1:
                raise UserError("at least one GPU must stay selected.", field="gpus")
            chosen.remove(index)
        else:
            chosen.append(index)
        self.request = replace(self.request, gpu=None, gpu_indices=tuple(sorted(chosen)),
                               gpu_count=len(chosen))

    def use_card(self, name: str | None) -> None:
        """Plan for a catalog card (None: this machine's GPUs, when NVML works)."""
        if name is not None:
            catalog_gpu(name)  # validates
        self.request = replace(self.request, gpu=name, gpu_indices=None if name else self.request.gpu_indices,
                               gpu_count=self.request.gpu_count if name else 1,
                               nodes=self.request.nodes if name else 1)

    def set_card_count(self, count: int) -> None:
        """How many of the catalog card to plan for (1-64): FSDP shards across them when one is too small."""
        if not 1 <= count <= MAX_GPUS_PER_NODE:
            raise BadValue("gpu_count", count, f"plan for 1 to {MAX_GPUS_PER_NODE} cards")
        self.request = replace(self.request, gpu_count=count)

    def set_node_count(self, nodes: int) -> None:
        """How many machines of the catalog card's shape (1-1024): a run over several is exported as a
        SLURM job or a per-node torchrun script, not launched from here."""
        if not 1 <= nodes <= MAX_NODES:
            raise BadValue("nodes", nodes, f"plan for 1 to {MAX_NODES} nodes")
        self.request = replace(self.request, nodes=nodes)

    def update_gpus(self, gpus: list[GpuInfo] | tuple[GpuInfo, ...]) -> None:
        """Fresh NVML readings (from the polling worker) replace the detected ones."""
        if self.hardware is not None and self.nvml and gpus:
            self.hardware = replace(self.hardware, gpus=tuple(gpus))

    # ---- model, tokenizer and data --------------------------------------------------------
    def set_model(self, ref: str, spec: ModelSpec, is_path: bool) -> None:
        self.spec = spec
        self.request = replace(self.request, model=spec.id if is_path else ref,
                               model_path=ref if is_path else None)

    def set_tokenizer(self, path: str | None) -> None:
        """A tokenizer folder or tokenizer.json; None (or "auto") finds the model's own."""
        text = (path or "").strip()
        self.request = replace(self.request, tokenizer=None if text.lower() in ("", "auto") else text)

    def set_dataset(self, dataset: DatasetRef | None) -> None:
        """A new file or layout: the old profile and preview no longer apply."""
        self.request = replace(self.request, dataset=dataset)
        self.profile = None
        self.preview = None
        if dataset is None:
            self.profile_generation += 1  # a profile still running is for another file
            self.profile_status = no_dataset_status()

    def profiling_started(self) -> int:
        """Forget the old profile; returns the generation the new result must carry."""
        self.profile_generation += 1
        self.profile = None
        self.preview = None
        self.tokenizer = None
        self.profile_status = ProfileStatus("running", "reading the tokenizer…")
        return self.profile_generation

    def tokenizer_chosen(self, tok: CountingTokenizer) -> None:
        self.tokenizer = tok
        if self.profile_status.busy:
            self.profile_status = replace(self.profile_status, text=f"counting with {tok.name}…")

    def profiling_progress(self, done: int, total: int | None) -> None:
        if self.profile_status.busy:
            self.profile_status = replace(self.profile_status, done=done, total=total)

    def profiling_done(self, profile: LengthProfile, tok: CountingTokenizer) -> None:
        self.profile, self.tokenizer = profile, tok
        origin = tokenizer_origin(self.request, tok)
        self.profile_status = ProfileStatus("approximate", f"approximate: {origin}") if tok.approximate \
            else ProfileStatus("done", f"exact: {origin}")

    def profiling_failed(self, message: str, cancelled: bool = False) -> None:
        self.profile = None
        self.profile_status = ProfileStatus("cancelled", "cancelled: the plan uses the cutoff you set") if cancelled \
            else ProfileStatus("failed", f"failed: {message}")

    @property
    def provisional(self) -> bool:
        """True while the dataset's token lengths, which set the cutoff, are still being read."""
        return (self.request.dataset is not None and self.profile is None
                and self.profile_status.state in ("idle", "running") and "cutoff_len" not in self.request.fixed)

    # ---- knobs ------------------------------------------------------------------------
    @property
    def knobs(self) -> TrainingKnobs:
        return self.plan.knobs if self.plan is not None else self.request.knobs

    def set_knob(self, name: str, value: Any) -> None:
        """Hold a knob at the user's value (validated: a bad one raises `BadValue`)."""
        knobs = self.request.knobs.replace(**{name: value})
        self.request = replace(self.request, knobs=knobs, fixed=self.request.fixed | {name})

    def set_effective_batch(self, value: int) -> None:
        """A target effective batch: the advisor re-derives accumulation to reach it."""
        default_accum = TrainingKnobs().grad_accum
        req = replace(self.request, effective_batch=value, knobs=self.request.knobs.replace(grad_accum=default_accum),
                      fixed=(self.request.fixed - {"grad_accum"}) | {"effective_batch"})
        check_request(req)
        self.request = req

    def release_knobs(self) -> None:
        """Hand every knob back to the advisor (the knobs it does not choose go back to their defaults)."""
        self.request = replace(self.request, knobs=TrainingKnobs(), fixed=frozenset(),
                               effective_batch=DEFAULT_EFFECTIVE_BATCH)

    # ---- planning ---------------------------------------------------------------------
    def replan(self) -> Plan | None:
        """Re-run the pure planner on the current choices. Errors are kept for the plan screen."""
        hw = self.plan_hardware()
        if hw is None or self.spec is None:
            return None
        started = time.perf_counter()
        try:
            self.plan = make_plan(self.request, hw, self.spec, self.profile)
        except UserError as e:
            self.plan_error = e.render(label_of)
            return None
        finally:
            self.plan_ms = (time.perf_counter() - started) * 1000
        self.plan_error = None
        return self.plan

    # ---- the equivalent command ---------------------------------------------------------
    def command_args(self) -> list[list[str]]:
        """`tuiwiz --auto` and one [flag, value] group per choice that reproduces this plan.

        Only the knobs the user set become flags: the advisor chooses the rest again."""
        req = self.request
        groups: list[list[str]] = [["tuiwiz", "--auto"]]

        def add(name: str, *value: str) -> None:
            groups.append([flag_for(name), *value])

        add("model", req.model_path or req.model)
        if req.tokenizer:
            add("tokenizer", req.tokenizer)
        if req.dataset is not None:
            add("dataset", req.dataset.path)
            if req.dataset.layout:
                add("layout", req.dataset.layout)
        if req.gpu or not self.nvml:
            add("gpu", self.catalog_card)
            if req.gpu_count > 1:
                add("gpu_count", str(req.gpu_count))
            if req.nodes > 1:
                add("nodes", str(req.nodes))
        elif req.gpu_indices:
            add("gpus", ",".join(map(str, req.gpu_indices)))
        for info in KNOBS:
            if info.name in req.fixed:
                add(info.name, format_knob(info.name, getattr(req.knobs, info.name)))
        if "effective_batch" in req.fixed:
            add("effective_batch", str(req.effective_batch))
        if req.headroom != DEFAULT_HEADROOM:
            add("headroom", f"{req.headroom:g}")
        if req.percentile != DEFAULT_PERCENTILE:
            add("percentile", f"{req.percentile:g}")
        if req.sample:
            add("sample", str(req.sample))
        if req.strict:
            add("strict")
        if req.trust_remote_code:
            add("trust_remote_code")
        return groups

    def auto_command(self) -> str:
        """The command, one flag per line with ` \\` continuations, so it copies cleanly into a shell."""
        return " \\\n  ".join(shlex.join(g) for g in self.command_args())

