"""FlashAttention 2 and bf16 rules by compute capability, and how the worker reports a setup failure."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuiwiz.gpu_features import AMPERE, flash_attn_installed, flash_attn_problem, native_bf16, parse_capability

REPO = Path(__file__).resolve().parents[1]
NO_FLASH = importlib.util.find_spec("flash_attn") is None


def test_gpu_features_imports_no_torch() -> None:
    """The planner and the launch pre-flight use it; neither may pay for torch."""
    code = ("import sys, tuiwiz.gpu_features, tuiwiz.planning.schedule; "
            "bad = [m for m in ('torch', 'transformers', 'textual') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("text,cap", [("8.6", (8, 6)), ("7.5", (7, 5)), ("9", (9, 0)), ("", None), (None, None),
                                      ("x.y", None)])
def test_capability_text_as_nvml_gives_it(text: str | None, cap: tuple[int, int] | None) -> None:
    assert parse_capability(text) == cap


@pytest.mark.parametrize("cap,bf16", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 9), True),
                                      ((9, 0), True), (None, False)])
def test_native_bf16_starts_at_ampere(cap: tuple[int, int] | None, bf16: bool) -> None:
    assert native_bf16(cap) is bf16


def test_flash_attention_on_a_turing_card_is_refused_even_when_installed() -> None:
    msg = flash_attn_problem((7, 5), installed=True)
    assert msg is not None and "7.5" in msg and "8.0" in msg and msg.startswith("attn:")
    assert "--" not in msg  # core words: the field, never a CLI flag


def test_flash_attention_missing_package_is_named() -> None:
    msg = flash_attn_problem(AMPERE, installed=False)
    assert msg is not None and "flash_attn" in msg
    assert flash_attn_problem(None, installed=False) is not None  # unknown card: the package still decides


def test_flash_attention_on_ampere_with_the_package_is_fine() -> None:
    assert flash_attn_problem((8, 0), installed=True) is None
    assert flash_attn_problem(None, installed=True) is None


def test_installed_check_agrees_with_the_import_system() -> None:
    assert flash_attn_installed() is (not NO_FLASH)


@pytest.mark.skipif(not NO_FLASH, reason="flash_attn is installed here; this checks the missing-package path")
def test_the_worker_refuses_flash_attention_without_the_package_as_a_setup_error() -> None:
    from tuiwiz.train import build
    from tuiwiz.train.classify import classify
    from tuiwiz.train.errors import SetupError

    with pytest.raises(SetupError) as info:
        build.check_attention("flash_attention_2", "cuda:0")  # no card visible: the package decides
    kind, message, suggestion = classify(info.value, "model")
    assert kind == "setup" and "flash_attn" in message and "sdpa" in suggestion
    build.check_attention("sdpa", "cuda:0")  # other attentions are not checked


@pytest.mark.slow
@pytest.mark.skipif(not NO_FLASH, reason="flash_attn is installed here; this checks the missing-package path")
@pytest.mark.skipif(importlib.util.find_spec("kernels") is not None and os.environ.get("HF_HUB_OFFLINE") != "1",
                    reason="transformers would fetch the kernels fallback from the Hub; run with HF_HUB_OFFLINE=1")
def test_transformers_own_flash_attention_import_error_is_a_setup_error(tmp_path: Path) -> None:
    """The error transformers raises when asked for FlashAttention 2 without the package."""
    from transformers import AutoModelForCausalLM

    from tiny_model import build_model
    from tuiwiz.train.classify import classify

    model_dir = build_model(tmp_path / "m")
    with pytest.raises(ImportError) as info:
        AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="flash_attention_2")
    assert classify(info.value, "model")[0] == "setup"
    assert classify(ModuleNotFoundError("No module named 'flash_attn'"), "model")[0] == "setup"
    assert classify(ModuleNotFoundError("No module named 'pyarrow'"), "data")[0] == "setup"
