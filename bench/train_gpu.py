"""GPU benchmark: train real-shaped models (random weights, no download) through the worker's own
builders and record measured peak memory (torch + NVML), tokens/s, and the plan's estimate.

Needs a CUDA GPU (it was written on a CPU-only machine and has not been run on a GPU yet).
Model shapes come from ../shared/data/model_configs (or --config PATH). Example, on an H100:

    .venv/bin/python bench/train_gpu.py --models meta-llama__Llama-3.1-8B Qwen__Qwen2.5-7B \
        --cutoff 1024 2048 --micro-batch 1 2 --steps 8

writes bench/results/train_gpu-<gpu>-<time>.json (one record per case; a case that OOMs is
recorded with "oom": true and its measured peak). `--device cpu --tiny` smoke-tests the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIGS = REPO.parent / "shared" / "data" / "model_configs"
GIB = 1024**3


def nvml_process_used_gib(index: int) -> float | None:
    """GPU memory NVML attributes to this process (what decides an OOM), or None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == os.getpid() and p.usedGpuMemory is not None:
                return p.usedGpuMemory / GIB
        return pynvml.nvmlDeviceGetMemoryInfo(h).used / GIB  # containers may hide pids
    except Exception:  # noqa: BLE001
        return None


def estimate(config_path: Path, cfg: dict[str, Any], knobs: Any) -> dict[str, Any] | None:
    """The estimate for the config that really runs (with --tiny, the shrunk one)."""
    try:
        from tuiwiz.models import spec_from_config
        from tuiwiz.planning.memory import estimate_memory

        est = estimate_memory(spec_from_config(cfg, config_path.stem, str(config_path)), knobs)
        return {"peak_gib": est.peak_gib, "allocated_gib": est.allocated_gib, "reserved_gib": est.reserved_gib,
                "breakdown_gib": est.breakdown_gib()}
    except Exception as e:  # noqa: BLE001 - the benchmark still measures
        return {"error": f"{type(e).__name__}: {e}"}


def run_case(cfg_path: Path, cfg: dict[str, Any], knobs: Any, steps: int, device: str, scratch: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, TrainerCallback

    from tuiwiz.train import build

    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    est = estimate(cfg_path, cfg, knobs)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    ckpt = scratch / cfg_path.stem
    if not (ckpt / "config.json").exists():
        build.random_checkpoint(config, ckpt)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    record: dict[str, Any] = {"model": cfg_path.stem, "knobs": knobs.model_dump(mode="json"), "steps": steps,
                              "estimate": est}
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # type: ignore[override]
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    vocab = int(cfg.get("vocab_size", 32000))
    n_rows = steps * knobs.micro_batch_size * knobs.grad_accum
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(10, vocab - 10, (knobs.cutoff_len,), generator=g).tolist(),
             "completion_mask": [0] * 16 + [1] * (knobs.cutoff_len - 16)} for _ in range(n_rows)]
    try:
        model = build.build_model(str(ckpt), knobs, device)
        record["after_load_allocated_gib"] = torch.cuda.memory_allocated() / GIB if on_gpu else None
        tok = _dummy_tokenizer(scratch, vocab)
        trainer = build.build_trainer(model, tok, knobs, rows, [], scratch / "out", device=device,
                                      callbacks=[Timer()])
        record["param_dtypes"] = build.param_dtype_summary(trainer.model)
        t0 = time.perf_counter()
        trainer.train()
        record["oom"] = False
        # steady state: skip the first step (allocator warm-up, kernel autotuning)
        if len(times) >= 3:
            per_step = (times[-1] - times[0]) / (len(times) - 1)
        else:
            per_step = (time.perf_counter() - t0) / max(1, len(times))
        tokens_per_step = knobs.micro_batch_size * knobs.grad_accum * knobs.cutoff_len
        record.update({"s_per_step": per_step, "tokens_per_s": tokens_per_step / per_step})
    except torch.OutOfMemoryError as e:
        record.update({"oom": True, "error": str(e).splitlines()[0][:300]})
    except Exception as e:  # noqa: BLE001 - one broken case must not lose the others
        record.update({"oom": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    if on_gpu:
        record.update({
            "torch_max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "torch_max_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "nvml_used_gib": nvml_process_used_gib(torch.cuda.current_device()),
        })
        est = record["estimate"] or {}
        if "peak_gib" in est and record.get("nvml_used_gib"):
            record["estimate_error_pct"] = 100 * (est["peak_gib"] / record["nvml_used_gib"] - 1)
    return record


_TOK: Any = None


def _dummy_tokenizer(scratch: Path, vocab: int) -> Any:
    """A fast tokenizer whose ids cover the vocab (the rows are pre-tokenized; it only pads)."""
    global _TOK
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    _TOK = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t1", eos_token="t2", bos_token="t3")
    return _TOK


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["meta-llama__Llama-3.1-8B"], help="model_configs file stems")
    ap.add_argument("--config", type=Path, nargs="*", default=[], help="extra config.json files")
    ap.add_argument("--cutoff", type=int, nargs="*", default=[1024, 2048])
    ap.add_argument("--micro-batch", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--loss", nargs="*", default=["chunked"], choices=["chunked", "standard"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--tiny", action="store_true", help="shrink each config to 2 layers / hidden 256 (smoke test)")
    ap.add_argument("--scratch", type=Path, default=None, help="where random checkpoints go (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from tuiwiz.planning.knobs import TrainingKnobs

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible; use --device cpu --tiny for a smoke test", file=sys.stderr)
        return 2
    paths = [CONFIGS / f"{m}.json" for m in args.models] + list(args.config)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    scratch_ctx = tempfile.TemporaryDirectory(prefix="tuiwiz-bench-") if args.scratch is None else None
    scratch = args.scratch or Path(scratch_ctx.name)  # type: ignore[union-attr]
    records = []
    for p in paths:
        cfg = json.loads(p.read_text())
        if args.tiny:
            cfg.update({"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                        "vocab_size": min(int(cfg.get("vocab_size", 32000)), 4096)})
            for key in ("layer_types", "rope_scaling"):  # per-layer lists / per-head-dim factors
                cfg.pop(key, None)
            if cfg.get("model_type") == "gemma2":
                cfg["query_pre_attn_scalar"] = 64
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                v = cfg.get(key)  # an explicit None: Phi3Config's default pad id (32000) is outside the vocab too
                cfg[key] = v if isinstance(v, int) and v < cfg["vocab_size"] else None
        for loss in args.loss:
            for cutoff in args.cutoff:
                for mb in args.micro_batch:
                    knobs = TrainingKnobs(micro_batch_size=mb, grad_accum=args.grad_accum, cutoff_len=cutoff,
                                          loss=loss, max_steps=args.steps, save_steps=10**6, logging_steps=1,
                                          val_ratio=0.0, warmup_ratio=0.0)
                    rec = run_case(p, dict(cfg), knobs, args.steps, args.device, scratch)
                    rec.update({"gpu": gpu, "tiny": args.tiny})
                    print(json.dumps({k: rec.get(k) for k in ("model", "oom", "tokens_per_s", "nvml_used_gib",
                                                              "torch_max_allocated_gib", "estimate_error_pct",
                                                              "error")}), flush=True)
                    records.append(rec)
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
    from tuiwiz.train.worker import versions

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"train_gpu-{gpu.replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "versions": versions(), "records": records},
                              indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
