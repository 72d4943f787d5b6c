"""Per-GPU memory per strategy (tuiwiz.planning.strategy), the advisor's choice, and the hardware shape.

Truths used: bitsandbytes' own storage of a model loaded the way a sharded run loads it (bf16 quant
storage, no fp32 upcast), DeepSpeed's published 18 bytes per trainable parameter, the estimate's
own activation terms across GPU counts (activations are never sharded), and the CLI's exit codes.
"""

from __future__ import annotations

import json
import os

import pytest

from tuiwiz.cli import main
from tuiwiz.errors import BadValue
from tuiwiz.models import resolve_model
from tuiwiz.planning.advisor import advise, budget_bytes
from tuiwiz.planning.knobs import TrainingKnobs, parse_knob
from tuiwiz.planning.memory import estimate_memory, lora_param_count
from tuiwiz.planning.strategy import DS_BYTES_PER_TRAINABLE, host_ram, stored

L70 = resolve_model("meta-llama/Llama-3.1-70B")
L8 = resolve_model("meta-llama/Llama-3.1-8B")
SHARDED = {"residual": "bf16", "optim": "adamw_torch"}


def _terms(spec, gpus: int, **knobs) -> dict[str, int]:
    return {t.key: t.bytes for t in estimate_memory(spec, TrainingKnobs(**{"cutoff_len": 2048, **knobs}), gpus).terms}


def _auto(capsys, *args: str) -> tuple[int, dict]:
    code = main(["--auto", "--json", "--cutoff-len", "2048", *args])
    return code, json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------ the per-GPU model


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_offload", "zero3", "zero3_offload"])
def test_activations_are_not_sharded(strategy: str) -> None:
    one = _terms(L70, 1, strategy="ddp", residual="bf16", optim="adamw_torch")
    for gpus in (2, 8):
        many = _terms(L70, gpus, strategy=strategy, **SHARDED)
        assert (many["activations"], many["logits"]) == (one["activations"], one["logits"])


def test_fsdp_shards_the_packed_weights_and_keeps_the_absmax_whole() -> None:
    st = stored(L70, TrainingKnobs(strategy="fsdp", **SHARDED))
    two, eight = (_terms(L70, n, strategy="fsdp", **SHARDED)["quantized_weights"] for n in (2, 8))
    assert two - st.constants == pytest.approx(st.packed / 2, abs=1) and eight - st.constants == pytest.approx(
        st.packed / 8, abs=1)
    assert 0 < st.constants < 0.1 * st.packed  # double-quantized absmax: ~0.127 bit per 4-bit weight


def test_a_sharded_run_holds_far_less_than_a_replicated_one_per_gpu() -> None:
    ddp = estimate_memory(L70, TrainingKnobs(cutoff_len=2048, **SHARDED), 2).peak_bytes
    fsdp = estimate_memory(L70, TrainingKnobs(cutoff_len=2048, strategy="fsdp", **SHARDED), 2).peak_bytes
    offload = estimate_memory(L70, TrainingKnobs(cutoff_len=2048, strategy="fsdp_offload", **SHARDED), 2).peak_bytes
    packed = stored(L70, TrainingKnobs(strategy="fsdp", **SHARDED)).packed
    # two GPUs: half the packed 4-bit weights each, less the two gathered layers and the root unit
    assert offload < fsdp and ddp - fsdp > 0.4 * packed


def test_offloading_moves_the_shards_to_host_ram() -> None:
    knobs = TrainingKnobs(cutoff_len=2048, strategy="fsdp_offload", **SHARDED)
    t = _terms(L70, 2, **knobs.model_dump())
    st = stored(L70, knobs)
    assert t["quantized_weights"] == st.constants and t["unquantized_weights"] == 0
    assert t["lora_weights"] == t["lora_gradients"] == t["optimizer_states"] == 0
    ram = {x.key: x.bytes for x in host_ram(L70, knobs, 2, 2).terms}
    assert ram["host_offloaded"] >= st.packed + st.other  # both ranks' shards on this node
    one_node_of_two = {x.key: x.bytes for x in host_ram(L70, knobs, 4, 2).terms}
    assert one_node_of_two["host_offloaded"] == pytest.approx(ram["host_offloaded"] / 2, rel=0.01)


def test_zero3_charges_deepspeeds_18_bytes_only_to_the_trainable_adapters() -> None:
    """DeepSpeed's estimator charges 18 bytes per parameter (bf16 weight and gradient, fp32 master
    and Adam moments); with a frozen 4-bit base that holds for LoRA only."""
    assert sum(DS_BYTES_PER_TRAINABLE.values()) == 18
    knobs = TrainingKnobs(cutoff_len=2048, strategy="zero3", **SHARDED)
    t = _terms(L70, 8, **knobs.model_dump())
    lora = lora_param_count(L70, knobs)
    bucket = 2 * min(500_000_000, lora)
    assert t["lora_weights"] + t["lora_gradients"] - bucket + t["optimizer_states"] == pytest.approx(
        18 * lora / 8, abs=8)
    st = stored(L70, knobs)
    base = t["quantized_weights"] - st.constants
    assert base == pytest.approx(st.packed / 8, abs=1)
    assert base < 0.26 * 2 * L70.quantizable_params() / 8  # a quarter of DeepSpeed's 2 bytes per weight


def test_one_gpu_ddp_is_what_it_always_was() -> None:
    assert _terms(L8, 1) == _terms(L8, 1, strategy="ddp")
    assert "gathered_layers" not in _terms(L8, 2)


# ------------------------------------------------------------------ the advisor's choice


def _advise(spec, gib: float, gpus: int, **fixed_knobs):
    base = TrainingKnobs(cutoff_len=2048, **fixed_knobs)
    return advise(spec, base, budget_bytes(gib), gpus=gpus, fixed=set(fixed_knobs) | {"cutoff_len"})


def test_advisor_keeps_ddp_when_a_whole_copy_fits_one_card() -> None:
    a = _advise(L8, 24, 2)
    assert a.knobs.strategy == "ddp" and a.fits
    assert any(r.startswith("strategy ddp: the whole model fits on one GPU") for r in a.reasons)


def test_advisor_shards_a_model_too_big_for_one_card_and_offloads_when_sharding_is_not_enough() -> None:
    sharded = _advise(resolve_model("Qwen/Qwen2.5-32B"), 24, 2)
    assert sharded.knobs.strategy == "fsdp" and sharded.fits
    assert (sharded.knobs.residual, sharded.knobs.optim) == ("bf16", "adamw_torch")
    offloaded = _advise(L70, 24, 2)
    assert offloaded.knobs.strategy == "fsdp_offload" and offloaded.fits
    (line,) = [r for r in offloaded.reasons if r.startswith("strategy fsdp_offload")]
    assert "host RAM" in line and "GiB" in line
    # and the cheaper strategies really did not fit at their smallest step
    small = offloaded.knobs.replace(micro_batch_size=1, grad_checkpointing=True)
    assert estimate_memory(L70, small.replace(strategy="fsdp"), 2).peak_bytes > budget_bytes(24)


def test_advisor_holds_a_strategy_the_user_chose_and_never_shards_one_gpu() -> None:
    held = _advise(L8, 80, 2, strategy="zero3")
    assert held.knobs.strategy == "zero3"
    alone = _advise(L70, 24, 1)
    assert alone.knobs.strategy == "ddp" and not alone.fits


def test_an_8bit_base_cannot_be_sharded(capsys) -> None:
    code = main(["--auto", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "24GB", "--num-gpus", "2",
                 "--quant", "8", "--strategy", "fsdp"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tuiwiz: --strategy:") and "8-bit" in err


def test_auto_leaves_the_strategy_to_the_advisor() -> None:
    assert parse_knob("strategy", "auto") is None
    with pytest.raises(BadValue):
        parse_knob("strategy", "pipeline")


# ------------------------------------------------------------------ the hardware shape and the CLI


def test_a_70b_model_on_two_3090s_plans_fsdp_qlora_with_its_host_ram(capsys) -> None:
    code, d = _auto(capsys, "--model", "meta-llama/Llama-3.1-70B", "--gpu", "3090", "--num-gpus", "2")
    assert code == 0 and d["plan"]["strategy"].startswith("fsdp") and d["memory"]["fits"]
    assert (d["hardware"]["count"], d["hardware"]["nodes"], d["hardware"]["source"]) == (2, 1, "catalog")
    assert (d["plan"]["gpus"], d["plan"]["nodes"]) == (2, 1)
    ram = d["memory"]["host_ram"]
    assert ram["per"] == "node" and ram["peak_gib"] > 37  # at least the 4-bit model itself
    if d["plan"]["strategy"] == "fsdp_offload":
        assert ram["offloading"] and any("host RAM" in w for w in d["warnings"])
    assert any(r.startswith(f"strategy {d['plan']['strategy']}") for r in d["reasons"])


def test_two_catalog_cards_are_two_cards(capsys) -> None:
    code, d = _auto(capsys, "--model", "meta-llama/Llama-3.1-8B", "--gpu", "A100-80GB", "--num-gpus", "2")
    assert code == 0 and [g["name"] for g in d["hardware"]["gpus"]] == ["A100 80GB", "A100 80GB"]
    assert d["plan"]["gpus"] == 2 and d["plan"]["effective_batch"] % 2 == 0


def test_nodes_multiply_the_gpus_and_the_effective_batch(capsys) -> None:
    code, d = _auto(capsys, "--model", "meta-llama/Llama-3.1-8B", "--gpu", "H100", "--num-gpus", "8",
                    "--nodes", "2", "--effective-batch", "64")
    assert code == 0 and (d["plan"]["gpus"], d["plan"]["nodes"], d["plan"]["gpus_per_node"]) == (16, 2, 8)
    k = d["plan"]
    assert k["micro_batch_size"] * k["grad_accum"] * 16 == k["effective_batch"] >= 64


@pytest.mark.parametrize("args, words", [
    (["--gpus", "0,1", "--num-gpus", "3"], "--num-gpus"),
    (["--gpus", "0,1", "--nodes", "2"], "--nodes"),
    (["--gpu", "A100-80GB", "--gpus", "0,1"], "--gpus"),
    (["--gpu", "3090", "--num-gpus", "0"], "--num-gpus"),
])
def test_conflicting_or_bad_shape_flags_are_usage_errors(args: list[str], words: str, capsys) -> None:
    code = main(["--auto", "--model", "meta-llama/Llama-3.1-8B", *args])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err


def test_more_gpus_is_suggested_before_a_smaller_model(capsys) -> None:
    code, d = _auto(capsys, "--model", "meta-llama/Llama-3.1-70B", "--gpu", "3090")
    assert code == 3
    texts = [s["text"] for s in d["suggestions"]]
    more = next(i for i, t in enumerate(texts) if "per node, strategy fsdp" in t)
    smaller = next(i for i, t in enumerate(texts) if t.startswith("a smaller model"))
    assert more < smaller
    flags = d["suggestions"][more]["flags"]
    code, again = _auto(capsys, "--model", "meta-llama/Llama-3.1-70B", "--gpu", "3090", *flags)
    assert code == 0 and again["memory"]["fits"]


def test_a_multi_node_preset_is_not_launched_on_one_machine(tmp_path) -> None:
    from tuiwiz.errors import UserError
    from tuiwiz.preset import preset_from_dict
    from tuiwiz.runs.launcher import launch

    preset = preset_from_dict({"model": {"id": "x/y"}, "hardware": {"gpu": "H100", "memory_gib": 80, "count": 8,
                                                                     "nodes": 2}})
    with pytest.raises(UserError) as e:
        launch(preset, tmp_path)
    assert e.value.field == "nodes" and "SLURM" in str(e.value)


def test_a_sharded_plan_is_not_launched_on_the_cpu(tmp_path) -> None:
    from tuiwiz.errors import UserError
    from tuiwiz.preset import preset_from_dict
    from tuiwiz.runs.launcher import launch

    preset = preset_from_dict({"model": {"id": "x/y"}, "hardware": {"gpu": "H100", "memory_gib": 80, "count": 2},
                               "training": {"strategy": "fsdp", "residual": "bf16"}})
    with pytest.raises(UserError) as e:
        launch(preset, tmp_path, cpu=True)
    assert e.value.field == "strategy" and not any(tmp_path.iterdir())  # refused before anything was made


# ------------------------------------------------------------------ measured: how a sharded run stores the model


@pytest.mark.slow
def test_sharded_loading_stores_4bit_weights_in_bf16_as_the_estimate_counts() -> None:
    """Loaded the way the worker loads an FSDP run: packed weights in bf16 storage, absmax whole,
    embeddings, norms and head left in bf16 (no fp32 upcast)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import bitsandbytes as bnb
    from _accounting import saved_base, tiny_config

    from tuiwiz.models import spec_from_config
    from tuiwiz.train.build import build_model

    cfg = tiny_config("llama", layers=2, vocab=1024)
    cfg.update(hidden_size=256, intermediate_size=704)
    spec = spec_from_config(cfg, "tiny-llama", "test")
    knobs = TrainingKnobs(strategy="fsdp", residual="bf16", optim="adamw_torch")
    model = build_model(saved_base(cfg), knobs, device="cpu")
    st = stored(spec, knobs)
    packed = constants = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w, qs = mod.weight, mod.weight.quant_state
            assert w.dtype == torch.bfloat16  # FSDP can flatten and split it
            packed += w.untyped_storage().nbytes()
            constants += qs.absmax.untyped_storage().nbytes() + (qs.state2.absmax.untyped_storage().nbytes()
                                                                 if qs.nested else 0)
    assert packed == st.packed
    assert abs(constants - st.constants) <= 0.02 * constants
    others = {p.data_ptr(): p for p in model.parameters() if p.__class__.__name__ != "Params4bit"}
    assert all(p.dtype == torch.bfloat16 for p in others.values())
    assert sum(p.numel() * p.element_size() for p in others.values()) == st.other
    layer = model.model.layers[0]
    own = sum(p.untyped_storage().nbytes() if p.__class__.__name__ == "Params4bit" else p.numel() * p.element_size()
              for p in layer.parameters())
    own += sum(m.weight.quant_state.absmax.untyped_storage().nbytes() for m in layer.modules()
               if isinstance(m, bnb.nn.Linear4bit))
    lora_per_layer = st.layer - own
    assert abs(lora_per_layer - 2 * lora_param_count(spec, knobs) // spec.layers) <= 0.02 * own
