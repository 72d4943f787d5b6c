"""What the worst-case probe costs: the time to order an epoch, and what it does to padding.

    python bench/probe_cost.py [--dataset ../shared/data/datasets/sharegpt_zh_1K_format.jsonl]
                               [--tokenizer ../shared/data/tokenizers/qwen2.5] [--cutoff 2048]

1. Ordering: `WorstFirstSampler.order` (a seeded permutation, then the longest rows of the first
   step moved to the front) against the plain permutation the Trainer draws, for 10k to 1M rows;
   and `row_lengths` on a datasets.Dataset (Arrow, no Python loop over the ids).
2. Padding: with `batching: padded` a micro-batch is padded to its longest row, so moving rows
   changes the padded tokens of an epoch. Real lengths (the dataset encoded as the worker does,
   truncated to the cutoff), micro-batch 4 x accumulation 4: padded tokens of the epoch with the
   probe order against the plain order, over 20 seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tuiwiz.train.probe import WorstFirstSampler, row_lengths

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _best_of(fn, repeat: int = 5) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ordering_cost() -> None:
    import random

    from datasets import Dataset

    print("rows       plain randperm   probe order   extra")
    for n in (10_000, 100_000, 1_000_000):
        lengths = [random.randint(16, 4096) for _ in range(n)]
        sampler = WorstFirstSampler(lengths, micro_batch=4, grad_accum=4, world=1, seed=42)
        plain = _best_of(lambda: torch.randperm(n, generator=torch.Generator().manual_seed(42)).tolist())
        probe = _best_of(lambda: sampler.order(0))
        print(f"{n:>9,}  {plain * 1e3:12.1f} ms  {probe * 1e3:9.1f} ms  {(probe - plain) * 1e3:6.1f} ms")
    ds = Dataset.from_dict({"input_ids": [[1] * (i % 512 + 1) for i in range(100_000)]})
    print(f"row_lengths on a 100,000-row Dataset: {_best_of(lambda: row_lengths(ds)) * 1e3:.1f} ms")


def padded_tokens(order: list[int], lengths: list[int], micro: int) -> int:
    return sum(micro * max(lengths[i] for i in order[j:j + micro]) if len(order[j:j + micro]) == micro
               else len(order[j:j + micro]) * max(lengths[i] for i in order[j:j + micro])
               for j in range(0, len(order), micro))


def padding_cost(dataset: Path, tokenizer: Path, cutoff: int) -> None:
    from tuiwiz.data import encode_sample, iter_conversations, load_tokenizer
    from tuiwiz.preset import DatasetRef

    tok = load_tokenizer(str(tokenizer))
    lengths = [min(cutoff, len(encode_sample(s, tok).input_ids))
               for s in iter_conversations(DatasetRef(path=str(dataset)))]
    real = sum(lengths)
    changes = []
    for seed in range(20):
        s = WorstFirstSampler(lengths, micro_batch=4, grad_accum=4, world=1, seed=seed)
        plain = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        changes.append(padded_tokens(s.order(0), lengths, 4) / padded_tokens(plain, lengths, 4) - 1)
    print(f"{dataset.name}: {len(lengths)} rows, {real:,} real tokens at cutoff {cutoff}; padded tokens per "
          f"epoch with the probe order vs the plain shuffle: median {statistics.median(changes) * 100:+.2f}% "
          f"(range {min(changes) * 100:+.2f}% to {max(changes) * 100:+.2f}%, 20 seeds)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=SHARED / "datasets" / "sharegpt_zh_1K_format.jsonl")
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "qwen2.5")
    ap.add_argument("--cutoff", type=int, default=2048)
    args = ap.parse_args()
    ordering_cost()
    if args.dataset.exists() and args.tokenizer.exists():
        padding_cost(args.dataset, args.tokenizer, args.cutoff)


if __name__ == "__main__":
    main()
