"""The static terms match the real module tree after the worker's k-bit preparation.

bitsandbytes 4-bit loads on CPU, so the quantized storage (packed weights, absmax, double-quant
constants), the dtypes k-bit preparation leaves on embeddings, head and norms, and the LoRA
adapters' count and dtype can be read off a tiny model of each family and compared with
`tuiwiz.planning.memory`.

The default run checks Llama on the default bf16 stream and Gemma 2 (tied embeddings, eager) with
peft's fp32 upcast; `pytest --full` runs all four families with both (see tests/conftest.py).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _accounting import build_qlora, tiny_config  # noqa: E402
from lanes import lane  # noqa: E402

from tuiwiz.models import spec_from_config  # noqa: E402
from tuiwiz.planning import memory  # noqa: E402
from tuiwiz.planning.knobs import TrainingKnobs  # noqa: E402

FAMILIES = ["llama", "qwen2", "gemma2", "phi3"]
RANK = 16
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=lane([(f, r) for f in FAMILIES for r in ("bf16", "fp32")],
                                             [("llama", "bf16"), ("gemma2", "fp32")], lambda p: "-".join(p)))
def prepared(request):
    fam, residual = request.param
    cfg = tiny_config(fam, layers=2, vocab=1024)
    cfg.update(hidden_size=256, intermediate_size=FAMILIES_INTER[fam])
    spec = spec_from_config(cfg, f"tiny-{fam}", "test")
    names = list(spec.resolve_targets("all-linear"))
    attn = "eager" if fam == "gemma2" else "sdpa"
    model = build_qlora(cfg, rank=RANK, dropout=0.05, targets=names, attn=attn, grad_checkpointing=True,
                        residual=residual)
    knobs = TrainingKnobs(lora_rank=RANK, target_modules="all-linear", attn=attn, residual=residual)
    return spec, knobs, model


FAMILIES_INTER = {"llama": 704, "qwen2": 1216, "gemma2": 1024, "phi3": 640}


def _quant_storage(model) -> int:
    import bitsandbytes as bnb

    total = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = mod.weight
            qs = w.quant_state
            total += w.untyped_storage().nbytes() + qs.absmax.untyped_storage().nbytes()
            if qs.nested:
                total += qs.state2.absmax.untyped_storage().nbytes()
    return total


def test_quantized_weights_match_bitsandbytes_storage(prepared):
    spec, knobs, model = prepared
    got = _quant_storage(model)
    est = memory.quantized_weights_bytes(spec, knobs)
    assert abs(est - got) <= 0.02 * got, f"bitsandbytes {got} B, estimate {est} B"


def test_every_decoder_linear_is_4bit_and_nothing_else_is(prepared):
    spec, _, model = prepared
    import bitsandbytes as bnb

    n4 = sum(1 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert n4 == spec.layers * len(spec.linear_modules())
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)


def test_embeddings_head_and_norms_are_in_the_residual_dtype_and_counted(prepared):
    """bf16 by default; peft's k-bit preparation (`residual: fp32`) upcasts them to fp32."""
    spec, knobs, model = prepared
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    want = torch.float32 if knobs.residual == "fp32" else torch.bfloat16
    assert emb.dtype == want and head.dtype == want
    assert (emb.data_ptr() == head.data_ptr()) == spec.tied_embeddings
    frozen = {p.data_ptr(): p for p in model.parameters()
              if not p.requires_grad and p.__class__.__name__ != "Params4bit"}  # tied: one storage
    unquant = sum(p.numel() * p.element_size() for p in frozen.values())
    assert abs(memory.unquantized_weights_bytes(spec, knobs) - unquant) <= 0.02 * unquant


def test_lora_adapters_are_bf16_after_the_trainer_cast_and_counted_exactly(prepared):
    spec, knobs, model = prepared
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in trainable)
    assert sum(p.numel() for p in trainable) == memory.lora_param_count(spec, knobs)
    assert memory.lora_weights_bytes(spec, knobs) == sum(p.numel() * p.element_size() for p in trainable)


def test_worker_builds_gemma2_with_eager_attention_when_sdpa_is_asked():
    """transformers refuses SDPA for Gemma 2; the builder must not pass it on (the plan and the
    estimate assume eager)."""
    from _accounting import saved_base

    from tuiwiz.train.build import build_model

    model = build_model(saved_base(tiny_config("gemma2", layers=1)), TrainingKnobs(attn="sdpa"), device="cpu")
    assert model.config._attn_implementation == "eager"
