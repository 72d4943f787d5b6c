"""Model specs: catalog parameter counts equal the real module tree; offline resolution.

The module-tree check runs on the smallest catalog model of each family, with tied and with
untied embeddings; `pytest --full` runs every catalog model (see tests/conftest.py).
"""

from __future__ import annotations

import json

import pytest
from lanes import lane

from tuiwiz.errors import UserError
from tuiwiz.model_catalog import CATALOG
from tuiwiz.models import resolve_model, spec_from_config
from tuiwiz.planning.knobs import TrainingKnobs
from tuiwiz.planning.memory import lora_param_count


def _meta_model(cfg: dict):
    import torch
    import transformers

    cfg = dict(cfg)
    conf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(conf)


def _smallest_of_each_family() -> list:
    """The smallest catalog entry per (model_type, tied embeddings): every code path of the count."""
    best: dict = {}
    for e in CATALOG:
        key = (e.config["model_type"], bool(e.config.get("tie_word_embeddings")))
        size = spec_from_config(e.config, e.hub_id, "catalog").total_params
        if key not in best or size < best[key][0]:
            best[key] = (size, e)
    return [e for _, e in best.values()]


@pytest.mark.parametrize("entry", lane(CATALOG, _smallest_of_each_family(), lambda e: e.hub_id))
def test_catalog_param_count_equals_real_module_tree(entry):
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    model = _meta_model(entry.config)
    spec = spec_from_config(entry.config, entry.hub_id, "catalog")
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    counts = spec.param_counts()
    assert counts["embedding"] == model.get_input_embeddings().weight.numel()
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and ".layers." in n)
    assert spec.quantizable_params() == linear
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_param_count(spec, TrainingKnobs(lora_rank=8)) == trainable


def test_attention_only_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    entry = next(e for e in CATALOG if e.hub_id == "Qwen/Qwen2.5-0.5B")
    model = get_peft_model(_meta_model(entry.config),
                           LoraConfig(r=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    spec = spec_from_config(entry.config, entry.hub_id, "catalog")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_param_count(spec, TrainingKnobs(lora_rank=32, target_modules="attn")) == trainable


def test_catalog_matches_published_configs(shared_data):
    checked = 0
    for path in sorted((shared_data / "model_configs").glob("*.json")):
        if path.name.startswith("_"):
            continue
        hub_id = path.stem.replace("__", "/")
        published = spec_from_config(json.loads(path.read_text()), hub_id, str(path))
        try:
            ours = resolve_model(hub_id)
        except UserError:
            continue  # not in the catalog (e.g. MoE); resolving the file itself is covered elsewhere
        for f in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "tied_embeddings"):
            assert getattr(ours, f) == getattr(published, f), (hub_id, f)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("alias,base", [
    ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B"),
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"),
    ("google/gemma-2-9b-it", "google/gemma-2-9b"),
    ("Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B"),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"),
])
def test_instruct_variants_resolve_to_base_architecture(alias, base):
    a, b = resolve_model(alias), resolve_model(base)
    assert (a.layers, a.hidden, a.vocab, a.total_params) == (b.layers, b.hidden, b.vocab, b.total_params)


def test_local_config_and_hf_cache_resolve_offline(tmp_path, monkeypatch):
    entry = next(e for e in CATALOG if e.hub_id == "Qwen/Qwen2.5-0.5B")
    cfg = {**entry.config, "num_hidden_layers": 3}
    folder = tmp_path / "mymodel"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    assert resolve_model(str(folder)).layers == 3
    assert resolve_model(str(folder / "config.json")).layers == 3
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = resolve_model("acme/tiny")
    assert spec.layers == 3 and "HF cache" in spec.source


def test_unknown_model_suggests_catalog_entries():
    with pytest.raises(UserError, match="Did you mean .*Qwen/Qwen2.5-7B"):
        resolve_model("Qwen/Qwen2.5-8B")


def test_bad_config_names_file_and_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 8,\n oops}')
    with pytest.raises(UserError, match=r"config.json: line 2"):
        resolve_model(str(bad))


def test_unsupported_architecture_is_named(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(UserError, match="mamba"):
        resolve_model(str(p))
