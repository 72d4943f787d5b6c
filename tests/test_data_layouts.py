"""Reading and normalizing every supported layout and file format, and the bad-input errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from data_fixtures import DATASETS, chat_row, need_shared, write_jsonl
from tuiwiz.data import iter_conversations
from tuiwiz.data.readers import ReadReport
from tuiwiz.errors import UserError
from tuiwiz.preset import DatasetRef


def samples(path: Path | DatasetRef, **kw) -> list:
    return list(iter_conversations(path, **kw))


def test_messages_layout_is_detected_and_list_content_parts_are_joined(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": [{"type": "text", "value": "hello"}], "loss_weight": 1.0}]}]
    detected: list[str] = []
    (s,) = list(iter_conversations(write_jsonl(tmp_path / "d.jsonl", rows), detected=detected))
    assert detected == ["messages"]
    assert s.messages == [{"role": "user", "content": "hi\nthere"}, {"role": "assistant", "content": "hello"}]


def test_sharegpt_maps_roles_tools_function_calls_and_observations(tmp_path: Path) -> None:
    tools = [{"name": "get_time", "description": "now", "parameters": {"type": "object", "properties": {}}}]
    rows = [{"conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "time?"},
        {"from": "function_call", "value": json.dumps({"name": "get_time", "arguments": {"tz": "UTC"}})},
        {"from": "observation", "value": "{\"time\": \"12:00\"}"},
        {"from": "gpt", "value": "It is noon."},
    ], "tools": json.dumps(tools)}]
    (s,) = samples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert s.messages[2]["tool_calls"] == [{"type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}]
    assert s.tools == tools


def test_alpaca_joins_instruction_and_input_and_expands_history_and_system(tmp_path: Path) -> None:
    rows = [{"instruction": "Translate", "input": "chat", "output": "cat", "system": "You translate.",
             "history": [["hi", "hello"]]}]
    (s,) = samples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert s.messages == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Translate\nchat"}, {"role": "assistant", "content": "cat"},
    ]


def test_prompt_completion_string_form_keeps_plain_text(tmp_path: Path) -> None:
    (s,) = samples(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2=", "completion": "4"}]))
    assert (s.kind, s.prompt, s.completion) == ("completion", "2+2=", "4")


def test_prompt_completion_conversational_form_trains_only_the_completion(tmp_path: Path) -> None:
    row = {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
           "completion": [{"role": "assistant", "content": "d"}]}
    (s,) = samples(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert s.kind == "chat" and len(s.messages) == 4 and s.train_from == 3


def test_text_layout(tmp_path: Path) -> None:
    (s,) = samples(write_jsonl(tmp_path / "d.jsonl", [{"text": "once upon a time"}]))
    assert (s.kind, s.text) == ("text", "once upon a time")


def test_question_answer_keys_are_detected_as_prompt_completion(tmp_path: Path) -> None:
    (s,) = samples(write_jsonl(tmp_path / "d.jsonl", [{"question": "q?", "answer": "a."}]))
    assert (s.kind, s.prompt, s.completion) == ("completion", "q?", "a.")


def test_layout_override_beats_detection(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello", "instruction": "x", "output": "y"}])
    assert samples(path)[0].kind == "chat"  # instruction+output wins detection
    assert samples(path, layout="text")[0].text == "hello"


def test_column_mapping_with_our_names_and_llamafactory_names(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "What?", "ctx": "this", "a": "That."}])
    ours = samples(DatasetRef(path=str(path), layout="alpaca", columns={"instruction": "q", "input": "ctx", "output": "a"}))
    lf = samples(DatasetRef(path=str(path), layout="alpaca", columns={"prompt": "q", "query": "ctx", "response": "a"}))
    assert ours[0].messages == lf[0].messages == [{"role": "user", "content": "What?\nthis"}, {"role": "assistant", "content": "That."}]


def test_sharegpt_tags_from_a_dataset_info_mapping(tmp_path: Path) -> None:
    row = {"dialog": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "yo"}]}
    ref = DatasetRef(path=str(write_jsonl(tmp_path / "d.jsonl", [row])), layout="sharegpt",
                     columns={"messages": "dialog", "role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"})
    assert samples(ref)[0].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_system_prompt_from_the_dataset_ref_is_prepended(tmp_path: Path) -> None:
    ref = DatasetRef(path=str(write_jsonl(tmp_path / "d.jsonl", [chat_row(1, 1)])), system_prompt="Be kind.")
    assert samples(ref)[0].messages[0] == {"role": "system", "content": "Be kind."}


def test_unknown_layout_names_the_keys_it_saw_and_the_known_layouts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(UserError) as e:
        samples(path)
    msg = str(e.value)
    assert "bar, foo" in msg and "alpaca" in msg and "sharegpt" in msg and "d.jsonl: line 1" in msg
    assert e.value.field == "layout" and "--" not in msg  # the front end names the flag, not the core


def test_real_mt_bench_questions_are_an_unknown_layout() -> None:
    path = need_shared("datasets", "mt_bench_question.jsonl")
    with pytest.raises(UserError, match="turns"):
        samples(path)


def test_malformed_json_lines_are_counted_with_line_numbers_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    good = json.dumps(chat_row(1, 1))
    path.write_text("\n".join([good, "{broken", good, "", "[1, 2]", good]) + "\n", encoding="utf-8")
    report = ReadReport()
    got = samples(path, report=report)
    assert len(got) == 3
    assert report.skipped == 2
    assert [row.line for row in report.examples] == [2, 5]


def test_malformed_json_line_is_an_error_in_strict_mode(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat_row(1, 1)) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid JSON"):
        samples(path, strict=True)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_not_utf8_reports_the_byte_offset(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    head = ("[" if suffix == ".json" else "") + json.dumps({"text": "abc"})
    head += "," if suffix == ".json" else "\n"
    data = head.encode() + b'{"text": "caf\xe9"}' + (b"]" if suffix == ".json" else b"\n")
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(UserError, match=rf"not UTF-8 .*offset {offset}\b"):
        samples(path)


def test_empty_dataset_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        samples(path)


def test_empty_json_array_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        samples(path)


def test_sample_without_assistant_turn_is_an_error_in_strict_mode(tmp_path: Path) -> None:
    rows = [chat_row(1, 1), {"messages": [{"role": "user", "content": "anyone?"}]}]
    with pytest.raises(UserError, match=r"line 2 has no assistant turn .*roles: user"):
        samples(write_jsonl(tmp_path / "d.jsonl", rows), strict=True)


def test_sample_without_assistant_turn_is_skipped_and_counted_otherwise(tmp_path: Path) -> None:
    rows = [chat_row(1, 1), {"messages": [{"role": "user", "content": "anyone?"}]}]
    report = ReadReport()
    assert len(samples(write_jsonl(tmp_path / "d.jsonl", rows), report=report)) == 1
    assert [(row.line, row.reason) for row in report.examples] == [(2, "no assistant turn")]


def test_dataset_with_no_assistant_turn_at_all_is_an_error(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "x"}]}] * 3
    with pytest.raises(UserError, match="no assistant turn"):
        samples(write_jsonl(tmp_path / "d.jsonl", rows))


def test_json_array_is_streamed_across_read_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tuiwiz.data.readers as readers

    monkeypatch.setattr(readers, "_READ_CHUNK", 64)  # force elements to straddle chunk edges
    rows = [{"text": f"sample {i} " + "é" * (i % 50)} for i in range(200)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    got = samples(path)
    assert [s.text for s in got] == [r["text"] for r in rows]


def test_truncated_json_array_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"}, {"text": "b"', encoding="utf-8")
    with pytest.raises(UserError, match="d.json"):
        samples(path)


def test_csv_rows_are_read_as_records(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["say hi", "", "hi, there"])
    (s,) = samples(path)
    assert s.messages[-1] == {"role": "assistant", "content": "hi, there"}


def test_parquet_and_save_to_disk_folder_are_read(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert [s.completion for s in samples(tmp_path / "d.parquet")] == ["c1", "c2"]

    folder = tmp_path / "saved"
    folder.mkdir()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    assert [s.prompt for s in samples(folder)] == ["p1", "p2"]


def test_unknown_role_is_skipped_with_its_name(tmp_path: Path) -> None:
    rows = [chat_row(1, 1), {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    report = ReadReport()
    assert len(samples(write_jsonl(tmp_path / "d.jsonl", rows), report=report)) == 1
    assert "narrator" in report.examples[0].reason


def test_every_real_dataset_reads_with_detection_or_its_mapping() -> None:
    need_shared("datasets")
    counts = {
        "alpaca_en_demo.json": 999, "alpaca_zh_demo.json": 1000, "glaive_toolcall_en_demo.json": 300,
        "identity.json": 91, "kto_en_demo.json": 300, "v1_sft_demo.jsonl": 500,
    }
    for name, expected in counts.items():
        assert len(samples(DATASETS / name)) == expected, name
    gsm = samples(DatasetRef(path=str(DATASETS / "gsm8k_train.jsonl"), layout="alpaca",
                             columns={"instruction": "question", "output": "answer"}))
    assert len(gsm) == 7473
