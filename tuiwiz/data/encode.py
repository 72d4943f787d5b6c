"""THE shared rendering + tokenizing function: the profiler and the training worker both
call this, so the lengths we report are the sequences the trainer sees.

Rendering: the model's chat template (or DEFAULT_CHAT_TEMPLATE) over the whole
conversation, once; then ONE tokenization of that text with add_special_tokens=False, as
`apply_chat_template(..., tokenize=True)` does. Totals therefore equal transformers' count.

Trained tokens: assistant turns. We find each assistant message's text in the rendered
string (walking messages in order so a reply is never matched inside an earlier prompt),
extend the span over the end-of-turn marker the template writes right after it (<|eot_id|>,
<|im_end|>, <|end|>, eos...), and mark every token whose characters overlap a span, using
the offsets of the single full encoding, so junction tokens cannot change the total. Role
headers and the whitespace after the end marker are masked. When a reply is not in the text
verbatim (tool calls, templates that rewrite content), the span is taken from prefix
renders instead: from the end of render(messages[:i], add_generation_prompt=True) to the
end of render(messages[:i+1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tuiwiz.data.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    TemplateError,
    TemplateSyntaxError,
    compile_template,
    render,
)
from tuiwiz.data.layouts import Sample
from tuiwiz.data.tokenizer import CountingTokenizer, EncodingLike
from tuiwiz.errors import UserError


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int], ...]  # trained character spans, sorted, disjoint
    add_special_tokens: bool  # True for plain text/completion (the tokenizer adds BOS itself)
    all_trained: bool = False


@dataclass(frozen=True)
class EncodedSample:
    """input_ids and a same-length 0/1 list: 1 = the loss is computed on this token."""

    input_ids: list[int]
    trained: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def template_source(tok: CountingTokenizer) -> str:
    """Where the template rendering `tok`'s conversations comes from, as messages name it."""
    if tok.chat_template:
        return tok.chat_template_source or f"{tok.name}: chat_template"
    return "the built-in default chat template"


def template_for(tok: CountingTokenizer) -> Any:
    """The compiled chat template; one that does not compile is a UserError naming its file.

    Call it once before reading samples: a syntax error is the template's fault, not a row's.
    """
    try:
        return compile_template(tok.chat_template or DEFAULT_CHAT_TEMPLATE)
    except TemplateSyntaxError as e:
        raise UserError(f"{template_source(tok)}: {e}.", field="tokenizer") from None


def _find(full: str, needle: str, start: int) -> tuple[int, int] | None:
    if not needle:
        return None
    pos = full.find(needle, start)
    if pos < 0:
        stripped = needle.strip()
        if not stripped or stripped == needle:
            return None
        pos = full.find(stripped, start)
        if pos < 0:
            return None
        return pos, pos + len(stripped)
    return pos, pos + len(needle)


def _prefix_span(tpl: Any, msgs: list[dict[str, Any]], i: int, tools: Any, special: dict[str, Any], full: str) -> tuple[int, int] | None:
    try:
        before = render(tpl, msgs[:i], tools=tools, special=special, add_generation_prompt=True) if i else ""
    except TemplateError:
        return None
    if not full.startswith(before):
        return None
    if i == len(msgs) - 1:
        end = len(full)
    else:
        try:
            upto = render(tpl, msgs[: i + 1], tools=tools, special=special)
        except TemplateError:
            return None
        if not full.startswith(upto):
            return None
        end = len(upto)
    start = len(before)
    end = start + len(full[start:end].rstrip())
    return (start, end) if end > start else None


def render_chat(sample: Sample, tok: CountingTokenizer) -> Rendered:
    tpl = template_for(tok)
    msgs = sample.messages or []
    full = render(tpl, msgs, tools=sample.tools, special=tok.special)
    spans: list[tuple[int, int]] = []
    cursor = 0
    markers = tok.end_markers
    for i, m in enumerate(msgs):
        content = m.get("content")
        is_reply = m["role"] == "assistant" and i >= sample.train_from
        simple = isinstance(content, str) and not m.get("tool_calls") and "reasoning_content" not in m
        found = _find(full, content, cursor) if simple and content else None
        if not is_reply:
            if found:
                cursor = found[1]
            continue
        if found is not None:
            s, e = found
            for mk in markers:
                if full.startswith(mk, e):
                    e += len(mk)
                    break
            span: tuple[int, int] | None = (s, e)
        else:
            span = _prefix_span(tpl, msgs, i, sample.tools, tok.special, full)
            if span is not None and span[0] < cursor:
                span = None
        if span is not None:
            spans.append(span)
            cursor = span[1]
    return Rendered(full, tuple(spans), False)


def render_sample(sample: Sample, tok: CountingTokenizer) -> Rendered:
    """Text + trained character spans for any sample kind (chat, completion, text)."""
    eos = tok.special.get("eos_token", "")
    if sample.kind == "chat":
        return render_chat(sample, tok)
    if sample.kind == "completion":
        prompt = sample.prompt or ""
        text = prompt + (sample.completion or "") + eos
        return Rendered(text, ((len(prompt), len(text)),) if len(text) > len(prompt) else (), True)
    text = (sample.text or "") + eos
    return Rendered(text, ((0, len(text)),), True, all_trained=True)


def encode_rendered(rendered: Sequence[Rendered], tok: CountingTokenizer) -> list[EncodingLike]:
    """Tokenize many rendered samples in one batch call (Rust, multi-threaded)."""
    if not rendered:
        return []
    flags = {r.add_special_tokens for r in rendered}
    if len(flags) == 1:
        return tok.encode_full([r.text for r in rendered], add_special_tokens=flags.pop())
    out: list[EncodingLike] = []
    for r in rendered:
        out.extend(tok.encode_full([r.text], add_special_tokens=r.add_special_tokens))
    return out


def _token_at_or_after(enc: EncodingLike, pos: int, stop: int) -> int | None:
    while pos < stop:
        t = enc.char_to_token(pos)
        if t is not None:
            return t
        pos += 1
    return None


def _token_at_or_before(enc: EncodingLike, pos: int, stop: int) -> int | None:
    while pos >= stop:
        t = enc.char_to_token(pos)
        if t is not None:
            return t
        pos -= 1
    return None


def token_spans(r: Rendered, enc: EncodingLike) -> list[tuple[int, int]]:
    """Trained token index ranges [start, end) from character spans, via the encoding's offsets."""
    n = len(enc)
    if r.all_trained:
        return [(0, n)] if n else []
    out: list[tuple[int, int]] = []
    for s, e in r.spans:
        a = _token_at_or_after(enc, s, e)
        b = _token_at_or_before(enc, e - 1, s)
        if a is None or b is None or b < a:
            continue
        if out and a < out[-1][1]:  # a token shared by two spans: merge
            out[-1] = (out[-1][0], max(out[-1][1], b + 1))
        else:
            out.append((a, b + 1))
    return out


def chat_error(sample: Sample, tok: CountingTokenizer, err: TemplateError, path: str | None = None) -> UserError:
    """A conversation the template refused: names the sample (file and line) and the template."""
    where = f"{path}: {sample.where()}" if path else sample.where()
    return UserError(f"{where}: the chat template rejected this conversation ({err}; template: {template_source(tok)}).",
                     field="dataset")


def encode_sample(sample: Sample, tokenizer: CountingTokenizer) -> EncodedSample:
    """input_ids + trained mask for one sample, exactly as profiled. The worker feeds these
    to trl as `input_ids` and `completion_mask`."""
    try:
        r = render_sample(sample, tokenizer)
    except TemplateError as e:
        raise chat_error(sample, tokenizer, e) from None
    enc = encode_rendered([r], tokenizer)[0]
    ids = list(enc.ids)
    mask = [0] * len(ids)
    for a, b in token_spans(r, enc):
        mask[a:b] = [1] * (b - a)
    return EncodedSample(ids, mask)


def mask_preview(sample: Sample, tokenizer: CountingTokenizer) -> list[tuple[str, bool]]:
    """Each token's text and whether it is trained, for the masked-token preview."""
    enc = encode_sample(sample, tokenizer)
    pieces = tokenizer.token_strings(enc.input_ids)
    return [(p, bool(t)) for p, t in zip(pieces, enc.trained)]
