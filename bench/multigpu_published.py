"""Compare tuiwiz's per-GPU estimate for FSDP-QLoRA, ZeRO-3 and DDP with published multi-GPU figures.

    .venv/bin/python bench/multigpu_published.py

Writes bench/results/multigpu_published.md and .json. Every row is a figure whose source states
its setup (model, GPUs, strategy, sequence length, micro-batch, LoRA, checkpointing), expressed in
tuiwiz's knobs and compared at the level the source measured: torch's peak *reserved* memory
(Answer.AI's benchmark tables, see their note on reserved vs allocated) or the whole process as
nvidia-smi sees it (PEFT's guides; the figure is read as GiB, as nvidia-smi's MiB/1024 gives it; a
decimal-GB reading would make the published values 7% smaller). Host RAM is compared where the
source gives it. No GPU was lent to this task: nothing here is measured by tuiwiz itself.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuiwiz.models import ModelSpec, resolve_model, spec_from_config  # noqa: E402
from tuiwiz.planning.knobs import TrainingKnobs  # noqa: E402
from tuiwiz.planning.memory import GIB, estimate_memory  # noqa: E402
from tuiwiz.planning import strategy  # noqa: E402
from tuiwiz.planning.strategy import host_ram  # noqa: E402

PEFT_FSDP = ("https://huggingface.co/docs/peft/accelerate/fsdp (huggingface/peft docs/source/accelerate/fsdp.md, "
             "'Use PEFT QLoRA and FSDP', Memory usage)")
PEFT_DS = ("https://huggingface.co/docs/peft/accelerate/deepspeed (huggingface/peft "
           "docs/source/accelerate/deepspeed.md, 'Use PEFT QLoRA and DeepSpeed with ZeRO3', Memory usage)")
ANSWERAI = ("https://github.com/AnswerDotAI/fsdp_qlora/blob/main/benchmarks_03_2024.md (Answer.AI, "
            "'Benchmarking QLoRA+FSDP', dual 3090 case study); defaults from its train.py")
PHILSCHMID = ("https://gist.github.com/bigsnarfdude/47684d7afc4941c118ad8c0a2d764ca5 (copy of philschmid's "
              "fsdp-qlora-distributed-llama3 notebook header)")


def _llama(h: int, layers: int, heads: int, kv: int, inter: int, vocab: int, maxpos: int) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab,
            "max_position_embeddings": maxpos, "tie_word_embeddings": False}


#: Published config.json sizes of the models these sources trained that the catalog lacks.
SPECS: dict[str, ModelSpec] = {
    "meta-llama/Llama-2-70b-hf": spec_from_config(_llama(8192, 80, 64, 8, 28672, 32000, 4096),
                                                  "meta-llama/Llama-2-70b-hf", "bench table"),
    "01-ai/Yi-34B": spec_from_config(_llama(7168, 60, 56, 8, 20480, 64000, 4096), "01-ai/Yi-34B", "bench table"),
}

#: PEFT's FSDP-QLoRA and ZeRO-3 QLoRA runs (run_peft_qlora_fsdp.sh / run_peft_qlora_deepspeed_stage3.sh):
#: Llama-2-70B, 2 GPUs, max_seq_len 2048 with packing, per-device batch 2, gradient checkpointing,
#: flash-attention, LoRA r 8 / alpha 16 / dropout 0.1 on all linear layers, nested 4-bit quant with
#: bf16 storage, bf16, the Trainer's default AdamW; trl's SFTTrainer of the time: full logits.
PEFT_KNOBS = dict(cutoff_len=2048, batching="packed", micro_batch_size=2, lora_rank=8, lora_alpha=16,
                  lora_dropout=0.1, target_modules="all-linear", grad_checkpointing=True, attn="flash_attention_2",
                  optim="adamw_torch", loss="standard", residual="bf16", double_quant=True)
#: Answer.AI's train.py defaults: LoRA r 64 / alpha 16 / dropout 0.1 on q, k, v, gate, up, down (not
#: o_proj), pure bf16 (4-bit storage in bf16, no fp32 upcast), torch AdamW, reentrant checkpointing,
#: the model's own cross-entropy (full logits), SDPA; the 'dummy' dataset fills every sample to the
#: context length (no padding below it).
ANSWERAI_KNOBS = dict(lora_rank=64, lora_alpha=16, lora_dropout=0.1,
                      target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                      grad_checkpointing=True, attn="sdpa", optim="adamw_torch", loss="standard", residual="bf16",
                      double_quant=True, batching="padded")


@dataclass(frozen=True)
class Row:
    source: str
    model: str
    gpus: int
    gpu: str
    strategy: str
    knobs: dict[str, Any]
    level: str  # "reserved" | "nvml"
    published_gib: float
    host_ram_gb: float | None = None
    setup_stated: bool = True
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


ROWS: tuple[Row, ...] = (
    Row(PEFT_FSDP, "meta-llama/Llama-2-70b-hf", 2, "24 GB class", "fsdp_offload", PEFT_KNOBS, "nvml", 19.6,
        host_ram_gb=107, note="FSDP1, cpu_ram_efficient_loading, use_orig_params false, CPU offload"),
    Row(PEFT_FSDP, "meta-llama/Llama-2-70b-hf", 2, "(not stated)", "fsdp", PEFT_KNOBS, "nvml", 35.6,
        note="the same run with CPU offloading disabled"),
    Row(PEFT_DS, "meta-llama/Llama-2-70b-hf", 2, "40 GB class", "zero3", PEFT_KNOBS, "nvml", 36.6,
        note="ZeRO-3, zero3_init_flag, no offload, bf16"),
    Row(ANSWERAI, "meta-llama/Llama-2-7b-hf", 2, "RTX 3090", "fsdp", {**ANSWERAI_KNOBS, "cutoff_len": 512,
                                                                      "micro_batch_size": 1}, "reserved", 4.98),
    Row(ANSWERAI, "meta-llama/Llama-2-7b-hf", 2, "RTX 3090", "fsdp", {**ANSWERAI_KNOBS, "cutoff_len": 2048,
                                                                      "micro_batch_size": 1}, "reserved", 5.21),
    Row(ANSWERAI, "meta-llama/Llama-2-7b-hf", 2, "RTX 3090", "fsdp", {**ANSWERAI_KNOBS, "cutoff_len": 2048,
                                                                      "micro_batch_size": 4}, "reserved", 11.22),
    Row(ANSWERAI, "meta-llama/Llama-2-7b-hf", 2, "RTX 3090", "fsdp", {**ANSWERAI_KNOBS, "cutoff_len": 2048,
                                                                      "micro_batch_size": 10}, "reserved", 20.97),
    Row(ANSWERAI, "meta-llama/Llama-2-7b-hf", 2, "RTX 3090", "ddp", {**ANSWERAI_KNOBS, "cutoff_len": 2048,
                                                                     "micro_batch_size": 8}, "reserved", 20.94,
        note="FSDP NO_SHARD (a whole copy per GPU): tuiwiz's ddp with a bf16 residual"),
    Row(ANSWERAI, "01-ai/Yi-34B", 2, "RTX 3090", "fsdp", {**ANSWERAI_KNOBS, "cutoff_len": 2048,
                                                          "micro_batch_size": 2}, "reserved", 23.05),
    Row(ANSWERAI, "01-ai/Yi-34B", 2, "RTX 3090", "fsdp_offload", {**ANSWERAI_KNOBS, "cutoff_len": 2048,
                                                                  "micro_batch_size": 4}, "reserved", 22.98),
    Row(ANSWERAI, "meta-llama/Llama-2-70b-hf", 2, "RTX 3090", "fsdp_offload",
        {**ANSWERAI_KNOBS, "cutoff_len": 2048, "micro_batch_size": 2}, "reserved", 14.92, host_ram_gb=128,
        note="host RAM: 128 GB filled at the start of training; a 10 GB swapfile got it past the spike"),
    Row(PHILSCHMID, "meta-llama/Llama-3.1-70B", 4, "24 GB class", "fsdp_offload",
        dict(cutoff_len=3072, micro_batch_size=1, batching="padded", grad_checkpointing=True,
             attn="flash_attention_2", optim="adamw_torch", residual="bf16"), "nvml", 22.0, host_ram_gb=127,
        setup_stated=False, note="Llama-3-70B (same shape as 3.1); LoRA settings not in the quoted header: "
                                 "tuiwiz defaults; not in the summary"),
)


def _spec(model: str) -> ModelSpec:
    return SPECS[model] if model in SPECS else resolve_model(model)


def evaluate(row: Row) -> dict[str, Any]:
    spec = _spec(row.model)
    knobs = TrainingKnobs(**{**row.knobs, "strategy": row.strategy})
    est = estimate_memory(spec, knobs, row.gpus)
    ours = (est.reserved_bytes if row.level == "reserved" else est.peak_bytes) / GIB
    prior, strategy.SHARDED_SLACK = strategy.SHARDED_SLACK, {}
    try:
        bare = estimate_memory(spec, knobs, row.gpus)
    finally:
        strategy.SHARDED_SLACK = prior
    without = (bare.reserved_bytes if row.level == "reserved" else bare.peak_bytes) / GIB
    out: dict[str, Any] = {
        "source": row.source, "model": row.model, "gpus": row.gpus, "gpu": row.gpu, "strategy": row.strategy,
        "seq": knobs.cutoff_len, "micro_batch": knobs.micro_batch_size, "lora_rank": knobs.lora_rank,
        "level": row.level, "published_gib": row.published_gib, "ours_gib": round(ours, 2),
        "error": round(ours / row.published_gib - 1, 4),
        "ours_without_sharded_slack_gib": round(without, 2), "error_without": round(without / row.published_gib - 1, 4),
        "setup_stated": row.setup_stated, "note": row.note,
        "terms_gib": {t.key: round(t.gib, 2) for t in est.terms if t.bytes},
    }
    if row.host_ram_gb is not None:
        ram = host_ram(spec, knobs, row.gpus, row.gpus).peak_bytes / 1e9
        out.update(host_ram_published_gb=row.host_ram_gb, host_ram_ours_gb=round(ram, 1),
                   host_ram_error=round(ram / row.host_ram_gb - 1, 4))
    return out


def _summary(rows: list[dict[str, Any]], key: str = "error") -> list[tuple[str, int, float, float]]:
    out = []
    for name, keep in (("stated setups", lambda r: r["setup_stated"]),
                       ("FSDP-QLoRA (fsdp, fsdp_offload)", lambda r: r["setup_stated"] and r["strategy"].startswith("fsdp")),
                       ("ZeRO-3", lambda r: r["strategy"].startswith("zero3")),
                       ("replicated (ddp)", lambda r: r["strategy"] == "ddp")):
        errs = [abs(r[key]) for r in rows if keep(r)]
        if errs:
            out.append((name, len(errs), statistics.median(errs), max(errs)))
    return out


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Published multi-GPU QLoRA memory vs tuiwiz's per-GPU estimate",
        "",
        "Generated by `.venv/bin/python bench/multigpu_published.py`. error = ours / published - 1, at the level the "
        "source measured (reserved: torch peak reserved; nvml: the whole process, nvidia-smi). No GPU measured "
        "anything here: these are published figures only.",
        "",
        "The extra allocator slack of a sharded step (`tuiwiz.planning.strategy.SHARDED_SLACK`: +10% of allocated, "
        "+25% when offloading) is a prior set from these rows, so the first table is not an independent check; "
        "the second shows the terms alone. Every row was under-estimated without it.",
        "",
        "| subset | rows | median abs error | max abs error | without the sharded slack: median | max |",
        "|---|---|---|---|---|---|",
    ]
    bare = {name: (med, worst) for name, _, med, worst in _summary(rows, "error_without")}
    for name, n, med, worst in _summary(rows):
        lines.append(f"| {name} | {n} | {med:.1%} | {worst:.1%} | {bare[name][0]:.1%} | {bare[name][1]:.1%} |")
    lines += ["", "## Per GPU", "",
              "| # | model | GPUs | strategy | seq | mb | r | level | published GiB | ours GiB | error | "
              "without sharded slack | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        flag = "" if r["setup_stated"] else " (setup partly stated)"
        lines.append(f"| {i} | {r['model']} | {r['gpus']} x {r['gpu']} | {r['strategy']} | {r['seq']} | "
                     f"{r['micro_batch']} | {r['lora_rank']} | {r['level']} | {r['published_gib']:.2f} | "
                     f"{r['ours_gib']:.2f} | {r['error']:+.1%} | {r['error_without']:+.1%} | {r['note']}{flag} |")
    lines += ["", "## Host RAM (per node)", "", "| # | model | strategy | published GB | ours GB | error |",
              "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        if "host_ram_published_gb" in r:
            lines.append(f"| {i} | {r['model']} | {r['strategy']} | {r['host_ram_published_gb']:.0f} | "
                         f"{r['host_ram_ours_gb']:.0f} | {r['host_ram_error']:+.1%} |")
    lines += ["", "## Sources", ""]
    for src in dict.fromkeys(r["source"] for r in rows):
        lines.append(f"- {src}")
    lines += ["", "## Reading it", "",
              "- The setups differ from tuiwiz's own worker where the source says so (Answer.AI's own training "
              "loop, PEFT's example script); each row is expressed with the source's knobs, not tuiwiz's defaults.",
              "- Host RAM: tuiwiz counts each rank's copy of the 4-bit model while it loads, the offloaded shards "
              "and a 3 GiB runtime prior per process. Two published 2-GPU figures are 26-38% above that (loading "
              "keeps more resident: 16-bit tensors before quantization, page cache, pinned buffers), the 4-GPU one "
              "is 35% below (not every rank's copy is resident at once). Read it as the order of magnitude, and "
              "keep swap as Answer.AI did.",
              "- The PEFT offload row (nvidia-smi level) stays 21% under: NCCL's buffers and offload's pinned "
              "staging are visible to nvidia-smi and not modelled.",
              ""]
    return "\n".join(lines)


def main() -> int:
    rows = [evaluate(r) for r in ROWS]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "multigpu_published.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    (out / "multigpu_published.md").write_text(render(rows), encoding="utf-8")
    for r in rows:
        print(f"{r['model']:<28} {r['strategy']:<13} {r['published_gib']:6.2f} {r['ours_gib']:6.2f} {r['error']:+.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
