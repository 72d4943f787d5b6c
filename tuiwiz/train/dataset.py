"""Training examples, built by the very function the profiler uses, so lengths match the plan."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tuiwiz.data import CountingTokenizer, encode_sample, iter_conversations, load_tokenizer
from tuiwiz.data.tokenizer import load_tokenizer_folder
from tuiwiz.errors import UserError
from tuiwiz.models import is_hub_id
from tuiwiz.preset import Preset

# What rendering and counting read from a Hub repo: never the weights (from_pretrained fetches those).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "config.json")


@dataclass
class BuiltData:
    """Pre-tokenized rows (`input_ids` + `completion_mask`) split into train / validation."""

    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    total: int
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    notes: list[str] = field(default_factory=list)


def truncate_example(input_ids: list[int], trained: list[int], cutoff_len: int) -> tuple[list[int], list[int], bool]:
    """Keep the first `cutoff_len` tokens (trl's `keep_start`, and what the profiler counts as truncated)."""
    if len(input_ids) <= cutoff_len:
        return input_ids, trained, False
    return input_ids[:cutoff_len], trained[:cutoff_len], True


def split_train_eval(rows: list[Any], val_ratio: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded shuffle, then the first round(n*ratio) rows (at least 1 when ratio > 0 and n >= 2) validate."""
    if val_ratio <= 0 or len(rows) < 2:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * val_ratio)))
    eval_idx = set(order[:n_eval])
    return ([r for i, r in enumerate(rows) if i not in eval_idx], [r for i, r in enumerate(rows) if i in eval_idx])


def training_tokenizer(preset: Preset) -> CountingTokenizer:
    """The model's exact tokenizer: from disk or the HF cache, else (a run launched `--online`, so
    HF_HUB_OFFLINE is unset) downloaded from the Hub into the HF cache. Never an approximation."""
    from huggingface_hub import is_offline_mode

    m = preset.model
    tok = load_tokenizer(m.tokenizer or m.path, model_id=m.id)
    if not getattr(tok, "approximate", False):
        return tok
    if is_hub_id(m.id) and not is_offline_mode():
        from huggingface_hub import snapshot_download

        folder = snapshot_download(m.id, allow_patterns=list(TOKENIZER_FILES))
        return load_tokenizer_folder(folder, name=m.id)
    raise UserError(f"model {m.id}: no tokenizer.json found offline (training needs the exact one); set "
                    "model.tokenizer or model.path in the preset to a folder that has it, or launch with --online.",
                    field="tokenizer")


def build_examples(preset: Preset) -> BuiltData:
    """Render every conversation with `tuiwiz.data.encode_sample`, truncate, drop rows with nothing to learn."""
    if preset.dataset is None:
        raise UserError("preset has no dataset: set dataset.path (and layout) before launching.")
    knobs = preset.training
    tok = training_tokenizer(preset)
    rows: list[dict[str, list[int]]] = []
    total = truncated = dropped = tokens = 0
    for sample in iter_conversations(preset.dataset):
        total += 1
        enc = encode_sample(sample, tok)
        ids, mask, cut = truncate_example(list(enc.input_ids), [int(b) for b in enc.trained], knobs.cutoff_len)
        truncated += cut
        if not any(mask):
            dropped += 1
            continue
        tokens += len(ids)
        rows.append({"input_ids": ids, "completion_mask": mask})
    if not rows:
        raise UserError(f"{preset.dataset.path}: no example has a trained (assistant) token after truncation to "
                        f"cutoff_len={knobs.cutoff_len}; check dataset.layout/columns or raise cutoff_len.")
    train, val = split_train_eval(rows, knobs.val_ratio, knobs.seed)
    notes = []
    if truncated:
        notes.append(f"{truncated} of {total} examples truncated to {knobs.cutoff_len} tokens")
    if dropped:
        notes.append(f"{dropped} examples dropped (no trained tokens left)")
    return BuiltData(train, val, total, truncated, dropped, tokens, notes)
