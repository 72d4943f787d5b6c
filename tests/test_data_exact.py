"""Totals equal transformers' apply_chat_template on every real dataset x real tokenizer,
and the trained mask covers exactly the assistant replies. transformers is imported here
only, as the reference.

The comparison with transformers takes every 8th sample of each dataset by default and every
sample (over 11,000) under `pytest --full` (see tests/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_fixtures import CHATML, DATASETS, REAL_TOKENIZERS, TOKENIZERS, make_word_tokenizer, need_shared, write_jsonl
from tuiwiz.data import encode_sample, iter_conversations, mask_preview, profile_dataset
from tuiwiz.data.encode import encode_rendered, render_sample, token_spans
from tuiwiz.data.tokenizer import load_tokenizer_folder
from tuiwiz.preset import DatasetRef

REAL_DATASETS = [
    "alpaca_en_demo.json", "alpaca_zh_demo.json", "glaive_toolcall_en_demo.json", "identity.json",
    "kto_en_demo.json", "v1_sft_demo.jsonl", "sharegpt_zh_1K_format.jsonl", "gsm8k_train.jsonl",
]


def _ref(name: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZERS / name))


def _dataset(name: str):
    if name == "gsm8k_train.jsonl":  # question/answer: mapped to a chat through the column mapping
        return DatasetRef(path=str(DATASETS / name), layout="alpaca", columns={"instruction": "question", "output": "answer"})
    return DATASETS / name


#: The default lane compares every STRIDE-th sample; --full compares them all.
STRIDE = 8


@pytest.mark.slow
@pytest.mark.parametrize("tok_name", REAL_TOKENIZERS)
def test_token_ids_equal_transformers_apply_chat_template_on_every_real_sample(tok_name: str, full_lane: bool) -> None:
    need_shared("tokenizers", tok_name)
    need_shared("datasets")
    ours = load_tokenizer_folder(TOKENIZERS / tok_name)
    ref = _ref(tok_name)
    checked = 0
    for ds in REAL_DATASETS:
        samples = list(iter_conversations(_dataset(ds)))[::1 if full_lane else STRIDE]
        encs = encode_rendered([render_sample(s, ours) for s in samples], ours)
        # the reference, batched per tools value to keep it fast
        mismatches = []
        for s, enc in zip(samples, encs):
            expected = ref.apply_chat_template(s.messages, tools=s.tools, tokenize=True, return_dict=False)
            if list(enc.ids) != list(expected):
                mismatches.append((s.index, len(enc.ids), len(expected)))
        assert not mismatches, f"{tok_name} {ds}: {len(mismatches)} samples differ, first {mismatches[:3]}"
        checked += len(samples)
    assert checked > (11_000 if full_lane else 11_000 // STRIDE)


@pytest.mark.parametrize("tok_name", REAL_TOKENIZERS)
def test_trained_tokens_are_the_assistant_replies_on_real_data(tok_name: str) -> None:
    need_shared("tokenizers", tok_name)
    tok = load_tokenizer_folder(TOKENIZERS / tok_name)
    for ds in ("alpaca_en_demo.json", "glaive_toolcall_en_demo.json", "kto_en_demo.json", "sharegpt_zh_1K_format.jsonl"):
        for s in list(iter_conversations(need_shared("datasets", ds)))[:60]:
            r = render_sample(s, tok)
            enc = encode_rendered([r], tok)[0]
            spans = token_spans(r, enc)
            trained_text = "".join(tok.decode(enc.ids[a:b]) for a, b in spans)
            replies = [m for m in s.messages if m["role"] == "assistant"]
            assert len(spans) >= 1
            for m in replies:
                if m["content"].strip():
                    assert m["content"].strip() in trained_text, (ds, s.index)
            for m in s.messages:
                text = m["content"].strip()
                if m["role"] == "user" and len(text) > 20 and all(text not in x["content"] for x in replies):
                    assert text not in trained_text, (ds, s.index)


def test_end_of_turn_token_is_trained_and_role_header_is_not() -> None:
    tok = load_tokenizer_folder(need_shared("tokenizers", "llama3"))
    from tuiwiz.data.layouts import Sample

    s = Sample(0, "chat", messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}])
    preview = mask_preview(s, tok)
    trained = [t for t, on in preview if on]
    assert "".join(trained) == "Hello there<|eot_id|>"
    assert not any(on for t, on in preview if t in ("<|start_header_id|>", "assistant", "<|end_header_id|>"))


def test_word_tokenizer_counts_follow_the_template_definition(tmp_path: Path) -> None:
    # ChatML per message: <|im_start|> + role + words + <|im_end|>; trained = reply words + <|im_end|>
    tok = load_tokenizer_folder(make_word_tokenizer(tmp_path / "tok", template=CHATML))
    rows = [{"messages": [{"role": "user", "content": "w " * 5}, {"role": "assistant", "content": "x " * 7},
                          {"role": "user", "content": "y"}, {"role": "assistant", "content": "z z"}]}]
    (s,) = iter_conversations(write_jsonl(tmp_path / "d.jsonl", rows))
    enc = encode_sample(s, tok)
    assert len(enc.input_ids) == 4 * 3 + 5 + 7 + 1 + 2
    assert sum(enc.trained) == (7 + 1) + (2 + 1)
    assert len(enc.trained) == len(enc.input_ids)


def test_prompt_completion_trains_completion_and_eos_only(tmp_path: Path) -> None:
    tok = load_tokenizer_folder(make_word_tokenizer(tmp_path / "tok"))
    (s,) = iter_conversations(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a b c ", "completion": "d e"}]))
    enc = encode_sample(s, tok)
    assert enc.trained == [0, 0, 0, 1, 1, 1]  # a b c | d e </s>


def test_text_mode_trains_everything(tmp_path: Path) -> None:
    tok = load_tokenizer_folder(make_word_tokenizer(tmp_path / "tok"))
    (s,) = iter_conversations(write_jsonl(tmp_path / "d.jsonl", [{"text": "one two three"}]))
    enc = encode_sample(s, tok)
    assert enc.trained == [1, 1, 1, 1]


def test_base_model_without_template_uses_the_documented_default(tmp_path: Path) -> None:
    from tuiwiz.data import DEFAULT_CHAT_TEMPLATE

    tok = load_tokenizer_folder(make_word_tokenizer(tmp_path / "tok", template=None))
    assert tok.chat_template is None
    (s,) = iter_conversations(write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]))
    text = render_sample(s, tok).text
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo</s><|im_end|>\n"
    assert "im_start" in DEFAULT_CHAT_TEMPLATE


def test_tool_call_turns_are_trained_via_prefix_renders() -> None:
    tok = load_tokenizer_folder(need_shared("tokenizers", "qwen2.5"))
    samples = list(iter_conversations(need_shared("datasets", "glaive_toolcall_en_demo.json")))
    s = next(x for x in samples if any(m.get("tool_calls") for m in x.messages))
    enc = encode_sample(s, tok)
    text = "".join(tok.decode([i]) for i, t in zip(enc.input_ids, enc.trained) if t)
    assert "<tool_call>" in text and s.messages[[m.get("tool_calls") is not None for m in s.messages].index(True)]["tool_calls"][0]["function"]["name"] in text


def test_profile_totals_match_encode_sample(tmp_path: Path) -> None:
    tok = load_tokenizer_folder(need_shared("tokenizers", "phi3"))
    path = need_shared("datasets", "identity.json")
    prof = profile_dataset(path, tok)
    expect = [len(encode_sample(s, tok)) for s in iter_conversations(path)]
    assert list(prof.lengths) == expect
