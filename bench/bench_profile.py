"""Benchmark the dataset profiler (tuiwiz.data) on the real shared data and a synthetic set.

    .venv/bin/python bench/bench_profile.py            # everything (~5 min on 2 cores)
    .venv/bin/python bench/bench_profile.py --synthetic 100000   # smaller synthetic run

Writes bench/results/profile.json and bench/results/profile.md. Measures, per real tokenizer
(all real shared datasets concatenated, gsm8k through a column mapping):
  * profiler: profile_dataset end to end (read, render, tokenize, stats), samples/s, tokens/s
  * naive: transformers AutoTokenizer.apply_chat_template(tokenize=True) per sample, timed on
    a subset (NAIVE_SUBSET samples) and reported as a rate (extrapolated, not a full run)
  * raw: Tokenizer.encode_batch alone over the same texts pre-rendered (chunks of 512)
  * approximation error of the offline heuristic and, when its encoding file is cached,
    tiktoken o200k_base, against each real tokenizer (per-sample totals)
and, for a synthetic chat dataset of N samples (default 1,000,000) with the llama3 tokenizer,
throughput and peak RSS (each profile run in its own process, so ru_maxrss is its own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
DATASETS = SHARED / "datasets"
TOKS = ("llama3", "qwen2.5", "qwen3", "phi3")
NAIVE_SUBSET = 2000
REAL = ["alpaca_en_demo.json", "alpaca_zh_demo.json", "glaive_toolcall_en_demo.json", "identity.json",
        "kto_en_demo.json", "v1_sft_demo.jsonl", "sharegpt_zh_1K_format.jsonl", "gsm8k_train.jsonl"]


def dataset_ref(name: str):
    from tuiwiz.preset import DatasetRef

    if name == "gsm8k_train.jsonl":
        return DatasetRef(path=str(DATASETS / name), layout="alpaca", columns={"instruction": "question", "output": "answer"})
    return DatasetRef(path=str(DATASETS / name))


def combined_file(tmp: Path) -> Path:
    """All real datasets as one messages-layout JSONL (so one profile call covers them)."""
    from tuiwiz.data import iter_conversations

    out = tmp / "real_all.jsonl"
    with out.open("w", encoding="utf-8") as fh:
        for name in REAL:
            for s in iter_conversations(dataset_ref(name)):
                row = {"messages": s.messages}
                if s.tools:
                    row["tools"] = s.tools
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def bench_real(tok_name: str, path: Path) -> dict:
    from tokenizers import Tokenizer

    from tuiwiz.data import iter_conversations, profile_dataset
    from tuiwiz.data.encode import render_sample
    from tuiwiz.data.tokenizer import load_tokenizer_folder

    tok = load_tokenizer_folder(SHARED / "tokenizers" / tok_name)
    profile_dataset(path, tok, sample=200)  # warm up (template compile, page cache)
    t0 = time.perf_counter()
    prof = profile_dataset(path, tok)
    t_prof = time.perf_counter() - t0
    n, tokens = prof.samples, int(prof.stats["total_tokens"])

    samples = list(iter_conversations(path))
    texts = [render_sample(s, tok).text for s in samples]
    raw = Tokenizer.from_file(str(SHARED / "tokenizers" / tok_name / "tokenizer.json"))
    t0 = time.perf_counter()
    for i in range(0, len(texts), 512):
        raw.encode_batch(texts[i:i + 512], add_special_tokens=False)
    t_raw = time.perf_counter() - t0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / tok_name))
    rng = random.Random(0)
    subset = rng.sample(samples, min(NAIVE_SUBSET, len(samples)))
    t0 = time.perf_counter()
    naive_tokens = 0
    for s in subset:
        naive_tokens += len(ref.apply_chat_template(s.messages, tools=s.tools, tokenize=True, return_dict=False))
    t_naive = time.perf_counter() - t0
    naive_rate = len(subset) / t_naive
    return {
        "tokenizer": tok_name, "samples": n, "tokens": tokens,
        "profiler_s": round(t_prof, 3), "profiler_samples_per_s": round(n / t_prof), "profiler_tokens_per_s": round(tokens / t_prof),
        "raw_encode_batch_s": round(t_raw, 3), "raw_samples_per_s": round(n / t_raw), "raw_tokens_per_s": round(tokens / t_raw),
        "naive_subset": len(subset), "naive_samples_per_s": round(naive_rate), "naive_tokens_per_s": round(naive_tokens / t_naive),
        "naive_extrapolated_full_s": round(n / naive_rate, 2),
        "speedup_vs_naive": round((n / t_prof) / naive_rate, 2),
        "fraction_of_raw_tokenizer": round(t_raw / t_prof, 3),
        "suggested_cutoff": prof.suggested_cutoff, "p99": prof.stats["p99"],
    }


def approx_error() -> list[dict]:
    """Per-sample relative error of approximate counts vs each real tokenizer (each with its
    own chat template; the approximation renders the default template)."""
    from tuiwiz.data import iter_conversations
    from tuiwiz.data.encode import encode_rendered, render_sample
    from tuiwiz.data.tokenizer import HeuristicTokenizer, load_tokenizer_folder, load_tiktoken

    approximators = [HeuristicTokenizer()]
    tk = load_tiktoken()
    if tk is not None:
        approximators.append(tk)
    rows = []
    for name in REAL:
        samples = list(iter_conversations(dataset_ref(name)))
        approx_counts = {a.name: [len(e) for e in encode_rendered([render_sample(s, a) for s in samples], a)] for a in approximators}
        for tok_name in TOKS:
            tok = load_tokenizer_folder(SHARED / "tokenizers" / tok_name)
            real = [len(e) for e in encode_rendered([render_sample(s, tok) for s in samples], tok)]
            for a_name, counts in approx_counts.items():
                rel = [(a - r) / r for a, r in zip(counts, real)]
                rs, cs = sorted(real), sorted(counts)
                p99r, p99a = rs[int(0.99 * (len(rs) - 1))], cs[int(0.99 * (len(cs) - 1))]
                rows.append({"dataset": name, "tokenizer": tok_name, "approximation": a_name,
                             "mean_bias": round(statistics.mean(rel), 4),
                             "mean_abs_error": round(statistics.mean(abs(x) for x in rel), 4),
                             "p99_error": round((p99a - p99r) / p99r, 4)})
    return rows


def make_synthetic(path: Path, n: int) -> None:
    """Chat samples with lognormal reply lengths (mostly short, a long tail), deterministic."""
    rng = random.Random(42)
    words = "the model reads each sample and we count tokens exactly as training will see them".split()
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            q = " ".join(rng.choices(words, k=rng.randint(5, 40)))
            a = " ".join(rng.choices(words, k=min(3000, int(rng.lognormvariate(4.5, 0.8)))))
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 3 == 0:
                msgs.insert(0, {"role": "system", "content": "You are helpful."})
            fh.write(json.dumps({"messages": msgs}) + "\n")


def peak_rss_kib() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from
    the parent (which has transformers loaded), VmHWM belongs to this process's memory map."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def one_synthetic(path: str, tok_name: str, sample: int | None) -> dict:
    from tuiwiz.data import profile_dataset
    from tuiwiz.data.tokenizer import load_tokenizer_folder

    tok = load_tokenizer_folder(SHARED / "tokenizers" / tok_name)
    t0 = time.perf_counter()
    prof = profile_dataset(path, tok, sample=sample)
    dt = time.perf_counter() - t0
    rss = peak_rss_kib()
    return {"samples": prof.samples, "population": prof.population, "tokens": int(prof.stats["total_tokens"]),
            "seconds": round(dt, 2), "samples_per_s": round(prof.samples / dt), "tokens_per_s": round(prof.stats["total_tokens"] / dt),
            "peak_rss_mib": round(rss / 1024, 1), "p99": prof.stats["p99"], "suggested_cutoff": prof.suggested_cutoff,
            "p99_ci95": list(prof.percentile_ci) if prof.percentile_ci else None}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", type=int, default=1_000_000)
    ap.add_argument("--child", nargs="*")
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    if args.child is not None:
        kind = args.child[0]
        if kind == "real":
            print(json.dumps(bench_real(args.child[1], Path(args.child[2]))))
        else:
            sample = int(args.child[3]) if len(args.child) > 3 else None
            print(json.dumps(one_synthetic(args.child[1], args.child[2], sample)))
        return 0
    if not SHARED.exists():
        print(f"shared data missing at {SHARED}", file=sys.stderr)
        return 1
    results: dict = {"command": "python bench/bench_profile.py" + (f" --synthetic {args.synthetic}" if args.synthetic != 1_000_000 else ""),
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                     "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        if not args.skip_real:
            combined = combined_file(tmpd)
            results["real"] = [run_child("real", t, str(combined)) for t in TOKS]
            for r in results["real"]:
                print(json.dumps(r), flush=True)
            results["approximation"] = approx_error()
        synth = tmpd / "synthetic.jsonl"
        make_synthetic(synth, args.synthetic)
        small = tmpd / "synthetic_small.jsonl"
        make_synthetic(small, max(1, args.synthetic // 10))
        results["synthetic"] = [
            {"n": args.synthetic // 10, **run_child("synth", str(small), "llama3")},
            {"n": args.synthetic, **run_child("synth", str(synth), "llama3")},
            {"n": args.synthetic, "sample": 10_000, **run_child("synth", str(synth), "llama3", "10000")},
        ]
        for r in results["synthetic"]:
            print(json.dumps(r), flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "profile.md").write_text(to_markdown(results), encoding="utf-8")
    print(to_markdown(results))
    return 0


def to_markdown(r: dict) -> str:
    lines = ["# Dataset profiler benchmark", "", f"Command: `{r['command']}`  ", f"Machine: {r['machine']}, {r['date']}", ""]
    if "real" in r:
        lines += ["## Real tokenizers, all shared datasets concatenated", "",
                  "| tokenizer | samples | tokens | profiler samples/s | tokens/s | naive samples/s (subset of %d) | speedup vs naive | raw encode_batch tokens/s | profiler / raw |" % NAIVE_SUBSET,
                  "|---|---|---|---|---|---|---|---|---|"]
        for x in r["real"]:
            lines.append(f"| {x['tokenizer']} | {x['samples']:,} | {x['tokens']:,} | {x['profiler_samples_per_s']:,} | {x['profiler_tokens_per_s']:,} | "
                         f"{x['naive_samples_per_s']:,} | {x['speedup_vs_naive']}x | {x['raw_tokens_per_s']:,} | {x['fraction_of_raw_tokenizer']} |")
        lines += ["", "Naive = transformers `apply_chat_template(..., tokenize=True)` per sample, timed on a random subset and reported as a rate.",
                  "Raw = `Tokenizer.encode_batch` alone on the same texts, pre-rendered; profiler / raw = raw time / profiler time.", ""]
    if "approximation" in r:
        lines += ["## Approximate counts vs the real tokenizers (per-sample totals)", "",
                  "| approximation | dataset | tokenizer | mean bias | mean abs error | p99 error |", "|---|---|---|---|---|---|"]
        for x in r["approximation"]:
            lines.append(f"| {x['approximation']} | {x['dataset']} | {x['tokenizer']} | {x['mean_bias']:+.1%} | {x['mean_abs_error']:.1%} | {x['p99_error']:+.1%} |")
        lines.append("")
    lines += ["## Synthetic chat dataset, llama3 tokenizer", "", "| samples in file | profiled | seconds | samples/s | tokens/s | peak RSS MiB | p99 (95% CI) |", "|---|---|---|---|---|---|---|"]
    for x in r["synthetic"]:
        ci = f" ({x['p99_ci95'][0]}-{x['p99_ci95'][1]})" if x.get("p99_ci95") else ""
        lines.append(f"| {x['n']:,} | {x['samples']:,} | {x['seconds']} | {x['samples_per_s']:,} | {x['tokens_per_s']:,} | {x['peak_rss_mib']} | {x['p99']}{ci} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
