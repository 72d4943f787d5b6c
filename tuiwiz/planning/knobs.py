"""Training knobs: everything about a run that changes its memory or its schedule.

One frozen pydantic model shared by the estimator, the advisor, presets, the TUI and
the training worker, so the plan that was estimated is exactly the run that is launched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuiwiz.errors import BadValue

QuantBits = Literal[4, 8, 16]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"]
AttnImpl = Literal["sdpa", "flash_attention_2", "eager"]
LossImpl = Literal["chunked", "standard"]
ComputeDtype = Literal["bf16", "fp16"]
#: How samples share a micro-batch (trl 1.16 SFTConfig): padded to the micro-batch's longest;
#: packed whole into cutoff-long rows (trl's "bfd"); or padding_free, laid end to end in one row.
#: packed and padding_free run flattened with position ids, so no slot is padding and samples
#: stay apart (flash-attention varlen, or transformers' block-diagonal mask for sdpa and eager).
Batching = Literal["padded", "packed", "padding_free"]
#: The trainer that runs the plan; its stack (residual dtype, adapter dtype, fused loss) is
#: what the estimate models (tuiwiz.planning.stacks).
Trainer = Literal["tuiwiz", "llamafactory", "axolotl"]
Residual = Literal["fp32", "bf16"]
#: How a run spreads over its GPUs (tuiwiz.planning.strategy): replicated (DDP), FSDP-QLoRA, or
#: DeepSpeed ZeRO-3, the last two optionally offloading their shards to host RAM.
Strategy = Literal["ddp", "fsdp", "fsdp_offload", "zero3", "zero3_offload"]

#: Names of the linear projections LoRA can target, per role. Families map their own
#: module names onto these roles in `tuiwiz.models` (Phi-3 fuses qkv and gate/up).
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR_TARGETS = ATTN_TARGETS + MLP_TARGETS

TargetModules = Union[Literal["attn", "all-linear"], list[str]]

#: Architectures transformers 5.23 refuses to run with SDPA ("does not support an attention
#: implementation through torch.nn.functional.scaled_dot_product_attention yet").
NO_SDPA_MODEL_TYPES = frozenset({"gemma2"})


def attn_for_model(model_type: str | None, attn: str) -> str:
    """The attention a model of `model_type` really runs with when `attn` is asked for: eager
    where transformers has no SDPA. Shared by the estimate, the advisor and the worker."""
    if attn == "sdpa" and model_type in NO_SDPA_MODEL_TYPES:
        return "eager"
    return attn


LrScheduler = Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                      "polynomial", "inverse_sqrt"]

#: How a knob is edited: a whole number, a decimal, on/off, one of `choices`, or LoRA targets.
WidgetKind = Literal["int", "float", "switch", "choice", "targets"]


def knob(default: Any, flag: str, label: str, help: str, *, tui: bool = False, auto: bool = False,
         **bounds: Any) -> Any:
    """A `TrainingKnobs` field with what every front end needs to show it: the one place a knob
    gets its CLI flag, its TUI label and its help. `tui` puts it in the Plan screen's knob panel;
    `auto` lets a user type "auto" for it, which leaves it to the advisor (not held)."""
    extra = {"flag": flag, "label": label, "tui": tui, "auto": auto}
    return Field(default, description=help, json_schema_extra=extra, **bounds)


class TrainingKnobs(BaseModel):
    """Every knob a QLoRA run is planned and launched with.

    Defaults are what tuiwiz's own worker runs: NF4 with double quantization, bf16 compute,
    LoRA r=16 on all linear layers, paged 8-bit AdamW, SDPA attention, gradient checkpointing,
    and trl's chunked (fused) log-prob loss, which never materialises the full logits.
    Bounds reject values that pass a type check but are nonsense (`epochs: .inf`, alpha 1e29).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    cutoff_len: int = knob(2048, "--cutoff-len", "cutoff", "tokens per sample; longer ones are truncated",
                           tui=True, ge=16, le=1_048_576)
    micro_batch_size: int = knob(1, "--micro-batch", "micro-batch", "samples per GPU per forward pass",
                                 tui=True, ge=1, le=4096)
    grad_accum: int = knob(16, "--grad-accum", "accumulation", "micro-batches per optimizer step",
                           tui=True, ge=1, le=65536)
    lora_rank: int = knob(16, "--lora-rank", "LoRA rank", "LoRA rank r", tui=True, ge=1, le=1024)
    lora_alpha: int = knob(32, "--lora-alpha", "LoRA alpha", "LoRA scaling alpha (default 2 x rank)",
                           tui=True, ge=1, le=65536)
    lora_dropout: float = knob(0.05, "--lora-dropout", "LoRA dropout", "dropout on the LoRA input (0 saves memory)",
                               tui=True, ge=0.0, lt=1.0)
    target_modules: TargetModules = knob("all-linear", "--target-modules", "targets",
                                         "LoRA targets: attn, all-linear or a comma list", tui=True)
    grad_checkpointing: bool = knob(True, "--grad-checkpointing", "checkpointing",
                                    "recompute activations in backward (saves memory, ~30% slower)", tui=True)
    optim: Optimizer = knob("paged_adamw_8bit", "--optim", "optimizer", "optimizer", tui=True)
    quant_bits: QuantBits = knob(4, "--quant", "quantization", "bits of the frozen base weights")
    double_quant: bool = knob(True, "--double-quant", "double quant", "quantize the 4-bit constants too")
    compute_dtype: ComputeDtype = knob("bf16", "--compute-dtype", "compute dtype",
                                       "bf16 (Ampere and newer) or fp16")
    attn: AttnImpl = knob("sdpa", "--attn", "attention", "attention implementation")
    loss: LossImpl = knob("chunked", "--loss", "loss",
                          "chunked: the trainer's fused loss (no full logits); standard: full logits")
    trainer: Trainer = knob("tuiwiz", "--trainer", "trainer",
                            "the trainer that runs the plan: memory is estimated for its stack")
    residual: Residual = knob("bf16", "--residual", "residual stream",
                              "dtype of a k-bit base's embeddings, norms and residual stream: bf16 (the "
                              "compute dtype, as LLaMA-Factory and Axolotl run it; an fp16 plan keeps fp32 "
                              "unless you hold this) or fp32 (peft's k-bit preparation; about twice the "
                              "activations)")
    batching: Batching = knob("padded", "--batching", "batching",
                              "padded (to each micro-batch's longest), packed (whole samples in cutoff-long "
                              "rows; micro-batch counts rows) or padding_free (samples end to end); "
                              "auto: the advisor's choice from the data", auto=True)
    liger: bool = knob(False, "--liger", "Liger kernels",
                       "Liger's RMSNorm, SwiGLU and RoPE kernels (CUDA, needs tuiwiz[liger])")
    epochs: float = knob(1.0, "--epochs", "epochs", "passes over the data", tui=True, gt=0, le=1000)
    max_steps: int | None = knob(None, "--max-steps", "max steps",
                                 "stop after this many optimizer steps (overrides epochs)", ge=1, le=10**9)
    learning_rate: float = knob(2e-4, "--lr", "learning rate", "peak learning rate", tui=True, gt=0, lt=1)
    lr_scheduler: LrScheduler = knob("cosine", "--lr-scheduler", "LR schedule", "learning-rate schedule")
    warmup_ratio: float = knob(0.03, "--warmup-ratio", "warmup", "fraction of steps spent warming up",
                               ge=0, lt=1)
    val_ratio: float = knob(0.1, "--val-ratio", "validation", "fraction of samples held out", ge=0, lt=1)
    seed: int = knob(42, "--seed", "seed", "random seed (shuffle, LoRA init, split)", ge=0, le=2**32 - 1)
    logging_steps: int = knob(1, "--logging-steps", "log every", "log every N optimizer steps", ge=1, le=10**9)
    save_steps: int = knob(100, "--save-steps", "save every", "checkpoint every N optimizer steps", ge=1, le=10**9)
    eval_steps: int | None = knob(None, "--eval-steps", "eval every",
                                  "evaluate every N steps (default: when saving)", ge=1, le=10**9)
    early_stopping_patience: int | None = knob(None, "--early-stopping", "early stopping",
                                               "stop after N evaluations without improvement", ge=1, le=10**6)
    strategy: Strategy = knob("ddp", "--strategy", "strategy",
                              "how the run spreads over GPUs: ddp (a whole copy per GPU), fsdp (FSDP-QLoRA, "
                              "weights sharded), zero3 (DeepSpeed ZeRO-3); *_offload keeps the shards in host "
                              "RAM; auto: the cheapest that fits", auto=True)

    @model_validator(mode="before")
    @classmethod
    def _packing_was_batching(cls, data: Any) -> Any:
        """Presets written before `batching` said `packing: true/false`: read them as packed/padded."""
        if isinstance(data, dict) and "packing" in data:
            data = dict(data)
            packing = data.pop("packing")
            if not isinstance(packing, bool):
                raise ValueError(f"packing must be true or false, not {packing!r} (it is now batching: packed)")
            wanted = "packed" if packing else "padded"
            if data.setdefault("batching", wanted) != wanted:
                raise ValueError(f"packing: {str(packing).lower()} contradicts batching: {data['batching']}")
        return data

    @field_validator("target_modules")
    @classmethod
    def _known_or_list(cls, v: TargetModules) -> TargetModules:
        if isinstance(v, list):
            if not v:
                raise ValueError("give at least one module name, or 'attn' / 'all-linear'")
            if any(not isinstance(x, str) or not x.strip() for x in v):
                raise ValueError("module names must be non-empty strings")
        return v

    def targets(self) -> str | tuple[str, ...]:
        """The LoRA targets in the hashable form `ModelSpec.resolve_targets` takes."""
        return self.target_modules if isinstance(self.target_modules, str) else tuple(self.target_modules)

    def effective_batch(self, gpus: int = 1) -> int:
        return self.micro_batch_size * self.grad_accum * max(1, gpus)

    def replace(self, **changes: object) -> "TrainingKnobs":
        """A copy with `changes` applied and validated (a bad value raises `BadValue` naming the knob)."""
        return knobs_from({**self.model_dump(), **changes})


# ---- the knob registry: flags, labels, widgets and parsing, all from the fields above -------------

@dataclass(frozen=True)
class KnobInfo:
    """What a front end needs to offer one knob: generated from its field, never typed by hand."""

    name: str
    flag: str
    label: str
    help: str
    kind: WidgetKind
    choices: tuple[Any, ...]
    optional: bool
    tui: bool
    default: Any
    #: "auto" is a value a user may type: it leaves the knob to the advisor (`parse_knob` gives None).
    auto: bool = False


def _kind_and_choices(annotation: Any) -> tuple[WidgetKind, tuple[Any, ...], bool]:
    args = [a for a in get_args(annotation) if a is not type(None)]
    optional = len(args) < len(get_args(annotation))
    if annotation is TargetModules:
        return "targets", get_args(get_args(TargetModules)[0]), False
    if optional:
        annotation = args[0]
    if get_origin(annotation) is Literal:
        return "choice", get_args(annotation), optional
    if annotation is bool:
        return "switch", (True, False), optional
    return ("int" if annotation is int else "float"), (), optional


def _registry() -> tuple[KnobInfo, ...]:
    out = []
    for name, f in TrainingKnobs.model_fields.items():
        extra = f.json_schema_extra or {}
        kind, choices, optional = _kind_and_choices(f.annotation)
        out.append(KnobInfo(name, extra["flag"], extra["label"], f.description or "", kind, choices, optional,
                            bool(extra.get("tui")), f.default, bool(extra.get("auto"))))
    return tuple(out)


#: Every knob, in the order the CLI, the report and the TUI show them.
KNOBS: tuple[KnobInfo, ...] = _registry()
KNOB_BY_NAME: dict[str, KnobInfo] = {k.name: k for k in KNOBS}
NONE_WORDS = ("none", "auto")


def parse_knob(name: str, text: str) -> Any:
    """A knob's value from what a user typed (a CLI flag or a TUI field). Raises `BadValue`.

    None means unset: "none" for an optional knob, "auto" for a knob the advisor chooses."""
    info = KNOB_BY_NAME[name]
    t = text.strip()
    if (info.optional and t.lower() in NONE_WORDS) or (info.auto and t.lower() == "auto"):
        return None
    if info.kind == "switch":
        if t.lower() in ("on", "true", "yes", "1"):
            return True
        if t.lower() in ("off", "false", "no", "0"):
            return False
        raise BadValue(name, text, "expected on or off")
    if info.kind == "targets":
        if t in info.choices:
            return t
        names = [x.strip() for x in t.split(",") if x.strip()]
        if not names:
            raise BadValue(name, text, "give attn, all-linear or a comma-separated list of module names")
        return names
    if info.kind == "choice":
        for c in info.choices:
            if str(c) == t:
                return c
        raise BadValue(name, text, "choose one of " + ", ".join(map(str, info.choices)))
    try:
        return int(t) if info.kind == "int" else float(t)
    except ValueError:
        raise BadValue(name, text, "expected a whole number" if info.kind == "int" else "expected a number") from None


def format_knob(name: str, value: Any) -> str:
    """A knob's value as `parse_knob` reads it back (the show-command and the report use it)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def knobs_from(data: dict[str, Any]) -> TrainingKnobs:
    """Validate plain data as knobs; the first problem becomes a `BadValue` naming the knob."""
    try:
        return TrainingKnobs.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        field = str(e["loc"][0]) if e["loc"] else "training"
        why = e["msg"].removeprefix("Value error, ")
        raise BadValue(field, e.get("input"), why[0].lower() + why[1:] if why else why) from None
