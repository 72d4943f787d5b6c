"""Pre-flight: everything `launch` and `resume` can check before a worker is detached, without torch.

A run that cannot start must be refused here, with one line that names the file or preset field,
instead of a run id and a failed run a second later. Each check mirrors what the worker
(`tuiwiz.train`) will look for: the same dataset reader, the same model and tokenizer folders,
the same weight file names transformers loads, the same checkpoint rotation.

Errors are typed (`tuiwiz.errors`) and carry the preset field; the core never names CLI flags.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from tuiwiz.errors import BadValue, CannotWrite, NotFound, UserError
from tuiwiz.gpu_features import flash_attn_installed, flash_attn_problem, parse_capability
from tuiwiz.hardware import GpuInfo, read_gpus
from tuiwiz.jsonfile import read_json_object
from tuiwiz.models import ModelSpec, find_in_hf_cache, hf_cache_dirs, is_hub_id, resolve_model
from tuiwiz.planning.knobs import TrainingKnobs
from tuiwiz.planning.memory import lora_weights_bytes, optimizer_state_bytes
from tuiwiz.planning.schedule import SAVE_TOTAL_LIMIT, early_stopping_on, eval_and_save_steps
from tuiwiz.preset import Preset

if TYPE_CHECKING:
    from tuiwiz.data.layouts import Sample

MIB = 1024**2
GIB = 1024**3
#: What `pip` needs to install the training stack (the worker's imports).
TRAIN_EXTRA_INSTALL = "pip install 'tuiwiz[train]'"
#: Modules the worker imports for every run; bitsandbytes only when the plan uses it.
TRAIN_MODULES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
#: The weight files transformers' `from_pretrained` loads from a folder, in its order of preference.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: Per checkpoint besides adapter, optimizer and tokenizer: trainer_state.json, scheduler.pt,
#: rng_state.pth, training_args.bin, adapter_config.json, README.md, pickling overhead.
CHECKPOINT_FIXED_BYTES = 4 * MIB
#: Slack on top of the estimate: train.log, events, TensorBoard, and estimation error.
DISK_MARGIN_BYTES = 256 * MIB
DISK_MARGIN_RATIO = 0.10
#: Samples read and encoded up front: enough to catch a wrong layout or template, cheap on any file.
SAMPLE_ROWS = 8


class ModelNotLocal(NotFound):
    """The model (or its tokenizer) is not on this machine, and the worker runs offline.

    A front end can offer to let the worker download it; the message says where we looked.
    """

    def __init__(self, message: str, *, model_id: str, field: str = "model") -> None:
        super().__init__(message, field=field)
        self.model_id = model_id


@dataclass(frozen=True)
class DataCheck:
    """What pre-flight learnt from the first rows of the dataset."""

    samples: tuple[Sample, ...]
    rows_hint: int | None  # number of records when the reader knows it cheaply (JSONL/CSV line count)
    skipped: int  # unreadable records among those read


# ------------------------------------------------------------------ the training extra


def missing_train_modules(knobs: TrainingKnobs) -> list[str]:
    """Top-level modules of the training stack that are not importable (`find_spec`, no import)."""
    needed = list(TRAIN_MODULES)
    if knobs.quant_bits in (4, 8) or "8bit" in knobs.optim:
        needed.append("bitsandbytes")  # the worker quantizes (and optimizes) with it on CPU too
    if knobs.strategy.startswith("zero3"):
        needed.append("deepspeed")  # ZeRO-3 runs on DeepSpeed, which the training extra does not install
    return [m for m in needed if importlib.util.find_spec(m) is None]


def check_trainer(knobs: TrainingKnobs) -> None:
    """A plan made for another trainer's stack (its loss, dtypes, kernels) is not what tuiwiz's own
    worker would run, so its estimate does not hold here: re-plan it for tuiwiz first."""
    if knobs.trainer != "tuiwiz":
        raise BadValue("trainer", knobs.trainer, "this preset was planned for that trainer's own stack; re-plan it "
                       "for tuiwiz's worker (training.trainer: tuiwiz) before launching it here")


def check_train_extra(knobs: TrainingKnobs) -> None:
    missing = missing_train_modules(knobs)
    if missing:
        raise UserError(f"the training stack is not installed (missing: {', '.join(missing)}); "
                        f"install it with: {TRAIN_EXTRA_INSTALL}", field="train_extra")


# ------------------------------------------------------------------ dataset


def check_dataset(preset: Preset, sample_rows: int = SAMPLE_ROWS) -> DataCheck:
    """Read the first rows with the profiler's reader (the worker's too): layout, columns, JSON."""
    from tuiwiz.data.layouts import iter_conversations
    from tuiwiz.data.readers import ReadReport

    ds = preset.dataset
    if ds is None:
        raise UserError("the preset has no dataset: set dataset.path (and dataset.layout) before launching.",
                        field="dataset")
    path = Path(ds.path).expanduser()
    if not path.exists():
        raise NotFound(f"dataset.path: {path}: no such file or folder.", path=path, field="dataset")
    if not os.access(path, os.R_OK):
        raise NotFound(f"dataset.path: {path}: not readable (permission denied).", path=path, field="dataset")
    report = ReadReport()
    try:
        samples = tuple(itertools.islice(iter_conversations(ds, report=report), sample_rows))
    except UserError as e:
        raise UserError(f"dataset: {e}", field="dataset") from None
    except OSError as e:
        raise NotFound(f"dataset.path: {path}: cannot read it ({e.strerror or e}).", path=path, field="dataset") from None
    return DataCheck(samples, report.total_hint, report.skipped)


# ------------------------------------------------------------------ model and tokenizer


def weights_problem(folder: Path) -> str | None:
    """Why `from_pretrained(folder)` would find no weights, or None (a sharded index needs its shards)."""
    for name in WEIGHT_FILES:
        f = folder / name
        if not f.is_file():
            continue
        if not name.endswith(".index.json"):
            return None
        try:
            weight_map = read_json_object(f, "a weight index (.index.json)").get("weight_map")
        except UserError as e:
            return str(e)
        if not isinstance(weight_map, dict):
            return f"{name} has no weight_map"
        shards = {str(s) for s in weight_map.values()}
        missing = sorted(s for s in shards if not (folder / s).is_file())
        return f"{name} lists {len(missing)} missing shard(s), first {missing[0]}" if missing else None
    return f"no weights ({', '.join(WEIGHT_FILES)})"


def _local_model_folder(preset: Preset) -> Path | None:
    """The folder the worker loads from when it is local: model.path, or model.id naming a folder."""
    m = preset.model
    if m.path:
        p = Path(m.path).expanduser()
        if not p.is_dir():
            what = "a file, not a model folder" if p.exists() else "no such folder"
            raise NotFound(f"model.path: {p}: {what}.", path=p, field="model")
        return p
    p = Path(m.id).expanduser()
    return p if p.is_dir() else None


def _check_folder(folder: Path, what: str) -> None:
    if not (folder / "config.json").is_file():
        raise NotFound(f"{what}: {folder}: no config.json in this folder.", path=folder, field="model")
    problem = weights_problem(folder)
    if problem:
        raise NotFound(f"{what}: {folder}: {problem}.", path=folder, field="model")


def _cache_dirs() -> str:
    """Where the HF cache was looked for, each folder once."""
    return ", ".join(dict.fromkeys(str(d) for d in hf_cache_dirs()))


def _download_hint(model_id: str) -> str:
    return (f"download it first (hf download {model_id}) or set model.path to a folder "
            "with config.json and the weights")


def model_folder(preset: Preset, *, online: bool = False) -> tuple[Path | None, list[str]]:
    """The folder the worker will load the model from, and warnings.

    None with `online`: a hub id that is not cached; the worker downloads it. Offline, the model
    must be a local folder or a complete snapshot in the HF cache (config.json + weights).
    """
    folder = _local_model_folder(preset)
    if folder is not None:
        _check_folder(folder, "model.path" if preset.model.path else "model.id")
        return folder, []
    mid = preset.model.id
    cached = find_in_hf_cache(mid, "config.json") if is_hub_id(mid) else None
    if cached is not None and weights_problem(cached.parent) is None:
        return cached.parent, []
    if online and is_hub_id(mid):
        return None, [f"model {mid} is not (completely) in the local HF cache: the worker will download it."]
    looked = _cache_dirs()
    if cached is not None:
        why = f"its HF cache snapshot {cached.parent} has {weights_problem(cached.parent)}"
    else:
        why = f"not a local folder and not in the HF cache ({looked})"
    catalog = ""
    from tuiwiz.model_catalog import lookup

    if lookup(mid) is not None:
        catalog = " (the catalog knows its shape, enough to plan, but training needs the weights)"
    raise ModelNotLocal(f"model {mid}: {why}{catalog}; {_download_hint(mid)}.", model_id=mid)


def tokenizer_file(preset: Preset, *, online: bool = False) -> tuple[Path | None, list[str]]:
    """The tokenizer.json the worker will use, and warnings.

    Mirrors the worker: model.tokenizer (a folder or the file), else the model folder, else the
    HF cache snapshot of model.id. The data builder reads it with `tokenizers` and never
    downloads, so it has to be on disk.
    """
    m = preset.model
    if m.tokenizer:
        p = Path(m.tokenizer).expanduser()
        f = p if p.is_file() else p / "tokenizer.json"
        if not f.is_file():
            raise NotFound(f"model.tokenizer: {p}: no tokenizer.json there.", path=p, field="tokenizer")
        return f, []
    folder = _local_model_folder(preset)
    if folder is not None:
        f = folder / "tokenizer.json"
        if not f.is_file():
            raise NotFound(f"{folder}: no tokenizer.json in the model folder; set model.tokenizer to a folder "
                           "that has it.", path=folder, field="tokenizer")
        return f, []
    cached = find_in_hf_cache(m.id, "tokenizer.json") if is_hub_id(m.id) else None
    if cached is not None:
        return cached, []
    if online and is_hub_id(m.id):
        return None, [f"tokenizer of {m.id} is not in the local HF cache: the worker has to download it."]
    raise ModelNotLocal(f"model {m.id}: no tokenizer.json in the HF cache ({_cache_dirs()}); "
                        f"{_download_hint(m.id)}, or set model.tokenizer.", model_id=m.id, field="tokenizer")


def check_encoding(data: DataCheck, tokenizer_json: Path, knobs: TrainingKnobs) -> list[str]:
    """Encode the sampled rows as the worker will (chat template, trained-token mask)."""
    from tuiwiz.data import encode_sample, load_tokenizer

    tok = load_tokenizer(str(tokenizer_json))
    trained = 0
    for sample in data.samples:
        enc = encode_sample(sample, tok)
        trained += any(enc.trained[: knobs.cutoff_len])
    if data.samples and not trained:
        return [f"none of the first {len(data.samples)} samples has a trained token within cutoff_len="
                f"{knobs.cutoff_len}; rows without one are dropped."]
    return []


# ------------------------------------------------------------------ hardware


def _visible_count(env: Mapping[str, str], nvml: int) -> int:
    """GPUs a worker started with `env` can use: CUDA_VISIBLE_DEVICES narrows what NVML sees."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return nvml
    return min(nvml, len([x for x in cvd.split(",") if x.strip()]))


def check_gpus(preset: Preset, gpus: Sequence[GpuInfo], env: Mapping[str, str]) -> list[GpuInfo]:
    """The GPUs the plan names (`hardware.indices`, `hardware.count`) are visible through NVML; returns them."""
    hw = preset.hardware
    plan = f"{hw.count} x {hw.gpu}"
    if not gpus:
        raise UserError(f"no NVIDIA GPU is visible here (NVML finds none); the plan is for {plan} "
                        "(hardware.gpu, hardware.count).", field="gpus")
    have = ", ".join(str(g.index) for g in gpus)
    if hw.indices:
        by_index = {g.index: g for g in gpus}
        missing = [i for i in hw.indices if i not in by_index]
        if missing:
            raise UserError(f"hardware.indices: no GPU with index {', '.join(map(str, missing))} here "
                            f"(this machine has: {have}).", field="gpus")
        if hw.count > len(hw.indices):
            raise UserError(f"hardware.count is {hw.count} but hardware.indices names {len(hw.indices)} GPU(s).",
                            field="gpus")
        return [by_index[i] for i in hw.indices[: hw.count]]
    visible = _visible_count(env, len(gpus))
    if hw.count > visible:
        where = " (CUDA_VISIBLE_DEVICES)" if visible < len(gpus) else ""
        raise UserError(f"hardware.count is {hw.count} but {visible} GPU(s) are visible here{where}.", field="gpus")
    return list(gpus[: hw.count])


def check_attention(knobs: TrainingKnobs, gpus: Sequence[GpuInfo]) -> None:
    """FlashAttention 2 needs its package and an Ampere or newer card (the oldest of those used)."""
    if knobs.attn != "flash_attention_2":
        return
    caps = [c for c in (parse_capability(g.compute_capability) for g in gpus) if c is not None]
    problem = flash_attn_problem(min(caps) if caps else None, flash_attn_installed())
    if problem:
        raise UserError(f"training.{problem}", field="attn")


# ------------------------------------------------------------------ runs folder and disk


def check_runs_dir(root: Path) -> None:
    """Create the runs folder and prove a file can be written in it."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tuiwiz-write-test-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CannotWrite(root, e.strerror or str(e)) from None


def total_steps(knobs: TrainingKnobs, train_rows: int | None, gpus: int) -> int | None:
    """Optimizer steps the trainer will run: max_steps, else epochs over the training rows."""
    if knobs.max_steps:
        return knobs.max_steps
    if train_rows is None:
        return None
    batches = math.ceil(train_rows / (knobs.micro_batch_size * max(1, gpus)))
    return max(1, math.ceil(knobs.epochs * math.ceil(batches / knobs.grad_accum)))


def checkpoints_kept(knobs: TrainingKnobs, steps: int | None) -> int | None:
    """Checkpoint folders on disk at the worst moment, as the worker's trainer rotates them.

    Without early stopping `save_total_limit` is 3 and the trainer writes the next checkpoint
    before it deletes the oldest: 4. With early stopping every checkpoint is kept (the best
    one is loaded at the end): one per save step, plus the final save. None when the number
    of steps is unknown.
    """
    has_eval = knobs.val_ratio > 0
    if not early_stopping_on(knobs, has_eval):
        return SAVE_TOTAL_LIMIT + 1
    if steps is None:
        return None
    _, every = eval_and_save_steps(knobs, has_eval)
    return steps // every + 1


def checkpoint_bytes(spec: ModelSpec, knobs: TrainingKnobs, tokenizer_bytes: int) -> int:
    """One checkpoint: the adapter weights, the optimizer's moments, the tokenizer, small trainer files."""
    return lora_weights_bytes(spec, knobs) + optimizer_state_bytes(spec, knobs) + tokenizer_bytes + CHECKPOINT_FIXED_BYTES


def disk_needed(spec: ModelSpec, knobs: TrainingKnobs, kept: int, tokenizer_bytes: int, merge: bool) -> int:
    """Bytes the run will write at most: kept checkpoints, the final adapter, the merged model, a margin."""
    adapter = lora_weights_bytes(spec, knobs) + tokenizer_bytes + CHECKPOINT_FIXED_BYTES
    merged = 2 * spec.total_params + tokenizer_bytes if merge else 0
    raw = kept * checkpoint_bytes(spec, knobs, tokenizer_bytes) + adapter + merged
    return int(raw * (1 + DISK_MARGIN_RATIO)) + DISK_MARGIN_BYTES


def check_disk(root: Path, needed: int, detail: str) -> None:
    free = shutil.disk_usage(root).free
    if free < needed:
        raise UserError(f"{root}: {free / GIB:.2f} GiB free, but the run writes up to {needed / GIB:.2f} GiB "
                        f"({detail}); free some space or keep runs on another disk.", field="runs_dir")


def _disk(preset: Preset, root: Path, folder: Path | None, tok: Path | None, data: DataCheck, *,
          gpus: int, merge: bool) -> list[str]:
    """Refuse when the runs folder's disk cannot hold what the run writes; warnings otherwise."""
    knobs = preset.training
    try:
        spec = resolve_model(str(folder) if folder is not None else preset.model.id)
        tok_bytes = tok.stat().st_size if tok else 0
        per = checkpoint_bytes(spec, knobs, tok_bytes)
    except (UserError, ValueError, KeyError, OSError) as e:
        return [f"free-disk check skipped: the model's shape is unknown ({e})."]
    warnings = []
    train_rows = None if data.rows_hint is None else math.ceil(data.rows_hint * (1 - knobs.val_ratio))
    kept = checkpoints_kept(knobs, total_steps(knobs, train_rows, gpus))
    if kept is None:
        kept = SAVE_TOTAL_LIMIT + 1
        warnings.append(f"with early stopping every checkpoint is kept; the free-disk check assumed {kept} "
                        "(the number of rows is not known up front).")
    what = f"{kept} checkpoints of {per / MIB:.1f} MiB, the adapter" + (", the merged model" if merge else "")
    check_disk(root, disk_needed(spec, knobs, kept, tok_bytes, merge), what + " and a margin")
    return warnings


# ------------------------------------------------------------------ all of it


def preflight(preset: Preset, runs_root: Path, *, online: bool = False, cpu: bool = False, merge: bool = False,
              env: Mapping[str, str] | None = None, gpus: Sequence[GpuInfo] | None = None) -> list[str]:
    """Refuse (typed `UserError`) a run that cannot start; return warnings for one that can.

    `cpu`: the worker will see no GPU (an explicit CPU run), so the GPU and FlashAttention
    checks do not apply. `online`: the worker may download a hub model that is not cached.
    `env` is the worker's environment (CUDA_VISIBLE_DEVICES); `gpus` replaces the NVML reading.
    Checks run cheapest-first and only the runs folder is created.
    """
    knobs = preset.training
    check_trainer(knobs)
    check_train_extra(knobs)
    data = check_dataset(preset)
    warnings = []
    if data.skipped:
        warnings.append(f"dataset: {data.skipped} unreadable record(s) among the first rows are skipped.")
    folder, w = model_folder(preset, online=online)
    warnings += w
    tok, w = tokenizer_file(preset, online=online)
    warnings += w
    if tok is not None:
        warnings += check_encoding(data, tok, knobs)
    if not cpu:
        used = check_gpus(preset, read_gpus() if gpus is None else gpus, os.environ if env is None else env)
        check_attention(knobs, used)
    check_runs_dir(runs_root)
    warnings += _disk(preset, runs_root, folder, tok, data, gpus=1 if cpu else preset.hardware.count, merge=merge)
    return warnings
