"""GPU calibration grid for the memory estimate, safe to run in 10-minute slices on fresh machines.

    .venv/bin/python bench/memory_grid.py --list                   # points, predicted seconds, total
    .venv/bin/python bench/memory_grid.py --deadline 500           # run what fits in 500 s, resume later
    .venv/bin/python bench/memory_grid.py --summarise              # rebuild json/csv/md from the jsonl
    .venv/bin/python bench/memory_grid.py --device cpu --tiny      # the same code path on CPU (CI)

Each point builds a randomly initialised model of a real catalog architecture (no download)
with the worker's own builder (`tuiwiz.train.build`: NF4 + double quant, k-bit preparation,
peft LoRA, trl SFTTrainer with its fused LM head) and trains a few steps on synthetic
full-length rows (every token scored). It records torch's max allocated and max reserved, the
NVML peak of the process and the estimate. Points:

- grid: fixed knobs covering 0.5B-14B, cutoffs 512-8192, micro-batch 1-8, ranks 8-64,
  checkpointing on/off, sdpa/eager, paged 8-bit and 32-bit AdamW (`GRID` in grid/points.py).
- plan / step_up (the plan check, every grid model): the plan `advise` makes for an 80 GB
  card (H100 80GB) and a simulated 24 GB card (RTX 4090), exactly as the planner does
  (`advise(spec, TrainingKnobs(cutoff_len=C), budget_bytes(card_gib))`, 10% headroom), at a
  cutoff C where memory binds (`Advice.held_back` non-empty). The allocator is capped to the
  card minus the CUDA context measured at start-up (`torch.cuda.set_per_process_memory_fraction`
  does not cover the context). The plan must run without OOM within the card and should use
  >= 85% of the advisor's budget at the NVML level. `Advice.step_up` (one notch bigger, which
  the estimate refused) runs under the same cap: if it also runs within the card, the
  estimate was too conservative for that model ("tightness").

How it runs: the parent imports torch/transformers/peft/trl/bitsandbytes/datasets once and
never initialises CUDA; each point runs in a forked child (a clean CUDA context each), while
the parent polls NVML for the child's pid (fallback: device used minus the baseline before
the child started; `nvml_source` says which). Random checkpoints are drawn on the GPU in a
child, written to /dev/shm when it has room (else --scratch) and removed after the model's
points. A point that fails (error, OOM, crash, timeout) is recorded and the grid goes on.

Resuming: every finished point is appended to RESULTS/memory_grid.jsonl under a stable id
(kind, model, card, knobs). On start the points already there are skipped (`--redo` ignores
them, `--retry-errors` re-runs failed ones). `--deadline S` never starts a point whose
predicted time would pass S seconds from start: it prints how many points remain and exits 0.
The predicted times are a rough prior (grid/timing.py), rescaled by the measured/
predicted ratio of the points already recorded on the same GPU.

Only physically fixed terms are calibrated: the summary fits the CUDA context as
median(NVML peak - torch max reserved) and recomputes the NVML error with it; the measured
reserved/allocated ratio is reported, not fitted. docs/gpu_grid.md has the device procedure.

This file is the command line; the parts live in bench/grid/ (its __init__ lists them).
"""


from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _path in (str(REPO), str(BENCH)):  # tuiwiz, and grid/ however this file is loaded
    if _path not in sys.path:
        sys.path.insert(0, _path)

from grid.points import Point, all_points, catalog_config, select  # noqa: E402
from grid.records import done_ids, read_records, re_estimate  # noqa: E402
from grid.report import write_outputs  # noqa: E402
from grid.runner import Runner  # noqa: E402
from grid.session import Session, StopGrid  # noqa: E402
from grid.slices import SliceResult  # noqa: E402
from grid.stack import NvmlProbe, gpu_info, import_stack, parent_cuda_initialised, versions  # noqa: E402
from grid.timing import Predictor, print_list, time_scale  # noqa: E402

RESULTS = BENCH / "results"
JSONL = "memory_grid.jsonl"


def main(argv: list[str] | None = None) -> int:
    """--summarise rebuilds the outputs from the jsonl; anything else lists the points or runs a slice."""
    args = parse_args(argv)
    if args.summarise:
        return summarise_records(args.results, args.re_estimate)
    return run_grid(args, started=time.monotonic())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="docs/gpu_grid.md: how to run it on a lent GPU in slices")
    ap.add_argument("--results", type=Path, default=None,
                    help="folder of memory_grid.jsonl (default bench/results; with --tiny SCRATCH/results-tiny)")
    ap.add_argument("--list", action="store_true", help="print the points, predicted seconds and the total")
    ap.add_argument("--summarise", "--summarize", action="store_true", help="rebuild json/csv/md from the jsonl")
    ap.add_argument("--re-estimate", action="store_true",
                    help="with --summarise: recompute the estimates with the current code (measurements kept; "
                         "the jsonl is not changed)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds from start; no point starts past it")
    ap.add_argument("--grace", type=float, default=15.0,
                    help="a point still running this many seconds after the deadline is killed (interrupted)")
    ap.add_argument("--redo", action="store_true", help="ignore recorded points")
    ap.add_argument("--retry-errors", action="store_true", help="re-run points recorded as error/crash/timeout")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="shrink each architecture to 2 layers (CI, smoke tests)")
    ap.add_argument("--no-plan-check", action="store_true")
    ap.add_argument("--only", help="regular expression on point ids")
    ap.add_argument("--limit", type=int, help="at most this many points")
    ap.add_argument("--per-kind", type=int, help="at most this many points of each kind (grid/plan/step_up)")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/tuiwiz-grid"),
                    help="checkpoints when /dev/shm lacks room, logs")
    ap.add_argument("--child-mode", choices=("auto", "fork", "spawn"), default="auto")
    ap.add_argument("--point-timeout", type=float, default=120.0, help="minimum per-point timeout (s); "
                    "the timeout is max(this, 4 x predicted)")
    ap.add_argument("--max-failures", type=int, default=3,
                    help="stop after this many consecutive errors/crashes/timeouts (a broken stack; 0: never)")
    args = ap.parse_args(argv)
    if args.results is None:
        args.results = args.scratch / "results-tiny" if args.tiny else RESULTS
    return args


def summarise_records(results: Path, re_estimated: bool) -> int:
    """--summarise: json/csv/md from the jsonl alone (--re-estimate: with the current estimate)."""
    jsonl = results / JSONL
    records = read_records(jsonl)
    if not records:
        print(f"memory_grid: no records in {jsonl}", file=sys.stderr)
        return 1
    if re_estimated:
        records = [re_estimate(r) if r.get("model") and "cutoff_len" in r else r for r in records]
    summary = write_outputs(results, records)
    print(json.dumps({k: v for k, v in summary.items() if k != "plan_check"}, indent=1, default=str))
    print(f"wrote {results}/memory_grid.{{json,csv,md}}")
    return 0


def run_grid(args: argparse.Namespace, started: float) -> int:
    """--list, or one slice: the selected points not yet recorded, as many as the deadline allows."""
    jsonl = args.results / JSONL
    records = read_records(jsonl)
    points = select(all_points(args.tiny, not args.no_plan_check), args.only, args.limit, args.per_kind)
    done = set() if args.redo else done_ids(records, args.retry_errors)
    on_gpu = args.device.startswith("cuda")
    gpu = gpu_info() if on_gpu else {"gpu": "cpu"}
    scale = time_scale(records, gpu.get("gpu"))
    if args.list:
        print_list(points, done, scale, args.tiny)
        return 0
    predictor = Predictor.from_records(records, scale, args.tiny)
    todo = [p for p in points if p.id not in done]
    print(f"memory_grid: {len(points)} points selected, {len(points) - len(todo)} already in {jsonl}, "
          f"{len(todo)} to run (predicted {sum(map(predictor.point, todo)):.0f} s)", flush=True)
    if not todo:
        if records:
            write_outputs(args.results, records)
        return 0
    if args.deadline is not None and time.monotonic() - started + min(map(predictor.point, todo)) > args.deadline:
        print(f"memory_grid: no point fits in the {args.deadline:.0f} s deadline\nmemory_grid: REMAINING {len(todo)}",
              flush=True)
        return 0
    for name, value in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
        os.environ.setdefault(name, value)
    if on_gpu and not gpu.get("gpu"):
        print(f"memory_grid: no GPU visible through NVML ({gpu.get('nvml_error')}); use --device cpu --tiny",
              file=sys.stderr)
        return 2
    session = start_session(args, gpu, todo, records, scale, started)
    return run_slice_and_report(session, args, todo, predictor, started)


def start_session(args: argparse.Namespace, gpu: dict[str, Any], todo: list[Point], records: list[dict[str, Any]],
                  scale: float, started: float) -> Session:
    """Import the stack once in the parent, choose how children start, and say so."""
    on_gpu = args.device.startswith("cuda")
    t0 = time.monotonic()
    notes = import_stack(args.device, {catalog_config(p.model)["model_type"] for p in todo})
    probe = NvmlProbe() if on_gpu else None
    mode = child_mode(args.child_mode, on_gpu, args.scratch, probe, notes)
    env = {**gpu, "versions": versions(), "child_mode": mode}
    print(f"memory_grid: imports {time.monotonic() - t0:.1f} s; {json.dumps(env)}", flush=True)
    for n in notes:
        print(f"memory_grid: note: {n}", flush=True)
    deadline_at = started + args.deadline + args.grace if args.deadline is not None else None
    return Session(device=args.device, scratch=args.scratch, tiny=args.tiny, point_timeout=args.point_timeout,
                   max_failures=args.max_failures, auto_mode=args.child_mode == "auto",
                   runner=Runner(args.scratch, mode, probe, deadline_at), env=env, jsonl=args.results / JSONL,
                   records=records, scale=scale)


def child_mode(requested: str, on_gpu: bool, scratch: Path, probe: NvmlProbe | None, notes: list[str]) -> str:
    """"fork" (each point starts warm) unless asked otherwise, or unless CUDA cannot start in a fork:
    the parent's imports initialised it, or a probe child fails to. Appends the reason to `notes`."""
    if requested != "auto":
        return requested
    if not on_gpu:
        return "fork"
    if parent_cuda_initialised():
        notes.append("the parent's imports initialised CUDA: children are spawned (slower), not forked")
        return "spawn"
    res = Runner(scratch, "fork", probe, None).child({"task": "probe"}, timeout=60)
    if res.get("status") != "ok":
        notes.append(f"a forked child could not start CUDA ({res.get('error')}): children are spawned")
        return "spawn"
    return "fork"


def run_slice_and_report(session: Session, args: argparse.Namespace, todo: list[Point], predictor: Predictor,
                         started: float) -> int:
    """Run the slice, rebuild the outputs from every record, and say whether points remain."""
    try:
        res = session.run(todo, predictor, args.deadline, lambda: time.monotonic() - started)
    except StopGrid as e:
        write_outputs(args.results, session.records)
        print(f"memory_grid: STOPPED: {e}", flush=True)
        return 3
    summary = write_outputs(args.results, session.records)
    report_slice(res, summary["records"], session.jsonl, time.monotonic() - started)
    return 0


def report_slice(res: SliceResult, n_records: int, jsonl: Path, elapsed: float) -> None:
    """The last lines, which docs/gpu_grid.md tells the operator to read: REMAINING N or COMPLETE."""
    left = len(res.left) + len(res.interrupted)
    print(f"memory_grid: ran {len(res.ran)} points in {elapsed:.0f} s; "
          f"{left} left for the next slice ({len(res.interrupted)} interrupted by the deadline); "
          f"{n_records} records in {jsonl}", flush=True)
    if left:
        print(f"memory_grid: REMAINING {left}", flush=True)
    else:
        print("memory_grid: COMPLETE: every selected point is recorded", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
