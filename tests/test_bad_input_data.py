"""Broken dataset files and tokenizers: each is one UserError naming the file (and line or field),
never a traceback and never a hang; rows left out are counted and the first is named."""

from __future__ import annotations

import errno
import gzip
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from data_fixtures import chat_row, make_word_tokenizer, write_jsonl
from tuiwiz.data import iter_conversations, load_tokenizer, profile_dataset
from tuiwiz.data.readers import ReadReport
from tuiwiz.data.stats import PERCENTILE_RANGE
from tuiwiz.data_ref import dataset_ref_from_args
from tuiwiz.errors import BadValue, NotFound, UserError

DEADLINE_S = 10.0  # far above the milliseconds a refusal takes, far below "hangs"


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(str(make_word_tokenizer(tmp_path_factory.mktemp("tok"))))


def read_all(path: Path | str, **kw: Any) -> list:
    return list(iter_conversations(path, **kw))


def user_error(fn: Callable[[], Any]) -> UserError:
    """The UserError `fn` raises; any other exception (a traceback for the user) fails the test."""
    with pytest.raises(UserError) as info:
        fn()
    return info.value


def within_deadline(fn: Callable[[], Any]) -> BaseException | None:
    """Run `fn` on a daemon thread; fail if it is still running at the deadline. Returns what it raised."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            outcome.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(DEADLINE_S)
    assert not t.is_alive(), f"still running after {DEADLINE_S} s: it blocks instead of refusing"
    return outcome[0]


def unblock_fifo(path: Path) -> None:
    """If a reader is stuck opening the pipe, give it a writer that closes at once (it then reads EOF)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)


# ------------------------------------------------------------------ the path itself


def test_named_pipe_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    try:
        err = within_deadline(lambda: read_all(fifo))
    finally:
        unblock_fifo(fifo)
    assert isinstance(err, UserError), err
    assert str(fifo) in str(err) and "named pipe" in str(err) and err.field == "dataset"


def test_symlink_loop_is_named_as_a_loop_not_as_missing(tmp_path: Path) -> None:
    link = tmp_path / "data.jsonl"
    link.symlink_to(link)
    err = user_error(lambda: read_all(link))
    assert "symlink loop" in str(err) and str(link) in str(err)
    assert not isinstance(err, NotFound)


def test_dangling_symlink_names_its_missing_target(tmp_path: Path) -> None:
    link = tmp_path / "data.jsonl"
    link.symlink_to(tmp_path / "gone.jsonl")
    err = user_error(lambda: read_all(link))
    assert isinstance(err, NotFound) and "gone.jsonl" in str(err) and err.field == "dataset"


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    err = user_error(lambda: read_all(tmp_path / "nope.jsonl"))
    assert isinstance(err, NotFound) and "nope.jsonl" in str(err)


def test_a_file_used_as_a_folder_is_not_found(tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "d.jsonl", [chat_row(1, 1)])
    err = user_error(lambda: read_all(plain / "inner.jsonl"))
    assert isinstance(err, NotFound) and "not a folder" in str(err)


def test_permission_denied_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, which ignores file modes: make opening this one file fail as it would
    # for an unprivileged user.
    path = write_jsonl(tmp_path / "secret.jsonl", [chat_row(1, 1)])
    real_open = Path.open

    def guarded_open(self: Path, *args: Any, **kwargs: Any):
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded_open)
    err = user_error(lambda: read_all(path))
    assert "permission denied" in str(err) and str(path) in str(err) and err.field == "dataset"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode; the monkeypatched test covers it")
def test_unreadable_file_mode_is_permission_denied(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "secret.jsonl", [chat_row(1, 1)])
    path.chmod(0)
    err = user_error(lambda: read_all(path))
    assert "permission denied" in str(err) and str(path) in str(err)


def test_character_device_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "data.jsonl"
    link.symlink_to("/dev/zero")  # endless: reading it would never finish
    err = within_deadline(lambda: read_all(link))
    assert isinstance(err, UserError) and "character device" in str(err)


def test_folder_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "things"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    err = user_error(lambda: read_all(folder))
    assert str(folder) in str(err) and "save_to_disk" in str(err)


def test_empty_file_says_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"")
    err = user_error(lambda: read_all(path))
    assert str(path) in str(err) and "empty (0 bytes)" in str(err)


@pytest.mark.parametrize("name,data,words", [
    ("elf.jsonl", b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)), "binary file"),
    ("gz.jsonl", gzip.compress(b'{"text": "x"}\n'), "gzip-compressed"),
    ("d.json", b"PK\x03\x04" + bytes(64), "zip archive"),
    ("d.csv", "text\nhello\n".encode("utf-16"), "UTF-16"),
])
def test_binary_files_are_named_as_binary(tmp_path: Path, name: str, data: bytes, words: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    err = user_error(lambda: read_all(path))
    assert str(path) in str(err) and words in str(err)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_invalid_utf8_names_line_and_offset(tmp_path: Path, suffix: str) -> None:
    good = {"text": "fine"}
    if suffix == ".jsonl":
        data = (json.dumps(good) + "\n" + json.dumps(good) + "\n").encode() + b'{"text": "caf\xe9"}\n'
    elif suffix == ".json":
        data = ("[\n" + json.dumps(good) + ",\n" + json.dumps(good) + ",\n").encode() + b'{"text": "caf\xe9"}\n]'
    else:
        data = b"text\nfine\nfine\ncaf\xe9\n"
    path = tmp_path / f"d{suffix}"
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    line = data[:offset].count(b"\n") + 1
    err = user_error(lambda: read_all(path))
    assert f"{path}: line {line}: not UTF-8" in str(err) and f"0xe9 at offset {offset})" in str(err)


def test_a_bad_byte_cut_by_the_read_chunk_is_placed_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tuiwiz.data.readers as readers

    monkeypatch.setattr(readers, "_READ_CHUNK", 16)
    data = b'{"text": "\xc3\xa9\xc3"}\n'  # a valid 2-byte character, then a cut one
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    err = user_error(lambda: read_all(path))
    assert "line 1:" in str(err) and "0xc3" in str(err)


def test_empty_path_in_a_dataset_ref_is_a_bad_value() -> None:
    err = user_error(lambda: dataset_ref_from_args("", None, None))
    assert isinstance(err, BadValue) and err.field == "dataset"


def test_nul_in_a_path_is_a_bad_value() -> None:
    err = user_error(lambda: read_all("data\x00.jsonl"))
    assert isinstance(err, BadValue) and err.field == "dataset"


# ------------------------------------------------------------------ rows left out


def test_deeply_nested_line_is_skipped_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat_row(1, 1)) + "\n" + "[" * 100_000 + "\n", encoding="utf-8")
    report = ReadReport()
    assert len(read_all(path, report=report)) == 1
    assert report.skipped == 1 and report.first.line == 2 and "nested too deeply" in report.first.reason
    err = user_error(lambda: read_all(path, strict=True))
    assert f"{path}:2:" in str(err)


def test_deeply_nested_json_array_element_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps(chat_row(1, 1)) + ",\n" + "[" * 100_000 + "]" * 100_000 + "\n]",
                    encoding="utf-8")
    err = user_error(lambda: read_all(path))
    assert f"{path}:3:" in str(err) and "nested too deeply" in str(err)


def test_skipped_rows_are_counted_and_the_first_is_named(tmp_path: Path, word_tok) -> None:
    path = tmp_path / "d.jsonl"
    rows = [json.dumps(chat_row(2, 3)) for _ in range(99)]
    rows.insert(4, "{not json")  # line 5
    rows.insert(9, json.dumps({"instruction": "q", "output": "a"}))  # line 10: another layout
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    prof = profile_dataset(path, word_tok)
    assert prof.samples == 99 and prof.skipped == 2
    first = prof.first_skipped
    assert first is not None and first.line == 5 and "not valid JSON" in first.reason
    second = prof.skipped_examples[1]
    assert second.line == 10 and "alpaca row in a messages dataset" in second.reason
    data = prof.to_json()["skipped_rows"]
    assert data["count"] == 2
    assert data["first"] == {"line": 5, "row": None, "reason": first.reason}
    assert [e["line"] for e in data["examples"]] == [5, 10]
    note = prof.skipped_note()
    assert note is not None and "2 records skipped" in note and "line 5" in note


def test_a_clean_dataset_reports_no_skipped_rows(tmp_path: Path, word_tok) -> None:
    prof = profile_dataset(write_jsonl(tmp_path / "d.jsonl", [chat_row(1, 1)] * 3), word_tok)
    assert prof.to_json()["skipped_rows"] == {"count": 0, "first": None, "examples": []}
    assert prof.skipped_note() is None


def test_skipped_parquet_rows_are_named_by_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    odd = [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "a"}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"messages": [good, odd, good]}), path)
    report = ReadReport()
    assert len(read_all(path, report=report)) == 2
    assert report.first is not None and report.first.to_json()["row"] == 2 and report.first.line is None
    assert report.first.where() == "row 2" and "narrator" in report.first.reason


def test_percentile_outside_the_range_is_a_bad_value_naming_the_field(word_tok) -> None:
    lo, hi = PERCENTILE_RANGE
    for bad in (lo - 1, hi + 0.9, float("nan")):
        err = user_error(lambda: profile_dataset("unused.jsonl", word_tok, percentile=bad))
        assert isinstance(err, BadValue) and err.field == "percentile" and "--" not in str(err)
    err = user_error(lambda: profile_dataset("unused.jsonl", word_tok, sample=0))
    assert isinstance(err, BadValue) and err.field == "sample"


# ------------------------------------------------------------------ chat templates


def test_template_syntax_error_names_the_tokenizer_config_before_rows_are_read(tmp_path: Path) -> None:
    tok = load_tokenizer(str(make_word_tokenizer(tmp_path / "tok", template="{% for m in messages %}\n{{ m.content }\n")))
    missing = tmp_path / "not-there.jsonl"  # never opened: the template fails first
    err = user_error(lambda: profile_dataset(missing, tok))
    msg = str(err)
    assert f"{tmp_path / 'tok' / 'tokenizer_config.json'}: chat_template: syntax error at line 2" in msg
    assert "not-there" not in msg and err.field == "tokenizer"


def test_template_syntax_error_in_a_jinja_file_names_that_file(tmp_path: Path) -> None:
    folder = make_word_tokenizer(tmp_path / "tok", template=None)
    (folder / "chat_template.jinja").write_text("{% if %}", encoding="utf-8")
    tok = load_tokenizer(str(folder))
    err = user_error(lambda: profile_dataset(write_jsonl(tmp_path / "d.jsonl", [chat_row(1, 1)]), tok))
    assert f"{folder / 'chat_template.jinja'}: syntax error at line 1" in str(err)


def test_template_refusing_one_row_names_the_data_line_and_the_template(tmp_path: Path) -> None:
    template = ("{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no boom') }}{% endif %}"
                "{{ m.content }}{% endfor %}")
    tok = load_tokenizer(str(make_word_tokenizer(tmp_path / "tok", template=template)))
    rows = [chat_row(1, 1), {"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "x"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    err = user_error(lambda: profile_dataset(path, tok))
    assert f"{path}: line 2: the chat template rejected" in str(err) and "no boom" in str(err)
    assert "tokenizer_config.json" in str(err)


def test_chat_template_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    folder = make_word_tokenizer(tmp_path / "tok", template=None)
    (folder / "chat_template.jinja").write_bytes(b"{{ x }}\n\xff")
    err = user_error(lambda: load_tokenizer(str(folder)))
    assert "chat_template.jinja: line 2: not UTF-8" in str(err) and err.field == "tokenizer"


# ------------------------------------------------------------------ tokenizers


def test_tokenizer_folder_without_tokenizer_json_is_not_found(tmp_path: Path) -> None:
    err = user_error(lambda: load_tokenizer(str(tmp_path)))
    assert isinstance(err, NotFound) and err.field == "tokenizer" and "--" not in str(err)


def test_corrupt_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    folder = make_word_tokenizer(tmp_path / "tok")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 5}', encoding="utf-8")
    err = user_error(lambda: load_tokenizer(str(folder)))
    assert "tokenizer.json: not a valid tokenizer.json" in str(err)


def test_malformed_tokenizer_config_names_its_line(tmp_path: Path) -> None:
    folder = make_word_tokenizer(tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>",\n  oops}', encoding="utf-8")
    err = user_error(lambda: load_tokenizer(str(folder)))
    assert "tokenizer_config.json: line 2: not valid JSON" in str(err) and err.field == "tokenizer"


def test_tokenizer_json_that_is_a_pipe_is_refused(tmp_path: Path) -> None:
    folder = make_word_tokenizer(tmp_path / "tok")
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    try:
        err = within_deadline(lambda: load_tokenizer(str(folder)))
    finally:
        unblock_fifo(folder / "tokenizer.json")
    assert isinstance(err, UserError) and "named pipe" in str(err)


# ------------------------------------------------------------------ through the CLI


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from tuiwiz.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def broken_datasets(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """One file per class of broken input, and the words its error must contain."""
    out: dict[str, tuple[Path, str]] = {}
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    out["symlink loop"] = (loop, "symlink loop")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    out["empty"] = (empty, "0 bytes")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(100))
    out["binary"] = (binary, "binary file")
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    out["not utf-8"] = (latin, "line 1: not UTF-8")
    folder = tmp_path / "folder"
    folder.mkdir()
    out["plain folder"] = (folder, "save_to_disk")
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text("{oops\n[1]\n", encoding="utf-8")
    out["no good rows"] = (only_bad, "line 1")
    return out


def test_cli_reports_each_broken_dataset_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, (path, words) in broken_datasets(tmp_path).items():
        code, err = cli(["--auto", "--json", "--dataset", str(path)], capsys)
        assert_one_line_error(code, err, str(path), words)


def test_cli_refuses_a_named_pipe_quickly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    codes: list[int] = []
    try:
        err = within_deadline(lambda: codes.append(cli(["--auto", "--json", "--dataset", str(fifo)], capsys)[0]))
    finally:
        unblock_fifo(fifo)
    assert err is None and codes == [2]


def test_cli_names_the_template_file_for_a_template_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tok = make_word_tokenizer(tmp_path / "tok", template="{% for m in messages %}{{ m.content }")
    data = write_jsonl(tmp_path / "d.jsonl", [chat_row(1, 1)])
    code, err = cli(["--auto", "--json", "--dataset", str(data), "--tokenizer", str(tok)], capsys)
    assert_one_line_error(code, err, "tokenizer_config.json: chat_template: syntax error at line 1")
    assert "d.jsonl" not in err
