"""Model configs with impossible values, and model references that name nothing: each is one
UserError naming the config file and key (or the field), never a traceback or a plan for a
model with a negative parameter count."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tuiwiz.errors import BadValue, NotFound, UserError
from tuiwiz.model_catalog import CATALOG
from tuiwiz.models import BadConfigValue, resolve_model, spec_from_config

BASE = next(e for e in CATALOG if e.hub_id == "Qwen/Qwen2.5-0.5B").config  # hidden 896, 14 heads, 2 kv heads
MOE = {"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 100,
       "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
ABSENT = object()


def write_config(folder: Path, cfg: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def with_value(base: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    cfg = dict(base)
    if value is ABSENT:
        cfg.pop(key, None)
    else:
        cfg[key] = value
    return cfg


# (config, key the message must name, words it must contain)
BROKEN = {
    "zero heads": (with_value(BASE, "num_attention_heads", 0), "num_attention_heads", "between 1"),
    "negative heads": (with_value(BASE, "num_attention_heads", -14), "num_attention_heads", "between 1"),
    "heads as text": (with_value(BASE, "num_attention_heads", "14"), "num_attention_heads", "whole number"),
    "heads null": (with_value(BASE, "num_attention_heads", None), "num_attention_heads", "is null"),
    "heads true": (with_value(BASE, "num_attention_heads", True), "num_attention_heads", "whole number"),
    "hidden missing": (with_value(BASE, "hidden_size", ABSENT), "hidden_size", "is missing"),
    "hidden fractional": (with_value(BASE, "hidden_size", 896.5), "hidden_size", "whole number"),
    "hidden a list": (with_value(BASE, "hidden_size", [896]), "hidden_size", "whole number"),
    "hidden absurd": (with_value(BASE, "hidden_size", 10**9), "hidden_size", "between 1"),
    "layers negative": (with_value(BASE, "num_hidden_layers", -3), "num_hidden_layers", "between 1 and 1,000"),
    "layers zero": (with_value(BASE, "num_hidden_layers", 0), "num_hidden_layers", "between 1"),
    "layers absurd": (with_value(BASE, "num_hidden_layers", 10**6), "num_hidden_layers", "between 1"),
    "layers infinite": (with_value(BASE, "num_hidden_layers", float("inf")), "num_hidden_layers", "whole number"),
    "vocab zero": (with_value(BASE, "vocab_size", 0), "vocab_size", "between 1"),
    "intermediate negative": (with_value(BASE, "intermediate_size", -1), "intermediate_size", "between 1"),
    "heads not dividing hidden": ({**BASE, "num_attention_heads": 13}, "num_attention_heads", "divide hidden_size"),
    "kv heads not dividing heads": (with_value(BASE, "num_key_value_heads", 4), "num_key_value_heads", "divide"),
    "kv heads zero": (with_value(BASE, "num_key_value_heads", 0), "num_key_value_heads", "between 1"),
    "kv heads above heads": (with_value(BASE, "num_key_value_heads", 28), "num_key_value_heads", "between 1 and 14"),
    "head_dim zero": (with_value(BASE, "head_dim", 0), "head_dim", "between 1"),
    "positions negative": (with_value(BASE, "max_position_embeddings", -1), "max_position_embeddings", "between 1"),
    "tied as text": (with_value(BASE, "tie_word_embeddings", "false"), "tie_word_embeddings", "true or false"),
    "softcap negative": (with_value(BASE, "final_logit_softcapping", -30.0), "final_logit_softcapping", "positive"),
    "experts negative": (with_value(MOE, "num_experts", -8), "num_experts", "between 0"),
    "experts per token zero": (with_value(MOE, "num_experts_per_tok", 0), "num_experts_per_tok", "between 1 and 8"),
    "experts per token above experts": (with_value(MOE, "num_experts_per_tok", 9), "num_experts_per_tok", "and 8"),
    "sparse step zero": (with_value(MOE, "decoder_sparse_step", 0), "decoder_sparse_step", "between 1"),
    "mlp-only layers not a list": (with_value(MOE, "mlp_only_layers", "0,1"), "mlp_only_layers", "list of layer"),
    "mlp-only layer out of range": (with_value(MOE, "mlp_only_layers", [7]), "mlp_only_layers", "0 to 3"),
    "nested text config": ({**BASE, "text_config": {"hidden_size": 0}}, "text_config.hidden_size", "between 1"),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_impossible_config_value_names_the_file_and_key(tmp_path: Path, case: str) -> None:
    cfg, key, words = BROKEN[case]
    path = write_config(tmp_path / "m", cfg)
    with pytest.raises(BadConfigValue) as info:
        resolve_model(str(path.parent))
    err = info.value
    assert str(err).startswith(f"{path}: {key}: "), str(err)
    assert words in str(err) and err.field == "model" and err.key == key
    assert err.render(lambda f: "--" + f) == str(err)  # the file and key, not a flag, name it


def test_the_valid_base_configs_still_resolve(tmp_path: Path) -> None:
    for i, cfg in enumerate((BASE, MOE, {**BASE, "hidden_size": 896.0})):
        spec = resolve_model(str(write_config(tmp_path / str(i), cfg)))
        assert spec.total_params > 0


def test_bad_value_in_the_hf_cache_names_the_cached_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = tmp_path / "hub" / "models--acme--broken" / "snapshots" / "abc123"
    path = write_config(snap, with_value(BASE, "vocab_size", 0))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(BadConfigValue, match=rf"^{path}: vocab_size: "):
        resolve_model("acme/broken")


def test_spec_from_config_names_the_source_it_is_given() -> None:
    with pytest.raises(BadConfigValue, match=r"^the loaded model's config: num_hidden_layers: "):
        spec_from_config(with_value(BASE, "num_hidden_layers", 0), "x", "the loaded model's config")


@pytest.mark.parametrize("cfg,words", [
    ({**BASE, "model_type": ["llama"]}, "not supported"),
    ({k: v for k, v in BASE.items() if k != "model_type"} | {"architectures": 5}, "not supported"),
    ({k: v for k, v in BASE.items() if k != "model_type"} | {"architectures": [7, "Qwen2ForCausalLM"]}, None),
])
def test_odd_model_type_and_architectures_do_not_crash(tmp_path: Path, cfg: dict, words: str | None) -> None:
    path = write_config(tmp_path / "m", cfg)
    if words is None:
        assert resolve_model(str(path)).model_type == "qwen2"
        return
    with pytest.raises(UserError, match=words) as info:
        resolve_model(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text,words", [
    ("[1, 2]", "expected a JSON object \\(a model config.json\\), got an array"),
    ('{"hidden_size": 8,\n oops}', "line 2: not valid JSON"),
    ("[" * 100_000, "nested too deeply"),
    ("", "line 1: not valid JSON"),
])
def test_malformed_config_file_names_the_file(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=words) as info:
        resolve_model(str(path))
    assert str(info.value).startswith(str(path)) and info.value.field == "model"


def test_config_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'{\n"model_type": "caf\xe9"}')
    with pytest.raises(UserError, match=rf"^{path}: line 2: not UTF-8"):
        resolve_model(str(path))


# ------------------------------------------------------------------ references that name nothing


@pytest.mark.parametrize("ref", ["", "   "])
def test_empty_model_reference_is_a_bad_value(ref: str) -> None:
    with pytest.raises(BadValue) as info:
        resolve_model(ref)
    assert info.value.field == "model" and "empty" in str(info.value)


def test_folder_without_config_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no config.json in this folder") as info:
        resolve_model(str(tmp_path))
    assert info.value.field == "model" and "--" not in str(info.value)


def test_missing_local_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as info:
        resolve_model(str(tmp_path / "nope" / "config.json"))
    assert info.value.field == "model"


def test_unknown_hub_id_is_not_found_without_naming_a_flag() -> None:
    with pytest.raises(NotFound) as info:
        resolve_model("acme/no-such-model-anywhere")
    assert info.value.field == "model" and "--" not in str(info.value)


def test_config_symlink_loop_is_named(tmp_path: Path) -> None:
    link = tmp_path / "config.json"
    link.symlink_to(link)
    with pytest.raises(UserError, match="symlink loop"):
        resolve_model(str(link))


def test_config_that_is_a_named_pipe_is_refused_quickly(tmp_path: Path) -> None:
    fifo = tmp_path / "m" / "config.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    caught: list[BaseException] = []

    def target() -> None:
        try:
            resolve_model(str(fifo.parent))
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            caught.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(10.0)
    if t.is_alive():  # let the stuck reader go before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not t.is_alive(), "resolving a model whose config.json is a pipe blocks"
    assert caught and isinstance(caught[0], UserError) and "named pipe" in str(caught[0])


# ------------------------------------------------------------------ through the CLI


def test_cli_reports_an_impossible_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tuiwiz.cli import main

    path = write_config(tmp_path / "m", with_value(BASE, "num_attention_heads", 0))
    code = main(["--auto", "--json", "--model", str(path.parent), "--gpu", "24GB"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{path}: num_attention_heads:" in err


def test_norms_per_layer_count_matches_the_real_module_tree() -> None:
    """`ModelSpec.norms_per_layer` is the number of norm modules transformers builds per decoder layer."""
    import torch
    import transformers

    for hub_id in ("google/gemma-2-2b", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen3-0.6B"):
        cfg = dict(next(e for e in CATALOG if e.hub_id == hub_id).config)
        spec = spec_from_config(cfg, hub_id, "catalog")
        conf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):
            layer = transformers.AutoModelForCausalLM.from_config(conf).model.layers[0]
        hidden_norms = [n for n, m in layer.named_modules() if n.endswith("layernorm") or n.endswith("feedforward_layernorm")]
        assert spec.norms_per_layer == len(hidden_norms), (hub_id, hidden_norms)
        head_norms = [n for n, _ in layer.named_modules() if n.endswith(("q_norm", "k_norm"))]
        assert spec.has_qk_norm == bool(head_norms), hub_id
