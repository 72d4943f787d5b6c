"""'What would fit' is true: each suggestion's flags, added to the same command, give a plan that fits.

The check is the CLI itself (exit 0), not the suggestion's own arithmetic.
"""

from __future__ import annotations

import json

import pytest

from tuiwiz.cli import EXIT_FITS, EXIT_NO_FIT, main

CASES = {
    "held knobs on a 48 GB card": ["--model", "meta-llama/Llama-3.1-8B", "--gpu", "48GB", "--micro-batch", "4",
                                   "--grad-checkpointing", "off", "--cutoff-len", "8192"],
    "long cutoff on a 24 GB card": ["--model", "Qwen/Qwen2.5-14B", "--gpu", "24GB", "--cutoff-len", "32768"],
    "full logits and a 16-bit base": ["--model", "Qwen/Qwen2.5-7B", "--gpu", "24GB", "--cutoff-len", "4096",
                                      "--loss", "standard", "--quant", "16"],
}


def _plan(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = main(["--auto", "--json", *argv])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("case", list(CASES))
def test_every_suggestion_fits_when_its_flags_are_added(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = _plan(CASES[case], capsys)
    assert code == EXIT_NO_FIT and data["suggestions"], case
    for s in data["suggestions"]:
        assert set(s) == {"text", "flags"} and s["flags"], s
        again, fixed = _plan([*CASES[case], *s["flags"]], capsys)
        assert again == EXIT_FITS, (case, s)
        assert fixed["memory"]["fits"]


def test_releasing_a_held_knob_comes_first_and_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    _, data = _plan(CASES["held knobs on a 48 GB card"], capsys)
    first = data["suggestions"][0]
    assert "let the advisor choose" in first["text"] and "you set off" in first["text"]
    assert first["flags"][first["flags"].index("--grad-checkpointing") + 1] == "on"
    texts = " | ".join(s["text"] for s in data["suggestions"])
    assert "GB free" in texts  # a bigger card, sized from the plan's own floor, comes last
    assert data["suggestions"][-1]["flags"][0] == "--gpu"


def test_cheapest_first_cutoff_then_smaller_model_then_card(capsys: pytest.CaptureFixture[str]) -> None:
    _, data = _plan(CASES["long cutoff on a 24 GB card"], capsys)
    kinds = [s["flags"][0] for s in data["suggestions"]]
    assert kinds.index("--cutoff-len") < kinds.index("--model") < kinds.index("--gpu")


def test_lighter_stack_offered_before_a_smaller_model(capsys: pytest.CaptureFixture[str]) -> None:
    _, data = _plan(CASES["full logits and a 16-bit base"], capsys)
    kinds = [s["flags"][0] for s in data["suggestions"]]
    assert "--loss" in kinds or "--quant" in kinds
    lighter = min(kinds.index(k) for k in ("--loss", "--quant") if k in kinds)
    assert "--model" not in kinds or lighter < kinds.index("--model")


def test_a_plan_that_fits_has_no_suggestions(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = _plan(["--model", "Qwen/Qwen2.5-0.5B", "--gpu", "H100", "--cutoff-len", "1024"], capsys)
    assert code == EXIT_FITS and data["suggestions"] == []
