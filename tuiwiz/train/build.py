"""Model and trainer builders shared by the worker and the memory-calibration benchmark.

`build_model` loads (or, from a bare config, randomly initialises) a causal LM exactly the way
a tuiwiz run does: bitsandbytes NF4 + double quant, then peft's k-bit preparation. The
benchmark reuses it so that what it measures is what the worker runs.

What the worker does to dtypes (trl 1.16 / peft 0.21 / transformers 5.23), which the memory
estimator models:
- 4/8-bit bases: linear weights are bnb Params4bit (uint8 storage) / Int8Params.
- `prepare_model_for_kbit_training` upcasts every non-quantized bf16/fp16 parameter to fp32:
  embeddings, norms and lm_head are fp32 afterwards (all frozen).
- LoRA A/B are created by peft in fp32, then trl's SFTTrainer casts trainable params of a
  quantized model to bf16 (QLoRA paper recipe) whatever the compute dtype. Under fp16 compute
  `build_trainer` casts them back to fp32 (see `adapter_dtype`): fp16's GradScaler cannot
  unscale bf16 gradients.
- bf16 compute needs a card with native bf16 (sm_80+); a bf16 plan on an older card trains in
  fp16 (see `choose_compute_dtype`).
- Gradient checkpointing uses `use_reentrant=False`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PretrainedConfig, Trainer
from trl import SFTConfig, SFTTrainer

from tuiwiz.gpu_features import Capability, flash_attn_installed, flash_attn_problem, native_bf16
from tuiwiz.models import spec_from_config
from tuiwiz.planning.knobs import TrainingKnobs, attn_for_model
from tuiwiz.planning.strategy import engine, is_sharded
from tuiwiz.planning.schedule import SAVE_TOTAL_LIMIT, early_stopping_on, eval_and_save_steps
from tuiwiz.preset import Preset
from tuiwiz.train.errors import SetupError

GC_KWARGS = {"use_reentrant": False}


def resolve_device(device: str = "auto") -> str:
    """'cuda:<local rank>' when a GPU is visible, else 'cpu'."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def device_capability(device: str) -> Capability | None:
    """The CUDA compute capability of `device`, None off the GPU."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major, minor


def choose_compute_dtype(wanted: str, on_cuda: bool, capability: Capability | None,
                         hardware_bf16: bool = True) -> tuple[torch.dtype, str | None]:
    """(dtype, warning): bf16 when the plan asks for it and the card has native bf16, else fp16.

    The capability decides, not `torch.cuda.is_bf16_supported()`, which also says True on a
    T4/V100 where bf16 is only emulated. A bf16 plan on such a card trains in fp16 and says so
    (the warning). The CPU path always uses bf16 (fp16 matmuls are not what CPUs run).
    """
    if not on_cuda:
        return torch.bfloat16, None
    if wanted != "bf16" or not hardware_bf16:
        return torch.float16, None
    if native_bf16(capability):
        return torch.bfloat16, None
    card = f"compute capability {capability[0]}.{capability[1]}" if capability else "unknown compute capability"
    return torch.float16, (f"the plan asks for bf16 compute, but this GPU ({card}) has no native bf16 "
                           "(Ampere or newer needed): training in fp16 instead")


def compute_dtype(knobs: TrainingKnobs, device: str, hardware_bf16: bool = True) -> torch.dtype:
    """The dtype this run computes in on `device` (see `choose_compute_dtype`)."""
    return choose_compute_dtype(knobs.compute_dtype, device.startswith("cuda"), device_capability(device),
                                hardware_bf16)[0]


def adapter_dtype(compute: torch.dtype, quantized: bool) -> torch.dtype:
    """The dtype the trainable LoRA weights must have.

    fp16 compute runs with a GradScaler, which can only unscale fp32 gradients, so the adapters
    stay fp32. Under bf16 a quantized base keeps trl's bf16 adapters (QLoRA recipe, what the
    estimate models); a 16-bit base keeps peft's fp32 (autocast_adapter_dtype).
    """
    if compute == torch.bfloat16 and quantized:
        return torch.bfloat16
    return torch.float32


def cast_trainable(model: Any, dtype: torch.dtype) -> None:
    """Give every trainable parameter `dtype` (before the optimizer is built, so its state follows)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def quantization_config(knobs: TrainingKnobs, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes' config. A sharded run (FSDP-QLoRA, ZeRO-3) stores the packed 4-bit weights in
    the compute dtype (`bnb_4bit_quant_storage`): FSDP and DeepSpeed only split float tensors."""
    if knobs.quant_bits == 4:
        storage = dtype if is_sharded(knobs.strategy) else torch.uint8
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=knobs.double_quant, bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_quant_storage=storage)
    if knobs.quant_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def attn_implementation(knobs: TrainingKnobs, device: str, model_type: str | None = None) -> str:
    """What to ask transformers for: FlashAttention falls back to SDPA off the GPU, and SDPA to
    eager for architectures transformers has no SDPA for (Gemma 2), as the estimate assumes."""
    if knobs.attn == "flash_attention_2" and not device.startswith("cuda"):
        return "sdpa"  # FlashAttention needs a GPU; the CPU test path falls back
    return attn_for_model(model_type, knobs.attn)


def check_attention(attn: str, device: str) -> None:
    """Refuse FlashAttention 2 up front when the card is too old or flash_attn is missing
    (a SetupError, not a stack trace from deep inside transformers)."""
    if attn == "flash_attention_2":
        problem = flash_attn_problem(device_capability(device), flash_attn_installed())
        if problem:
            raise SetupError(problem)


def random_checkpoint(config: PretrainedConfig | dict[str, Any], out_dir: str | os.PathLike[str],
                      dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: str = "cpu") -> Path:
    """Write a randomly initialised model for `config` (no download) so it can be loaded like a real one.

    Weights are drawn N(0, 0.02) (norms = 1), straight from uninitialised storage, which is fast
    even for 8B models; loading it back through `build_model` takes the normal quantized path.
    `device="cuda"` draws them on the GPU (seconds for a 14B model instead of minutes on CPU);
    the weights are then copied to host memory one tensor at a time as they are saved.
    """
    out = Path(out_dir)
    if isinstance(config, dict):
        cfg = dict(config)
        model_type = cfg.pop("model_type")
        config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(out)
    return out


def build_model(source: Preset | str | os.PathLike[str] | PretrainedConfig, knobs: TrainingKnobs,
                device: str = "auto", *, trust_remote_code: bool = False, hardware_bf16: bool = True,
                scratch_dir: str | os.PathLike[str] | None = None, dtype: torch.dtype | None = None) -> Any:
    """Load the base model quantized per `knobs` and prepared for k-bit LoRA training.

    `source` is a preset (uses model.path or the hub id, resolved offline from the HF cache),
    a local folder / hub id, or a bare `PretrainedConfig` (random weights, written to
    `scratch_dir` first; for benchmarks). LoRA is attached later by the trainer (peft_config).
    `dtype` overrides the compute dtype `compute_dtype` would choose.
    """
    device = resolve_device(device)
    if isinstance(source, Preset):
        trust_remote_code = source.model.trust_remote_code
        hardware_bf16 = source.hardware.bf16
        source = source.model.path or source.model.id
    if isinstance(source, PretrainedConfig):
        if scratch_dir is None:
            raise ValueError("building from a config needs scratch_dir to hold the random weights")
        source = random_checkpoint(source, scratch_dir)
    dtype = dtype or compute_dtype(knobs, device, hardware_bf16)
    qcfg = quantization_config(knobs, dtype)
    device_map: dict[str, Any] = {"": int(device.split(":")[1]) if device.startswith("cuda:") else device}
    if engine(knobs.strategy) == "fsdp":
        # FSDP moves the model to the GPU one wrapped layer at a time (sync_module_states); a whole
        # quantized copy per GPU first would not fit where FSDP-QLoRA is needed
        device_map = {"": "cpu"}
    config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)  # read once, passed on
    attn = attn_implementation(knobs, device, config.model_type)
    check_attention(attn, device)
    model = AutoModelForCausalLM.from_pretrained(
        str(source), config=config, quantization_config=qcfg, dtype=dtype, device_map=device_map,
        attn_implementation=attn, trust_remote_code=trust_remote_code,
    )
    model.config.use_cache = False
    if qcfg is not None:
        model = prepare_kbit(model, knobs)
    return model


def prepare_kbit(model: Any, knobs: TrainingKnobs) -> Any:
    """peft's k-bit preparation for `residual: fp32` (it upcasts embeddings, norms and head, so the
    residual stream is fp32). For `residual: bf16` only its other parts: a frozen base, and with
    checkpointing, gradients into the inputs and checkpointing itself; the stream stays bf16, as
    LLaMA-Factory and Axolotl run it (`tuiwiz.planning.stacks`)."""
    if knobs.residual == "fp32":
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=knobs.grad_checkpointing,
                                               gradient_checkpointing_kwargs=GC_KWARGS)
    for param in model.parameters():
        param.requires_grad_(False)
    if knobs.grad_checkpointing:
        model.enable_input_require_grads()
        enable_checkpointing(model)
    return model


def enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing, by the name transformers 5.25 keeps
    (`gradient_checkpointing_enable` is its deprecated alias, removed in v6)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=GC_KWARGS)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GC_KWARGS)


def lora_targets(knobs: TrainingKnobs, model: Any) -> str | list[str]:
    """peft's 'all-linear', or the module names `tuiwiz.models` resolves for this model (the same
    names the memory estimate counts; Phi-3's fused qkv_proj / gate_up_proj included)."""
    if knobs.target_modules == "all-linear":
        return "all-linear"
    cfg = model.config
    spec = spec_from_config(cfg.to_dict(), cfg.name_or_path or cfg.model_type, "the loaded model's config")
    return list(spec.resolve_targets(knobs.targets()))


def lora_config(knobs: TrainingKnobs, model: Any) -> LoraConfig:
    return LoraConfig(r=knobs.lora_rank, lora_alpha=knobs.lora_alpha, lora_dropout=knobs.lora_dropout,
                      target_modules=lora_targets(knobs, model), bias="none", task_type="CAUSAL_LM")


def liger_problem(knobs: TrainingKnobs, device: str) -> str | None:
    """Why the plan's Liger kernels cannot run here (None: they can, or were not asked for).
    They are Triton kernels, so CUDA only, and liger-kernel is an optional extra."""
    if not knobs.liger:
        return None
    if not device.startswith("cuda"):
        return "the plan asks for Liger kernels, which need a CUDA GPU: training without them"
    if importlib.util.find_spec("liger_kernel") is None:
        return ("the plan asks for Liger kernels, but liger-kernel is not installed (pip install 'tuiwiz[liger]'): "
                "training without them")
    return None


def use_liger(knobs: TrainingKnobs, device: str) -> bool:
    """Turn on transformers' `use_liger_kernel` (applied when training starts, trainer.py `apply_liger_kernel`)."""
    return knobs.liger and liger_problem(knobs, device) is None


def report_to() -> str:
    """TensorBoard only if installed (not a tuiwiz dependency)."""
    return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"


def sft_config(knobs: TrainingKnobs, output_dir: str | os.PathLike[str], *, device: str, has_eval: bool,
               dtype: torch.dtype, report: str = "none") -> SFTConfig:
    """Map TrainingKnobs onto trl's SFTConfig (pre-tokenized data: max_length = cutoff_len, completion-only loss)."""
    eval_steps, save_steps = eval_and_save_steps(knobs, has_eval)
    early = early_stopping_on(knobs, has_eval)
    on_cpu = not device.startswith("cuda")
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=knobs.micro_batch_size,
        per_device_eval_batch_size=knobs.micro_batch_size,
        gradient_accumulation_steps=knobs.grad_accum,
        num_train_epochs=knobs.epochs,
        max_steps=knobs.max_steps or -1,
        learning_rate=knobs.learning_rate,
        lr_scheduler_type=knobs.lr_scheduler,
        warmup_steps=knobs.warmup_ratio,  # a float < 1 is a ratio of total steps in transformers 5
        optim=knobs.optim,
        activation_checkpointing=knobs.grad_checkpointing,  # transformers 5.23 name (gradient_* is an alias)
        activation_checkpointing_kwargs=dict(GC_KWARGS),
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=on_cpu,
        seed=knobs.seed,
        logging_steps=knobs.logging_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=None if early else SAVE_TOTAL_LIMIT,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        # rows arrive truncated to the cutoff (train/dataset.py); trl refuses padding_free with a
        # max_length and no packing (trl/trainer/sft_trainer.py, "When `padding_free=True` without packing")
        max_length=None if knobs.batching == "padding_free" else knobs.cutoff_len,
        truncation_mode="keep_start",
        packing=knobs.batching == "packed",
        packing_strategy="bfd",  # whole samples per row; trl flattens bfd rows padding-free itself
        padding_free=knobs.batching != "padded",
        use_liger_kernel=use_liger(knobs, device),
        completion_only_loss=True,
        report_to=report,
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


class StandardLossSFTTrainer(SFTTrainer):
    """loss: 'standard' -> the model's own cross-entropy over the full logits (no fused LM head).

    trl 1.16's SFTTrainer always calls the model with `fused_lm_head=True` (chunked log-probs,
    never materialising [batch, seq, vocab] logits); its `compute_loss_func` hook is deprecated and
    runs a second forward, so this subclass calls `transformers.Trainer.compute_loss` instead.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        inputs["use_cache"] = False
        if self.model.training and "attention_mask" in inputs:
            n = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def load_hf_tokenizer(folder: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_trainer(model: Any, tokenizer: Any, knobs: TrainingKnobs, train_rows: Sequence[dict[str, Any]],
                  eval_rows: Sequence[dict[str, Any]], output_dir: str | os.PathLike[str], *, device: str = "auto",
                  callbacks: Sequence[Any] = (), report: str = "none", hardware_bf16: bool = True,
                  dtype: torch.dtype | None = None) -> SFTTrainer:
    """trl's SFTTrainer on pre-tokenized rows (`input_ids` + `completion_mask`), LoRA via peft_config,
    its adapters in `adapter_dtype` (`dtype` overrides the compute dtype, as in `build_model`)."""
    from datasets import Dataset
    from transformers import EarlyStoppingCallback

    device = resolve_device(device)
    dtype = dtype or compute_dtype(knobs, device, hardware_bf16)
    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    has_eval = len(eval_rows) > 0
    args = sft_config(knobs, output_dir, device=device, has_eval=has_eval, dtype=dtype, report=report)
    cbs = list(callbacks)
    if knobs.early_stopping_patience and has_eval:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=knobs.early_stopping_patience))
    cls = StandardLossSFTTrainer if knobs.loss == "standard" else SFTTrainer
    trainer = cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(list(train_rows)),
        eval_dataset=Dataset.from_list(list(eval_rows)) if has_eval else None,
        processing_class=tokenizer,
        peft_config=lora_config(knobs, model),
        callbacks=cbs,
    )
    cast_trainable(trainer.model, adapter_dtype(dtype, quantized))  # undoes trl's bf16 cast under fp16
    return trainer


def save_adapter(trainer: Any, folder: str, *, is_main: bool) -> None:
    """Save the adapter to `folder`. Under FSDP or ZeRO-3 every rank takes part (the weights are
    sharded, gathering them is collective) and FSDP switches to a full state dict first (its
    sharded checkpoints are not an adapter `from_pretrained` can load); otherwise rank 0 alone."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    if is_main or trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        trainer.save_model(folder)


def param_dtype_summary(model: Any) -> dict[str, str]:
    """Which dtype each kind of parameter ended up in (recorded in the start event)."""
    kinds: dict[str, set[str]] = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            k = "lora"
        elif "embed" in name:
            k = "embeddings"
        elif "norm" in name:
            k = "norms"
        elif "lm_head" in name:
            k = "lm_head"
        else:
            k = "linear" if type(p).__name__ in ("Params4bit", "Int8Params") else "other"
        kinds.setdefault(k, set()).add(f"{type(p).__name__}:{str(p.dtype).replace('torch.', '')}"
                                       if k == "linear" else str(p.dtype).replace("torch.", ""))
    return {k: ",".join(sorted(v)) for k, v in sorted(kinds.items())}
