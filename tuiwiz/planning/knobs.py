"""Training knobs: everything about a run that changes its memory or its schedule.

One frozen pydantic model shared by the estimator, the advisor, presets, the TUI and
the training worker, so the plan that was estimated is exactly the run that is launched.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

QuantBits = Literal[4, 8, 16]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"]
AttnImpl = Literal["sdpa", "flash_attention_2", "eager"]
LossImpl = Literal["chunked", "standard"]
ComputeDtype = Literal["bf16", "fp16"]

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


class TrainingKnobs(BaseModel):
    """Every knob a QLoRA run is planned and launched with.

    Defaults are what tuiwiz's own worker runs: NF4 with double quantization, bf16 compute,
    LoRA r=16 on all linear layers, paged 8-bit AdamW, SDPA attention, gradient checkpointing,
    and trl's chunked (fused) log-prob loss, which never materialises the full logits.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    quant_bits: QuantBits = 4
    double_quant: bool = True
    compute_dtype: ComputeDtype = "bf16"
    lora_rank: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: TargetModules = "all-linear"
    optim: Optimizer = "paged_adamw_8bit"
    grad_checkpointing: bool = True
    attn: AttnImpl = "sdpa"
    micro_batch_size: int = Field(1, ge=1, le=4096)
    grad_accum: int = Field(16, ge=1, le=65536)
    cutoff_len: int = Field(2048, ge=16, le=1_048_576)
    packing: bool = False
    loss: LossImpl = "chunked"
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    val_ratio: float = Field(0.1, ge=0, lt=1)
    seed: int = 42
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(100, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)

    @field_validator("target_modules")
    @classmethod
    def _known_or_list(cls, v: TargetModules) -> TargetModules:
        if isinstance(v, list):
            if not v:
                raise ValueError("give at least one module name, or 'attn' / 'all-linear'")
            if any(not isinstance(x, str) or not x.strip() for x in v):
                raise ValueError("module names must be non-empty strings")
        return v

    def target_list(self) -> tuple[str, ...]:
        """The canonical projection names LoRA is attached to."""
        if self.target_modules == "attn":
            return ATTN_TARGETS
        if self.target_modules == "all-linear":
            return ALL_LINEAR_TARGETS
        return tuple(self.target_modules)

    def effective_batch(self, gpus: int = 1) -> int:
        return self.micro_batch_size * self.grad_accum * max(1, gpus)

    def replace(self, **changes: object) -> "TrainingKnobs":
        """A copy with `changes` applied and validated."""
        return TrainingKnobs.model_validate({**self.model_dump(), **changes})
