"""The worker trains with the model's exact tokenizer: local, cached, or (launched --online) fetched."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")


def _preset(tmp_path: Path, data: Path, model_id: str):
    from tiny_model import tiny_preset_dict

    from tuiwiz.preset import Preset

    d = tiny_preset_dict(tmp_path / "unused", data)
    d["model"] = {"id": model_id}
    return Preset.model_validate(d)


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return cache


def _offline(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE once, into `constants`; `is_offline_mode` returns it."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


def test_offline_run_without_a_tokenizer_says_how_to_get_one(tiny, empty_hf_cache, tmp_path, monkeypatch) -> None:
    from tuiwiz.errors import UserError
    from tuiwiz.train.dataset import build_examples

    _offline(monkeypatch, True)
    with pytest.raises(UserError) as e:
        build_examples(_preset(tmp_path, tiny[1], "some-org/not-cached"))
    assert "some-org/not-cached" in str(e.value) and "--online" in str(e.value)
    assert e.value.field == "tokenizer"


def test_online_run_fetches_only_the_tokenizer_files_and_trains_on_them(tiny, empty_hf_cache, tmp_path,
                                                                       monkeypatch) -> None:
    import huggingface_hub

    from tuiwiz.data import load_tokenizer
    from tuiwiz.train.dataset import TOKENIZER_FILES, build_examples

    model_dir, data = tiny
    calls: list[tuple[str, list[str]]] = []

    def fake_download(repo_id: str, *, allow_patterns: list[str]) -> str:
        """Stands in for the Hub: copies what the patterns allow from the tiny model's folder."""
        calls.append((repo_id, allow_patterns))
        snap = empty_hf_cache / "snap"
        snap.mkdir(parents=True)
        for f in model_dir.iterdir():
            if f.name in allow_patterns:
                shutil.copy(f, snap / f.name)
        return str(snap)

    _offline(monkeypatch, False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    built = build_examples(_preset(tmp_path, data, "some-org/tiny"))
    assert calls == [("some-org/tiny", list(TOKENIZER_FILES))]
    assert not any(n.endswith((".safetensors", ".bin")) for n in TOKENIZER_FILES)
    # The same ids the model folder's own tokenizer gives: the fetched tokenizer is the exact one.
    local = _preset(tmp_path, data, "tiny-llama")
    local.model.path = str(model_dir)
    expected = build_examples(local)
    assert built.train == expected.train and built.tokens == expected.tokens > 0
    assert not getattr(load_tokenizer(str(empty_hf_cache / "snap")), "approximate", False)
