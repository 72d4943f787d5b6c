"""Build a tiny Llama + byte-level BPE tokenizer (with a chat template) and a small dataset, locally.

Nothing is downloaded: the tokenizer is trained on a few sentences, the model is a 2-layer
LlamaConfig with random weights. Training it on CPU through the real worker takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang songs about rivers "
         "numbers one two three four five six seven eight nine ten add plus equals answer question").split()


def corpus_rows(n: int = 48) -> list[dict[str, str]]:
    """Alpaca-style rows; the answer is a deterministic function of the question, so loss can fall."""
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        rows.append({"instruction": f"say {a} then {b}", "input": "", "output": f"{a} {b} {a} {b}"})
    return rows


def build_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [" ".join(WORDS)] * 4 + [json.dumps(r) for r in corpus_rows(48)]
    tok.train_from_iterator(text, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|end|>",
        "pad_token": "<pad>", "model_max_length": 256, "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return folder


def build_model(folder: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A tiny LlamaForCausalLM saved with its tokenizer in `folder` (bf16 weights like a real checkpoint).

    hidden must be a multiple of 64: bitsandbytes' CPU 4-bit inference path (used in eval)
    reshapes absmax by in_features // blocksize(64) and fails below that.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tokenizer(folder)
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=3, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    return folder


def write_dataset(path: Path, n: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(corpus_rows(n)), encoding="utf-8")
    return path


def tiny_preset_dict(model_dir: Path, data_path: Path, **training: object) -> dict:
    """A preset for the tiny model: a few CPU steps, checkpoints every 2 steps."""
    knobs = {"micro_batch_size": 2, "grad_accum": 1, "cutoff_len": 64, "max_steps": 6, "save_steps": 2,
             "eval_steps": 3, "learning_rate": 5e-3, "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
             "warmup_ratio": 0.0, "val_ratio": 0.1, "logging_steps": 1}
    knobs.update(training)
    return {
        "version": 1, "name": "tiny",
        "model": {"id": "tiny-llama", "path": str(model_dir)},
        "dataset": {"path": str(data_path), "layout": "alpaca"},
        "hardware": {"gpu": "cpu-test", "memory_gib": 1.0, "count": 1, "bf16": True},
        "training": knobs,
        "estimate": {"peak_gib": 0.5, "allocated_gib": 0.4, "budget_gib": 1.0, "fits": True,
                     "breakdown_gib": {"weights": 0.1}},
    }


def worker_env(**extra: str) -> dict[str, str]:
    """The environment a test's worker runs in: this one without tuiwiz/accelerate settings, offline,
    on the CPU, one thread; `extra` adds seams such as TUIWIZ_FAULT or TUIWIZ_STEP_DELAY."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUIWIZ_", "ACCELERATE_", "FSDP_"))}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra})
    return env
