"""Compute and adapter dtypes the worker picks, for cards it cannot see here (capabilities faked).

Why it matters on real GPUs:
- `torch.cuda.is_bf16_supported()` defaults to `including_emulation=True`, which says True on a
  T4 (sm_75) or V100 (sm_70): the worker must decide from the compute capability instead.
- trl 1.16 casts the LoRA weights of a quantized model to bf16 whatever the compute dtype
  (.venv/lib/python3.11/site-packages/trl/trainer/sft_trainer.py, lines 908-911:
  `if _is_quantized_model: ... param.data = param.data.to(torch.bfloat16)`), and fp16 training's
  GradScaler cannot unscale bf16 gradients on CUDA ("_amp_foreach_non_finite_check_and_unscale_cuda"
  not implemented for 'BFloat16', pytorch/pytorch#127176, huggingface/trl#4901). On CPU the
  unscale kernel does take bf16, so these tests check the dtypes the trainer ends up with.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tuiwiz.planning.knobs import TrainingKnobs  # noqa: E402
from tuiwiz.train import build  # noqa: E402

T4, V100, A100, H100 = (7, 5), (7, 0), (8, 0), (9, 0)


def test_installed_torch_still_counts_emulated_bf16_as_supported() -> None:
    """The trap this module avoids: the default of is_bf16_supported includes emulation."""
    sig = inspect.signature(torch.cuda.is_bf16_supported)
    assert sig.parameters["including_emulation"].default is True


@pytest.mark.parametrize("cap,dtype", [(T4, torch.float16), (V100, torch.float16), (None, torch.float16),
                                       (A100, torch.bfloat16), (H100, torch.bfloat16), ((12, 0), torch.bfloat16)])
def test_a_bf16_plan_trains_in_bf16_only_on_ampere_or_newer(cap: tuple[int, int] | None, dtype: torch.dtype) -> None:
    got, warning = build.choose_compute_dtype("bf16", True, cap)
    assert got == dtype
    assert (warning is not None) == (dtype == torch.float16)  # the switch to fp16 is always said
    if cap is not None and warning:
        assert f"{cap[0]}.{cap[1]}" in warning and "fp16" in warning


def test_fp16_plans_and_non_bf16_presets_stay_fp16_without_a_warning() -> None:
    assert build.choose_compute_dtype("fp16", True, H100) == (torch.float16, None)
    assert build.choose_compute_dtype("bf16", True, H100, hardware_bf16=False) == (torch.float16, None)


def test_the_cpu_path_computes_in_bf16() -> None:
    assert build.choose_compute_dtype("fp16", False, None) == (torch.bfloat16, None)
    assert build.compute_dtype(TrainingKnobs(compute_dtype="bf16"), "cpu") == torch.bfloat16


@pytest.mark.parametrize("compute,quantized,want", [
    (torch.float16, True, torch.float32),   # the GradScaler needs fp32 gradients
    (torch.float16, False, torch.float32),
    (torch.bfloat16, True, torch.bfloat16),  # trl's QLoRA recipe, what the estimate models
    (torch.bfloat16, False, torch.float32),  # peft's autocast_adapter_dtype
])
def test_adapter_dtype_for_each_compute_dtype_and_base(compute: torch.dtype, quantized: bool,
                                                       want: torch.dtype) -> None:
    assert build.adapter_dtype(compute, quantized) == want


def _trainable_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad}


def _rows() -> list[dict[str, list[int]]]:
    return [{"input_ids": [1] + [10 + (i + j) % 50 for j in range(20)], "completion_mask": [0] * 5 + [1] * 16}
            for i in range(8)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_model import build_model

    return build_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.slow
@pytest.mark.parametrize("quant_bits,dtype,want", [
    (4, torch.float16, torch.float32),   # trl cast these to bf16; the worker casts them back
    (16, torch.float16, torch.float32),
    (4, torch.bfloat16, torch.bfloat16),  # control: trl's cast is really there
])
def test_the_trainer_keeps_lora_weights_in_the_adapter_dtype(tiny_dir: Path, tmp_path: Path, quant_bits: int,
                                                             dtype: torch.dtype, want: torch.dtype) -> None:
    """Built exactly as the worker builds it (build_model + build_trainer with the run's dtype),
    then trained a step: the optimizer's parameters keep that dtype."""
    knobs = TrainingKnobs(quant_bits=quant_bits, compute_dtype="fp16" if dtype == torch.float16 else "bf16",
                          micro_batch_size=2, grad_accum=1, max_steps=1, cutoff_len=32, lora_rank=4, lora_alpha=8,
                          save_steps=100, logging_steps=1, warmup_ratio=0.0, optim="adamw_torch")
    model = build.build_model(str(tiny_dir), knobs, "cpu", dtype=dtype)
    trainer = build.build_trainer(model, build.load_hf_tokenizer(tiny_dir), knobs, _rows(), [], tmp_path / "out",
                                  device="cpu", dtype=dtype)
    assert trainer.args.fp16 == (dtype == torch.float16)
    lora = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert set(lora.values()) == {want}
    trainer.train()
    assert _trainable_dtypes(trainer.model) == {want}
    assert {p.dtype for g in trainer.optimizer.param_groups for p in g["params"]} == {want}
