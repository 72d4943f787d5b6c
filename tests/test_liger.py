"""The `liger` knob: what the estimate takes off, what the plan says, and when the worker turns it on.

Liger's kernels are Triton (CUDA only), so on CPU this checks the plumbing and the estimate:
- transformers' MLP keeps three intermediate-width tensors (measured below); Liger's SwiGLU keeps
  two, gate and up, and recomputes the activation in backward (liger_kernel/ops/swiglu.py,
  `LigerSiLUMulFunction.forward`: `ctx.save_for_backward(a, b)`);
- transformers' RMSNorm keeps an fp32 copy of its input; Liger's keeps the input in its own dtype
  (liger_kernel/ops/rms_norm.py: `ctx.save_for_backward(X, W, RSTD)`);
- RoPE: neither keeps anything per token (the rotary tables are shared), so nothing to save;
- fused linear cross-entropy: trl 1.16's SFTTrainer turns it off and keeps its own chunked head
  (trl/trainer/sft_trainer.py: `liger_kernel_config = {..., "fused_linear_cross_entropy": False}`).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tuiwiz.models import resolve_model
from tuiwiz.planning import activations as act
from tuiwiz.planning.knobs import TrainingKnobs, parse_knob
from tuiwiz.planning.memory import ALLOCATOR_SLACK, estimate_memory, liger_saving_bytes

ROOT = Path(__file__).resolve().parents[1]
LLAMA = resolve_model("meta-llama/Llama-3.1-8B")


def test_transformers_mlp_keeps_three_intermediate_tensors_per_token() -> None:
    """The baseline Liger's SwiGLU improves on, counted from what autograd saves in LlamaMLP."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=64, intermediate_size=176)
    mlp = LlamaMLP(cfg).requires_grad_(False)  # frozen base weights, as under LoRA
    x = torch.randn(1, 10, 64, requires_grad=True)
    wide: set[int] = set()

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 3 and t.shape[-1] == cfg.intermediate_size:  # per token (not the down weight)
            wide.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        mlp(x)
    assert len(wide) == 3 == act._mlp_saved_tensors(LLAMA, TrainingKnobs())
    assert act._mlp_saved_tensors(LLAMA, TrainingKnobs(liger=True)) == 2


def test_liger_takes_one_mlp_tensor_per_layer_and_token_off_an_fp32_stream() -> None:
    """NF4 base, fp32 residual, no checkpointing: each layer keeps 4 x intermediate bytes less per
    token, and the norms save nothing (their input is already fp32). Peak moves by that plus slack."""
    k = TrainingKnobs(micro_batch_size=2, cutoff_len=512, grad_checkpointing=False, batching="padding_free",
                      residual="fp32")
    tokens = 2 * 512
    expected = LLAMA.layers * tokens * 4 * LLAMA.intermediate
    saved = liger_saving_bytes(LLAMA, k)
    assert saved == pytest.approx(expected * (1 + ALLOCATOR_SLACK), rel=0.002)


def test_liger_norms_keep_a_bf16_input_instead_of_an_fp32_copy_on_a_16_bit_base() -> None:
    k = TrainingKnobs(quant_bits=16, micro_batch_size=1, cutoff_len=256, grad_checkpointing=False)
    per_token = (act.layer_saved_bytes_per_token(LLAMA, k, 256)
                 - act.layer_saved_bytes_per_token(LLAMA, k.replace(liger=True), 256))
    assert per_token == 2 * LLAMA.intermediate + LLAMA.norms_per_layer * (4 - 2) * LLAMA.hidden


def test_liger_changes_nothing_for_a_model_it_has_no_kernels_for() -> None:
    other = dataclasses.replace(LLAMA, model_type="starcoder2")
    k = TrainingKnobs(grad_checkpointing=False)
    assert estimate_memory(other, k.replace(liger=True)).peak_bytes == estimate_memory(other, k).peak_bytes


def test_liger_is_a_switch_with_a_flag() -> None:
    assert parse_knob("liger", "on") is True and TrainingKnobs().liger is False


def test_liger_is_an_optional_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("liger-kernel") for dep in extras["liger"])
    assert not any(dep.startswith("liger-kernel") for dep in extras["train"])


def _plan(*flags: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "tuiwiz", "--auto", "--json", "--model", "meta-llama/Llama-3.1-8B",
                          "--gpu", "48GB", "--cutoff-len", "1024", "--micro-batch", "2", "--grad-checkpointing",
                          "off", *flags], capture_output=True, text=True, cwd=ROOT, env={"HF_HUB_OFFLINE": "1",
                                                                                          "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_plan_says_what_liger_saves() -> None:
    """The reason's figure is the difference between the same plan without and with Liger."""
    off, on = _plan(), _plan("--liger", "on")
    said = next(r for r in on["reasons"] if r.startswith("Liger kernels save"))
    gib = float(said.split("save ")[1].split(" GiB")[0])
    assert gib > 0.5
    assert gib == pytest.approx(off["memory"]["peak_gib"] - on["memory"]["peak_gib"], abs=0.01)
    assert any("Liger kernels" in a for a in on["memory"]["assumptions"])


def test_worker_turns_liger_on_only_on_cuda_with_liger_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    import torch

    from tuiwiz.train import build

    k = TrainingKnobs(liger=True)
    assert build.liger_problem(TrainingKnobs(), "cpu") is None
    assert "CUDA" in (build.liger_problem(k, "cpu") or "")
    assert build.sft_config(k, tmp_path, device="cpu", has_eval=False, dtype=torch.bfloat16).use_liger_kernel is False

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    assert "tuiwiz[liger]" in (build.liger_problem(k, "cuda:0") or "")
    assert build.use_liger(k, "cuda:0") is False

    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: real("json") if name == "liger_kernel" else real(name, *a))
    assert build.liger_problem(k, "cuda:0") is None and build.use_liger(k, "cuda:0") is True
    assert build.use_liger(TrainingKnobs(), "cuda:0") is False
