"""Dataset layouts -> one normalized conversation shape (`Sample`).

Every layout becomes either a chat (`messages` of {role, content[, tool_calls]}, optional
`tools`) that the model's chat template renders, a prompt/completion pair of plain strings,
or plain text. Detection looks at the first record's keys; `layout` overrides it and
`columns` renames keys (our field name -> the file's key), like LLaMA-Factory's
dataset_info.json (its "columns" and "tags" names are accepted too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, get_args

from tuiwiz.data.readers import FIELD, ReadReport, Record, iter_records
from tuiwiz.errors import BadValue, UserError
from tuiwiz.userfile import expand

#: The dataset layouts tuiwiz reads: the one list the CLI, the TUI and presets offer.
Layout = Literal["alpaca", "sharegpt", "messages", "prompt_completion", "text"]
LAYOUTS: tuple[str, ...] = get_args(Layout)

#: Each layout's keys, as the help and error messages show them.
LAYOUT_KEYS: dict[str, str] = {
    "alpaca": "instruction, input, output",
    "sharegpt": "conversations: [{from, value}]",
    "messages": "messages: [{role, content}]",
    "prompt_completion": "prompt, completion",
    "text": "text",
}
LAYOUT_HELP = ", ".join(f"{name} ({LAYOUT_KEYS[name]})" for name in LAYOUTS)

# Our field names per layout, with their default keys in the file.
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system", "history": "history"},
    "sharegpt": {
        "messages": "conversations", "system": "system", "tools": "tools",
        "role_tag": "from", "content_tag": "value",
    },
    "messages": {"messages": "messages", "system": "system", "tools": "tools", "role_tag": "role", "content_tag": "content"},
    "prompt_completion": {"prompt": "prompt", "completion": "completion", "system": "system", "tools": "tools"},
    "text": {"text": "text"},
}
# LLaMA-Factory's names for the same fields.
_LF_ALIASES = {"prompt": "instruction", "query": "input", "response": "output"}

_ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
    "function_call": "function_call",
    "observation": "tool", "tool": "tool", "function": "tool", "ipython": "tool",
}
_KEEP_MESSAGE_KEYS = ("tool_calls", "name", "tool_call_id", "reasoning_content", "thinking", "reasoning")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclass(frozen=True, slots=True)
class Sample:
    """One normalized training example.

    kind "chat": `messages` (+ `tools`); assistant turns from `train_from` on are trained.
    kind "completion": plain `prompt` + `completion` strings (completion trained).
    kind "text": plain `text` (all trained).
    """

    index: int
    kind: str
    messages: list[dict[str, Any]] | None = None
    tools: list[Any] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    train_from: int = 0
    line: int | None = None

    def where(self) -> str:
        return f"line {self.line}" if self.line is not None else f"row {self.index + 1}"


class BadSample(ValueError):
    """A record that does not fit its layout; skipped (counted) unless strict."""


# ------------------------------------------------------------------------- detection


def _first_list_item(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else None


def detect_layout(data: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """(layout, column overrides) from one record's keys; UserError naming the keys if unknown."""
    for key in ("messages", "conversations", "conversation", "chat"):
        first = _first_list_item(data.get(key))
        if isinstance(first, dict):
            if "from" in first and "value" in first:
                return "sharegpt", {"messages": key}
            if "role" in first:
                return "messages", {"messages": key}
            if "from" in first:
                return "sharegpt", {"messages": key}
    if "instruction" in data and "output" in data:
        return "alpaca", {}
    if "prompt" in data and "completion" in data:
        return "prompt_completion", {}
    if "question" in data and "answer" in data:
        return "prompt_completion", {"prompt": "question", "completion": "answer"}
    if "text" in data and isinstance(data["text"], str):
        return "text", {}
    keys = ", ".join(sorted(map(str, data.keys()))[:12]) or "(none)"
    raise UserError(
        f"cannot tell the dataset layout from its keys ({keys}). Known layouts: {LAYOUT_HELP}. "
        "Set the layout and map your keys to its fields (e.g. instruction=question, output=answer).",
        field="layout",
    )


def resolve_columns(layout: str, detected: Mapping[str, str], user: Mapping[str, str] | None) -> dict[str, str]:
    cols = dict(DEFAULT_COLUMNS[layout])
    cols.update(detected)
    for key, value in (user or {}).items():
        if layout == "alpaca":
            key = _LF_ALIASES.get(key, key)
        cols[key] = value
    return cols


# ------------------------------------------------------------------------- normalizers


def _text(value: Any, what: str) -> str:
    """Content as a string; a list of parts (OpenAI / LLaMA-Factory v1) joins its text parts."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                if part.get("type", "text") != "text":
                    raise BadSample(f"{what}: only text content is supported, got a {part.get('type')!r} part")
                piece = part.get("text", part.get("value"))
                if not isinstance(piece, str):
                    raise BadSample(f"{what}: a text part has no 'text' string")
                parts.append(piece)
            else:
                raise BadSample(f"{what}: content parts must be objects, got {type(part).__name__}")
        return "\n".join(parts)
    if isinstance(value, (int, float)):
        return str(value)
    raise BadSample(f"{what}: expected text, got {type(value).__name__}")


def _tools(value: Any) -> list[Any] | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadSample(f"tools: not valid JSON ({e.msg})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise BadSample(f"tools: expected a list of function schemas, got {type(value).__name__}")
    return value or None


def _tool_calls(value: Any, what: str) -> list[dict[str, Any]]:
    """A ShareGPT function_call value ('{"name":..,"arguments":..}' or a list) as OpenAI tool_calls."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadSample(f"{what}: function_call is not valid JSON ({e.msg})") from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        if not isinstance(call, dict) or "name" not in call:
            raise BadSample(f"{what}: a function call needs a 'name'")
        args = call.get("arguments", call.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        out.append({"type": "function", "function": {"name": call["name"], "arguments": args}})
    return out


def _clean_message(msg: Mapping[str, Any], role: str, content: str) -> dict[str, Any]:
    out: dict[str, Any] = {"role": role, "content": content}
    for key in _KEEP_MESSAGE_KEYS:
        if msg.get(key) is not None:
            out[key] = msg[key]
    reasoning = next((out[k] for k in _REASONING_FIELDS if k in out), None)
    if reasoning is not None:  # transformers aliases these names the same way
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def _chat_messages(turns: Any, cols: Mapping[str, str], layout: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list):
        raise BadSample(f"{cols['messages']}: expected a list of turns, got {type(turns).__name__}")
    role_key, content_key = cols["role_tag"], cols["content_tag"]
    tag_roles = {cols[t]: r for t, r in (
        ("user_tag", "user"), ("assistant_tag", "assistant"), ("system_tag", "system"),
        ("function_tag", "function_call"), ("observation_tag", "tool"),
    ) if t in cols}
    messages = []
    for i, turn in enumerate(turns):
        what = f"{cols['messages']}[{i}]"
        if not isinstance(turn, dict):
            raise BadSample(f"{what}: expected an object, got {type(turn).__name__}")
        raw_role = turn.get(role_key)
        if not isinstance(raw_role, str):
            raise BadSample(f"{what}: no {role_key!r} field")
        role = tag_roles.get(raw_role) or _ROLE_ALIASES.get(raw_role.lower())
        if role is None:
            raise BadSample(f"{what}: unknown role {raw_role!r} (known: user/human, assistant/gpt, system, tool/observation, function_call)")
        if role == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(turn.get(content_key), what)})
            continue
        content = _text(turn.get(content_key), what)
        messages.append(_clean_message(turn, role, content))
    return messages


def _with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def normalize(record: Record, layout: str, cols: Mapping[str, str], system_prompt: str | None) -> Sample:
    """One record -> Sample. Raises BadSample for structural problems."""
    d = record.data
    idx, line = record.index, record.line

    def need(field: str) -> Any:
        key = cols[field]
        if key not in d:
            raise BadSample(f"no {key!r} field (layout {layout}; keys: {', '.join(sorted(map(str, d))[:10])})")
        return d[key]

    tools = _tools(d.get(cols["tools"])) if "tools" in cols else None
    system = d.get(cols["system"]) if "system" in cols else None
    system = _text(system, cols.get("system", "system")) if system is not None else None
    system = system or system_prompt

    if layout in ("sharegpt", "messages"):
        messages = _with_system(_chat_messages(need("messages"), cols, layout), system)
        return Sample(idx, "chat", messages=messages, tools=tools, line=line)
    if layout == "alpaca":
        instruction = _text(need("instruction"), cols["instruction"])
        extra = _text(d.get(cols["input"]), cols["input"])
        user = f"{instruction}\n{extra}" if extra else instruction
        output = _text(need("output"), cols["output"])
        messages: list[dict[str, Any]] = []
        history = d.get(cols["history"])
        if history:
            if not isinstance(history, list):
                raise BadSample(f"{cols['history']}: expected a list of [question, answer] pairs")
            for pair in history:
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                    raise BadSample(f"{cols['history']}: each entry must be a [question, answer] pair")
                messages += [{"role": "user", "content": _text(pair[0], "history")},
                             {"role": "assistant", "content": _text(pair[1], "history")}]
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Sample(idx, "chat", messages=_with_system(messages, system), tools=tools, line=line)
    if layout == "prompt_completion":
        prompt, completion = need("prompt"), need("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            chat_cols = {"messages": cols["prompt"], "role_tag": "role", "content_tag": "content"}
            p = _chat_messages(prompt, chat_cols, "messages") if isinstance(prompt, list) else [{"role": "user", "content": _text(prompt, cols["prompt"])}]
            chat_cols["messages"] = cols["completion"]
            c = _chat_messages(completion, chat_cols, "messages") if isinstance(completion, list) else [{"role": "assistant", "content": _text(completion, cols["completion"])}]
            messages = _with_system(p, system)
            return Sample(idx, "chat", messages=messages + c, tools=tools, train_from=len(messages), line=line)
        return Sample(idx, "completion", prompt=_text(prompt, cols["prompt"]), completion=_text(completion, cols["completion"]), line=line)
    if layout == "text":
        return Sample(idx, "text", text=_text(need("text"), cols["text"]), line=line)
    raise BadValue("layout", layout, f"must be one of {', '.join(LAYOUTS)}")


def untrainable_reason(sample: Sample, path: str) -> str | None:
    """Why a chat sample has nothing to train on (no assistant turn), as a full message; else None."""
    if sample.kind != "chat":
        return None
    msgs = sample.messages or []
    if any(m["role"] == "assistant" for m in msgs[sample.train_from:]):
        return None
    roles = ", ".join(m["role"] for m in msgs) or "no messages"
    return (
        f"{path}: {sample.where()} has no assistant turn to train on (roles: {roles}); "
        "every sample needs at least one assistant/gpt reply (check the role names or the layout)."
    )


# ------------------------------------------------------------------------- public iterator


def _dataset_fields(dataset: Any) -> tuple[Path, str | None, dict[str, str] | None, str | None]:
    if isinstance(dataset, (str, Path)):
        return expand(dataset, field=FIELD), None, None, None
    return expand(dataset.path, field=FIELD), dataset.layout, dataset.columns, dataset.system_prompt


def _layout_and_columns(record: Record, layout: str | None, columns: Mapping[str, str] | None,
                        path: Path) -> tuple[str, dict[str, str]]:
    """The layout (given, else detected from this first record) and its file keys."""
    if layout is None:
        try:
            layout, found = detect_layout(record.data)
        except UserError as e:
            raise UserError(f"{path}: {_where(record)}: {e}", field=e.field) from None
    else:
        found = {}
        if layout in ("sharegpt", "messages") and not (columns or {}).get("messages"):
            for key in ("messages", "conversations", "conversation", "chat"):
                if isinstance(record.data.get(key), list):
                    found = {"messages": key}
                    break
    return layout, resolve_columns(layout, found, columns)


def _where(record: Record) -> str:
    return f"line {record.line}" if record.line is not None else f"row {record.index + 1}"


def _skip_reason(record: Record, layout: str, problem: BadSample, origin: str) -> str:
    """Why a record was skipped; a row written in another layout says so, since that is the fix."""
    try:
        other, _ = detect_layout(record.data)
    except UserError:
        other = None
    if other is not None and other != layout:
        article = "an" if other[0] in "aeiou" else "a"
        return f"{article} {other} row in a {layout} dataset (layout {origin})"
    return str(problem)


def _skip(report: ReadReport, record: Record, reason: str) -> None:
    if record.line is not None:
        report.bad(reason, line=record.line)
    else:
        report.bad(reason, row=record.index + 1)


def iter_conversations(
    dataset: Any,
    *,
    layout: str | None = None,
    strict: bool = False,
    report: ReadReport | None = None,
    detected: list[str] | None = None,
) -> Iterator[Sample]:
    """Stream normalized samples from a DatasetRef (or a path).

    Bad records are counted in `report` and skipped (strict: UserError). The layout used is
    appended to `detected` (if given) once known. A sample without an assistant turn is a
    UserError in strict mode; otherwise it is skipped and counted like a bad line, and the
    UserError is raised only if no sample at all has one (the whole file is prompt-only or
    its role names are not recognised). An empty dataset is a UserError.
    """
    path, ref_layout, columns, system_prompt = _dataset_fields(dataset)
    given = layout or ref_layout
    if given is not None and given not in LAYOUTS:
        raise BadValue("layout", given, f"must be one of {', '.join(LAYOUTS)}")
    report = report if report is not None else ReadReport()
    cols: dict[str, str] = {}
    used = given or ""
    origin = "as set"
    yielded = 0
    first_untrainable: str | None = None
    for record in iter_records(path, report, strict=strict):
        if not cols:
            used, cols = _layout_and_columns(record, given, columns, path)
            origin = "as set" if given else f"detected from {_where(record)}"
            if detected is not None:
                detected.append(used)
        try:
            sample = normalize(record, used, cols, system_prompt)
        except BadSample as e:
            if strict:
                raise UserError(f"{path}: {_where(record)}: {e}.", field=FIELD) from None
            _skip(report, record, _skip_reason(record, used, e, origin))
            continue
        reason = untrainable_reason(sample, str(path))
        if reason is not None:
            if strict or first_untrainable is None and record.index >= 1000 and yielded == 0:
                raise UserError(reason, field=FIELD)
            first_untrainable = first_untrainable or reason
            _skip(report, record, "no assistant turn")
            continue
        yielded += 1
        yield sample
    if yielded == 0:
        if first_untrainable is not None:
            raise UserError(first_untrainable, field=FIELD)
        first = report.first
        extra = f" ({report.skipped} malformed record(s) skipped, first at {first.where()}: {first.reason})" if first else ""
        raise UserError(f"{path}: the dataset is empty: no samples to profile or train on{extra}.", field=FIELD)
