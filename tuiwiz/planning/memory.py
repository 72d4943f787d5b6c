"""The memory estimate: a pure function from (ModelSpec, TrainingKnobs, GPU count) to a breakdown.

Each term is a small function whose docstring says why it has that size. The terms add up
to what `torch.cuda.max_memory_allocated` would report for one training step; the caching
allocator's slack gives the reserved figure; the CUDA context gives what NVML (and so the
OOM killer's view of the card) sees. See README "How the estimate works".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tuiwiz.models import ModelSpec
from tuiwiz.planning import activations as act
from tuiwiz.planning.knobs import TrainingKnobs
from tuiwiz.planning.strategy import assumption as strategy_assumption
from tuiwiz.planning.strategy import slack_fraction, state_terms
from tuiwiz.planning.stacks import residual_fp32, stack_of

if TYPE_CHECKING:
    from tuiwiz.planning.calibration import Calibration, CalibrationApplied

GIB = 1024**3

#: CUDA context + cuBLAS/cuDNN workspaces + kernels loaded by torch: visible to NVML, not to the
#: allocator. Uncalibrated prior (no GPU measured yet); `bench/memory_grid.py` fits it.
CUDA_CONTEXT_BYTES = int(0.55 * GIB)
#: Caching-allocator slack (fragmentation, cached blocks) as a fraction of the allocated peak, with
#: `expandable_segments` as the worker sets it. An uncalibrated prior, kept generous until a GPU's
#: own runs calibrate it (tuiwiz.planning.calibration): published HF runs show the driver-level peak
#: 16-32% above max allocated on long variable-length batches. 15% centres the 18 published HF-stack
#: whole-process rows (median error +2.8%, 3 of 18 under) and keeps every advisor plan under 90% of
#: the card at a 16% gap (`python bench/landing.py`; 6% put 106 of 859 plans over 90%).
ALLOCATOR_SLACK = 0.15
#: bitsandbytes 4-bit: one absmax per 64 weights (blocksize 64); double quantization stores
#: those as uint8 with one fp32 absmax per 256 of them (nested blocksize 256).
NF4_BLOCK = 64
NESTED_BLOCK = 256
#: bitsandbytes 8-bit optimizers keep fp32 state for tensors under this many elements.
BNB_MIN_8BIT_SIZE = 4096
BNB_OPT_BLOCK = 256

#: Breakdown groups reported in `--json` (`memory.breakdown_gib`).
GROUPS = ("weights", "lora", "gradients", "optimizer", "activations", "logits", "overhead")


@dataclass(frozen=True)
class Term:
    key: str
    label: str
    group: str
    bytes: int
    why: str

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass(frozen=True)
class MemoryEstimate:
    terms: tuple[Term, ...]
    allocated_bytes: int  # ~ torch.cuda.max_memory_allocated
    reserved_bytes: int  # ~ torch.cuda.max_memory_reserved
    peak_bytes: int  # ~ NVML used by this process: what decides OOM
    lora_params: int
    assumptions: tuple[str, ...] = field(default=())
    #: where the step peaks: "layer" (a decoder layer's recompute/backward) or "head"
    peak_at: str = "layer"
    #: how this GPU's measured runs moved the estimate (None: uncalibrated priors)
    calibration: CalibrationApplied | None = None

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def allocated_gib(self) -> float:
        return self.allocated_bytes / GIB

    @property
    def reserved_gib(self) -> float:
        return self.reserved_bytes / GIB

    def breakdown_bytes(self) -> dict[str, int]:
        out = {g: 0 for g in GROUPS}
        for t in self.terms:
            out[t.group] += t.bytes
        return out

    def breakdown_gib(self, ndigits: int = 3) -> dict[str, float]:
        return {k: round(v / GIB, ndigits) for k, v in self.breakdown_bytes().items()}

    def term(self, key: str) -> Term:
        return next(t for t in self.terms if t.key == key)


# ---- static terms ----------------------------------------------------------------------

def quantized_weights_bytes(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """Linear weights inside the decoder blocks, as bitsandbytes stores them.

    NF4 packs two weights per byte, plus one absmax per 64 weights: fp32 (0.5 bit/weight), or
    with double quantization uint8 plus an fp32 absmax per 256 blocks (~0.127 bit/weight).
    LLM.int8 keeps one byte per weight plus an fp32 scale per output row. 16-bit: 2 bytes.
    """
    n = spec.quantizable_params()
    if knobs.quant_bits == 4:
        blocks = math.ceil(n / NF4_BLOCK)
        absmax = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) if knobs.double_quant else 4 * blocks
        return math.ceil(n / 2) + absmax
    if knobs.quant_bits == 8:
        rows = spec.layers * sum(out for _, out in spec.linear_modules().values())
        return n + 4 * rows
    return 2 * n


def unquantized_weights_bytes(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """Embeddings, the output head (unless tied), norms, biases and MoE experts.

    bitsandbytes only quantizes `nn.Linear` inside the blocks. With a quantized base the worker
    runs peft's `prepare_model_for_kbit_training`, which casts every remaining 16-bit parameter
    to fp32, so these cost 4 bytes each (`residual: fp32`); a 16-bit base, `residual: bf16`,
    LLaMA-Factory and Axolotl keep them at 2 bytes (`tuiwiz.planning.stacks`).
    """
    counts = spec.param_counts()
    n = spec.total_params - spec.quantizable_params()
    if spec.is_moe:
        n = counts["embedding"] + counts["head"] + counts["norms"] + counts["experts"] + counts["router"]
        if spec.attention_bias:
            n += spec.layers * (spec.q_dim + 2 * spec.kv_dim)
    return n * (4 if residual_fp32(knobs) else 2)


def lora_param_count(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """LoRA adds A (r x d_in) and B (d_out x r) to each targeted linear in every layer."""
    targets = knobs.target_modules if not isinstance(knobs.target_modules, list) else tuple(knobs.target_modules)
    per_layer = sum(knobs.lora_rank * (d_in + d_out) for d_in, d_out in spec.resolve_targets(targets).values())
    return spec.layers * per_layer


def _lora_tensor_sizes(spec: ModelSpec, knobs: TrainingKnobs) -> list[int]:
    targets = knobs.target_modules if not isinstance(knobs.target_modules, list) else tuple(knobs.target_modules)
    sizes = []
    for d_in, d_out in spec.resolve_targets(targets).values():
        sizes += [knobs.lora_rank * d_in, knobs.lora_rank * d_out]
    return sizes * spec.layers


def lora_param_bytes(knobs: TrainingKnobs) -> int:
    """Bytes per adapter weight. trl 1.16's SFTTrainer casts the adapters of a quantized base to
    bf16 (QLoRA paper recipe); the worker keeps them fp32 under fp16 compute (the fp16 grad scaler
    cannot unscale bf16 gradients); on a 16-bit base peft's autocast_adapter_dtype keeps them fp32.
    LLaMA-Factory and Axolotl keep them fp32 on any base (`tuiwiz.planning.stacks`)."""
    bf16 = knobs.quant_bits in (4, 8) and knobs.compute_dtype == "bf16" and not stack_of(knobs).fp32_adapters
    return 2 if bf16 else 4


def lora_weights_bytes(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """Adapter weights: bf16 on a quantized base, fp32 on a 16-bit one (see lora_param_bytes)."""
    return lora_param_bytes(knobs) * lora_param_count(spec, knobs)


def lora_gradients_bytes(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """One gradient per adapter weight, in the adapter's dtype; the frozen base has none."""
    return lora_param_bytes(knobs) * lora_param_count(spec, knobs)


def optimizer_state_bytes(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """AdamW keeps two moments per trainable weight.

    adamw_torch / adamw_torch_fused: two moments in the parameter's dtype (torch allocates them
    with zeros_like): 4 bytes for bf16 adapters, 8 for fp32. bitsandbytes 8-bit (paged or not):
    two uint8 moments plus one fp32 absmax per 256 values each; tensors under 4096 elements
    keep fp32 moments. Paged states live in unified memory and are resident on the GPU while training.
    """
    if knobs.optim in ("adamw_torch", "adamw_torch_fused"):
        return 2 * lora_param_bytes(knobs) * lora_param_count(spec, knobs)
    total = 0
    for n in _lora_tensor_sizes(spec, knobs):
        if n < BNB_MIN_8BIT_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_OPT_BLOCK)
    return total


def dequant_workspace_bytes(spec: ModelSpec, knobs: TrainingKnobs) -> int:
    """bitsandbytes dequantizes a 4/8-bit weight to the compute dtype for each matmul of a
    base linear (forward, and again in backward for the input's gradient) and frees it right
    after: one transient bf16 copy of the largest linear (the transpose is a view).

    It is alive only around that matmul, when of the MLP's wide tensors only the matmul's
    input is (measured on CPU), so `estimate_memory` counts it against the layer's transients,
    not on top of them.
    """
    if knobs.quant_bits == 16:
        return 0
    biggest = max(a * b for a, b in spec.linear_modules().values())
    return 2 * biggest


def ddp_bucket_bytes(spec: ModelSpec, knobs: TrainingKnobs, gpus: int) -> int:
    """DDP copies gradients into all-reduce buckets of the same total size (only with >1 GPU)."""
    return lora_param_bytes(knobs) * lora_param_count(spec, knobs) if gpus > 1 else 0


# ---- the estimate ----------------------------------------------------------------------

def estimate_memory(spec: ModelSpec, knobs: TrainingKnobs, gpus: int = 1,
                    calibration: Calibration | None = None) -> MemoryEstimate:
    """Peak memory of one training step on each GPU; `gpus` is the run's GPU count over all nodes,
    and `knobs.strategy` says how they share the model (tuiwiz.planning.strategy).

    The step peaks either inside a decoder layer (its recompute and gradients, with the
    dequantized weight of a base matmul) or at the output head's first backward tile; the two
    never coexist (measured op by op on CPU), so the estimate takes the larger and reports the
    terms alive at that moment. What is kept through the whole step counts in both.
    """
    b, s = act.micro_batch_shape(knobs)  # rows x tokens: a flattened batching is one row
    kept = act.kept_layer_bytes(spec, knobs, b, s)
    # the busiest layer moment: its widest transients, or a base matmul's dequantized weight
    # beside that matmul's input, whichever is larger
    busiest = act.busiest_layer_bytes(spec, knobs, b, s)
    at_matmul = act.base_matmul_moment_bytes(spec, knobs, b, s)
    dequant = dequant_workspace_bytes(spec, knobs)
    if at_matmul + dequant > busiest:
        busiest = at_matmul
    else:
        dequant = 0
    outside = act.outside_saved_bytes(spec, knobs, b, s)
    head = act.head_work_bytes(spec, knobs, b, s)
    at_layer = busiest + dequant >= head
    where = ("peak inside a decoder layer (the head's tiles are freed by then)" if at_layer
             else "peak at the output head's first backward tile (no layer transients then)")
    # `why` texts are short enough for the 80-column table of `tuiwiz --auto`
    if knobs.grad_checkpointing:
        layers_why = "layer inputs + 1 layer" if at_layer else "checkpointed inputs"
    else:
        layers_why = "all layers + transients" if at_layer else "every layer's saved"
    # the states (weights, adapters, gradients, optimizer) as the run's strategy spreads them over
    # its GPUs (tuiwiz.planning.strategy); what follows is per GPU whatever the strategy
    terms = [
        *state_terms(spec, knobs, gpus),
        Term("activations", "activations", "activations", kept + (busiest if at_layer else 0), layers_why),
        Term("dequant_workspace", "dequantized weight (transient)", "activations", dequant if at_layer else 0,
             "largest linear, bf16" if at_layer and dequant else "freed at this peak"),
        Term("logits", "logits and loss", "logits", outside + (0 if at_layer else head),
             ("full logits, fp32" if knobs.loss == "standard"
              else "chunked; tiles freed" if at_layer else "chunked head's tiles")),
    ]
    allocated = sum(t.bytes for t in terms)
    fraction = slack_fraction(knobs)  # ALLOCATOR_SLACK, more for a sharded step (tuiwiz.planning.strategy)
    slack = int(fraction * allocated)
    terms.append(Term("allocator_slack", "allocator slack", "overhead", slack,
                      f"{fraction:.0%}, expandable_segments"))
    terms.append(Term("cuda_context", "CUDA context", "overhead", CUDA_CONTEXT_BYTES, "per process, NVML only"))
    context, applied = CUDA_CONTEXT_BYTES, None
    if calibration is not None:
        terms, applied = calibration.apply(terms)
        allocated = sum(t.bytes for t in terms if t.group != "overhead")
        slack, context = (next(t.bytes for t in terms if t.key == k) for k in ("allocator_slack", "cuda_context"))
    reserved = allocated + slack
    peak = reserved + context
    return MemoryEstimate(
        terms=tuple(terms),
        allocated_bytes=allocated,
        reserved_bytes=reserved,
        peak_bytes=peak,
        lora_params=lora_param_count(spec, knobs),
        assumptions=_assumptions(spec, knobs, gpus) + (where,),
        peak_at="layer" if at_layer else "head",
        calibration=applied,
    )


def batching_assumption(knobs: TrainingKnobs) -> str:
    """The micro-batch the estimate sizes, in words (its worst case: every sample at the cutoff)."""
    b, s = knobs.micro_batch_size, knobs.cutoff_len
    if knobs.batching == "padded":
        return f"padded: {b} row{'s' if b > 1 else ''} of up to {s} tokens (worst case: padded to the cutoff)"
    rows = f"{b} packed row{'s' if b > 1 else ''}" if knobs.batching == "packed" else f"{b} sample{'s' if b > 1 else ''}"
    return f"{knobs.batching.replace('_', '-')}: {rows} flattened into one row of up to {b * s} tokens, no padding"


def liger_saving_bytes(spec: ModelSpec, knobs: TrainingKnobs, gpus: int = 1) -> int:
    """What Liger's kernels take off this plan's peak (0 when the model type has none): the plan
    says it. Its fused linear cross-entropy is not among them: trl 1.16's SFTTrainer turns it off
    and keeps its own chunked head (trl/trainer/sft_trainer.py, `liger_kernel_config`)."""
    on, off = knobs.replace(liger=True), knobs.replace(liger=False)
    return estimate_memory(spec, off, gpus).peak_bytes - estimate_memory(spec, on, gpus).peak_bytes


def _assumptions(spec: ModelSpec, knobs: TrainingKnobs, gpus: int) -> tuple[str, ...]:
    out = [
        f"{'NF4' if knobs.quant_bits == 4 else f'{knobs.quant_bits}-bit'} base"
        + (" with double quantization" if knobs.quant_bits == 4 and knobs.double_quant else "")
        + f", {knobs.compute_dtype} compute",
        f"attention: {knobs.attn}",
        "gradient checkpointing " + ("on" if knobs.grad_checkpointing else "off"),
        batching_assumption(knobs),
        f"loss: {stack_of(knobs).fused_loss} (no full logits)" if knobs.loss == "chunked"
        else "loss: full logits in fp32 (standard cross-entropy)",
        f"trainer: {stack_of(knobs).label}, residual stream "
        + ("fp32" if residual_fp32(knobs) else "16-bit")
        + (", fp32 LoRA weights" if lora_param_bytes(knobs) == 4 else ", bf16 LoRA weights"),
    ]
    if knobs.liger:
        out.append("Liger kernels: RMSNorm and SwiGLU keep less, RoPE runs in place" if act.liger_on(spec, knobs)
                   else f"Liger kernels: none for {spec.model_type} models (the estimate assumes none)")
    spread = strategy_assumption(knobs, gpus)
    if spread:
        out.append(spread)
    if spec.is_moe:
        out.append("MoE experts are fused 3D parameters that bitsandbytes leaves unquantized")
    return tuple(out)
