"""How a run spreads over its GPUs, and what one GPU (and the host) then holds, term by term.

The engines are the ones users already have; this module only models their memory:

- `ddp`: accelerate's DistributedDataParallel. Every GPU holds the whole model (4-bit weights,
  fp32 embeddings and norms after peft's k-bit preparation) and its own adapter states;
  gradients are all-reduced through buckets as large as the LoRA gradients.
- `fsdp`: FSDP-QLoRA (Answer.AI with bitsandbytes and Hugging Face). bitsandbytes stores the
  4-bit weights in the compute dtype (`bnb_4bit_quant_storage`) so FSDP can shard them like any
  bf16 tensor: each GPU keeps 1/N of every weight and all-gathers one decoder layer at a time.
  The quantization constants (absmax) are attributes of the weights, not parameters: every GPU
  keeps all of them. Embeddings, norms and head stay in the compute dtype (peft's fp32 upcast
  would break FSDP's flat parameters, so the worker skips it).
- `zero3`: DeepSpeed ZeRO-3, which partitions parameters, gradients and optimizer states.
  DeepSpeed's own estimate (`estimate_zero3_model_states_mem_needs_all_live`) charges 18 bytes
  per parameter plus 4 bytes per parameter of the largest layer. With a frozen 4-bit base that
  rule holds only for the trainable LoRA parameters: the base costs its stored bytes (half a byte
  per weight plus constants), has no gradient and no optimizer state, and its largest gathered
  layer is 4-bit too.
- `*_offload`: the shards live in host RAM (FSDP `offload_params`; ZeRO-3 `offload_param` and
  `offload_optimizer` on the CPU). The GPU keeps only what it is computing with.

Activations, logits and the dequantized weight of the running matmul are never sharded: each GPU
runs its own micro-batch. `tuiwiz.planning.memory` counts those; this module counts the states.
Pure functions, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tuiwiz.models import ModelSpec
from tuiwiz.planning.knobs import Strategy, TrainingKnobs

if TYPE_CHECKING:
    from tuiwiz.planning.memory import Term

GIB = 1024**3
STRATEGIES: tuple[Strategy, ...] = ("ddp", "fsdp", "fsdp_offload", "zero3", "zero3_offload")
SHARDED: frozenset[str] = frozenset({"fsdp", "fsdp_offload", "zero3", "zero3_offload"})
OFFLOADED: frozenset[str] = frozenset({"fsdp_offload", "zero3_offload"})
#: What each strategy is called where a person reads it.
TITLES: dict[str, str] = {
    "ddp": "DDP (a whole copy per GPU)", "fsdp": "FSDP-QLoRA (sharded)",
    "fsdp_offload": "FSDP-QLoRA, shards offloaded to host RAM", "zero3": "DeepSpeed ZeRO-3",
    "zero3_offload": "DeepSpeed ZeRO-3, offloaded to host RAM",
}
#: Decoder layers FSDP holds unsharded at once: the one computing and the next, prefetched
#: (`backward_prefetch: BACKWARD_PRE`, the config tuiwiz writes). ZeRO-3's prefetch does the same.
GATHERED_LAYERS = 2
#: DeepSpeed ZeRO-3's default `reduce_bucket_size` (elements, deepspeed/runtime/zero/config.py):
#: gradients are copied into a bucket this large (or as large as all of them) before reduce-scatter.
DS_REDUCE_BUCKET = 500_000_000
#: DeepSpeed's per-parameter bytes for a trainable parameter under ZeRO-3 (its own estimator):
#: bf16 weight 2 + bf16 gradient 2 + fp32 master weight, two fp32 Adam moments and fp32 gradient 14.
DS_BYTES_PER_TRAINABLE = {"weights": 2, "gradients": 2, "optimizer": 14}
#: Host RAM one training process holds besides model state: the Python interpreter, torch, CUDA
#: and NCCL host buffers, tokenizer and dataset. An uncalibrated prior (a CUDA PyTorch process
#: is typically 2-4 GiB resident before it loads a model).
PROCESS_HOST_BYTES = 3 * GIB


def is_sharded(strategy: str) -> bool:
    return strategy in SHARDED


def offloads(strategy: str) -> bool:
    return strategy in OFFLOADED


def engine(strategy: str) -> str:
    """Which engine runs it: "ddp", "fsdp" or "deepspeed"."""
    return "fsdp" if strategy.startswith("fsdp") else "deepspeed" if strategy.startswith("zero3") else "ddp"


def strategy_problem(knobs: TrainingKnobs) -> str | None:
    """Why these knobs cannot run under their strategy (None when they can)."""
    from tuiwiz.planning.stacks import residual_fp32

    if not is_sharded(knobs.strategy):
        return None
    if knobs.quant_bits == 8:
        return ("an 8-bit base cannot be sharded: bitsandbytes' int8 weights have no float storage that FSDP or "
                "ZeRO-3 could split; use a 4-bit or 16-bit base, or ddp")
    if residual_fp32(knobs):
        return ("a sharded run keeps one dtype across a layer's parameters: the fp32 upcast of a k-bit base "
                "(residual fp32) breaks FSDP's flat parameters; use residual bf16")
    return None


# ---- the model's bytes as a strategy stores them ---------------------------------------

@dataclass(frozen=True)
class Stored:
    """The model's parameter bytes split the way sharding treats them."""

    packed: int  # linear weights in the decoder (4-bit packed, int8 or 16-bit): shardable
    constants: int  # 4-bit absmax constants: attributes of the weights, kept whole on every GPU
    other: int  # embeddings, head, norms, MoE experts: unquantized, in their stored dtype
    root: int  # the part of `other` outside the decoder layers (embeddings, final norm, head)
    layer: int  # one decoder layer with its adapters, unsharded (what FSDP gathers)
    biggest_outer: int  # the largest module outside the layers (embedding or head), unsharded


def stored(spec: ModelSpec, knobs: TrainingKnobs) -> Stored:
    """Byte counts of the stored model: unquantized tensors in fp32 after peft's k-bit upcast
    (`residual: fp32`, DDP only), else in the compute dtype, as FSDP and ZeRO-3 need."""
    from tuiwiz.planning import memory as mem
    from tuiwiz.planning.stacks import residual_fp32

    quantized = mem.quantized_weights_bytes(spec, knobs)
    n = spec.quantizable_params()
    packed = math.ceil(n / 2) if knobs.quant_bits == 4 else quantized
    unq_bytes = 4 if residual_fp32(knobs) else 2
    other = mem.unquantized_weights_bytes(spec, knobs)
    counts = spec.param_counts()
    outer_params = counts["embedding"] + counts["head"] + spec.hidden
    lora_per_layer = mem.lora_weights_bytes(spec, knobs) // max(1, spec.layers)
    layer = (quantized + other - outer_params * unq_bytes) // max(1, spec.layers) + lora_per_layer
    return Stored(packed=packed, constants=quantized - packed, other=other, root=outer_params * unq_bytes,
                  layer=layer, biggest_outer=max(counts["embedding"], counts["head"]) * unq_bytes)


# ---- per-GPU state terms, one builder per engine ----------------------------------------

def state_terms(spec: ModelSpec, knobs: TrainingKnobs, gpus: int) -> list[Term]:
    """The terms every GPU holds for the whole step under `knobs.strategy` over `gpus` GPUs in all:
    weights (sharded or not), what is gathered, adapters, their gradients and optimizer states."""
    s = knobs.strategy
    if s == "ddp" or gpus < 1:
        return _ddp_terms(spec, knobs, gpus)
    if engine(s) == "fsdp":
        return _fsdp_terms(spec, knobs, gpus, offloads(s))
    return _zero3_terms(spec, knobs, gpus, offloads(s))


def _adapter_dtype(knobs: TrainingKnobs) -> str:
    from tuiwiz.planning.memory import lora_param_bytes

    return "bf16" if lora_param_bytes(knobs) == 2 else "fp32"


def _ddp_terms(spec: ModelSpec, knobs: TrainingKnobs, gpus: int) -> list[Term]:
    """Replicated: every GPU holds all of it (what a single-GPU run holds, plus DDP's buckets)."""
    from tuiwiz.planning import memory as mem
    from tuiwiz.planning.stacks import residual_fp32

    wdtype = _adapter_dtype(knobs)
    return [
        mem.Term("quantized_weights", f"{knobs.quant_bits}-bit decoder weights", "weights",
                 mem.quantized_weights_bytes(spec, knobs),
                 {4: "NF4 + absmax constants", 8: "int8 + row scales"}.get(knobs.quant_bits, "16-bit")),
        mem.Term("unquantized_weights", "embeddings, head, norms", "weights", mem.unquantized_weights_bytes(spec, knobs),
                 "fp32 after k-bit prep" if residual_fp32(knobs) else "16-bit"),
        mem.Term("lora_weights", "LoRA adapters", "lora", mem.lora_weights_bytes(spec, knobs),
                 f"{wdtype} A and B per target"),
        mem.Term("lora_gradients", "LoRA gradients", "gradients", mem.lora_gradients_bytes(spec, knobs) +
                 mem.ddp_bucket_bytes(spec, knobs, gpus), wdtype + (" + DDP buckets" if gpus > 1 else "")),
        mem.Term("optimizer_states", f"optimizer ({knobs.optim})", "optimizer", mem.optimizer_state_bytes(spec, knobs),
                 "2 AdamW moments/weight"),
    ]



def _stored_weight_terms(knobs: TrainingKnobs, st: Stored, n: int, here: int, shard: str) -> list[Term]:
    """The base's stored weights under sharding: the 4-bit storage split 1/n (its absmax constants
    whole on every GPU), the 16-bit rest split too; `here` is 0 when they live in host RAM."""
    from tuiwiz.planning import memory as mem

    return [
        mem.Term("quantized_weights", f"{knobs.quant_bits}-bit decoder weights", "weights",
                 here * _ceil_div(st.packed, n) + st.constants,
                 f"{shard}; absmax on every GPU" if st.constants else shard),
        mem.Term("unquantized_weights", "embeddings, head, norms", "weights", here * _ceil_div(st.other, n),
                 f"{knobs.compute_dtype}, {shard}"),
    ]

def _fsdp_terms(spec: ModelSpec, knobs: TrainingKnobs, gpus: int, offload: bool) -> list[Term]:
    """FSDP-QLoRA (FULL_SHARD, `use_orig_params: false`): a 1/N shard of every flat parameter, the
    absmax constants whole, two decoder layers and the root unit (embeddings, final norm, head:
    FSDP keeps the root unsharded from forward to backward) gathered. Offload moves the shards,
    the gradients and the optimizer step to host RAM."""
    from tuiwiz.planning import memory as mem

    st = stored(spec, knobs)
    n = max(1, gpus)
    here = 0 if offload else 1
    shard = f"1/{n} shard" if not offload else "in host RAM"
    lora = mem.lora_weights_bytes(spec, knobs)
    return [
        *_stored_weight_terms(knobs, st, n, here, shard),
        mem.Term("gathered_layers", "gathered for compute", "weights", GATHERED_LAYERS * st.layer,
                 f"{GATHERED_LAYERS} layers all-gathered"),
        mem.Term("gathered_root", "root unit (embeddings, head)", "weights", st.root, "unsharded fwd to bwd"),
        mem.Term("lora_weights", "LoRA adapters", "lora", here * _ceil_div(lora, n), f"{_adapter_dtype(knobs)}, {shard}"),
        mem.Term("lora_gradients", "LoRA gradients", "gradients", here * _ceil_div(mem.lora_gradients_bytes(spec, knobs), n),
                 f"reduce-scattered, {shard}"),
        mem.Term("optimizer_states", f"optimizer ({knobs.optim})", "optimizer",
                 here * _ceil_div(mem.optimizer_state_bytes(spec, knobs), n),
                 shard if not offload else "steps on the CPU"),
    ]


def _zero3_terms(spec: ModelSpec, knobs: TrainingKnobs, gpus: int, offload: bool) -> list[Term]:
    """ZeRO-3: parameters partitioned 1/N (the 4-bit storage too), the largest gathered unit, the
    reduce bucket, and DeepSpeed's 18 bytes per trainable parameter, here only the adapters'."""
    from tuiwiz.planning import memory as mem

    st = stored(spec, knobs)
    n = max(1, gpus)
    here = 0 if offload else 1
    shard = f"1/{n} partition" if not offload else "in host RAM"
    lora_n = mem.lora_param_count(spec, knobs)
    per = DS_BYTES_PER_TRAINABLE
    gathered = max(GATHERED_LAYERS * st.layer, st.biggest_outer)
    return [
        *_stored_weight_terms(knobs, st, n, here, shard),
        mem.Term("gathered_layers", "gathered for compute", "weights", gathered,
                 "2 layers or the head, 4-bit/bf16"),
        mem.Term("lora_weights", "LoRA adapters", "lora", here * _ceil_div(per["weights"] * lora_n, n), f"bf16, {shard}"),
        mem.Term("lora_gradients", "LoRA gradients", "gradients",
                 here * _ceil_div(per["gradients"] * lora_n, n) + 2 * min(DS_REDUCE_BUCKET, lora_n),
                 f"{shard} + reduce bucket"),
        mem.Term("optimizer_states", "optimizer (DeepSpeed, fp32)", "optimizer",
                 here * _ceil_div(per["optimizer"] * lora_n, n),
                 "master + 2 moments, " + shard if not offload else "on the CPU (DeepSpeedCPUAdam)"),
    ]


#: Allocator slack a sharded step adds to `memory.ALLOCATOR_SLACK`, as a fraction of allocated.
#: FSDP and ZeRO-3 allocate and free a whole layer's gathered weights every layer, forward and
#: backward, and CPU offload adds host-to-device staging copies; the caching allocator keeps the
#: blocks (PyTorch's FSDP `limit_all_gathers` exists because of this). An uncalibrated prior set from
#: the published runs in bench/results/multigpu_published.md: without it the sharded rows' median
#: shortfall is 12% of allocated and the offloaded rows' 25%.
SHARDED_SLACK = {"fsdp": 0.10, "zero3": 0.10, "fsdp_offload": 0.25, "zero3_offload": 0.25}


def slack_fraction(knobs: TrainingKnobs) -> float:
    """The caching allocator's slack for this step, as a fraction of allocated (a calibration
    measured on this GPU replaces it)."""
    from tuiwiz.planning import memory

    return memory.ALLOCATOR_SLACK + SHARDED_SLACK.get(knobs.strategy, 0.0)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def assumption(knobs: TrainingKnobs, gpus: int) -> str | None:
    """One line for the estimate's assumptions: how the GPUs share the model."""
    s = knobs.strategy
    if gpus <= 1 and s == "ddp":
        return None
    if s == "ddp":
        return f"data parallel over {gpus} GPUs: each holds the whole model"
    text = f"{TITLES[s]} over {gpus} GPU{'s' if gpus != 1 else ''}; activations are not sharded (each GPU runs its own micro-batch)"
    if engine(s) == "deepspeed":
        text += ("; DeepSpeed's 18 bytes/parameter rule applies to the LoRA parameters only (the 4-bit base "
                 "is frozen and stored in half a byte per weight)")
        if offloads(s):
            text += "; DeepSpeed's offload buffers are not modelled (PEFT reports more GPU memory with offload)"
    return text


# ---- host RAM ----------------------------------------------------------------------------

@dataclass(frozen=True)
class HostRam:
    """Host RAM one node needs: its terms (each with why) and the peak, which is the processes'
    runtime plus the larger of the loading and the training phase."""

    terms: tuple[Term, ...]
    peak_bytes: int

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def host_ram(spec: ModelSpec, knobs: TrainingKnobs, gpus: int, per_node: int) -> HostRam:
    """Host RAM of one node running `per_node` of the run's `gpus` processes.

    Loading: a sharded run loads the 4-bit model into host RAM in every process before FSDP
    moves it to the GPUs one layer at a time (transformers 5 does not apply
    `cpu_ram_efficient_loading`'s rank-0-only path to quantized models); ddp and ZeRO-3 load
    straight to the GPU, one checkpoint shard (5 GB, the Hub's default) at a time per process.
    Training: with offload, this node's share of every shard, gradient and optimizer state.
    """
    from tuiwiz.planning import memory as mem

    s = knobs.strategy
    n, local = max(1, gpus), max(1, min(per_node, gpus))
    st = stored(spec, knobs)
    model = st.packed + st.constants + st.other
    runtime = local * PROCESS_HOST_BYTES
    if engine(s) == "fsdp":
        loading, load_why = local * model, f"{local} x the {knobs.quant_bits}-bit model, before sharding"
    else:
        loading, load_why = local * 5 * 10**9, "one 5 GB checkpoint shard per process"
    offloaded, off_why = 0, "nothing offloaded"
    if offloads(s):
        lora_n = mem.lora_param_count(spec, knobs)
        if engine(s) == "fsdp":
            states = (st.packed + st.other + mem.lora_weights_bytes(spec, knobs) + mem.lora_gradients_bytes(spec, knobs)
                      + mem.optimizer_state_bytes(spec, knobs))
        else:
            states = st.packed + st.other + sum(DS_BYTES_PER_TRAINABLE.values()) * lora_n
        offloaded, off_why = _ceil_div(states * local, n), f"{local}/{n} of the shards and states (pinned)"
    terms = (
        mem.Term("host_runtime", "processes' runtime", "overhead", runtime, f"{local} x {PROCESS_HOST_BYTES / GIB:.0f} GiB prior"),
        mem.Term("host_loading", "loading the model", "weights", loading, load_why),
        mem.Term("host_offloaded", "offloaded while training", "weights", offloaded, off_why),
    )
    return HostRam(terms, runtime + max(loading, offloaded))


# ---- the advisor's choice -----------------------------------------------------------------

#: The order the advisor tries strategies in, fastest first: no gather traffic, then sharded,
#: then sharded with host round trips. ZeRO-3 is planned when the user asks for it.
AUTO_ORDER: tuple[Strategy, ...] = ("ddp", "fsdp", "fsdp_offload")
#: Optimizer a sharded run uses when the user left it free: PEFT's FSDP-QLoRA guide reports that
#: `paged_adamw_8bit` fails when a sharded checkpoint is saved, and ZeRO-3 brings its own.
SHARDED_OPTIM = "adamw_torch"


def choice_reason(chosen: Strategy, gpus: int, single_gib: float, chosen_gib: float, budget_gib: float,
                  host_gib: float | None) -> str:
    """The one line that says why the advisor chose `chosen` over the faster ones."""
    if chosen == "ddp":
        return (f"strategy ddp: the whole model fits on one GPU ({single_gib:.1f} of {budget_gib:.1f} GiB), so each "
                "GPU keeps a copy and only gradients travel (the fastest)")
    head = f"strategy {chosen} ({TITLES[chosen]}): a whole copy needs {single_gib:.1f} GiB per GPU (budget {budget_gib:.1f})"
    if chosen == "fsdp":
        return f"{head}; sharding it over {gpus} GPUs brings each to {chosen_gib:.1f} GiB"
    ram = f"; needs {host_gib:.0f} GiB of host RAM per node" if host_gib is not None else ""
    return (f"{head}, and sharded it still does not fit; keeping the shards in host RAM brings each GPU to "
            f"{chosen_gib:.1f} GiB{ram} (slower: every layer crosses PCIe each step)")
