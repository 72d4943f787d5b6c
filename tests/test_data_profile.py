"""Statistics, cutoff suggestion, truncation, packing, sampling, progress/cancel, memory,
the text report and the import boundary of tuiwiz.data."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import threading
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from data_fixtures import make_word_tokenizer, write_jsonl
from tuiwiz.data import DEMO_DATASET, load_tokenizer, profile_dataset, render_text_report
from tuiwiz.data.stats import bfd_bins, padded_tokens, percentile_ci, percentile_from_counts, round_cutoff
from tuiwiz.data.tokenizer import tiktoken_file_cached
from tuiwiz.errors import CancelledError, UserError
from tuiwiz.models import find_in_hf_cache

ROOT = Path(__file__).resolve().parents[1]
OVERHEAD = 6  # word tokenizer + ChatML: 2 messages x (<|im_start|>, role, <|im_end|>)


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(str(make_word_tokenizer(tmp_path_factory.mktemp("tok"), max_len=2000)))


def rows_with_answers(answer_words: list[int]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " ".join(["a"] * n)}]}
            for n in answer_words]


def test_percentiles_use_nearest_rank() -> None:
    counts = Counter(range(1, 101))  # 1..100
    assert percentile_from_counts(counts, 100, 50) == 50
    assert percentile_from_counts(counts, 100, 99) == 99
    assert percentile_from_counts(counts, 100, 99.5) == 100


def test_cutoff_rounds_up_to_multiple_of_64_and_is_capped() -> None:
    assert round_cutoff(1) == 64
    assert round_cutoff(64) == 64
    assert round_cutoff(65) == 128
    assert round_cutoff(5000, cap=4096) == 4096


def test_suggested_cutoff_is_p99_rounded_up(tmp_path: Path, word_tok) -> None:
    answers = list(range(1, 201))  # totals = answer + 1 (user word) + 6 overhead
    prof = profile_dataset(write_jsonl(tmp_path / "d.jsonl", rows_with_answers(answers)), word_tok)
    p99_total = 198 + 1 + OVERHEAD  # nearest rank ceil(0.99*200)=198th smallest
    assert prof.stats["p99"] == p99_total
    assert prof.suggested_cutoff == 256
    p95 = profile_dataset(tmp_path / "d.jsonl", word_tok, percentile=95)
    assert p95.stats["p95"] == 190 + 1 + OVERHEAD and p95.suggested_cutoff == 256


def test_suggested_cutoff_is_capped_at_model_max_positions(tmp_path: Path, word_tok) -> None:
    prof = profile_dataset(write_jsonl(tmp_path / "d.jsonl", rows_with_answers([300] * 10)), word_tok, max_positions=200)
    assert prof.suggested_cutoff == 200


def test_percentile_outside_95_to_99_is_refused(tmp_path: Path, word_tok) -> None:
    with pytest.raises(UserError, match="95 and 99"):
        profile_dataset(DEMO_DATASET, word_tok, percentile=90)


def test_truncation_counts_and_trained_tokens_lost(tmp_path: Path, word_tok) -> None:
    answers = [10] * 8 + [100, 200]
    prof = profile_dataset(write_jsonl(tmp_path / "d.jsonl", rows_with_answers(answers)), word_tok)
    c = prof.at_cutoff(64)
    assert c.truncated == 2 and c.truncated_frac == pytest.approx(0.2)
    # tokens: <|im_start|> user q <|im_end|> <|im_start|> assistant | reply... <|im_end|>
    # so the trained reply + end marker occupies positions [6, 6 + n + 1)
    lost = sum(max(0, (6 + n + 1) - 64) for n in answers)
    assert c.trained_tokens_lost == lost
    assert c.trained_lost_frac == pytest.approx(lost / sum(n + 1 for n in answers))


def _bfd_reference(lengths: list[int], cap: int) -> int:
    bins: list[int] = []  # remaining space per bin
    for n in sorted((min(x, cap) for x in lengths if x > 0), reverse=True):
        fits = [i for i, s in enumerate(bins) if s >= n]
        if fits:
            i = min(fits, key=lambda j: bins[j])
            bins[i] -= n
        else:
            bins.append(cap - n)
    return len(bins)


def test_packing_count_matches_a_plain_best_fit_decreasing() -> None:
    rng = random.Random(1)
    for _ in range(30):
        lengths = [rng.choice([rng.randint(1, 64), rng.randint(1, 600)]) for _ in range(rng.randint(1, 300))]
        cap = rng.choice([64, 100, 256, 512])
        assert bfd_bins(Counter(lengths), cap) == _bfd_reference(lengths, cap)


def test_packing_efficiency_is_tokens_over_slots(tmp_path: Path, word_tok) -> None:
    prof = profile_dataset(write_jsonl(tmp_path / "d.jsonl", rows_with_answers([25] * 10)), word_tok)
    c = prof.at_cutoff(64, batching="packed")  # each sample is 32 tokens: two per 64-token sequence
    assert c.sequences == 5 and c.fill == pytest.approx(1.0) and c.efficiency == pytest.approx(1.0)


def test_padding_waste_pads_each_micro_batch_to_its_longest() -> None:
    assert padded_tokens([10, 20, 30, 5], micro_batch=2, cutoff=100) == 2 * 20 + 2 * 30
    assert padded_tokens([10, 20, 30], micro_batch=2, cutoff=25) == 2 * 20 + 25


def test_no_padding_waste_at_micro_batch_one(tmp_path: Path, word_tok) -> None:
    prof = profile_dataset(write_jsonl(tmp_path / "d.jsonl", rows_with_answers([1, 50, 100])), word_tok)
    assert prof.at_cutoff(256, micro_batch=1).padding_waste == 0
    assert prof.at_cutoff(256, micro_batch=3).padding_waste > 0.3


def test_percentile_ci_covers_the_true_percentile_about_95_percent_of_the_time() -> None:
    rng = random.Random(7)
    population = sorted(int(rng.lognormvariate(6, 0.8)) for _ in range(50_000))
    true_p99 = population[math.ceil(0.99 * len(population)) - 1]
    hits = 0
    trials = 200
    for _ in range(trials):
        lo, hi = percentile_ci(sorted(rng.sample(population, 2000)), 99)
        hits += lo <= true_p99 <= hi
    assert 0.88 <= hits / trials <= 1.0


def test_sampling_profiles_n_samples_and_reports_a_ci(tmp_path: Path, word_tok) -> None:
    rng = random.Random(3)
    path = write_jsonl(tmp_path / "d.jsonl", rows_with_answers([rng.randint(1, 400) for _ in range(3000)]))
    prof = profile_dataset(path, word_tok, sample=500, seed=1)
    assert prof.samples == 500 and prof.population == 3000
    lo, hi = prof.percentile_ci
    assert lo <= prof.stats["p99"] <= hi
    assert sorted(set(prof.lengths)) != []
    again = profile_dataset(path, word_tok, sample=500, seed=1)
    assert list(again.lengths) == list(prof.lengths)  # seeded: reproducible
    assert prof.to_json()["sampled_from"] == 3000


def test_progress_callback_reaches_the_total(tmp_path: Path, word_tok) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows_with_answers([5] * 1500))
    calls: list[tuple[int, int | None]] = []
    profile_dataset(path, word_tok, progress=lambda d, t: calls.append((d, t)))
    assert len(calls) >= 2
    assert calls[-1] == (1500, 1500)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_cancel_stops_profiling(tmp_path: Path, word_tok) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows_with_answers([5] * 3000))
    cancel = threading.Event()

    def progress(done: int, total: int | None) -> None:
        cancel.set()

    with pytest.raises(CancelledError):
        profile_dataset(path, word_tok, progress=progress, cancel=cancel)


def test_peak_memory_stays_flat_as_the_dataset_grows(tmp_path: Path, word_tok) -> None:
    def peak(n: int) -> int:
        rng = random.Random(n)
        path = write_jsonl(tmp_path / f"d{n}.jsonl", rows_with_answers([rng.randint(1, 60) for _ in range(n)]))
        tracemalloc.start()
        profile_dataset(path, word_tok)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, big = peak(3_000), peak(30_000)
    # 10x the samples: only the compact per-sample arrays grow (~20 bytes/sample)
    assert big < small + 30_000 * 64, (small, big)


def test_to_json_has_the_planner_keys(word_tok) -> None:
    prof = profile_dataset(DEMO_DATASET, word_tok)
    data = prof.to_json()
    for key in ("path", "layout", "samples", "skipped", "tokenizer", "approximate", "p50", "p95", "p99",
                "max", "suggested_cutoff", "truncated_at_cutoff"):
        assert key in data
    assert data["samples"] == 300 and data["layout"] == "messages"
    json.dumps(data)


def test_demo_dataset_has_a_long_tail_and_some_system_and_multi_turn_samples(word_tok) -> None:
    rows = [json.loads(line) for line in DEMO_DATASET.read_text(encoding="utf-8").splitlines()]
    assert 250 <= len(rows) <= 400
    assert sum(r["messages"][0]["role"] == "system" for r in rows) >= 30
    assert sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows) >= 30
    prof = profile_dataset(DEMO_DATASET, load_tokenizer(None))
    assert prof.stats["p99"] > 2 * prof.stats["p95"]


def test_demo_dataset_file_is_what_the_generator_makes() -> None:
    from tuiwiz.demo.make_demo import build

    assert DEMO_DATASET.read_text(encoding="utf-8") == build()


def test_text_report_marks_percentiles_and_cutoff_and_fits_80_columns(word_tok) -> None:
    prof = profile_dataset(DEMO_DATASET, word_tok)
    text = render_text_report(prof, width=80)
    assert "p95" in text and "p99" in text and "cut" in text and "Longest samples" in text
    assert f"Suggested cutoff_len {prof.suggested_cutoff:,}" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_no_argument_tokenizer_is_approximate_offline_and_says_how_to_be_exact(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    tok = load_tokenizer(None)
    assert tok.approximate
    prof = profile_dataset(DEMO_DATASET, tok)
    text = render_text_report(prof)
    assert "approximate" in text.lower() and "tokenizer folder" in text and "--tokenizer" not in text
    assert prof.to_json()["approximate"] is True


def test_tiktoken_cache_dir_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import hashlib

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert not tiktoken_file_cached()
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_text("x")
    assert tiktoken_file_cached()


def test_model_id_is_found_in_the_offline_hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    make_word_tokenizer(snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_in_hf_cache("acme/tiny", "tokenizer.json") == snap / "tokenizer.json"
    tok = load_tokenizer(None, model_id="acme/tiny")
    assert not tok.approximate and tok.name == "acme/tiny"


def test_missing_tokenizer_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_chat_template_error_names_the_sample(tmp_path: Path) -> None:
    tok = load_tokenizer(str(make_word_tokenizer(tmp_path / "tok", template="{{ raise_exception('no system role') }}")))
    with pytest.raises(UserError, match=r"line 1: the chat template rejected .*no system role"):
        profile_dataset(write_jsonl(tmp_path / "d.jsonl", rows_with_answers([1])), tok)


def test_tuiwiz_data_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, tuiwiz.data as d\n"
        "p = d.profile_dataset(d.DEMO_DATASET, d.load_tokenizer(None))\n"
        "d.render_text_report(p)\n"
        "bad = [m for m in ('torch', 'transformers', 'textual') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_cli_progress_printer_is_rate_limited_but_prints_the_end() -> None:
    import io

    from tuiwiz.data import cli_progress_printer

    buf = io.StringIO()
    progress = cli_progress_printer(buf, every=3600)
    for done in range(0, 1001, 100):
        progress(done, 1000)
    lines = [line for line in buf.getvalue().splitlines() if line]
    assert len(lines) == 2  # the first call, then the final one; nothing in between
    assert lines[-1].startswith("profiling: 1,000/1,000 (100%)")
