"""Plans for the trainer that runs them: `trainer: tuiwiz|llamafactory|axolotl` estimates that
trainer's own stack, `--export FMT` implies it, and the export's header states that estimate.

What each consumer's stack does was read in its source (cited per fact below); the worker's
`residual: bf16` path is checked against the real module tree of a tiny quantized model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tuiwiz.cli import main
from tuiwiz.exports import export_text
from tuiwiz.models import resolve_model
from tuiwiz.planning.knobs import TrainingKnobs
from tuiwiz.planning.memory import estimate_memory, unquantized_weights_bytes
from tuiwiz.planning.stacks import STACKS, fit_to_trainer, residual_fp32
from tuiwiz.preset import load_preset

PRESETS = sorted((Path(__file__).resolve().parents[1] / "presets").glob("*.yaml"))

# --------------------------------------------------------------------------- vendored stack facts
# LLaMA-Factory, tag v0.9.5 @ 7af909522a951e3ad9f022ea6f88b6755257eaa5 (hiyouga/LLaMA-Factory):
#   no file under src/ calls peft's prepare_model_for_kbit_training; model/model_utils/checkpointing.py
#   `prepare_model_for_training` upcasts norms only with `upcast_layernorm`, which model_args.py
#   defaults to False; model/adapter.py `init_adapter` sets cast_trainable_params_to_fp32 = True for
#   LoRA (neither pure_bf16 nor BAdam); model/loader.py applies Liger with
#   require_logits=(stage not in ["pt", "sft"]), so sft and pt get its fused linear cross-entropy;
#   model_utils/liger_kernel.py patches llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, gemma,
#   gemma2, phi3 (among others).
# Axolotl 0.19.0 (the PyPI wheel; the same code at axolotl-ai-cloud/axolotl @
#   067b021c7b87a9e5e380b9173c704cf7340e30f5): loaders/model.py runs prepare_model_for_kbit_training
#   for a 4/8-bit lora/qlora, then, since `needs_fa2_dtype = True` for any lora/qlora adapter,
#   `_convert_embedding_modules_dtype(dist_dtype=cfg.torch_dtype)` casts norms, embed_tokens and
#   lm_head back to the compute dtype; loaders/adapter.py leaves peft's autocast_adapter_dtype
#   (fp32 adapters) unless peft_autocast_adapter_dtype is set; integrations/liger/plugin.py looks
#   model types up in liger-kernel's MODEL_TYPE_TO_APPLY_LIGER_FN.
CONSUMER_FACTS = {
    "llamafactory": {"residual": "bf16", "fp32_adapters": True},
    "axolotl": {"residual": "bf16", "fp32_adapters": True},
}


@pytest.mark.parametrize("trainer", sorted(CONSUMER_FACTS))
def test_consumer_stacks_match_what_their_source_does(trainer):
    stack, facts = STACKS[trainer], CONSUMER_FACTS[trainer]
    assert stack.residuals == (facts["residual"],)
    assert stack.fp32_adapters is facts["fp32_adapters"]
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"} <= stack.fused_model_types


def test_tuiwiz_defaults_to_the_bf16_stream_and_offers_peft_fp32():
    """bench/results/residual.md chose bf16: 25% less kept for backward, the same loss curve."""
    assert TrainingKnobs().residual == "bf16" and TrainingKnobs().trainer == "tuiwiz"
    assert STACKS["tuiwiz"].residuals == ("bf16", "fp32") and not STACKS["tuiwiz"].fp32_adapters


@pytest.mark.parametrize("argv, residual, warned", [
    (["--gpu", "T4"], "fp32", True),  # no bf16 on the card: fp16 compute keeps peft's fp32 stream
    (["--gpu", "4090", "--compute-dtype", "fp16"], "fp32", True),
    (["--gpu", "T4", "--residual", "bf16"], "bf16", False),  # held: the user's choice stands
    (["--gpu", "4090"], "bf16", False),
])
def test_fp16_compute_keeps_the_fp32_stream_unless_held(capsys, argv, residual, warned):
    """The bf16 default rests on bf16 measurements; fp16 has 5 exponent bits and can overflow."""
    main(["--auto", "--json", *argv])
    plan = json.loads(capsys.readouterr().out)
    assert plan["plan"]["residual"] == residual
    assert any("fp16 compute: residual stream fp32" in w for w in plan["warnings"]) is warned


# --------------------------------------------------------------------------- the estimate follows the stack


def _spec(model: str = "Qwen/Qwen2.5-7B-Instruct"):
    return resolve_model(model)


def test_a_consumer_runs_bf16_embeddings_and_fp32_adapters():
    spec = _spec()
    ours, peft_prep = TrainingKnobs(), TrainingKnobs(residual="fp32")
    lf, _ = fit_to_trainer(TrainingKnobs(trainer="llamafactory", residual="fp32"), spec.model_type)
    assert residual_fp32(peft_prep) and not residual_fp32(lf) and not residual_fp32(ours)
    assert unquantized_weights_bytes(spec, lf) == unquantized_weights_bytes(spec, ours)
    assert unquantized_weights_bytes(spec, lf) * 2 == unquantized_weights_bytes(spec, peft_prep)
    a, b = estimate_memory(spec, ours), estimate_memory(spec, lf)
    assert b.term("lora_weights").bytes == 2 * a.term("lora_weights").bytes  # fp32 instead of trl's bf16


def test_full_logits_cost_more_than_the_consumers_fused_loss():
    spec = _spec()
    for trainer in ("llamafactory", "axolotl"):
        fused, _ = fit_to_trainer(TrainingKnobs(trainer=trainer, micro_batch_size=4), spec.model_type)
        full = fused.replace(loss="standard")
        assert estimate_memory(spec, full).peak_bytes > estimate_memory(spec, fused).peak_bytes + 2 * 1024**3


def test_a_model_liger_does_not_patch_is_planned_with_full_logits():
    knobs, reasons = fit_to_trainer(TrainingKnobs(trainer="axolotl"), "falcon")
    assert knobs.loss == "standard" and any("full logits" in r for r in reasons)
    knobs, _ = fit_to_trainer(TrainingKnobs(trainer="tuiwiz"), "falcon")
    assert knobs.loss == "chunked"  # trl's chunked loss works for any model


def test_llamafactory_liger_kernels_follow_its_one_switch():
    on, _ = fit_to_trainer(TrainingKnobs(trainer="llamafactory"), "llama")
    off, _ = fit_to_trainer(TrainingKnobs(trainer="llamafactory", loss="standard", liger=True), "llama")
    assert on.liger and not off.liger


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
@pytest.mark.parametrize("fmt", ["llamafactory", "axolotl"])
def test_every_shipped_preset_fits_its_card_under_the_consumers_own_loss(path, fmt):
    preset = load_preset(path)
    spec = resolve_model(preset.model.id)
    knobs, _ = fit_to_trainer(preset.training.replace(trainer=fmt), spec.model_type)
    assert knobs.loss == "chunked"  # the export switches the fused loss on
    assert estimate_memory(spec, knobs, preset.hardware.count).peak_gib <= preset.estimate.budget_gib
    header = export_text(preset, fmt).splitlines()[:8]
    assert any("(fits)" in line for line in header), header


# --------------------------------------------------------------------------- front ends


def _json(capsys, *argv: str) -> dict:
    rc = main(["--auto", "--json", "--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu", "4090", *argv])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_export_implies_the_trainer_and_json_says_it(capsys, tmp_path):
    out = tmp_path / "lf.yaml"
    plan = _json(capsys, "--export", "llamafactory", "--out", str(out))
    assert plan["plan"]["trainer"] == "llamafactory" and plan["plan"]["residual"] == "bf16"
    header = out.read_text().splitlines()[:6]
    # the file states the same peak the plan reports
    assert any(f"peak {plan['memory']['peak_gib']:.1f} GiB" in line for line in header), header


def test_the_same_plan_differs_per_trainer(capsys):
    peaks = {t: _json(capsys, "--trainer", t, "--micro-batch", "2", "--grad-checkpointing", "on")["memory"]["peak_gib"]
             for t in ("tuiwiz", "llamafactory", "axolotl")}
    assert len(set(peaks.values())) == 3, peaks


def test_a_trainer_and_an_export_that_disagree_are_refused(capsys):
    assert main(["--auto", "--trainer", "axolotl", "--export", "llamafactory", "--gpu", "4090"]) == 2
    assert "disagree" in capsys.readouterr().err


def test_a_residual_the_trainer_cannot_run_is_refused(capsys):
    assert main(["--auto", "--trainer", "llamafactory", "--residual", "fp32", "--gpu", "4090"]) == 2
    err = capsys.readouterr().err
    assert "--residual" in err and "bf16" in err


def test_export_of_a_tuiwiz_preset_re_estimates_for_the_consumer():
    preset = load_preset(PRESETS[0])
    text = export_text(preset, "axolotl")
    spec = resolve_model(preset.model.id)
    knobs, _ = fit_to_trainer(preset.training.replace(trainer="axolotl"), spec.model_type)
    peak = estimate_memory(spec, knobs, preset.hardware.count).peak_gib
    assert f"peak {peak:.1f} GiB" in text and f"peak {preset.estimate.peak_gib:.1f} GiB" not in text
    assert yaml.safe_load(text)["liger_fused_linear_cross_entropy"] is True


# --------------------------------------------------------------------------- the worker's bf16 residual


@pytest.mark.slow
def test_worker_residual_bf16_keeps_embeddings_norms_and_head_in_bf16(tmp_path):
    """The real module tree after `build_model`: what `unquantized_weights_bytes` counts."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    from transformers import AutoConfig

    from tuiwiz.models import spec_from_config
    from tuiwiz.train.build import build_model

    raw = dict(model_type="llama", num_hidden_layers=2, vocab_size=512, hidden_size=128, intermediate_size=384,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
               tie_word_embeddings=False)
    spec = spec_from_config(raw, "tiny-llama", "test")
    for residual, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        knobs = TrainingKnobs(residual=residual, lora_rank=4)
        model = build_model(AutoConfig.for_model(**raw), knobs, device="cpu", scratch_dir=tmp_path / residual,
                            dtype=torch.bfloat16)
        plain = [p for p in model.parameters() if type(p).__name__ not in ("Params4bit", "Int8Params")]
        assert {p.dtype for p in plain} == {dtype}, residual
        assert not any(p.requires_grad for p in model.parameters())
        assert sum(p.numel() * p.element_size() for p in plain) == unquantized_weights_bytes(spec, knobs)
