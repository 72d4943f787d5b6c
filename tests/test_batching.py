"""Batching (padded, packed, padding-free): chosen by the advisor, sized by the estimate, run by the worker.

The correctness proof is `test_flattened_batch_equals_padded_batch_sample_by_sample`: on a tiny model built
and wrapped exactly as the worker builds it (build_model + build_trainer, LoRA attached, trl's fused head),
each sample's per-token log-probs, its loss and its LoRA gradients are the same whether it trains in the
flattened row trl's collator makes (packed or padding-free) or alone in its own row of a padded batch. A
padded row cannot see another row, so equality proves no sample attends to another.

Why it holds with the installed stack (trl 1.16, transformers 5.24):
- trl's `DataCollatorForLanguageModeling(padding_free=True)` concatenates the micro-batch into one row and
  returns `position_ids` that restart at 0 per sample, and no attention mask
  (trl/trainer/sft_trainer.py, DataCollatorForLanguageModeling.torch_call);
- transformers then finds the samples from the restarts (masking_utils.py `find_packed_sequence_indices`,
  used by `_preprocess_mask_arguments` when the attention mask is None and there is no cache) and ANDs a
  block-diagonal mask into the causal one for sdpa and eager (`create_causal_mask`,
  `packed_sequence_mask_function`); flash-attention gets the boundaries as `cu_seq_lens_*` (varlen).
- It needs `use_cache=False` (with a cache the packed format is not looked for): trl's `compute_loss`
  sets it, and so does the worker's model config.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from lanes import lane

from tuiwiz.errors import BadValue
from tuiwiz.models import resolve_model
from tuiwiz.planning import activations as act
from tuiwiz.planning.advisor import advise, budget_bytes
from tuiwiz.planning.knobs import TrainingKnobs, knobs_from
from tuiwiz.planning.memory import estimate_memory

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = SHARED / "datasets"
LLAMA3_TOKENIZER = SHARED / "tokenizers" / "llama3"
#: The shared files a plan can read as SFT data (dataset_info.json and the README are not data;
#: mt_bench has questions only).
SHARED_DATASETS = ("alpaca_en_demo.json", "alpaca_zh_demo.json", "glaive_toolcall_en_demo.json", "identity.json",
                   "kto_en_demo.json", "v1_sft_demo.jsonl", "gsm8k_train.jsonl", "sharegpt_zh_1K_format.jsonl")
#: The default lane checks the slot efficiency on these; `pytest --full` on every one (tests/conftest.py).
QUICK_DATASETS = ("alpaca_en_demo.json", "glaive_toolcall_en_demo.json", "identity.json", "kto_en_demo.json",
                  "v1_sft_demo.jsonl")
needs_shared = pytest.mark.skipif(not (DATASETS.is_dir() and LLAMA3_TOKENIZER.is_dir()),
                                  reason="needs ../shared/data (datasets and the llama3 tokenizer)")


# ---- the estimate: a micro-batch is sized by its tokens -------------------------------------------

def test_flattened_micro_batch_is_one_row_of_all_its_tokens() -> None:
    k = TrainingKnobs(micro_batch_size=4, cutoff_len=512)
    assert act.micro_batch_shape(k) == (4, 512)
    assert act.micro_batch_shape(k.replace(batching="padding_free")) == (1, 2048)
    assert act.micro_batch_shape(k.replace(batching="packed")) == (1, 2048)


def test_packed_memory_depends_on_tokens_per_micro_batch_not_on_rows() -> None:
    """Two packed rows of 1024 tokens cost what four of 512 cost: the same flattened row."""
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    base = TrainingKnobs(batching="packed", grad_checkpointing=False)
    a = estimate_memory(spec, base.replace(micro_batch_size=2, cutoff_len=1024))
    b = estimate_memory(spec, base.replace(micro_batch_size=4, cutoff_len=512))
    assert a.peak_bytes == b.peak_bytes
    assert estimate_memory(spec, base.replace(micro_batch_size=8, cutoff_len=512)).peak_bytes > b.peak_bytes


def test_flattened_sdpa_row_pays_its_mask_and_eager_pays_every_pair() -> None:
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    k = TrainingKnobs(micro_batch_size=8, cutoff_len=1024, grad_checkpointing=False)
    padded, flat = (estimate_memory(spec, k.replace(batching=b)).peak_bytes for b in ("padded", "padding_free"))
    mask_copies = spec.layers * 2 * (8 * 1024) ** 2  # one bf16 T x T copy per layer
    assert flat - padded >= mask_copies
    eager = estimate_memory(spec, k.replace(batching="padding_free", attn="eager")).peak_bytes
    assert eager > flat + spec.layers * 4 * spec.heads * (8 * 1024) ** 2  # fp32 scores for every pair


@pytest.mark.slow
def test_sdpa_keeps_one_mask_copy_per_layer_for_a_flattened_row(tmp_path: Path) -> None:
    """The estimate's `c x seq` per token for sdpa on a shared row is what sdpa really saves: counted
    here from the tensors autograd keeps for backward on a tiny Llama (transformers' own sdpa path)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuiwiz.models import spec_from_config

    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).train()
    model.config._attn_implementation = "sdpa"
    lengths = (40, 56, 32)
    rows = sum(lengths)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    square: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4 and t.shape[-2:] == (rows, rows):
            square[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=torch.randint(5, 300, (1, rows)), position_ids=pos, use_cache=False)
    spec = spec_from_config(cfg.to_dict(), "tiny", "test")
    k = TrainingKnobs(quant_bits=16, micro_batch_size=3, cutoff_len=rows // 3, lora_dropout=0.0)
    per_token = (act.layer_saved_bytes_per_token(spec, k.replace(batching="padding_free"), rows)
                 - act.layer_saved_bytes_per_token(spec, k, rows))
    assert sum(square.values()) == cfg.num_hidden_layers * rows * per_token


# ---- the advisor's choice ---------------------------------------------------------------------------

class _Profile:
    """The two queries the advisor makes of a dataset profile, over fixed lengths."""

    def __init__(self, lengths: list[int]) -> None:
        from array import array

        from tuiwiz.data.profile import LengthProfile

        n = len(lengths)
        self._p = LengthProfile(path="x", layout="alpaca", tokenizer="t", approximate=False, samples=n, skipped=0,
                                skipped_examples=[], lengths=array("I", lengths), trained=array("I", lengths),
                                span_offsets=array("Q", [0] * (n + 1)), span_flat=array("I"), longest=[],
                                percentile=99, max_positions=None)
        self.samples = n

    def at_cutoff(self, *a: Any) -> Any:
        return self._p.at_cutoff(*a)


_RNG = random.Random(0)
SPREAD = [_RNG.randint(40, 500) for _ in range(400)]
LLAMA = resolve_model("meta-llama/Llama-3.1-8B")


def _advise(profile: _Profile | None, **knobs: Any) -> Any:
    fixed = frozenset(k for k in knobs if k != "cutoff_len")
    return advise(LLAMA, TrainingKnobs(cutoff_len=512, **knobs), budget_bytes(80), profile=profile,
                  fixed=fixed | {"cutoff_len"})


def test_advisor_flattens_varied_lengths_and_says_why() -> None:
    a = _advise(_Profile(SPREAD))
    assert a.knobs.batching == "padding_free"
    assert any(r.startswith("batching padding-free:") and "padding" in r for r in a.reasons)


def test_advisor_keeps_padding_when_lengths_are_equal() -> None:
    a = _advise(_Profile([300] * 200))
    assert a.knobs.batching == "padded" and any("batching padded" in r for r in a.reasons)


def test_advisor_keeps_eager_attention_padded() -> None:
    assert _advise(_Profile(SPREAD), attn="eager").knobs.batching == "padded"


def test_advisor_packs_short_samples_for_flash_attention_and_counts_samples_per_step() -> None:
    short = [_RNG.randint(40, 160) for _ in range(400)]  # about 5 samples per 512-token row
    a = _advise(_Profile(short), attn="flash_attention_2")
    assert a.knobs.batching == "packed"
    # 16 samples per optimizer step need about 3 rows
    assert 2 <= a.knobs.effective_batch() <= 4
    assert any("packed rows, about" in r for r in a.reasons)


def test_advisor_leaves_a_held_batching_and_plans_without_a_profile_as_given() -> None:
    assert _advise(_Profile(SPREAD), batching="padded").knobs.batching == "padded"
    assert _advise(None).knobs.batching == "padded"


def test_padding_free_at_micro_batch_one_runs_padded() -> None:
    a = advise(LLAMA, TrainingKnobs(cutoff_len=4096), budget_bytes(12), profile=_Profile(SPREAD),
               fixed={"cutoff_len"})
    assert a.knobs.micro_batch_size == 1 and a.knobs.batching == "padded"


def test_presets_that_said_packing_read_as_batching() -> None:
    assert knobs_from({"packing": True}).batching == "packed"
    assert knobs_from({"packing": False}).batching == "padded"
    with pytest.raises(BadValue):
        knobs_from({"packing": True, "batching": "padding_free"})


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("name", lane(list(SHARED_DATASETS), list(QUICK_DATASETS)))
def test_default_plan_fills_95_percent_of_slots_as_trl_collates_them(name: str) -> None:
    """`dataset.slot_efficiency` of the default plan, checked against trl's own collator: the
    plan's micro-batches (profiled lengths, truncated at the cutoff) go through
    DataCollatorForLanguageModeling as the worker's trainer builds it, and real tokens are
    counted against the slots it returns."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tuiwiz.data_ref import dataset_ref_from_args
    from tuiwiz.planner import PlanRequest, plan_request

    req = PlanRequest(model="meta-llama/Llama-3.1-8B", tokenizer=str(LLAMA3_TOKENIZER), gpu="24GB",
                      dataset=dataset_ref_from_args(str(DATASETS / name), None, None))
    plan = plan_request(req)
    k, reported = plan.knobs, plan.to_json()["dataset"]["slot_efficiency"]
    assert reported >= 0.95, (name, k.batching, reported)
    if k.batching == "packed":
        pytest.skip("packed rows are flattened the same way; checked in the collator test above")
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=k.batching == "padding_free")
    lengths = [min(n, k.cutoff_len) for n in plan.profile.lengths]
    random.Random(1).shuffle(lengths)
    real = slots = 0
    for i in range(0, len(lengths), k.micro_batch_size):
        batch = collate([{"input_ids": [1] * n} for n in lengths[i:i + k.micro_batch_size]])
        real += sum(lengths[i:i + k.micro_batch_size])
        slots += batch["input_ids"].numel()
    assert real / slots == pytest.approx(reported, abs=0.02)


# ---- the worker runs it, and a sample never attends to another ---------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_model import build_model as build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "m")


def _rows(tok: Any, n: int = 10) -> list[dict[str, list[int]]]:
    """Samples of different lengths, half prompt and half completion."""
    rows = []
    for i in range(n):
        ids = tok(f"question {i} " + "the cat sat on a mat " * (1 + i % 4))["input_ids"]
        half = len(ids) // 2
        rows.append({"input_ids": ids, "completion_mask": [0] * half + [1] * (len(ids) - half)})
    return rows


def _worker_trainer(tiny_dir: Path, tmp_path: Path, batching: str, attn: str) -> Any:
    """The SFTTrainer the worker would build, in fp32 (so equal means equal to float rounding),
    with random LoRA B weights (peft starts B at zero, which would leave A's gradients zero)."""
    import torch

    from tuiwiz.train import build

    knobs = TrainingKnobs(batching=batching, attn=attn, quant_bits=16, micro_batch_size=4, grad_accum=1,
                          cutoff_len=64, lora_rank=4, lora_alpha=8, lora_dropout=0.0, max_steps=1)
    model = build.build_model(str(tiny_dir), knobs, "cpu", dtype=torch.float32)
    tok = build.load_hf_tokenizer(tiny_dir)
    trainer = build.build_trainer(model, tok, knobs, _rows(tok), [], tmp_path / "out", device="cpu",
                                  dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return trainer


def _samples_of(trainer: Any, batching: str) -> list[dict[str, list[int]]]:
    """A flattened micro-batch's samples as trl prepared them (packed rows split at their seq_lengths)."""
    rows = [trainer.train_dataset[i] for i in range(2 if batching == "packed" else 4)]
    if batching != "packed":
        return rows
    out = []
    for row in rows:
        start = 0
        for n in row["seq_lengths"]:
            out.append({"input_ids": row["input_ids"][start:start + n], "labels": row["labels"][start:start + n]})
            start += n
    return out


def _per_sample(trainer: Any, batch: dict[str, Any], spans: list[tuple[int, int, int]]) -> tuple[list[Any], list[Any]]:
    """Per-token log-probs and LoRA gradients of each sample's own loss. `spans` gives each sample's
    (row, first token, length) in `batch`; log_probs[:, t] scores token t + 1 (trl's fused head)."""
    import torch

    model = trainer.model
    lps, grads = [], []
    for i, (row, start, n) in enumerate(spans):
        model.zero_grad(set_to_none=True)
        out = model(**batch, use_cache=False, fused_lm_head=True)
        lp = out.log_probs[row, start:start + n - 1]
        lp.sum().neg().backward()
        lps.append(lp.detach().clone())
        grads.append(torch.cat([p.grad.flatten() for name, p in model.named_parameters() if "lora_" in name]))
    return lps, grads


def _spans_flat(batch: dict[str, Any]) -> list[tuple[int, int, int]]:
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
    return [(0, a, b - a) for a, b in zip(starts, starts[1:])]


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batching", ["padding_free", "packed"])
def test_flattened_batch_equals_padded_batch_sample_by_sample(tiny_dir: Path, tmp_path: Path, batching: str,
                                                              attn: str) -> None:
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trainer = _worker_trainer(tiny_dir, tmp_path, batching, attn)
    assert trainer.padding_free  # the collator the worker's trainer uses flattens
    samples = _samples_of(trainer, batching)
    assert len(samples) >= 3 and len({len(s["input_ids"]) for s in samples}) > 1
    flat = trainer.data_collator([dict(s) for s in samples])
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    padded = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)(
        [dict(s) for s in samples])
    lengths = [len(s["input_ids"]) for s in samples]
    assert padded["input_ids"].shape == (len(samples), max(lengths))

    lp_flat, g_flat = _per_sample(trainer, flat, _spans_flat(flat))
    lp_pad, g_pad = _per_sample(trainer, padded, [(i, 0, n) for i, n in enumerate(lengths)])
    for i, s in enumerate(samples):
        trained = torch.tensor(s["labels"][1:]) != -100  # the tokens whose loss counts
        assert torch.allclose(lp_flat[i], lp_pad[i], atol=1e-5), f"sample {i}: log-probs differ"
        loss_flat, loss_pad = (-x[trained].sum() / trained.sum() for x in (lp_flat[i], lp_pad[i]))
        assert loss_flat.item() == pytest.approx(loss_pad.item(), abs=1e-5)
        assert g_flat[i].abs().max() > 0
        assert torch.allclose(g_flat[i], g_pad[i], rtol=1e-4, atol=1e-6), f"sample {i}: gradients differ"


@pytest.mark.slow
def test_the_equivalence_check_fails_when_samples_do_attend_to_each_other(tiny_dir: Path, tmp_path: Path) -> None:
    """The same flattened row with one running position (no restarts): transformers sees one long
    sequence, later samples attend to earlier ones, and their log-probs move well past tolerance."""
    import torch

    trainer = _worker_trainer(tiny_dir, tmp_path, "padding_free", "sdpa")
    flat = trainer.data_collator([dict(s) for s in _samples_of(trainer, "padding_free")])
    spans = _spans_flat(flat)
    leaky = {"input_ids": flat["input_ids"], "labels": flat["labels"],
             "position_ids": torch.arange(flat["input_ids"].shape[1])[None]}
    with torch.no_grad():
        apart = trainer.model(**flat, use_cache=False, fused_lm_head=True).log_probs
        mixed = trainer.model(**leaky, use_cache=False, fused_lm_head=True).log_probs
    _, start, n = spans[-1]
    assert (apart[0, start:start + n - 1] - mixed[0, start:start + n - 1]).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["padded", "padding_free", "packed"])
def test_worker_trains_each_batching(tiny_dir: Path, tmp_path: Path, batching: str) -> None:
    """The trainer the worker builds runs two optimizer steps under each batching, loss finite."""
    import math

    import torch

    from tuiwiz.train import build

    knobs = TrainingKnobs(batching=batching, micro_batch_size=4, grad_accum=1, cutoff_len=64, lora_rank=4,
                          lora_alpha=8, lora_dropout=0.0, max_steps=2, save_steps=100, warmup_ratio=0.0,
                          logging_steps=1)
    args = build.sft_config(knobs, tmp_path, device="cpu", has_eval=False, dtype=torch.bfloat16)
    assert (args.packing, args.padding_free) == {"padded": (False, False), "padding_free": (False, True),
                                                 "packed": (True, True)}[batching]
    model = build.build_model(str(tiny_dir), knobs, "cpu")
    tok = build.load_hf_tokenizer(tiny_dir)
    trainer = build.build_trainer(model, tok, knobs, _rows(tok, 16), [], tmp_path / "out", device="cpu")
    assert trainer.padding_free == (batching != "padded")
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
