"""Exact accounting of what one QLoRA training step keeps alive, on CPU, for tests and benches.

Why not a memory profiler: CPU has no allocator statistics. Instead a TorchDispatchMode sees the
output storage of every aten op (bitsandbytes' ops included) during the forward pass; a storage
weak reference tells, after the forward, which of them are still alive. Alive-after-forward is
exactly what the step holds for backward: tensors saved through save_for_backward, tensors that
bitsandbytes keeps as ctx attributes, and the inputs non-reentrant gradient checkpointing keeps.
Each storage is attributed to the decoder layer that created it.

The CPU step is made to follow the CUDA code path where they differ:
- dropout: CUDA runs the fused `native_dropout` (saves a 1-byte bool mask); CPU's `F.dropout`
  saves a full-width noise tensor. LoRA's dropout modules are swapped for `native_dropout`.
- peft asks `torch.is_autocast_enabled()` (CUDA only) whether to cast LoRA inputs to fp32; under
  CPU autocast that says False and peft adds fp32 copies the GPU never makes. Patched to ask the
  CPU autocast state.
- trl's fused LM head gathers only the scored tokens when Triton runs (CUDA); on CPU it scores
  every position. Patched to take the CUDA (compact) path; the tiles still fold in torch.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

#: Tiny models, one per family, with each family's real head/kv/intermediate ratios.
FAMILIES: dict[str, dict] = {
    "llama": dict(hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    "mistral": dict(hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    "qwen2": dict(hidden_size=112, intermediate_size=592, num_attention_heads=7, num_key_value_heads=1, head_dim=16),
    "gemma2": dict(hidden_size=144, intermediate_size=576, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   query_pre_attn_scalar=64, final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=4096),
    "phi3": dict(hidden_size=128, intermediate_size=336, num_attention_heads=4, num_key_value_heads=4, head_dim=32),
}


def tiny_config(family: str, layers: int = 3, vocab: int = 640) -> dict:
    cfg = dict(model_type=family, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=1024,
               tie_word_embeddings=(family == "gemma2"), **FAMILIES[family])
    if family == "phi3":
        cfg.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "qwen2":
        cfg["attention_bias"] = True
    return cfg


def case_id(case: tuple) -> str:
    """A test id for a (family, attn, grad_checkpointing, rank, dropout, targets, quant_bits, residual)
    case; the residual may be left off (the knob's default)."""
    fam, attn, gc, r, p, t, qb, *rest = case
    tgt = t if isinstance(t, str) else "+".join(t)
    res = f"-res{rest[0]}" if rest else ""
    return f"{fam}-{attn}-{'gc' if gc else 'nogc'}-r{r}-p{p}-{tgt}-{qb}bit{res}"


def case_knobs(case: tuple, **more: object):
    """The TrainingKnobs of an accounting case (LoRA alpha 2 x rank, as `build_qlora` builds)."""
    from tuiwiz.planning.knobs import TrainingKnobs

    fam, attn, gc, rank, dropout, targets, qb, *rest = case
    res = {"residual": rest[0]} if rest else {}
    return TrainingKnobs(quant_bits=qb, lora_rank=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                         target_modules=targets, attn=attn, grad_checkpointing=gc, **res, **more)


_SAVED: dict[str, str] = {}


def saved_base(cfg: dict) -> str:
    """A bf16 checkpoint of a randomly initialised model (built once per config per process)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    key = repr(sorted(cfg.items()))
    if key not in _SAVED:
        conf = AutoConfig.for_model(**cfg)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16)
        path = tempfile.mkdtemp(prefix="tuiwiz-acc-")
        model.save_pretrained(path)
        _SAVED[key] = path
    return _SAVED[key]


class _NativeDropout(torch.nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.native_dropout(x, self.p, self.training)[0]


def build_qlora(cfg: dict, *, rank: int, dropout: float, targets: str | list[str], attn: str,
                grad_checkpointing: bool, quant_bits: int = 4, residual: str | None = None):
    """The worker's model: `tuiwiz.train.build.build_model` (NF4 + double quant, bf16 compute,
    k-bit preparation) plus what trl 1.16's SFTTrainer does to it before training: LoRA from
    `lora_config`, input gradients on under checkpointing, adapters cast to bf16 on a quantized
    base, and the fused LM head with the outputs the trainer asks for."""
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from tuiwiz.planning.knobs import TrainingKnobs
    from tuiwiz.train.build import build_model, enable_checkpointing, lora_config

    knobs = TrainingKnobs(quant_bits=quant_bits, lora_rank=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                          target_modules=targets, attn=attn, grad_checkpointing=grad_checkpointing,
                          **({"residual": residual} if residual else {}))
    model = build_model(saved_base(cfg), knobs, device="cpu")
    if quant_bits == 16:
        for prm in model.parameters():
            prm.requires_grad_(False)
        if grad_checkpointing:
            enable_checkpointing(model)
    torch.manual_seed(0)
    model = get_peft_model(model, lora_config(knobs, model))
    if grad_checkpointing:
        model.enable_input_require_grads()
    if quant_bits in (4, 8):
        for prm in model.parameters():
            if prm.requires_grad:
                prm.data = prm.data.to(torch.bfloat16)
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    for mod in model.modules():
        drops = getattr(mod, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for k, d in drops.items():
                if isinstance(d, torch.nn.Dropout):
                    drops[k] = _NativeDropout(d.p)
    model.train()
    return model


@dataclass
class Accounting:
    per_layer: list[int] = field(default_factory=list)  # bytes alive after forward, created in layer i
    other: int = 0  # created outside the decoder layers (embeddings, rotary tables, final norm, head)
    details: list[tuple[str, int, str, tuple]] = field(default_factory=list)


class _Track(TorchDispatchMode):
    def __init__(self, where: list[str]):
        super().__init__()
        self.where = where
        self.refs: list[tuple[StorageWeakRef, int, int, str, str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                self.refs.append((StorageWeakRef(s), s.data_ptr(), s.nbytes(), self.where[-1], str(t.dtype),
                                  tuple(t.shape)))
        return out


@contextlib.contextmanager
def _gpu_semantics(track: "_Live | None" = None):
    """Make the CPU step take the CUDA code path (see the module docstring).

    With a step tracker, the temporaries of trl's tile folds and fp32 accumulation are not
    counted: on CUDA the fold is a Triton kernel working in place on the tile and
    `torch.addmm(out_dtype=float32)` accumulates without copies, while the CPU fallbacks
    make fp32 copies of whole tiles.
    """
    import trl.kernels.chunked_logprob as trl_kernel
    import trl.trainer.utils as trl_utils

    orig_enabled, orig_triton = torch.is_autocast_enabled, trl_utils._use_triton
    orig_fns = {n: getattr(trl_kernel, n) for n in ("_forward_tile", "_backward_tile", "_addmm_fp32")}

    def enabled(device_type: str | None = None) -> bool:
        return orig_enabled("cpu") if device_type is None else orig_enabled(device_type)

    def uncounted(fn):
        def wrapper(*a, **kw):
            track.ignoring += 1
            try:
                return fn(*a, **kw)
            finally:
                track.ignoring -= 1
        return wrapper

    torch.is_autocast_enabled = enabled
    trl_utils._use_triton = lambda device: True
    if track is not None:
        for n, fn in orig_fns.items():
            setattr(trl_kernel, n, uncounted(fn))
    try:
        yield
    finally:
        torch.is_autocast_enabled, trl_utils._use_triton = orig_enabled, orig_triton
        for n, fn in orig_fns.items():
            setattr(trl_kernel, n, fn)


def _weight_ptrs(model) -> set[int]:
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    for mod in model.modules():  # bitsandbytes quant states (absmax, code) are weights, not activations
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs.state2, "absmax", None), getattr(qs.state2, "code", None),
                      getattr(qs, "offset", None)):
                if isinstance(t, torch.Tensor):
                    ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


def _label_layers(layers, where: list[str]) -> list:
    """Forward hooks that keep `where[-1]` naming the decoder layer running ("L3"), else "other"."""
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: where.append(f"L{i}") and None))
        hooks.append(layer.register_forward_hook(lambda m, a, o: where.pop() and None))
    return hooks


def account_forward(model, batch: int, seq: int, vocab: int, backward: bool = True) -> Accounting:
    """Run one forward (bf16 autocast) and report the bytes it leaves alive for backward."""
    layers = model.get_base_model().model.layers
    params = _weight_ptrs(model)
    where = ["other"]
    hooks = _label_layers(layers, where)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    params.add(ids.untyped_storage().data_ptr())  # the batch itself is the caller's, not the step's
    track = _Track(where)
    try:
        with _gpu_semantics():
            with torch.autocast("cpu", dtype=torch.bfloat16), track:
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, fused_lm_head=True)
            loss = out.loss
            del out
            # bitsandbytes recasts fp32 biases to bf16 on first use: those new storages are weights too
            params |= {p.untyped_storage().data_ptr() for p in model.parameters()}
            acc = Accounting(per_layer=[0] * len(layers))
            seen: set[int] = set()
            for ref, ptr, nbytes, w, dt, shape in track.refs:  # first creation wins: views made later share it
                if ref.expired() or ptr in seen or ptr in params or nbytes == 0:
                    continue
                seen.add(ptr)
                if w == "other":
                    acc.other += nbytes
                else:
                    acc.per_layer[int(w[1:])] += nbytes
                acc.details.append((w, nbytes, dt, shape))
            if backward:
                loss.backward()  # proves the graph is the real, complete one
    finally:
        for h in hooks:
            h.remove()
    return acc


@dataclass
class StepPeak:
    """Live non-parameter bytes over one forward + backward, sampled after every aten op."""

    peak: int = 0
    peak_phase: str = ""
    peak_op: str = ""
    forward_end: int = 0  # alive when the forward returns: what is saved for backward (+ the loss)


class _Live(TorchDispatchMode):
    """Tracks every storage an aten op creates until it dies; records the running total's peak."""

    def __init__(self, where: list[str], skip: set[int]):
        super().__init__()
        self.where, self.skip = where, skip
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.total = 0
        self.phase = "forward"
        self.ignoring = 0  # > 0 inside code whose CUDA counterpart allocates nothing (see _gpu_semantics)
        self.res = StepPeak()

    def _sweep(self) -> None:
        dead = [p for p, (r, _) in self.live.items() if r.expired()]
        for p in dead:
            self.total -= self.live.pop(p)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.ignoring:
            return out
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                ptr, n = s.data_ptr(), s.nbytes()
                if n == 0 or ptr in self.skip:
                    continue
                old = self.live.get(ptr)
                if old is not None and not old[0].expired():
                    continue  # a view of a storage already counted
                if old is not None:
                    self.total -= old[1]
                self.live[ptr] = (StorageWeakRef(s), n)
                self.total += n
        self._sweep()
        if self.total > self.res.peak:
            self.res.peak, self.res.peak_op = self.total, str(func)
            self.res.peak_phase = f"{self.phase}:{self.where[-1]}"
        return out


def account_step(model, batch: int, seq: int, vocab: int, vocab_chunk: int | None = None) -> StepPeak:
    """One forward + backward (bf16 autocast, the CUDA code path as in `account_forward`), and the
    peak of live non-weight bytes between aten ops: saved activations, backward transients and
    the LoRA gradients (alive throughout: this is a gradient-accumulation micro-step). Weights and
    bitsandbytes quant states are excluded (static terms).

    Not seen: memory an op uses internally and frees before returning (kernel workspaces).
    `peak_phase` says where the peak fell: `forward:L3`, `backward:L2`, `backward:other`, ...
    `vocab_chunk` shrinks trl's logits tile width (32768 columns whatever the vocabulary) so
    that on a tiny model the head does not hide the decoder layers; the estimate must then be
    evaluated with the same width (`activations.TRL_VOCAB_CHUNK`).
    """
    import trl.trainer.utils as trl_utils

    if vocab_chunk is not None:
        orig_chunk = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = vocab_chunk
        try:
            return account_step(model, batch, seq, vocab)
        finally:
            trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = orig_chunk
    layers = model.get_base_model().model.layers
    for p in model.parameters():
        p.grad = None
    where = ["other"]
    hooks = _label_layers(layers, where)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    # In backward, a layer's label holds from when the gradient of its output arrives (a tensor
    # hook on the output, registered in forward) until the next layer down takes over.

    def mark(i: int):
        def fwd_hook(m, a, o):
            h = o[0] if isinstance(o, tuple) else o
            if torch.is_grad_enabled() and h.requires_grad and track_ref and track_ref[0].phase == "forward":
                h.register_hook(lambda g: where.append(f"L{i}") and None)
        return fwd_hook

    track_ref: list = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(mark(i)))
    # The first call may recast weights (bitsandbytes' fp32 biases to bf16): warm up, then count
    # the second micro-batch of an accumulation, whose LoRA gradients exist from the start.
    with _gpu_semantics(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True).loss.backward()
    grads = {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes()
             for p in model.parameters() if p.grad is not None}
    skip = _weight_ptrs(model) | set(grads) | {ids.untyped_storage().data_ptr(), mask.untyped_storage().data_ptr()}
    track = _Live(where, skip)
    track.total = sum(grads.values())
    track_ref.append(track)
    try:
        with _gpu_semantics(track):
            with track:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True).loss
                track.res.forward_end = track.total
                track.phase = "backward"
                del where[1:]
                loss.backward()
                del loss
    finally:
        for h in hooks:
            h.remove()
    return track.res
