"""Load every export with the consumers' own code: LLaMA-Factory 0.9.5 and Axolotl 0.19.0.

    python bench/exports_check.py                 # build/reuse the venvs, check, write bench/results/exports_check.*
    python bench/exports_check.py --venvs DIR     # where the consumer venvs live (default /tmp/tuiwiz-consumers)

The consumers cannot be installed next to tuiwiz (their pins conflict with ours), so each gets
its own venv (`pip install llamafactory==0.9.5 liger-kernel`, `pip install axolotl==0.19.0`;
torch is the CPU wheel). The script then:
1. exports every shipped preset (presets/*.yaml) for both trainers, with the model path pointed
   at a local folder (config.json + tokenizer from /work/shared/data) since nothing is
   downloaded, and parses each file with the consumer's parser: LLaMA-Factory's
   `llamafactory.hparams.get_train_args`, Axolotl's `axolotl.cli.config.load_cfg`;
2. plans a run on each shared dataset for each trainer (`trainer: llamafactory|axolotl`),
   exports it, parses it, and loads and tokenizes the data with the consumer's own dataset
   loader on CPU (LLaMA-Factory `llamafactory.data.get_dataset`, Axolotl
   `axolotl.common.datasets.load_datasets`, what `axolotl preprocess` runs);
3. counts what survives: rows, trained tokens (labels != -100), tool calls in trained tokens
   (`"name": "` in the decoded trained text) and rows whose prompt carries tool schemas
   (`"parameters"` in the decoded text), next to tuiwiz's own encoding of the same data
   (`tuiwiz.train.dataset.build_examples`, truncated at the plan's cutoff).
The child half of this file (`--child`) runs inside a consumer venv and imports nothing of tuiwiz.
Nothing here needs a GPU or the network beyond PyPI for the installs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path(os.environ.get("TUIWIZ_SHARED", ROOT.parent / "shared")) / "data"
RESULTS = HERE / "results"
CONSUMERS = {"llamafactory": ("llamafactory==0.9.5", "liger-kernel"), "axolotl": ("axolotl==0.19.0",)}
TORCH_WHEELS = Path("/opt/wheels")
#: What each shared file is, for the table (mt_bench has no answers: tuiwiz refuses it).
DATASETS = ("alpaca_en_demo.json", "alpaca_zh_demo.json", "identity.json", "glaive_toolcall_en_demo.json",
            "kto_en_demo.json", "v1_sft_demo.jsonl", "sharegpt_zh_1K_format.jsonl", "gsm8k_train.jsonl",
            "mt_bench_question.jsonl")
#: Model id -> (shared config file, shared tokenizer folder). Mistral's tokenizer is not in shared/
#: (only parsed, never tokenized here), so it borrows Llama 3's.
MODELS = {
    "meta-llama/Llama-3.1-70B-Instruct": ("meta-llama__Llama-3.1-70B-Instruct.json", "llama3"),
    "meta-llama/Llama-3.1-8B-Instruct": ("meta-llama__Llama-3.1-8B.json", "llama3"),
    "mistralai/Mistral-7B-Instruct-v0.3": ("mistralai__Mistral-7B-v0.3.json", "llama3"),
    "Qwen/Qwen2.5-0.5B-Instruct": ("Qwen__Qwen2.5-0.5B.json", "qwen2.5"),
    "Qwen/Qwen2.5-7B-Instruct": ("Qwen__Qwen2.5-7B.json", "qwen2.5"),
    "Qwen/Qwen2.5-14B-Instruct": ("Qwen__Qwen2.5-14B.json", "qwen2.5"),
    "Qwen/Qwen3-8B": ("Qwen__Qwen3-8B.json", "qwen3"),
}
DATA_MODEL, DATA_GPU = "Qwen/Qwen2.5-7B-Instruct", "4090"
NAME_RE = re.compile(r'"name":\s*"')


# =========================================================================== child (consumer venv)


def _count(ds: Any, decode: Any) -> dict[str, int]:
    """Rows, trained tokens, tool-call names in trained text, rows whose text has tool schemas."""
    out = {"rows": 0, "trained_tokens": 0, "tool_calls": 0, "schema_rows": 0}
    if ds is None:
        return out
    for row in ds:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        out["rows"] += 1
        trained = [t for t, lab in zip(ids, labels) if lab != -100]
        out["trained_tokens"] += len(trained)
        out["tool_calls"] += len(NAME_RE.findall(decode(trained)))
        out["schema_rows"] += '"parameters"' in decode(ids)
    return out


def _stub_torchaudio(out: dict[str, Any]) -> None:
    """LLaMA-Factory's data package imports torchaudio at the top of data/mm_plugin.py and calls
    it only for audio. PyPI has no torchaudio for the CPU torch here (2.11.1 is the newest, and its
    library does not load against torch 2.13), so an empty module stands in; text never reaches it."""
    import types

    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
        out["stubbed"] = "torchaudio"


def _child_llamafactory(job: dict[str, Any]) -> dict[str, Any]:
    import yaml
    from llamafactory.hparams import get_train_args

    import torch

    cfg = yaml.safe_load(Path(job["path"]).read_text())
    if not torch.cuda.is_available():
        # transformers refuses bf16 without a GPU unless told the run is on CPU ("Your setup doesn't
        # support bf16/gpu"); the only key this check adds, and only here
        cfg["use_cpu"] = True
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(cfg)
    out: dict[str, Any] = {"parsed": True, "stage": finetuning_args.stage,
                           "liger": bool(model_args.enable_liger_kernel), "added": ["use_cpu: true"]}
    if job["load_data"]:
        _stub_torchaudio(out)
        from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
        from llamafactory.model import load_tokenizer

        tok_module = load_tokenizer(model_args)
        tok = tok_module["tokenizer"]
        template = get_template_and_fix_tokenizer(tok, data_args)
        module = get_dataset(template, model_args, data_args, training_args, stage=finetuning_args.stage, **tok_module)
        decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
        train, evl = _count(module.get("train_dataset"), decode), _count(module.get("eval_dataset"), decode)
        out["counts"] = {k: train[k] + evl[k] for k in train}
    return out


def _child_axolotl(job: dict[str, Any]) -> dict[str, Any]:
    import logging

    from axolotl.cli.config import load_cfg  # configures axolotl's loggers first

    warnings: list[str] = []

    class Catch(logging.Handler):
        """Axolotl logs its deprecations (`sdp_attention: true` is deprecated ...) as warnings."""

        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if "deprecat" in msg.lower() and record.name.startswith("axolotl"):
                warnings.append(msg[:200])

    for name in ("axolotl", ""):
        logging.getLogger(name).addHandler(Catch())
    cfg = load_cfg(job["path"])
    out: dict[str, Any] = {"parsed": True, "deprecations": sorted(set(warnings)),
                           "liger_flce": bool(cfg.get("liger_fused_linear_cross_entropy"))}
    if job["load_data"]:
        from axolotl.cli.args import PreprocessCliArgs
        from axolotl.common.datasets import load_datasets
        from axolotl.loaders import load_tokenizer

        tok = load_tokenizer(cfg)
        meta = load_datasets(cfg=cfg, cli_args=PreprocessCliArgs())
        decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
        train, evl = _count(meta.train_dataset, decode), _count(meta.eval_dataset, decode)
        out["counts"] = {k: train[k] + evl[k] for k in train}
    return out


def child(consumer: str, jobs_path: str, out_path: str) -> None:
    """Run each job in this (consumer) venv; one result per job, errors as one line."""
    import traceback

    jobs = json.loads(Path(jobs_path).read_text())
    results = []
    for job in jobs:
        os.chdir(job["cwd"])
        t0 = time.monotonic()
        try:
            res = (_child_llamafactory if consumer == "llamafactory" else _child_axolotl)(job)
        except BaseException as e:  # noqa: BLE001 - a consumer may exit; record it and go on
            tb = traceback.format_exc().strip().splitlines()
            res = {"parsed": False, "error": f"{type(e).__name__}: {str(e).strip()[:400]}", "where": tb[-3:]}
        res.update(id=job["id"], seconds=round(time.monotonic() - t0, 1))
        results.append(res)
        print(json.dumps({"id": job["id"], "ok": "error" not in res}), flush=True)
    Path(out_path).write_text(json.dumps(results, indent=1))


# =========================================================================== parent (tuiwiz venv)


def ensure_venv(root: Path, consumer: str) -> tuple[Path, dict[str, str]]:
    """The consumer's venv (built once, reused), and its package versions."""
    venv = root / consumer
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q"]
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        wheels = sorted(TORCH_WHEELS.glob("torch-*+cpu-*.whl"))
        if wheels:  # the CPU wheel on disk; otherwise pip picks torch from PyPI
            subprocess.run([*pip, str(wheels[-1])], check=True)
    if subprocess.run([str(py), "-m", "pip", "show", "-q", CONSUMERS[consumer][0].split("==")[0]],
                      capture_output=True).returncode != 0:
        pins = root / "pins.txt"
        version = subprocess.run([str(py), "-c", "import torch; print(torch.__version__.split('+')[0])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        pins.write_text(f"torch=={version}\n")  # keep the torch that is there (no CUDA wheel download)
        subprocess.run([*pip, "-c", str(pins), *CONSUMERS[consumer]], check=True)
    check = [str(py), "-c", "from transformers.modeling_utils import PreTrainedModel"]
    if subprocess.run(check, capture_output=True).returncode != 0:
        # PyPI's torchvision/torchaudio are built for another torch than the CPU wheel
        # ("operator torchvision::nms does not exist"), which breaks transformers' import;
        # the text-only paths checked here need neither.
        subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"], check=True)
    listing = json.loads(subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], capture_output=True,
                                        text=True, check=True).stdout)
    wanted = {"llamafactory", "axolotl", "transformers", "torch", "datasets", "peft", "trl", "liger-kernel"}
    return py, {p["name"].lower(): p["version"] for p in listing if p["name"].lower() in wanted}


def model_folder(work: Path, model_id: str) -> Path:
    """config.json + tokenizer files for `model_id`, no weights: enough to parse and tokenize."""
    config, tok = MODELS[model_id]
    folder = work / "models" / model_id.replace("/", "__")
    if not folder.exists():
        folder.mkdir(parents=True)
        shutil.copy(SHARED / "model_configs" / config, folder / "config.json")
        for f in (SHARED / "tokenizers" / tok).iterdir():
            if f.is_file():
                shutil.copy(f, folder / f.name)
    return folder


def lf_dataset_info(text: str) -> dict[str, Any]:
    """The dataset_info.json entry an LLaMA-Factory export gives in its comments (the user's step)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line == "# {")
    end = next(i for i in range(start, len(lines)) if lines[i] == "# }")
    return json.loads("\n".join(line[2:] for line in lines[start:end + 1]))


def tuiwiz_counts(preset: Any) -> dict[str, int]:
    """tuiwiz's own encoding of the data, as its worker trains it (truncated at the cutoff)."""
    from tokenizers import Tokenizer

    from tuiwiz.train.dataset import build_examples

    built = build_examples(preset)
    tok = Tokenizer.from_file(str(Path(preset.model.path) / "tokenizer.json"))
    out = {"rows": 0, "trained_tokens": 0, "tool_calls": 0, "schema_rows": 0}
    for row in built.train + built.eval:
        ids, mask = row["input_ids"], row["completion_mask"]
        trained = [t for t, m in zip(ids, mask) if m]
        out["rows"] += 1
        out["trained_tokens"] += len(trained)
        out["tool_calls"] += len(NAME_RE.findall(tok.decode(trained, skip_special_tokens=False)))
        out["schema_rows"] += '"parameters"' in tok.decode(ids, skip_special_tokens=False)
    return out


def preset_jobs(work: Path) -> list[dict[str, Any]]:
    from tuiwiz.exports import export_text
    from tuiwiz.preset import load_preset

    jobs = []
    for path in sorted((ROOT / "presets").glob("*.yaml")):
        preset = load_preset(path)
        local = preset.model_copy(update={"model": preset.model.model_copy(
            update={"path": str(model_folder(work, preset.model.id))})})
        for fmt in CONSUMERS:
            job = {"id": f"preset {path.stem} -> {fmt}", "fmt": fmt, "load_data": False, "kind": "preset",
                   "cwd": str(work / "run")}
            try:
                text = export_text(local, fmt)
            except Exception as e:  # noqa: BLE001 - reported in the table
                job["export_error"] = f"{type(e).__name__}: {e}"
            else:
                out = work / "exports" / f"{path.stem}.{fmt}.yaml"
                out.write_text(text)
                job.update(path=str(out), header=[line for line in text.splitlines()[:6] if "Memory" in line])
            jobs.append(job)
    return jobs


def dataset_jobs(work: Path) -> list[dict[str, Any]]:
    """A plan on each shared dataset for each trainer, exported with its data made loadable."""
    from tuiwiz.errors import UserError
    from tuiwiz.exports import export_text
    from tuiwiz.planner import PlanRequest, plan_request
    from tuiwiz.planning.knobs import TrainingKnobs
    from tuiwiz.preset import DatasetRef

    folder = model_folder(work, DATA_MODEL)
    jobs = []
    for name in DATASETS:
        ddir = work / "data" / Path(name).stem
        ddir.mkdir(parents=True, exist_ok=True)
        link = ddir / name  # a copy, not a link: plans resolve paths, and shared/ has LLaMA-Factory's own
        if not link.exists():  # dataset_info.json, which must not stand in for the exported entry
            shutil.copy(SHARED / "datasets" / name, link)
        ours: dict[str, Any] | str | None = None
        for fmt in CONSUMERS:
            job: dict[str, Any] = {"id": f"{name} -> {fmt}", "fmt": fmt, "load_data": True, "kind": "dataset",
                                   "dataset": name, "cwd": str(work / "run")}
            jobs.append(job)
            req = PlanRequest(model=DATA_MODEL, model_path=str(folder), tokenizer=str(folder),
                              dataset=DatasetRef(path=str(link)), gpu=DATA_GPU,
                              knobs=TrainingKnobs(trainer=fmt), fixed=frozenset({"trainer"}))
            try:
                plan = plan_request(req)
                preset = plan.to_preset(name=f"{Path(name).stem}-{fmt}")
                text = export_text(preset, fmt)
            except UserError as e:
                job["export_error"] = str(e)
                continue
            job.update(fits=plan.advice.fits, peak_gib=round(plan.advice.estimate.peak_gib, 2),
                       budget_gib=round(plan.advice.budget_gib, 2), cutoff=plan.knobs.cutoff_len,
                       loss=plan.knobs.loss, micro_batch=plan.knobs.micro_batch_size,
                       checkpointing=plan.knobs.grad_checkpointing)
            out = work / "exports" / f"{Path(name).stem}.{fmt}.yaml"
            out.write_text(text)
            job["path"] = str(out)
            if fmt == "llamafactory":
                (ddir / "dataset_info.json").write_text(json.dumps(lf_dataset_info(text), indent=1))
            if ours is None:
                try:
                    ours = tuiwiz_counts(preset)
                except UserError as e:
                    ours = str(e)
            job["tuiwiz"] = ours
    return jobs


def run_child(py: Path, consumer: str, jobs: list[dict[str, Any]], work: Path, log: Path) -> list[dict[str, Any]]:
    todo = [j for j in jobs if j["fmt"] == consumer and "path" in j]
    jobs_file, out_file = work / f"{consumer}.jobs.json", work / f"{consumer}.results.json"
    jobs_file.write_text(json.dumps(todo))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(work / "hf"), "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "DISABLE_VERSION_CHECK": "1", "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled"}
    with log.open("a") as fh:
        subprocess.run([str(py), str(Path(__file__).resolve()), "--child", consumer, str(jobs_file), str(out_file)],
                       env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    return json.loads(out_file.read_text()) if out_file.exists() else []


def _fmt_counts(c: dict[str, int] | None) -> str:
    if not isinstance(c, dict):
        return "-"
    return f"{c['rows']} / {c['trained_tokens']} / {c['tool_calls']} / {c['schema_rows']}"


def report(jobs: list[dict[str, Any]], results: dict[str, dict[str, Any]], versions: dict[str, dict[str, str]],
           seconds: float) -> str:
    lines = [
        "# Exports loaded by the consumers' own code",
        "",
        "`python bench/exports_check.py` (CPU, no GPU, no model weights: config.json + tokenizer only).",
        "Consumers, each in its own venv: "
        + "; ".join(f"{c}: " + ", ".join(f"{k} {v}" for k, v in sorted(vs.items())) for c, vs in versions.items())
        + ".",
        f"Wall time {seconds / 60:.1f} min.",
        "",
        "What ran: each consumer's config parser on every file, and for the dataset plans its dataset loader",
        "and tokenizer (train + validation split, as the plan sets it). What did not: loading model weights,",
        "bitsandbytes, Liger or a training step (no GPU here). Two changes to the environment, none to the files:",
        "LLaMA-Factory gets `use_cpu: true` added before parsing (transformers refuses bf16 without a GPU), and",
        "an empty `torchaudio` module (PyPI has no torchaudio for this CPU torch; LLaMA-Factory imports it at the",
        "top of data/mm_plugin.py and calls it only for audio). PyPI's torchvision is removed from the",
        "LLaMA-Factory venv for the same reason. Mistral's tokenizer is not in shared/, so its preset folder",
        "borrows Llama 3's (presets are only parsed, never tokenized).",
        "",
        "## Shipped presets: parsed by `get_train_args` (LLaMA-Factory) and `load_cfg` (Axolotl)",
        "",
        "| preset | trainer | parsed | tuiwiz's estimate for that trainer (export header) | notes |",
        "|---|---|---|---|---|",
    ]
    for j in (j for j in jobs if j["kind"] == "preset"):
        r = results.get(j["id"], {})
        ok = "export refused" if "export_error" in j else ("yes" if r.get("parsed") else "NO")
        note = j.get("export_error") or r.get("error") or "; ".join(r.get("deprecations", [])) or ""
        est = (j.get("header") or [""])[0].lstrip("# ").replace("Memory, estimated by tuiwiz for this stack: ", "")
        lines.append(f"| {j['id'].split(' ')[1]} | {j['fmt']} | {ok} | {est} | {note} |")
    lines += [
        "",
        "## A plan on each shared dataset: parsed, then loaded and tokenized by the consumer's dataset loader",
        "",
        f"Plan: {DATA_MODEL} (config + tokenizer from shared/), {DATA_GPU}, `trainer` set to the consumer; cutoff",
        "from tuiwiz's profile. Counts are rows / trained tokens / tool calls in trained text / rows with tool",
        "schemas, over train + validation; tuiwiz's are its own encoding (`build_examples`) of the same file.",
        "",
        "Reading it: LLaMA-Factory trains one more token per reply than tuiwiz (its templates end a reply with",
        "the end-of-turn marker and the newline after it, e.g. Qwen's `<|im_end|>\\n`; tuiwiz trains the marker",
        "only). Axolotl trains function_call turns as the JSON text the file holds, a few tokens shorter than",
        "the `<tool_call>` markup tuiwiz renders. One row more on the consumer's side is a conversation tuiwiz",
        "drops because nothing in it is left to train (no assistant turn, or all of it past the cutoff).",
        "",
        "| dataset | trainer | plan (peak of budget GiB, loss, micro-batch, ckpt) | parsed | consumer counts | "
        "tuiwiz counts | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for j in (j for j in jobs if j["kind"] == "dataset"):
        r = results.get(j["id"], {})
        if "export_error" in j:
            lines.append(f"| {j['dataset']} | {j['fmt']} | - | export refused | - | - | {j['export_error']} |")
            continue
        plan = (f"{j['peak_gib']} of {j['budget_gib']} {'fits' if j['fits'] else 'DOES NOT FIT'}, {j['loss']}, "
                f"mb {j['micro_batch']}, ckpt {'on' if j['checkpointing'] else 'off'}, cutoff {j['cutoff']}")
        ours = j.get("tuiwiz")
        note = r.get("error") or "; ".join(r.get("deprecations", [])) or ""
        lines.append(f"| {j['dataset']} | {j['fmt']} | {plan} | {'yes' if r.get('parsed') else 'NO'} | "
                     f"{_fmt_counts(r.get('counts'))} | {_fmt_counts(ours) if isinstance(ours, dict) else ours} | "
                     f"{note} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venvs", default="/tmp/tuiwiz-consumers", help="where the consumer venvs are built")
    ap.add_argument("--child", nargs=3, metavar=("CONSUMER", "JOBS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=("presets", "datasets"), help="run one half")
    ap.add_argument("--report-from", metavar="JSON", help="only rewrite the table from a results JSON")
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    if args.report_from:
        saved = json.loads(Path(args.report_from).read_text())
        results = {j["id"]: j["result"] for j in saved["jobs"] if j.get("result")}
        text = report(saved["jobs"], results, saved["versions"], saved.get("seconds", 0))
        (RESULTS / "exports_check.md").write_text(text)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    root = Path(args.venvs)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tuiwiz-exports-check-"))
    for sub in ("exports", "run"):
        (work / sub).mkdir()
    versions, pythons = {}, {}
    for consumer in CONSUMERS:
        pythons[consumer], versions[consumer] = ensure_venv(root, consumer)
    jobs = [] if args.only == "datasets" else preset_jobs(work)
    jobs += [] if args.only == "presets" else dataset_jobs(work)
    results: dict[str, dict[str, Any]] = {}
    log = work / "consumers.log"
    for consumer in CONSUMERS:
        for r in run_child(pythons[consumer], consumer, jobs, work, log):
            results[r["id"]] = r
    seconds = time.monotonic() - t0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "exports_check.md").write_text(report(jobs, results, versions, seconds))
    (RESULTS / "exports_check.json").write_text(json.dumps(
        {"versions": versions, "seconds": round(seconds), "jobs": [{**j, "result": results.get(j["id"])} for j in jobs]},
        indent=1))
    bad = [j["id"] for j in jobs if "path" in j and not results.get(j["id"], {}).get("parsed")]
    print(f"wrote {RESULTS / 'exports_check.md'}; work files in {work} (consumer log: {log})")
    if bad:
        print("not loaded: " + ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
