"""Preset files: a whole plan (model, data, hardware, knobs, estimate) as versioned, validated YAML.

Presets are data: they are read with `yaml.safe_load`, validated strictly (unknown keys are
errors) and every problem is reported with its field path and the bad value. Writes are
atomic and never replace an existing file unless forced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuiwiz.atomic import write_text_atomic
from tuiwiz.data.layouts import LAYOUTS, Layout
from tuiwiz.errors import NotFound, UserError, bounded, shown
from tuiwiz.hardware import MAX_GPUS_PER_NODE, MAX_NODES
from tuiwiz.planning.knobs import TrainingKnobs

PRESET_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Strict):
    """Which model to train: a hub id (resolved offline) and/or a local directory."""

    id: str = Field(min_length=1)
    path: str | None = None
    tokenizer: str | None = Field(None, description="tokenizer folder or tokenizer.json, if not with the model")
    trust_remote_code: bool = False


class DatasetRef(_Strict):
    """Which data to train on and how to read it."""

    path: str = Field(min_length=1)
    layout: Layout | None = Field(None, description=f"one of {', '.join(LAYOUTS)}; detected when empty")
    columns: dict[str, str] | None = Field(None, description="map of our field names to the file's keys")
    system_prompt: str | None = None


class HardwareRef(_Strict):
    """The GPU(s) the plan is for. `indices` selects devices on a real machine; `nodes` > 1 is a
    multi-node run, launched by SLURM or torchrun from an export."""

    gpu: str = Field(min_length=1)
    memory_gib: float = Field(gt=0)
    count: int = Field(1, ge=1, le=MAX_GPUS_PER_NODE)  # GPUs per node
    nodes: int = Field(1, ge=1, le=MAX_NODES,
                       description="machines, each with `count` GPUs (exported to SLURM/torchrun)")
    indices: list[int] | None = None
    bf16: bool = True


class EstimateInfo(_Strict):
    """The estimate when the preset was written. Informational: it is recomputed on load."""

    peak_gib: float
    allocated_gib: float
    budget_gib: float
    fits: bool
    breakdown_gib: dict[str, float]


class Preset(_Strict):
    version: Literal[1] = PRESET_VERSION
    name: str | None = None
    description: str | None = None
    model: ModelRef
    dataset: DatasetRef | None = None
    hardware: HardwareRef
    training: TrainingKnobs = Field(default_factory=TrainingKnobs)
    estimate: EstimateInfo | None = None


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid preset ({err.error_count()} problem{'s' if err.error_count() != 1 else ''}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        bad = e.get("input")
        got = "" if isinstance(bad, (dict, list)) else f" (got {shown(bad)})"
        lines.append(f"  - {loc}: {e['msg']}{got}")
    return bounded("\n".join(lines))


def preset_from_dict(data: Any, source: str = "preset") -> Preset:
    """Validate plain data as a preset; every problem is reported with its field path."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a preset must be a YAML mapping, got {type(data).__name__}.")
    version = data.get("version", PRESET_VERSION)
    if version != PRESET_VERSION:
        raise UserError(f"{source}: version: this tuiwiz reads preset version {PRESET_VERSION}, got {version!r}.")
    try:
        return Preset.model_validate(data)
    except ValidationError as err:
        raise UserError(_format_errors(source, err)) from None


#: A preset is a page of YAML; anything far larger is not one.
MAX_PRESET_BYTES = 1 << 20


def _read_preset_text(p: Path) -> str:
    try:
        if not p.is_file():
            raise NotFound(f"{p}: no such preset file." if not p.exists() else f"{p}: not a regular file.", path=p)
        if p.stat().st_size > MAX_PRESET_BYTES:
            raise UserError(f"{p}: {p.stat().st_size:,} bytes is too large for a preset (at most 1 MiB).")
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (bad byte at offset {e.start}).") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read it ({e.strerror}).") from None


def _safe_yaml(text: str, p: Path) -> Any:
    """`yaml.safe_load`, refusing aliases: presets never need them, and an alias bomb expands
    into gigabytes when validated."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                line = event.start_mark.line + 1
                raise UserError(f"{p}: line {line}: YAML aliases (*{event.anchor}) are not allowed in a preset; "
                                "write the value out.")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"{p}:{where}: not valid YAML ({getattr(e, 'problem', None) or e}).") from None


def _anchor_paths(preset: Preset, folder: Path) -> Preset:
    """Relative local paths in a preset are relative to the preset's own folder (a run copies its
    preset elsewhere, so they are made absolute on load). Hub ids are left alone."""
    def rel(v: str | None) -> str | None:
        return v if v is None or Path(v).expanduser().is_absolute() else str((folder / v).resolve())

    model = preset.model.model_copy(update={"path": rel(preset.model.path), "tokenizer": rel(preset.model.tokenizer)})
    dataset = preset.dataset.model_copy(update={"path": rel(preset.dataset.path)}) if preset.dataset else None
    return preset.model_copy(update={"model": model, "dataset": dataset})


def load_preset(path: str | Path) -> Preset:
    """Read and validate a preset file (safe YAML only, no aliases, at most 1 MiB)."""
    p = Path(path).expanduser()
    data = _safe_yaml(_read_preset_text(p), p)
    return _anchor_paths(preset_from_dict(data, str(p)), p.resolve().parent)


def preset_to_yaml(preset: Preset) -> str:
    data = preset.model_dump(mode="json", exclude_none=True)
    header = "# tuiwiz preset: edit freely; `tuiwiz --auto --preset THIS` re-checks it.\n"
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def save_preset(preset: Preset, path: str | Path, *, force: bool = False) -> Path:
    """Write a preset atomically; refuses to overwrite unless `force`."""
    return write_text_atomic(path, preset_to_yaml(preset), force=force)
