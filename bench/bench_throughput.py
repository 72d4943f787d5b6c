"""Trained tokens per second: tuiwiz's default plan against the classic padded QLoRA script.

    .venv/bin/python bench/bench_throughput.py            # CPU: ~5 min on 2 cores
    .venv/bin/python bench/bench_throughput.py --out bench/results/throughput

Both runs train the same model on the same samples in the same order, as two child processes of
this one that take turns step by step (one optimizer step of one, then one of the other, who goes
first alternating), so load from anything else on the machine weighs on both alike; `--reps` pairs:

- **the model**: the catalog's Llama-3.1-8B architecture (GQA, SwiGLU, RoPE, RMSNorm) cut to
  `--layers` layers of width `--hidden`, randomly initialised once and loaded by both as NF4 with
  double quantization (bitsandbytes' CPU 4-bit path). Its vocabulary is cut to `--vocab` too:
  token ids are folded modulo it, so lengths stay what the real tokenizer makes while the head does
  not dwarf the layers the way a 128k vocabulary would at this width.
- **the data**: `--steps` x 16 GSM8K samples (a seeded draw), rendered with Llama 3.1's chat template and
  tokenized by the real llama3 tokenizer, by tuiwiz's own encoder (what the worker trains on).
- **classic**: trl's SFTTrainer as the QLoRA tutorials set it up: nf4, peft's k-bit preparation with
  gradient checkpointing (its default), paged 8-bit AdamW, every sample padded to max_seq_length,
  micro-batch 4, completion-only loss. Same LoRA (r 16, alpha 32, dropout 0.05, all linear), same
  learning rate, same effective batch (16) and max_seq_length = the plan's cutoff.
- **tuiwiz**: the plan `tuiwiz --auto` makes for this model and data on a 24 GB card (batching,
  micro-batch, accumulation, checkpointing: the advisor's), built by the worker's own builders
  (`tuiwiz.train.build.build_model` and `build_trainer`).

Trained tokens per second count real tokens only (padding excluded) over each run's own step
times, the first step (warm-up) left out. Slot efficiency is real tokens over the token
slots the model was handed. Final loss is the mean training loss of the last three steps; both
runs see the same 16 samples in every step, so their curves should agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_DATASET = SHARED / "datasets" / "gsm8k_train.jsonl"
DEFAULT_TOKENIZER = SHARED / "tokenizers" / "llama3"
CATALOG_MODEL = "meta-llama/Llama-3.1-8B"
EFFECTIVE_BATCH = 16
CLASSIC_MICRO_BATCH = 4
LORA = dict(lora_rank=16, lora_alpha=32, lora_dropout=0.05, learning_rate=2e-4)


# ---- the parent: data, plan, the interleaved children, the report --------------------------------

def reduced_config(layers: int, hidden: int, vocab: int) -> dict[str, Any]:
    """The catalog architecture at reduced size: same head dim (64), GQA ratio and MLP ratio."""
    from tuiwiz.model_catalog import CATALOG

    full = next(e.config for e in CATALOG if e.hub_id == CATALOG_MODEL)
    head_dim = full["hidden_size"] // full["num_attention_heads"]
    heads = hidden // head_dim
    ratio = full["num_attention_heads"] // full["num_key_value_heads"]
    return {**full, "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // ratio),
            "intermediate_size": round(hidden * full["intermediate_size"] / full["hidden_size"] / 64) * 64,
            "vocab_size": vocab, "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 0}


def build_rows(dataset: Path, tokenizer: Path, n: int, cutoff: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    """`n` samples drawn with `seed`, encoded as the worker encodes them, truncated, ids folded into `vocab`."""
    from tuiwiz.data import encode_sample, iter_conversations, load_tokenizer
    from tuiwiz.data_ref import dataset_ref_from_args
    from tuiwiz.train.dataset import truncate_example

    tok = load_tokenizer(str(tokenizer))
    samples = list(iter_conversations(dataset_ref_from_args(str(dataset), None, None)))
    random.Random(seed).shuffle(samples)
    rows = []
    for s in samples:
        enc = encode_sample(s, tok)
        ids, mask, _ = truncate_example(list(enc.input_ids), [int(b) for b in enc.trained], cutoff)
        if any(mask):
            rows.append({"input_ids": [i % vocab for i in ids], "completion_mask": mask})
        if len(rows) == n:
            return rows
    raise SystemExit(f"{dataset}: only {len(rows)} usable samples, {n} asked")


def plan_for(config: dict[str, Any], dataset: Path, tokenizer: Path, gpu: str) -> tuple[Any, Any]:
    """tuiwiz's default plan for this model and data: the same read-then-plan path as `tuiwiz --auto`."""
    from tuiwiz.data_ref import dataset_ref_from_args
    from tuiwiz.models import spec_from_config
    from tuiwiz.planner import PlanRequest, make_plan, profile_for, read_hardware, tokenizer_for

    spec = spec_from_config(config, "bench-llama", "bench_throughput")
    req = PlanRequest(model="bench-llama", tokenizer=str(tokenizer), gpu=gpu,
                      dataset=dataset_ref_from_args(str(dataset), None, None))
    profile = profile_for(req, spec, tokenizer_for(req))
    return make_plan(req, read_hardware(req), spec, profile), profile


def run_pair(work: Path, threads: int, first: str) -> dict[str, dict[str, Any]]:
    """Both runs at once, in lockstep: each optimizer step of one, then one of the other (who goes
    first alternates), so whatever else loads the machine meanwhile weighs on both alike. A child
    waits for "go" on stdin at every step's start and prints "@@done" at its end."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    procs, outs = {}, {}
    for which in ("classic", "tuiwiz"):
        outs[which] = work / f"{which}-{time.monotonic_ns()}.json"
        procs[which] = subprocess.Popen(
            [sys.executable, __file__, "--child", which, "--work", str(work), "--result", str(outs[which]),
             "--threads", str(threads)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=(work / f"{which}.log").open("w"), text=True, bufsize=1)
    order = [first, "tuiwiz" if first == "classic" else "classic"]
    live = list(order)
    while live:
        for which in list(order):
            if which in live and not _one_step(procs[which]):
                live.remove(which)
        order.reverse()
    for which, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{which} child failed:\n{(work / f'{which}.log').read_text()[-4000:]}")
    return {which: json.loads(outs[which].read_text()) for which in procs}


def _one_step(proc: subprocess.Popen) -> bool:
    """Let the child run one optimizer step; False once it has finished training."""
    assert proc.stdout is not None and proc.stdin is not None
    for line in proc.stdout:
        if line.startswith("@@ready"):
            proc.stdin.write("go\n")
            proc.stdin.flush()
        elif line.startswith("@@done"):
            return True
    return False


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(which: str, key: str) -> float:
        return statistics.median(r[key] for r in results[which])

    return {
        which: {"tokens_per_s_median": round(med(which, "tokens_per_s"), 1),
                "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in results[which]],
                "slot_efficiency": round(med(which, "slot_efficiency"), 4),
                "final_loss_median": round(med(which, "final_loss"), 4),
                "final_loss_runs": [round(r["final_loss"], 4) for r in results[which]],
                "seconds_timed_median": round(med(which, "seconds"), 1)}
        for which in ("classic", "tuiwiz")
    } | {"speedup": round(med("tuiwiz", "tokens_per_s") / med("classic", "tokens_per_s"), 2),
         "loss_curve_max_abs_diff": round(max(abs(a - b) for c, t in zip(results["classic"], results["tuiwiz"])
                                              for a, b in zip(c["losses"], t["losses"])), 4)}


def report_md(meta: dict[str, Any], summary: dict[str, Any]) -> str:
    c, t = summary["classic"], summary["tuiwiz"]
    k = meta["tuiwiz_plan"]
    lines = [
        "# Trained tokens per second: tuiwiz's default plan vs the classic padded QLoRA script",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}; {meta['threads']} torch threads; load average before "
        f"{meta['load_before']}, after {meta['load_after']} (other work shares these cores).",
        f"Model: {meta['model']}. Data: {meta['samples']} GSM8K samples, llama3 tokenizer, cutoff "
        f"{k['cutoff_len']}; {meta['steps']} optimizer steps of {EFFECTIVE_BATCH} samples, the first one "
        f"untimed. The two runs take turns step by step in two child processes; {meta['reps']} pairs.",
        "",
        "| run | setup | trained tokens/s (median) | runs | slot efficiency | final loss (median) |",
        "|---|---|---:|---|---:|---:|",
        f"| classic | padded to {k['cutoff_len']}, micro-batch {CLASSIC_MICRO_BATCH} x {EFFECTIVE_BATCH // CLASSIC_MICRO_BATCH}"
        f", checkpointing on | {c['tokens_per_s_median']} | {c['tokens_per_s_runs']} | {c['slot_efficiency']:.1%} | "
        f"{c['final_loss_median']} |",
        f"| tuiwiz | {k['batching']}, micro-batch {k['micro_batch_size']} x {k['grad_accum']}, checkpointing "
        f"{'on' if k['grad_checkpointing'] else 'off'} | {t['tokens_per_s_median']} | {t['tokens_per_s_runs']} | "
        f"{t['slot_efficiency']:.1%} | {t['final_loss_median']} |",
        "",
        f"**Speed-up (ratio of medians): {summary['speedup']}x** trained tokens per second.",
        "",
        f"Final loss: tuiwiz minus classic = {t['final_loss_median'] - c['final_loss_median']:+.4f}; the per-step "
        f"loss curves differ by at most {summary['loss_curve_max_abs_diff']}. Both train on the same 16 samples "
        "in every step and the per-sample math is the same (tests/test_batching.py proves it in fp32); what "
        "differs is LoRA dropout's random masks and bf16 rounding, which depend on the batch's shape.",
        "",
        "Both use NF4 with double quantization, LoRA r 16 / alpha 32 / dropout 0.05 on every linear layer, "
        "paged 8-bit AdamW (bitsandbytes falls back to non-paged on CPU), lr 2e-4, trl's chunked loss on "
        "completion tokens only. What differs is what the plan chose: the batching (no padding slots), "
        "when memory allows no gradient checkpointing, and the residual stream (the classic script's peft "
        f"k-bit preparation upcasts it to fp32; the plan's is {k['residual']}). The "
        "advisor's reasons:",
        "",
        *[f"- {r}" for r in meta["plan_reasons"]],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=["classic", "tuiwiz"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--gpu", default="24GB", help="the card tuiwiz plans for (default 24GB)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is warm-up)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.work, args.result, args.threads)
        return 0

    from tuiwiz.train.build import random_checkpoint

    config = reduced_config(args.layers, args.hidden, args.vocab)
    plan, _ = plan_for(config, args.dataset, args.tokenizer, args.gpu)
    knobs = plan.knobs
    samples = args.steps * EFFECTIVE_BATCH
    rows = build_rows(args.dataset, args.tokenizer, samples, knobs.cutoff_len, args.vocab, args.seed)
    with tempfile.TemporaryDirectory(prefix="tuiwiz-throughput-") as tmp:
        work = Path(tmp)
        random_checkpoint(dict(config), work / "model", seed=args.seed)
        (work / "setup.json").write_text(json.dumps({
            "rows": rows, "knobs": knobs.model_dump(mode="json"), "tokenizer": str(args.tokenizer),
            "steps": args.steps, "seed": args.seed}))
        load_before = [round(x, 2) for x in os.getloadavg()]
        results: dict[str, list[dict[str, Any]]] = {"classic": [], "tuiwiz": []}
        for rep in range(args.reps):
            pair = run_pair(work, args.threads, "classic" if rep % 2 == 0 else "tuiwiz")
            for which, r in pair.items():
                results[which].append(r)
                print(f"rep {rep + 1} {which:8} {r['tokens_per_s']:8.1f} tok/s  slots {r['slot_efficiency']:.1%}  "
                      f"loss {r['final_loss']:.4f}", flush=True)
        load_after = [round(x, 2) for x in os.getloadavg()]
    summary = summarise(results)
    cmd = "python bench/bench_throughput.py" + (f" --out {args.out}" if args.out else "")
    meta = {
        "command": cmd, "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} cores, CPU", "threads": args.threads, "load_before": load_before,
        "load_after": load_after, "reps": args.reps, "steps": args.steps, "samples": samples,
        "model": f"{CATALOG_MODEL} architecture, {args.layers} layers, hidden {args.hidden}, "
                 f"intermediate {config['intermediate_size']}, {config['num_attention_heads']} heads "
                 f"({config['num_key_value_heads']} KV), vocab {args.vocab} (ids folded), random init, NF4",
        "tuiwiz_plan": knobs.model_dump(mode="json"), "plan_reasons": list(plan.advice.reasons),
        "plan_slot_efficiency": plan.to_json()["dataset"]["slot_efficiency"],
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary,
                                                             "runs": results}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(report_md(meta, summary))
    return 0


# ---- a child: one training run, timed -------------------------------------------------------------

class _Counter:
    """Wraps the trainer's collator: real tokens and token slots of every micro-batch, in order."""

    def __init__(self, collate: Any, pad_id: int) -> None:
        self.collate, self.pad_id = collate, pad_id
        self.real: list[int] = []
        self.slots: list[int] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        self.real.append(sum(len(e["input_ids"]) for e in examples))
        self.slots.append(batch["input_ids"].numel())
        return batch


def _lockstep() -> Any:
    from transformers import TrainerCallback

    class Lockstep(TrainerCallback):
        """Waits for the parent's "go" before each optimizer step; times each step; keeps each step's loss."""

        def __init__(self) -> None:
            self.began = 0.0
            self.seconds: list[float] = []
            self.losses: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            print("@@ready", flush=True)
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("the parent went away")
            self.began = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.seconds.append(time.perf_counter() - self.began)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                print("@@done", flush=True)  # logged after the step's optimizer update (logging_steps 1)

    return Lockstep()


def _classic_trainer(model_dir: Path, tok: Any, rows: list[dict[str, Any]], knobs: Any, out: Path, seed: int) -> Any:
    """The classic QLoRA script: SFTTrainer, nf4, peft's k-bit prep (checkpointing on, its default),
    paged 8-bit AdamW, pad to max_seq_length, micro-batch 4, completion-only loss."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"}, attn_implementation="sdpa")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model)  # use_gradient_checkpointing=True by default
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=CLASSIC_MICRO_BATCH,
                     gradient_accumulation_steps=EFFECTIVE_BATCH // CLASSIC_MICRO_BATCH, max_steps=-1,
                     num_train_epochs=1, learning_rate=LORA["learning_rate"], lr_scheduler_type="cosine",
                     warmup_steps=0.03, optim="paged_adamw_8bit", gradient_checkpointing=True, bf16=True,
                     use_cpu=True, seed=seed, logging_steps=1, save_strategy="no", report_to="none",
                     disable_tqdm=True, max_length=knobs.cutoff_len, pad_to_multiple_of=knobs.cutoff_len,
                     completion_only_loss=True, dataloader_num_workers=0)
    lora = LoraConfig(r=LORA["lora_rank"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                      peft_config=lora)


def _tuiwiz_trainer(model_dir: Path, tok: Any, rows: list[dict[str, Any]], knobs: Any, out: Path) -> Any:
    """The plan, built by the worker's own builders."""
    from tuiwiz.train import build

    model = build.build_model(str(model_dir), knobs, "cpu")
    return build.build_trainer(model, tok, knobs, rows, [], out, device="cpu")


def child(which: str, work: Path, result: Path, threads: int) -> None:
    import torch

    from tuiwiz.planning.knobs import knobs_from
    from tuiwiz.train.build import load_hf_tokenizer

    torch.set_num_threads(threads)
    setup = json.loads((work / "setup.json").read_text())
    knobs = knobs_from({**setup["knobs"], "save_steps": 10**6, "val_ratio": 0.0, "max_steps": None, "epochs": 1.0,
                        "logging_steps": 1})
    tok = load_hf_tokenizer(setup["tokenizer"])
    tok.pad_token = tok.convert_ids_to_tokens(0)  # ids are folded into the small vocabulary; 0 is in it
    out = work / f"out-{which}"
    rows = setup["rows"]
    torch.manual_seed(knobs.seed)  # the same LoRA initialisation in both
    trainer = (_classic_trainer(work / "model", tok, rows, knobs, out, knobs.seed) if which == "classic"
               else _tuiwiz_trainer(work / "model", tok, rows, knobs, out))
    counter = _Counter(trainer.data_collator, tok.pad_token_id)
    trainer.data_collator = counter
    timer = _lockstep()
    trainer.add_callback(timer)
    trainer.train()
    accum = trainer.args.gradient_accumulation_steps
    timed_real = sum(counter.real[accum:])  # every step but the first (warm-up)
    seconds = sum(timer.seconds[1:])
    result.write_text(json.dumps({
        "which": which, "steps": trainer.state.global_step, "seconds": seconds, "step_seconds": timer.seconds,
        "tokens_per_s": timed_real / seconds if seconds > 0 else 0.0,
        "slot_efficiency": sum(counter.real) / sum(counter.slots),
        "final_loss": statistics.mean(timer.losses[-3:]), "losses": timer.losses,
        "micro_batches": len(counter.real), "real_tokens": sum(counter.real), "slots": sum(counter.slots),
    }))


if __name__ == "__main__":
    raise SystemExit(main())
