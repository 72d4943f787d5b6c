"""Tokenizers for counting: the model's own (exact) or an approximation, all offline.

Why not `AutoTokenizer`: it imports transformers (and through it, torch), which costs seconds.
`tokenizers.Tokenizer.from_file` loads a `tokenizer.json` in milliseconds and is the same
Rust tokenizer transformers' fast tokenizers wrap. `tokenizer_config.json` gives the chat
template and the special-token strings the template sees.

Resolution order in `load_tokenizer`: explicit path -> model folder -> HF cache (offline) ->
tiktoken o200k_base if its encoding file is cached (approximate) -> a built-in heuristic
(approximate). Approximate tokenizers say so in `.name` and `.approximate`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from bisect import bisect_right
from pathlib import Path
from typing import Any, Protocol, Sequence

from tuiwiz.errors import NotFound, UserError
from tuiwiz.jsonfile import read_json_object
from tuiwiz.models import find_in_hf_cache
from tuiwiz.userfile import check_regular_file, expand, read_text, stat_path

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TIKTOKEN_ENCODING = "o200k_base"
_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
APPROX_HINT = "counts are approximate; give the model's tokenizer folder (with tokenizer.json) for exact counts"
FIELD = "tokenizer"


class EncodingLike(Protocol):
    """What the counters need from one encoded text (a `tokenizers.Encoding` satisfies it)."""

    ids: list[int]

    def __len__(self) -> int: ...

    def char_to_token(self, pos: int) -> int | None: ...


class CountingTokenizer:
    """Base class: a tokenizer plus what rendering needs (template, special tokens, limits)."""

    name: str = "?"
    approximate: bool = False
    chat_template: str | None = None
    #: where `chat_template` came from, for messages ("…/tokenizer_config.json: chat_template")
    chat_template_source: str | None = None
    max_positions: int | None = None
    #: template kwargs, as transformers' `special_tokens_map` (bos_token, eos_token, ...)
    special: dict[str, str]
    #: strings that close a turn (eos, <|im_end|>, <|eot_id|>, ...), longest first
    end_markers: tuple[str, ...] = ()

    def encode_full(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[EncodingLike]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids per text; no special tokens are added, as in `apply_chat_template`."""
        return [list(e.ids) for e in self.encode_full(texts, add_special_tokens)]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Readable text of each token (for previews), decoded one by one."""
        return [self.decode([i]) for i in ids]

    def describe(self) -> str:
        return f"{self.name} (approximate: {APPROX_HINT})" if self.approximate else self.name


# ---------------------------------------------------------------- exact: HF tokenizer.json


class HFTokenizer(CountingTokenizer):
    """A model's own tokenizer from `tokenizer.json` (+ `tokenizer_config.json`)."""

    def __init__(self, tokenizer_json: Path, config: dict[str, Any], name: str, max_positions: int | None) -> None:
        from tokenizers import Tokenizer

        check_regular_file(tokenizer_json, field=FIELD, what="tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the Rust side raises plain Exception
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"{tokenizer_json}: not a valid tokenizer.json ({first}).", field=FIELD) from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.name = name
        self.approximate = False
        self.chat_template, self.chat_template_source = _chat_template(tokenizer_json.parent, config)
        self.special = _special_tokens(config)
        model_max = config.get("model_max_length")
        if max_positions is None and type(model_max) is int and 0 < model_max < 10_000_000:
            max_positions = model_max
        self.max_positions = max_positions
        markers = {v for k, v in self.special.items() if k == "eos_token" and isinstance(v, str)}
        for added in self._tok.get_added_tokens_decoder().values():
            if added.special and re.search(r"(end|eot|eom|im_end|/s|turn)", added.content, re.I):
                markers.add(added.content)
        self.end_markers = tuple(sorted((m for m in markers if m), key=len, reverse=True))

    def encode_full(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[EncodingLike]:
        if not texts:
            return []
        return self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            piece = self._tok.decode([i], skip_special_tokens=False)
            if not piece or "\ufffd" in piece:  # part of a multi-byte character: show the raw token
                piece = self._tok.id_to_token(i) or piece
            out.append(piece)
        return out


def _chat_template(folder: Path, config: dict[str, Any]) -> tuple[str | None, str | None]:
    """The template text and where it came from: tokenizer_config.json, else chat_template.jinja."""
    template = config.get("chat_template")
    source = f"{folder / 'tokenizer_config.json'}: chat_template"
    if isinstance(template, list):  # named templates: transformers picks "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        source += " (default)"
    if template is None:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return read_text(jinja, field=FIELD, what="chat template file"), str(jinja)
    return (template, source) if isinstance(template, str) else (None, None)


def _special_tokens(config: dict[str, Any]) -> dict[str, Any]:
    """The special-token strings a chat template sees (bos_token, eos_token, ...)."""
    special: dict[str, Any] = {}
    for key in _SPECIAL_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens")
    if isinstance(extra, list):
        tokens = [t.get("content") if isinstance(t, dict) else t for t in extra]
        special["additional_special_tokens"] = [t for t in tokens if isinstance(t, str)]
    return special


# ---------------------------------------------------------------- approximate tokenizers


class _OffsetsEncoding:
    """A minimal `tokenizers.Encoding` stand-in: ids plus each token's start offset."""

    __slots__ = ("ids", "_starts")

    def __init__(self, ids: list[int], starts: list[int]) -> None:
        self.ids = ids
        self._starts = starts

    def __len__(self) -> int:
        return len(self.ids)

    def char_to_token(self, pos: int) -> int | None:
        if not self._starts:
            return None
        i = bisect_right(self._starts, pos) - 1
        return i if i >= 0 else None


class TiktokenTokenizer(CountingTokenizer):
    """OpenAI's o200k_base BPE: close to modern 150k-vocab tokenizers, but not the model's own."""

    def __init__(self, encoding: Any) -> None:
        self._enc = encoding
        self.name = f"tiktoken {encoding.name}"
        self.approximate = True
        self.chat_template = None
        self.special = {}
        self.end_markers = ()

    def encode_full(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[EncodingLike]:
        out: list[EncodingLike] = []
        for ids in self._enc.encode_ordinary_batch(list(texts), num_threads=2):
            _, starts = self._enc.decode_with_offsets(ids)
            out.append(_OffsetsEncoding(ids, starts))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))


# Calibrated on the shared datasets against llama3/qwen2.5 (see docs/dataset.md): a word of
# up to 8 letters (with its leading space) is one token, CJK/kana/hangul two characters per
# token, digits in groups of up to 3, punctuation in pairs, newline runs one token.
_L = r"[^\W\d_\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]"
_C = r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]"
_HEURISTIC_RE = re.compile(rf" ?{_L}{{1,8}}|{_C}{{1,2}}|\d{{1,3}}|\n+| +(?=\S)|\s+| ?[^\s\w]{{1,2}}|_")


class HeuristicTokenizer(CountingTokenizer):
    """Offline last resort: a regex that mimics BPE granularity (about one token per English word).

    Its error against the real tokenizers is measured in bench/results and docs/dataset.md.
    """

    def __init__(self) -> None:
        self.name = "heuristic estimate"
        self.approximate = True
        self.chat_template = None
        self.special = {}
        self.end_markers = ()
        self._vocab: dict[str, int] = {}
        self._pieces: list[str] = []

    def _id(self, piece: str) -> int:
        i = self._vocab.get(piece)
        if i is None:
            i = self._vocab[piece] = len(self._pieces)
            self._pieces.append(piece)
        return i

    def encode_full(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[EncodingLike]:
        out: list[EncodingLike] = []
        for text in texts:
            ids, starts = [], []
            for m in _HEURISTIC_RE.finditer(text):
                ids.append(self._id(m.group()))
                starts.append(m.start())
            out.append(_OffsetsEncoding(ids, starts))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._pieces[i] for i in ids)


# ---------------------------------------------------------------- resolution


def _max_positions_from_config(folder: Path) -> int | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = data.get(key) if isinstance(data, dict) else None
        if type(value) is int and value > 0:
            return value
    return None


def load_tokenizer_folder(path: str | os.PathLike[str], name: str | None = None) -> HFTokenizer:
    """Load a folder holding tokenizer.json (or the tokenizer.json file itself)."""
    p = expand(path, field=FIELD)
    st = stat_path(p, field=FIELD, what="tokenizer folder or file")
    if not stat.S_ISDIR(st.st_mode):
        if not p.name.endswith(".json"):
            raise UserError(f"{p}: not a tokenizer; give a folder with tokenizer.json, or that file.", field=FIELD)
        folder, tj = p.parent, p
    else:
        folder, tj = p, p / "tokenizer.json"
    if not (tj.exists() or tj.is_symlink()):
        hint = (" (it has tokenizer.model: only fast tokenizers, tokenizer.json, are supported)"
                if (folder / "tokenizer.model").exists() else "")
        raise NotFound(f"{folder}: no tokenizer.json there{hint}; give a folder that has one.", path=tj, field=FIELD)
    cfg_path = folder / "tokenizer_config.json"
    config = read_json_object(cfg_path, field=FIELD) if cfg_path.exists() else {}
    return HFTokenizer(tj, config, name or str(folder), _max_positions_from_config(folder))


def tiktoken_file_cached() -> bool:
    """True when o200k_base can be loaded without network (TIKTOKEN_CACHE_DIR honoured)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache is None:
        cache = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache:
        return False
    return os.path.isfile(os.path.join(cache, hashlib.sha1(_TIKTOKEN_URL.encode()).hexdigest()))


def load_tiktoken() -> TiktokenTokenizer | None:
    """tiktoken o200k_base if its encoding file is already cached; None otherwise (never downloads)."""
    if not tiktoken_file_cached():
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        return TiktokenTokenizer(tiktoken.get_encoding(TIKTOKEN_ENCODING))
    except Exception:  # a corrupt cache file: tiktoken would try the network next
        return None


def load_tokenizer(path_or_model_dir: str | None, *, model_id: str | None = None) -> CountingTokenizer:
    """The best tokenizer available offline for counting.

    `path_or_model_dir`: a tokenizer folder, a tokenizer.json, or a model folder. `model_id`
    ("org/name") is looked up in the HF cache. With neither on disk, an approximate tokenizer
    is returned (tiktoken when its encoding file is cached under TIKTOKEN_CACHE_DIR, else
    the heuristic); its `.approximate` is True and `.describe()` says how to get exact counts.
    """
    if path_or_model_dir:
        return load_tokenizer_folder(path_or_model_dir)
    if model_id and model_id.strip():
        local = expand(model_id, field="model")
        if local.exists():
            return load_tokenizer_folder(local)
        cached = find_in_hf_cache(model_id, "tokenizer.json")
        if cached is not None:
            return load_tokenizer_folder(cached.parent, name=model_id)
    approx = load_tiktoken()
    if approx is not None:
        return approx
    return HeuristicTokenizer()
