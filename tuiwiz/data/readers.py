"""Stream records out of dataset files without loading them whole.

JSONL is read line by line; a JSON array is parsed incrementally (one element at a time);
CSV with the csv module; Parquet and `datasets.save_to_disk` folders (Arrow IPC streams)
batch by batch with pyarrow. Malformed JSON lines are recorded in a `ReadReport` and
skipped (or raised in strict mode); bytes that are not UTF-8 are reported with their line
and offset. The path is checked before it is opened (see `iter_records`): a pipe would
block, and a binary file would otherwise show up as thousands of skipped lines.
"""

from __future__ import annotations

import codecs
import csv
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from tuiwiz.errors import UserError
from tuiwiz.jsonfile import json_type, read_json_object
from tuiwiz.userfile import open_file, special_kind, stat_path

MAX_SHOWN_BAD = 5
_READ_CHUNK = 1 << 20
_SNIFF = 8192
FIELD = "dataset"


@dataclass(frozen=True)
class SkippedRow:
    """One record left out of the profile (and of training), where it is and why."""

    line: int | None  # 1-based line in the file (JSONL, JSON array, CSV)
    row: int | None  # 1-based row, for Parquet and Arrow, which have no lines
    reason: str

    def where(self) -> str:
        return f"line {self.line}" if self.line is not None else f"row {self.row}"

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "row": self.row, "reason": self.reason}


@dataclass
class ReadReport:
    """What was skipped while reading, for the profile and the user."""

    skipped: int = 0
    examples: list[SkippedRow] = field(default_factory=list)  # the first few skipped, in file order
    total_hint: int | None = None  # number of records when cheap to know up front

    def bad(self, reason: str, *, line: int | None = None, row: int | None = None) -> None:
        self.skipped += 1
        if len(self.examples) < MAX_SHOWN_BAD:
            self.examples.append(SkippedRow(line, row, reason))

    @property
    def first(self) -> SkippedRow | None:
        return self.examples[0] if self.examples else None


@dataclass(frozen=True)
class Record:
    index: int  # 0-based position among the records that parsed
    line: int | None  # 1-based source line (JSONL/CSV) or None
    data: dict[str, Any]


def folder_kind(path: Path) -> str:
    """arrow_dir (a `save_to_disk` folder) or parquet_dir; any other folder is a UserError."""
    try:
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or any(path.glob("*.arrow")):
            return "arrow_dir"
        if any(path.glob("*.parquet")):
            return "parquet_dir"
    except PermissionError:
        raise UserError(f"{path}: permission denied; cannot list this folder.", field=FIELD) from None
    raise UserError(f"{path}: a folder, but not a dataset saved with datasets.save_to_disk "
                    "(no state.json, .arrow or .parquet files).", field=FIELD)


def file_kind(path: Path) -> str:
    """jsonl | json | csv | parquet, from the name (and the first bytes for .json)."""
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() in (".gz",) else path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".json":
        head = _head(path).lstrip(b"\xef\xbb\xbf \t\r\n")
        return "json" if head.startswith(b"[") else "jsonl"
    raise UserError(f"{path}: unsupported file type {path.suffix or '(none)'}; "
                    "use .json, .jsonl, .csv, .parquet or a save_to_disk folder.", field=FIELD)


def _open(path: Path) -> IO[bytes]:
    return open_file(path, "rb", field=FIELD)


def _head(path: Path) -> bytes:
    with _open(path) as fh:
        return fh.read(_SNIFF)


_BINARY_MAGIC = ((b"\x1f\x8b", "gzip-compressed; decompress it first"),
                 (b"PK\x03\x04", "a zip archive; extract it first"),
                 (b"PAR1", "a Parquet file; name it .parquet"))


def refuse_binary(path: Path, kind: str) -> None:
    """A UserError when a file meant to be text (JSON, JSONL, CSV) is binary or UTF-16.

    Caught from the first bytes, so the user hears "binary file" instead of one skipped
    "invalid JSON" per line or a confusing byte offset.
    """
    head = _head(path)
    for magic, what in _BINARY_MAGIC:
        if head.startswith(magic):
            raise UserError(f"{path}: not {kind} text: {what}.", field=FIELD)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path}: UTF-16 text; save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8).", field=FIELD)
    nul = head.find(b"\x00")
    if nul >= 0:
        line = head.count(b"\n", 0, nul) + 1
        raise UserError(f"{path}: line {line}: a binary file, not {kind} text (a NUL byte at offset {nul}).", field=FIELD)


def _not_utf8(path: Path) -> UserError:
    """The first byte of `path` that is not UTF-8, with its line and offset (read again: error path only)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    done = lines = 0  # bytes and newlines in the chunks already decoded
    with _open(path) as fh:
        while True:
            chunk = fh.read(_READ_CHUNK)
            pending = dec.getstate()[0]  # the start of a character cut by the last chunk
            try:
                dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                data = pending + chunk
                at = min(e.start, len(data) - 1)
                line = lines + data.count(b"\n", 0, at) + 1
                return UserError(f"{path}: line {line}: not UTF-8 text (bad byte 0x{data[at]:02x} at offset "
                                 f"{done - len(pending) + at}); convert it to UTF-8 (e.g. iconv -t UTF-8).", field=FIELD)
            if not chunk:
                return UserError(f"{path}: not UTF-8 text; convert it to UTF-8.", field=FIELD)
            lines += chunk.count(b"\n")
            done += len(chunk)


def count_lines(path: Path) -> int:
    """Fast newline count (C speed) so progress has a total for JSONL/CSV."""
    n, last = 0, b"\n"
    with _open(path) as fh:
        while chunk := fh.read(_READ_CHUNK):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (0 if last == b"\n" else 1)


def iter_jsonl(path: Path, report: ReadReport, strict: bool) -> Iterator[Record]:
    index = 0
    with _open(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _not_utf8(path) from None
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue
            data, problem = _parse_line(text)
            if problem is not None:
                if strict:
                    raise UserError(f"{path}:{lineno}: {problem}.", field=FIELD)
                report.bad(problem, line=lineno)
                continue
            yield Record(index, lineno, data)
            index += 1


def _parse_line(text: str) -> tuple[dict[str, Any], str | None]:
    """One JSONL line as an object, or why it is not one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return {}, f"not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return {}, "not usable JSON (nested too deeply)"
    if not isinstance(data, dict):
        return {}, f"expected a JSON object, got {json_type(data)}"
    return data, None


class _ArrayReader:
    """Incremental parse of `[ {...}, {...} ]`: memory is one chunk plus one element.

    The buffer `buf` holds decoded text from `pos` on; `line_base` is the line of `buf[0]`.
    """

    def __init__(self, path: Path, fh: IO[bytes]) -> None:
        self.path, self.fh = path, fh
        self.decoder = json.JSONDecoder()
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.line_base, self.eof = "", 0, 1, False

    def read_more(self) -> bool:
        """Append the next chunk to the buffer (dropping what was consumed); False at the end."""
        if self.eof:
            return False
        chunk = self.fh.read(_READ_CHUNK)
        try:
            text = self.utf8.decode(chunk, final=not chunk)
        except UnicodeDecodeError:
            raise _not_utf8(self.path) from None
        self.line_base += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos:] + text, 0
        self.eof = not chunk
        return bool(chunk)

    def line_at(self, pos: int) -> int:
        return self.line_base + self.buf.count("\n", 0, pos)

    def next_char(self) -> str | None:
        """The next character that is not whitespace, reading on as needed; None at the end."""
        while True:
            if len(self.buf) - self.pos < _READ_CHUNK // 2:
                self.read_more()
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n\ufeff":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return None

    def next_value(self) -> tuple[Any, int]:
        """The JSON value at the cursor and its line; an element cut by the chunk end reads on."""
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                break
            except json.JSONDecodeError as e:
                if self.read_more():
                    continue
                raise UserError(f"{self.path}:{self.line_at(e.pos)}: not valid JSON ({e.msg}); a JSON array "
                                "must parse whole (JSON Lines lets bad lines be skipped).", field=FIELD) from None
            except RecursionError:
                raise UserError(f"{self.path}:{self.line_at(self.pos)}: not usable JSON (nested too deeply).",
                                field=FIELD) from None
        line = self.line_at(self.pos)
        self.pos = end
        return value, line


def iter_json_array(path: Path, report: ReadReport, strict: bool) -> Iterator[Record]:
    """Every object of a JSON array file, parsed one element at a time."""
    index = 0
    with _open(path) as fh:
        arr = _ArrayReader(path, fh)
        if arr.next_char() != "[":
            raise UserError(f"{path}: expected a JSON array ('[' at the start).", field=FIELD)
        arr.pos += 1
        while True:
            ch = arr.next_char()
            if ch is None:
                raise UserError(f"{path}: the JSON array is not closed (missing ']' at the end); "
                                "is the file truncated?", field=FIELD)
            if ch == "]":
                return
            if ch == ",":
                arr.pos += 1
                continue
            value, line = arr.next_value()
            if not isinstance(value, dict):
                problem = f"expected a JSON object in the array, got {json_type(value)}"
                if strict:
                    raise UserError(f"{path}:{line}: {problem}.", field=FIELD)
                report.bad(problem, line=line)
                continue
            yield Record(index, line, value)
            index += 1


def iter_csv(path: Path, report: ReadReport, strict: bool) -> Iterator[Record]:
    index = 0
    try:
        with open_file(path, "r", field=FIELD, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                yield Record(index, reader.line_num, {k: v for k, v in row.items() if k is not None})
                index += 1
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except csv.Error as e:
        raise UserError(f"{path}: not valid CSV ({e}).", field=FIELD) from None


def _iter_arrow_batches(batches: Iterator[Any]) -> Iterator[Record]:
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield Record(index, None, row)
            index += 1


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


def iter_parquet(path: Path, report: ReadReport) -> Iterator[Record]:
    """Row counts come from the footers, so progress has a total before any row is read."""
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    handles = []
    for f in files:
        try:
            handles.append(pq.ParquetFile(f))
        except PermissionError:
            raise UserError(f"{f}: permission denied; cannot read it.", field=FIELD) from None
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            raise UserError(f"{f}: not a readable Parquet file ({_first_line(e)}).", field=FIELD) from None
    report.total_hint = sum(h.metadata.num_rows for h in handles)
    return _iter_arrow_batches(b for h in handles for b in h.iter_batches(batch_size=1024))


def _arrow_files(path: Path) -> list[Path]:
    """The Arrow files of a `save_to_disk` folder, in order (state.json lists them)."""
    state = path / "state.json"
    if state.is_file():
        listed = read_json_object(state, "a datasets state.json", field=FIELD).get("_data_files")
        if not isinstance(listed, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str)
                                                   for f in listed):
            raise UserError(f"{state}: not a datasets state.json (no _data_files list).", field=FIELD)
        return [path / f["filename"] for f in listed]
    return sorted(path.glob("*.arrow"))


def iter_arrow_dir(path: Path, report: ReadReport) -> Iterator[Record]:
    """A `datasets.Dataset.save_to_disk` folder: state.json lists Arrow IPC *stream* files."""
    import pyarrow as pa

    files = _arrow_files(path)
    if not files:
        splits = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "state.json").is_file())
        if splits:
            raise UserError(f"{path}: a DatasetDict; give one split folder ({', '.join(splits)}).", field=FIELD)
        raise UserError(f"{path}: no .arrow files in this save_to_disk folder.", field=FIELD)

    def batches() -> Iterator[Any]:
        for f in files:
            try:
                source = pa.memory_map(str(f))
                try:
                    reader = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(source)
                    for i in range(reader.num_record_batches):
                        yield reader.get_batch(i)
                    continue
                yield from reader
            except (OSError, pa.ArrowInvalid) as e:
                raise UserError(f"{f}: not a readable Arrow file ({_first_line(e)}).", field=FIELD) from None

    return _iter_arrow_batches(batches())


_TEXT_KINDS = {"jsonl": "JSON Lines", "json": "JSON", "csv": "CSV"}


def iter_records(path: Path, report: ReadReport, *, strict: bool = False) -> Iterator[Record]:
    """Every record of a dataset file or folder, in order.

    The path is checked before anything is opened: a missing path, a symlink loop, a pipe
    or device, an empty or binary file, or a folder that is not a saved dataset is a
    UserError naming the path.
    """
    st = stat_path(path, field=FIELD, what="dataset file or folder")
    if stat.S_ISDIR(st.st_mode):
        kind = folder_kind(path)
    else:
        special = special_kind(st)
        if special is not None:
            raise UserError(f"{path}: {special}, not a dataset file (reading it would block); "
                            "give a regular file.", field=FIELD)
        if st.st_size == 0:
            raise UserError(f"{path}: the file is empty (0 bytes); there is nothing to profile or train on.",
                            field=FIELD)
        kind = file_kind(path)
        if kind in _TEXT_KINDS:
            refuse_binary(path, _TEXT_KINDS[kind])
    if kind in ("jsonl", "csv"):
        lines = count_lines(path)
        report.total_hint = max(lines - (1 if kind == "csv" else 0), 0)
    if kind == "jsonl":
        return iter_jsonl(path, report, strict)
    if kind == "json":
        return iter_json_array(path, report, strict)
    if kind == "csv":
        return iter_csv(path, report, strict)
    if kind in ("parquet", "parquet_dir"):
        return iter_parquet(path, report)
    return iter_arrow_dir(path, report)
