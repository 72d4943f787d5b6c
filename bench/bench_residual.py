"""Residual stream precision: fp32 (peft's k-bit upcast) against bf16, measured on CPU.

    .venv/bin/python bench/bench_residual.py --out bench/results/residual

For each `residual` value the same tiny NF4 Llama (tests/tiny_model.py: 2 layers, width 128, its
own byte-level BPE tokenizer and a learnable alpaca-style corpus), built and fed by the worker's own
`build_model` / `build_trainer` / `build_examples`:
- **saved bytes**: what one forward pass leaves alive for backward (autograd's saved tensors, each
  storage counted once), beside what the estimate says (`activations.kept_layer_bytes` +
  `outside_saved_bytes`, no checkpointing);
- **loss curves**: `--steps` optimizer steps on the same samples in the same order, from the
  same LoRA initialisation; the table gives the loss averaged over windows of steps and the largest
  gap between the two curves' windowed means.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

sys.path.insert(0, str(ROOT / "tests"))

WINDOW = 25


def saved_bytes(trainer: Any, batch: dict[str, Any]) -> int:
    """Bytes of the distinct storages autograd keeps from one forward pass (parameters excluded)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        trainer.model(**batch, use_cache=False, fused_lm_head=True)
    return sum(seen.values())


def run(residual: str, model_dir: Path, tok: Any, rows: list[dict[str, Any]], args: argparse.Namespace,
        work: Path) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback

    from tuiwiz.models import spec_from_config
    from tuiwiz.planning import activations as act
    from tuiwiz.planning.knobs import TrainingKnobs
    from tuiwiz.train import build

    knobs = TrainingKnobs(residual=residual, micro_batch_size=8, grad_accum=1, cutoff_len=128,
                          grad_checkpointing=False, batching="padded", max_steps=args.steps, learning_rate=args.lr,
                          warmup_ratio=0.03, logging_steps=1, save_steps=10**6, val_ratio=0.0, seed=0,
                          lora_rank=8, lora_alpha=16)
    torch.manual_seed(0)
    model = build.build_model(str(model_dir), knobs, "cpu")
    trainer = build.build_trainer(model, tok, knobs, rows, [], work / f"out-{residual}", device="cpu")
    # one micro-batch of equal-length samples (no padding: the estimate's case)
    gen = torch.Generator().manual_seed(1)
    same = [{"input_ids": torch.randint(8, 300, (args.probe,), generator=gen).tolist()} for _ in range(8)]
    batch = trainer.data_collator(same)
    trainer.model.train()  # LoRA dropout on, as in training
    measured = saved_bytes(trainer, batch)
    spec = spec_from_config(json.loads((model_dir / "config.json").read_text()), "bench", "bench_residual")
    k = knobs.replace(cutoff_len=args.probe)
    estimated = (act.kept_layer_bytes(spec, k, 8, args.probe) + act.outside_saved_bytes(spec, k, 8, args.probe))

    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, a: Any, s: Any, c: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Losses())
    t0 = time.perf_counter()
    trainer.train()
    return {"residual": residual, "saved_bytes_measured": measured, "saved_bytes_estimated": estimated,
            "losses": losses, "seconds": round(time.perf_counter() - t0, 1),
            "param_dtypes": build.param_dtype_summary(trainer.model)}


def windows(losses: list[float]) -> list[float]:
    return [statistics.mean(losses[i:i + WINDOW]) for i in range(0, len(losses), WINDOW)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--probe", type=int, default=128, help="tokens per sample in the saved-bytes probe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from tiny_model import build_model as build_tiny, tiny_preset_dict, write_dataset

    from tuiwiz.preset import Preset
    from tuiwiz.train.build import load_hf_tokenizer
    from tuiwiz.train.dataset import build_examples

    torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="tuiwiz-residual-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny(work / "model", hidden=128, layers=2)
        data = write_dataset(work / "data.json", n=256)
        built = build_examples(Preset.model_validate(tiny_preset_dict(model_dir, data, val_ratio=0.0,
                                                                      cutoff_len=128)))
        tok = load_hf_tokenizer(model_dir)
        results = [run(r, model_dir, tok, built.train, args, work) for r in ("fp32", "bf16")]
    fp32, bf16 = results
    w32, w16 = windows(fp32["losses"]), windows(bf16["losses"])
    gap = max(abs(a - b) for a, b in zip(w32, w16))
    summary = {
        "saved_bytes": {r["residual"]: {"measured": r["saved_bytes_measured"], "estimated": r["saved_bytes_estimated"]}
                        for r in results},
        "bf16_saves_fraction_measured": round(1 - bf16["saved_bytes_measured"] / fp32["saved_bytes_measured"], 3),
        "loss_windows": {"fp32": [round(x, 4) for x in w32], "bf16": [round(x, 4) for x in w16]},
        "max_window_gap": round(gap, 4), "first_window": round(w32[0], 4), "last_window_fp32": round(w32[-1], 4),
        "last_window_bf16": round(w16[-1], 4),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": f"python bench/bench_residual.py --out {args.out}", "steps": args.steps, "lr": args.lr,
                "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
                "model": "tests/tiny_model.py Llama, 2 layers, hidden 128, NF4, random init; 256 alpaca-style rows",
                "micro_batch": 8, "param_dtypes": {r["residual"]: r["param_dtypes"] for r in results}}
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": results},
                                                            indent=1) + "\n")
        rows_md = "\n".join(f"| {i * WINDOW + 1}-{min((i + 1) * WINDOW, args.steps)} | {a:.4f} | {b:.4f} | {b - a:+.4f} |"
                            for i, (a, b) in enumerate(zip(w32, w16)))
        sb = summary["saved_bytes"]
        args.out.with_suffix(".md").write_text("\n".join([
            "# Residual stream: fp32 (peft's k-bit upcast) vs bf16", "",
            f"Command: `{meta['command']}`", "",
            f"Model: {meta['model']}; LoRA r 8, micro-batch 8, lr {args.lr}, {args.steps} steps on the same samples "
            f"in the same order; CPU, load average {load_before} before.", "",
            "| residual | saved for backward, measured (one micro-batch, 8 x "
            f"{args.probe} tokens) | the estimate |", "|---|---:|---:|",
            *[f"| {k} | {v['measured'] / 2**20:.2f} MiB | {v['estimated'] / 2**20:.2f} MiB |" for k, v in sb.items()],
            "", f"bf16 keeps {summary['bf16_saves_fraction_measured']:.0%} less for backward.", "",
            "| steps | loss fp32 | loss bf16 | bf16 - fp32 |", "|---|---:|---:|---:|", rows_md, "",
            f"Largest gap between the windowed curves: {gap:.4f}.", "",
        ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
