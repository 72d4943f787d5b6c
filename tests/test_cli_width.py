"""80x24 is the design size: no line of `--auto`, `--help` or "what would fit" passes 80 columns."""

from __future__ import annotations

import pytest

from tuiwiz.cli import main


@pytest.mark.parametrize("argv", [
    ["--auto"],
    ["--auto", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "48GB", "--micro-batch", "4",
     "--grad-checkpointing", "off", "--cutoff-len", "8192"],
    ["--auto", "--model", "meta-llama/Llama-3.1-70B", "--gpu", "3090", "--num-gpus", "2"],
    ["--help"],
    ["--list-gpus"],
])
def test_no_line_is_wider_than_80_columns(argv: list[str], capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps --help to the terminal it is given
    main(argv)
    out = capsys.readouterr().out
    assert out.strip()
    wide = [line for line in out.splitlines() if len(line) > 80]
    assert wide == [], "\n".join(wide)
