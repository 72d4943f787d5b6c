"""Model architecture facts (`ModelSpec`) and exact parameter counts, without torch.

A spec comes from a local `config.json` (a model folder or the file itself), from the
local Hugging Face cache (never the network: offline is normal for our users), or from
the built-in catalog in `tuiwiz.model_catalog`. Parameter counts are computed per module
kind from the architecture; `tests/test_models.py` checks each catalog entry against the
real module tree that transformers builds on the meta device.
"""

from __future__ import annotations

import difflib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tuiwiz.errors import BadValue, NotFound, UserError, bounded, shown
from tuiwiz.jsonfile import read_json_object
from tuiwiz.userfile import expand, stat_path

#: Families whose decoder layers we know module by module (names as in transformers).
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "phi3")
FIELD = "model"


@dataclass(frozen=True)
class ModelSpec:
    """What the memory estimate needs to know about a decoder-only transformer."""

    id: str
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_positions: int
    attention_bias: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    sparse_layers: int = 0
    final_logit_softcapping: float | None = None
    source: str = "catalog"
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- module shapes -------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def norms_per_layer(self) -> int:
        """RMSNorms in one decoder layer: before attention and MLP; Gemma 2 also norms after each."""
        return 4 if self.model_type == "gemma2" else 2

    @property
    def has_qk_norm(self) -> bool:
        """Qwen3 normalises q and k per head (one `head_dim` weight each)."""
        return self.model_type in ("qwen3", "qwen3_moe")

    def linear_modules(self) -> dict[str, tuple[int, int]]:
        """Per decoder layer: each `nn.Linear` by its module name, as (in_features, out_features).

        These are what bitsandbytes quantizes and what LoRA can target. Phi-3 fuses q/k/v
        and gate/up into single projections, which changes LoRA's parameter count.
        Experts of MoE layers are fused 3D parameters, not `nn.Linear`, so they are absent.
        """
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        if self.model_type == "phi3":
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        mods = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if not self.is_moe:
            mods.update({"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)})
        return mods

    def attention_module_names(self) -> tuple[str, ...]:
        return ("qkv_proj", "o_proj") if self.model_type == "phi3" else ("q_proj", "k_proj", "v_proj", "o_proj")

    def resolve_targets(self, targets: tuple[str, ...] | str) -> dict[str, tuple[int, int]]:
        """Map LoRA targets ('attn', 'all-linear' or module names) onto this model's linears.

        Canonical names are translated for fused families (q_proj -> qkv_proj on Phi-3);
        names the model lacks raise a BadValue that lists the ones it has.
        """
        mods = self.linear_modules()
        if targets == "attn":
            names: tuple[str, ...] = self.attention_module_names()
        elif targets == "all-linear":
            names = tuple(mods)
        else:
            fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                     "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"} if self.model_type == "phi3" else {}
            names = tuple(dict.fromkeys(fused.get(n, n) for n in targets))
        unknown = [n for n in names if n not in mods]
        if unknown:
            raise BadValue("target_modules", ", ".join(unknown),
                           f"{self.id} has no such module; it has {', '.join(mods)} (or use 'attn' / 'all-linear')")
        return {n: mods[n] for n in names}

    # ---- parameter counts by module kind ------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts per module kind; their sum is the model's total."""
        h, L = self.hidden, self.layers
        mods = self.linear_modules()
        attn_names = self.attention_module_names()
        attn = sum(a * b for n, (a, b) in mods.items() if n in attn_names)
        if self.attention_bias:
            attn += self.q_dim + 2 * self.kv_dim
        mlp = sum(a * b for n, (a, b) in mods.items() if n not in attn_names)
        experts = router = 0
        dense_layers = L
        if self.is_moe:
            dense_layers = L - self.sparse_layers
            experts = self.num_experts * 3 * h * self.moe_intermediate
            router = self.num_experts * h
        qk_norm = 2 * self.head_dim if self.model_type == "qwen3" or self.model_type == "qwen3_moe" else 0
        counts = {
            "embedding": self.vocab * h,
            "attention": L * attn,
            "mlp": dense_layers * (mlp if not self.is_moe else 3 * h * self.intermediate),
            "experts": self.sparse_layers * experts,
            "router": self.sparse_layers * router,
            "norms": L * (self.norms_per_layer * h + qk_norm) + h,
            "head": 0 if self.tied_embeddings else self.vocab * h,
        }
        return counts

    @property
    def total_params(self) -> int:
        return sum(self.param_counts().values())

    @property
    def params_b(self) -> float:
        return self.total_params / 1e9

    def quantizable_params(self) -> int:
        """Weights inside decoder `nn.Linear`s: what bitsandbytes stores in 4 or 8 bits."""
        per_layer = sum(a * b for a, b in self.linear_modules().values())
        total = self.layers * per_layer
        if self.is_moe:
            # dense layers among a MoE stack carry a plain MLP too
            total += (self.layers - self.sparse_layers) * 3 * self.hidden * self.intermediate
            total += self.sparse_layers * self.num_experts * self.hidden  # router is an nn.Linear
        return total

    def summary(self) -> str:
        tie = ", tied embeddings" if self.tied_embeddings else ""
        moe = f", MoE {self.num_experts}x{self.experts_per_token}" if self.is_moe else ""
        return (f"{self.id}: {self.params_b:.2f}B params, {self.layers} layers, hidden {self.hidden}, "
                f"{self.heads}/{self.kv_heads} heads (dim {self.head_dim}), vocab {self.vocab}{tie}{moe}")


# ---- building specs ---------------------------------------------------------------

#: Bounds no real decoder exceeds: a value outside them is a broken config, not a big model.
MAX_LAYERS = 1000
MAX_HIDDEN = 1_000_000
MAX_HEADS = 100_000
MAX_VOCAB = 10_000_000
MAX_INTERMEDIATE = 10_000_000
MAX_POSITIONS = 1 << 30
MAX_EXPERTS = 100_000

_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                  "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Phi3ForCausalLM": "phi3",
                  "Qwen3MoeForCausalLM": "qwen3_moe"}
_MISSING: Any = object()


class BadConfigValue(BadValue):
    """A value in a model's config.json that no real model has; the message names the file and key.

    `field` is "model" (the input to fix); `source` is the config file and `key` the entry.
    """

    def __init__(self, source: str, key: str, value: object, why: str) -> None:
        self.value, self.why, self.source, self.key = value, why, source, key
        UserError.__init__(self, f"{source}: {key}: {why} (got {shown(value)}).", field=FIELD)

    def render(self, name_of: Callable[[str], str] | None = None) -> str:
        return bounded(str(self))  # the file and key say more than the name of the field


class _ConfigValues:
    """Typed, bounded reads of config.json entries; each bad value is a BadConfigValue.

    A key that is absent or null takes its default (as transformers does); a required key
    (no default) that is absent or null is an error.
    """

    def __init__(self, cfg: dict[str, Any], source: str, nested: frozenset[str]) -> None:
        self.cfg, self.source, self.nested = cfg, source, nested

    def name(self, key: str) -> str:
        return f"text_config.{key}" if key in self.nested else key

    def bad(self, key: str, value: object, why: str) -> BadConfigValue:
        return BadConfigValue(self.source, self.name(key), value, why)

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """The value; absent or null gives `default`, or an error when there is none."""
        value = self.cfg.get(key)
        if value is not None:
            return value
        if default is _MISSING:
            why = "is null" if key in self.cfg else "is missing; is this a decoder-only LLM config.json?"
            raise self.bad(key, value, why)
        return default

    def int(self, key: str, lo: int, hi: int, default: Any = _MISSING) -> int:
        """A whole number in [lo, hi] (an integral float such as 4096.0 is accepted)."""
        if self.cfg.get(key) is None and default is not _MISSING:
            return default
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad(key, value, "must be a whole number")
        if isinstance(value, float):
            if not value.is_integer():
                raise self.bad(key, value, "must be a whole number")
            value = int(value)
        if not lo <= value <= hi:
            raise self.bad(key, value, f"must be between {lo:,} and {hi:,}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.bad(key, value, "must be true or false")
        return value

    def positive_or_none(self, key: str) -> float | None:
        value = self.raw(key, None)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise self.bad(key, value, "must be a positive number or null")
        return float(value)


def _model_type(cfg: dict[str, Any], source: str) -> str:
    """`model_type`, else guessed from `architectures`; an unsupported one is a UserError."""
    mt = cfg.get("model_type")
    if mt is None:
        archs = cfg.get("architectures")
        archs = archs if isinstance(archs, list) else []
        mt = next((_ARCHITECTURES[a] for a in archs if isinstance(a, str) and a in _ARCHITECTURES), None)
    if mt not in SUPPORTED_TYPES:
        raise UserError(
            f"{source}: model_type {shown(mt)} is not supported yet; tuiwiz knows {', '.join(SUPPORTED_TYPES)}.",
            field=FIELD,
        )
    return mt


def _sparse_layers(v: _ConfigValues, layers: int, num_experts: int) -> int:
    """How many decoder layers hold experts (Qwen3-MoE: every `decoder_sparse_step`-th, minus mlp_only_layers)."""
    if not num_experts:
        return 0
    step = v.int("decoder_sparse_step", 1, layers, default=1)
    only = v.raw("mlp_only_layers", [])
    if not isinstance(only, list) or not all(type(i) is int and 0 <= i < layers for i in only):
        raise v.bad("mlp_only_layers", only, f"must be a list of layer numbers from 0 to {layers - 1}")
    return sum(1 for i in range(layers) if i not in set(only) and (i + 1) % step == 0)


def spec_from_config(cfg: dict[str, Any], model_id: str, source: str, *, where: str | None = None) -> ModelSpec:
    """Read an HF `config.json` dict, checking every value used against bounds real models keep.

    Unknown architectures raise a UserError naming the type; a missing, null, non-numeric or
    impossible value (zero heads, heads that do not divide the hidden size, negative layers)
    raises a BadConfigValue naming `where` (the file; default `source`) and the key.
    """
    where = where or source
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    nested = frozenset(text_cfg or ())
    if text_cfg:
        cfg = {**cfg, **text_cfg}
    mt = _model_type(cfg, where)
    v = _ConfigValues(cfg, where, nested)
    hidden = v.int("hidden_size", 1, MAX_HIDDEN)
    heads = v.int("num_attention_heads", 1, MAX_HEADS)
    layers = v.int("num_hidden_layers", 1, MAX_LAYERS)
    vocab = v.int("vocab_size", 1, MAX_VOCAB)
    inter = v.int("intermediate_size", 1, MAX_INTERMEDIATE)
    if v.raw("head_dim", None) is None and hidden % heads:
        raise v.bad("num_attention_heads", heads, f"must divide hidden_size ({hidden}) when head_dim is not given")
    head_dim = v.int("head_dim", 1, MAX_HIDDEN, default=hidden // heads)
    kv_heads = v.int("num_key_value_heads", 1, heads, default=heads)
    if heads % kv_heads:
        raise v.bad("num_key_value_heads", kv_heads, f"must divide num_attention_heads ({heads})")
    num_experts = v.int("num_experts", 0, MAX_EXPERTS, default=0) if mt == "qwen3_moe" else 0
    bias_key = "attention_bias" if v.raw("attention_bias", None) is not None else "attention_qkv_bias"
    return ModelSpec(
        id=model_id,
        model_type=mt,
        layers=layers,
        hidden=hidden,
        intermediate=inter,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        tied_embeddings=v.flag("tie_word_embeddings", mt == "gemma2"),  # Gemma2Config ties by default
        max_positions=v.int("max_position_embeddings", 1, MAX_POSITIONS, default=4096),
        attention_bias=v.flag(bias_key, mt == "qwen2") if mt != "phi3" else False,
        num_experts=num_experts,
        experts_per_token=v.int("num_experts_per_tok", 1, num_experts, default=0) if num_experts else 0,
        moe_intermediate=v.int("moe_intermediate_size", 1, MAX_INTERMEDIATE, default=0) if num_experts else 0,
        sparse_layers=_sparse_layers(v, layers, num_experts),
        final_logit_softcapping=v.positive_or_none("final_logit_softcapping"),
        source=source,
        config=dict(cfg),
    )


def _read_config(path: Path) -> dict[str, Any]:
    return read_json_object(path, "a JSON object (a model config.json)", field=FIELD)


def hf_cache_dirs() -> list[Path]:
    """Where the Hugging Face hub cache may live, in the order huggingface_hub uses."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    xdg = os.environ.get("XDG_CACHE_HOME")
    dirs.append(Path(xdg) / "huggingface" / "hub" if xdg else Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def is_hub_id(model_id: str) -> bool:
    """True for an "org/name" Hub id; False for paths (absolute, relative, ~) and bare names."""
    return model_id.count("/") == 1 and not model_id.startswith(("/", ".", "~"))


def find_in_hf_cache(model_id: str, filename: str = "config.json") -> Path | None:
    """Path of `filename` for `model_id` in the local HF cache, or None. Never touches the network."""
    if "/" not in model_id:
        return None
    folder = "models--" + model_id.replace("/", "--")
    for root in hf_cache_dirs():
        snaps = root / folder / "snapshots"
        if not snaps.is_dir():
            continue
        for snap in _snapshots(root / folder):
            if (snap / filename).is_file():
                return snap / filename
    return None


def _snapshots(repo: Path) -> list[Path]:
    """A cached repo's snapshot folders: the one refs/main names first, then newest first."""
    candidates = []
    try:
        ref = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
        if ref:
            candidates.append(repo / "snapshots" / ref)
    except (OSError, UnicodeDecodeError):
        pass

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    try:
        return candidates + sorted((repo / "snapshots").iterdir(), key=mtime, reverse=True)
    except OSError:
        return candidates


def cached_model_ids() -> list[str]:
    """Hub ids with a config.json in the local HF cache (for suggestions in the TUI)."""
    found = []
    for root in hf_cache_dirs():
        if root.is_dir():
            for d in root.glob("models--*"):
                mid = d.name[len("models--"):].replace("--", "/")
                if find_in_hf_cache(mid):
                    found.append(mid)
    return sorted(set(found))


def resolve_model(ref: str) -> ModelSpec:
    """A ModelSpec for a local folder, a config.json path, a cached hub id, or a catalog id.

    Never downloads. An empty reference is a BadValue; an unknown id a NotFound suggesting
    the closest catalog entries.
    """
    if not ref.strip():
        raise BadValue(FIELD, ref, "is empty; give a model folder, its config.json, or a hub id")
    ref = ref.strip()
    p = expand(ref, field=FIELD)
    if os.path.lexists(p) or p.suffix == ".json" or ref.startswith(("./", "../", "/", "~")):
        return _spec_from_path(p)
    cached = find_in_hf_cache(ref)
    if cached is not None:
        cfg = _read_config(cached)
        return spec_from_config(cfg, ref, f"HF cache ({cached.parent.name[:8]})", where=str(cached))
    return _spec_from_catalog(ref)


def _spec_from_path(p: Path) -> ModelSpec:
    """A model folder (its config.json) or a config.json file."""
    st = stat_path(p, field=FIELD, what="model folder or config.json")
    cfg_path = p / "config.json" if stat.S_ISDIR(st.st_mode) else p
    if cfg_path is not p and not os.path.lexists(cfg_path):
        raise NotFound(f"{p}: no config.json in this folder; give a model folder or its config.json.",
                       path=cfg_path, field=FIELD)
    cfg = _read_config(cfg_path)
    return spec_from_config(cfg, _id_from_config(cfg, p.name if cfg_path is not p else p.stem), str(cfg_path))


def _spec_from_catalog(ref: str) -> ModelSpec:
    from tuiwiz.model_catalog import CATALOG, canonical_key, lookup

    entry = lookup(ref)
    if entry is not None:
        return spec_from_config(entry.config, ref, f"catalog ({entry.hub_id})")
    close = difflib.get_close_matches(canonical_key(ref), [canonical_key(e.hub_id) for e in CATALOG], n=3, cutoff=0.5)
    names = [e.hub_id for e in CATALOG if canonical_key(e.hub_id) in close]
    hint = f" Did you mean {', '.join(names)}?" if names else ""
    raise NotFound(
        f"{ref}: not a local folder, not in the local Hugging Face cache, and not in the catalog.{hint} "
        "Offline planning needs a config.json: give the model's folder or its config.json.",
        field=FIELD,
    )


def _id_from_config(cfg: dict[str, Any], fallback: str) -> str:
    name = cfg.get("_name_or_path")
    return name if isinstance(name, str) and name and not name.startswith("/") else fallback


