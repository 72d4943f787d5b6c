"""Headless CLI: the --json contract, exit codes, one-line errors, and no torch at start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuiwiz.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_contract(capsys):
    code, out, _ = run(["--auto", "--json", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "24GB",
                        "--cutoff-len", "2048"], capsys)
    data = json.loads(out)
    assert code == 0
    assert data["hardware"]["source"] == "catalog"
    assert {"index", "name", "total_gib", "free_gib", "bf16"} <= set(data["hardware"]["gpus"][0])
    assert {"id", "params_b", "layers", "hidden", "vocab"} <= set(data["model"])
    assert data["dataset"] is None
    assert {"cutoff_len", "micro_batch_size", "grad_accum", "effective_batch", "lora_rank", "lora_alpha",
            "target_modules", "grad_checkpointing", "optim", "quant_bits", "attn"} <= set(data["plan"])
    mem = data["memory"]
    assert {"weights", "lora", "gradients", "optimizer", "activations", "logits", "overhead"} == set(mem["breakdown_gib"])
    assert mem["fits"] is True and mem["peak_gib"] <= mem["budget_gib"]
    assert abs(sum(mem["breakdown_gib"].values()) - mem["peak_gib"]) < 0.01
    assert mem["peak_at"] in ("layer", "head")
    assert isinstance(data["warnings"], list)
    assert data["plan"]["cutoff_len"] == 2048


def test_dataset_feeds_the_cutoff(capsys):
    demo = ROOT / "tuiwiz" / "demo" / "demo.jsonl"
    code, out, _ = run(["--auto", "--json", "--dataset", str(demo), "--gpu", "A100-80GB"], capsys)
    d = json.loads(out)["dataset"]
    assert {"path", "layout", "samples", "skipped", "tokenizer", "approximate", "p50", "p95", "p99", "max",
            "suggested_cutoff", "truncated_at_cutoff"} <= set(d)
    assert json.loads(out)["plan"]["cutoff_len"] == d["suggested_cutoff"]
    assert d["suggested_cutoff"] % 64 == 0 and d["suggested_cutoff"] >= d["p99"]


def test_user_knobs_are_held_fixed(capsys):
    _, out, _ = run(["--auto", "--json", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "H100", "--micro-batch", "3",
                     "--lora-rank", "8", "--grad-checkpointing", "on", "--cutoff-len", "1024"], capsys)
    plan = json.loads(out)["plan"]
    assert (plan["micro_batch_size"], plan["lora_rank"], plan["grad_checkpointing"]) == (3, 8, True)


def test_exit_code_3_when_nothing_fits_and_plan_still_printed(capsys):
    code, out, _ = run(["--auto", "--model", "meta-llama/Llama-3.1-70B", "--gpu", "T4", "--cutoff-len", "4096"],
                       capsys)
    assert code == 3
    assert "DOES NOT FIT" in out and "What would fit" in out


@pytest.mark.parametrize("args,needle", [
    (["--auto", "--model", "nope/nothing"], "not in the catalog"),
    (["--auto", "--gpu", "GTX 9999"], "unknown card"),
    (["--auto", "--dataset", "/no/such/file.jsonl", "--gpu", "24GB"], "file.jsonl"),
    (["--auto", "--preset", "/no/such.yaml"], "no such preset"),
    (["--auto", "--lora-rank", "0", "--gpu", "24GB", "--model", "Qwen/Qwen2.5-0.5B"], "--lora-rank"),
])
def test_bad_input_is_one_line_exit_2(args, needle, capsys):
    code, _, err = run(args, capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err


def test_out_writes_preset_that_replans_identically(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    code, first, _ = run(["--auto", "--json", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "24GB",
                          "--cutoff-len", "2048", "--out", str(out)], capsys)
    assert code == 0 and out.exists()
    code, again, _ = run(["--auto", "--json", "--preset", str(out)], capsys)
    original, replanned = json.loads(first), json.loads(again)
    assert code == 0 and replanned["plan"] == original["plan"]
    assert replanned["model"]["id"] == original["model"]["id"] == "meta-llama/Llama-3.1-8B"
    assert replanned["memory"]["peak_gib"] == original["memory"]["peak_gib"]
    assert run(["--auto", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "24GB", "--out", str(out)], capsys)[0] == 2


def test_auto_does_not_import_torch_or_textual():
    code = ("import sys; from tuiwiz.cli import main; rc = main(['--auto', '--json']);"
            "bad = [m for m in ('torch', 'textual', 'transformers') if m in sys.modules];"
            "print(bad, file=sys.stderr); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_python_dash_m_works_without_arguments_headless():
    r = subprocess.run([sys.executable, "-m", "tuiwiz", "--auto"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode in (0, 3), r.stderr
    assert "Memory per GPU" in r.stdout and "Data" in r.stdout
