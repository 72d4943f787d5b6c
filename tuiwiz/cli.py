"""Command line: `tuiwiz` (the wizard), `tuiwiz --auto` (headless plan), and run management.

Exit codes: 0 the plan fits; 3 it does not (the plan is still printed); 2 usage or input
error, with a one-line message and no traceback. Nothing here imports torch or Textual
before it is needed, so `--auto` starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from tuiwiz import __version__
from tuiwiz.errors import Clobber, UserError

RUN_COMMANDS = ("launch", "runs", "attach", "stop", "resume")
EXIT_FITS, EXIT_USAGE, EXIT_NO_FIT = 0, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _on_off(v: str) -> bool:
    if v.lower() in ("on", "true", "yes", "1"):
        return True
    if v.lower() in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {v!r}")


def _targets(v: str) -> str | list[str]:
    if v in ("attn", "all-linear"):
        return v
    names = [x.strip() for x in v.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give attn, all-linear or a comma-separated list of module names")
    return names


def _gpu_list(v: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in v.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1, got {v!r}") from None
    if not out or any(i < 0 for i in out):
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1, got {v!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tuiwiz",
        description="Plan, launch and monitor QLoRA fine-tuning. With no arguments: the wizard on the bundled demo.",
        epilog="Run management: tuiwiz launch PRESET | runs | attach RUN | stop RUN | resume RUN (each has --help).",
    )
    p.add_argument("--version", action="version", version=f"tuiwiz {__version__}")
    p.add_argument("--auto", action="store_true", help="plan headless (no UI): a table, or JSON with --json")
    p.add_argument("--json", action="store_true", help="with --auto: one JSON object on stdout")
    p.add_argument("--list-models", action="store_true", help="list the built-in model catalog")
    p.add_argument("--list-gpus", action="store_true", help="list the built-in GPU catalog")
    g = p.add_argument_group("what to plan")
    g.add_argument("--model", help="hub id (offline: HF cache or catalog), model folder, or config.json")
    g.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (exact token counts)")
    g.add_argument("--dataset", help="JSON/JSONL/CSV/Parquet file or a saved datasets folder")
    g.add_argument("--layout", help="alpaca | sharegpt | messages | prompt_completion | text (default: detect)")
    g.add_argument("--sample", type=int, metavar="N", help="profile a uniform random sample of N rows")
    g.add_argument("--percentile", type=float, default=99.0, help="cutoff percentile, 95-99 (default 99)")
    g.add_argument("--strict", action="store_true", help="fail on the first malformed row instead of skipping")
    g.add_argument("--gpu", help="plan for a catalog card (4090, A100-80GB, H100...) or a size (24GB); 'auto' detects")
    g.add_argument("--gpus", type=_gpu_list, metavar="LIST", help="GPU indices to use on this machine, e.g. 0,1")
    g.add_argument("--preset", help="start from a preset file (its knobs are held fixed)")
    k = p.add_argument_group("training knobs (any you give is held fixed; the advisor chooses the rest)")
    k.add_argument("--cutoff-len", type=int, metavar="N")
    k.add_argument("--micro-batch", type=int, metavar="B", dest="micro_batch_size")
    k.add_argument("--grad-accum", type=int, metavar="K")
    k.add_argument("--effective-batch", type=int, metavar="E", help="target effective batch (default 16)")
    k.add_argument("--lora-rank", type=int, metavar="R")
    k.add_argument("--lora-alpha", type=int, metavar="A")
    k.add_argument("--target-modules", type=_targets, metavar="attn|all-linear|LIST")
    k.add_argument("--grad-checkpointing", type=_on_off, metavar="on|off")
    k.add_argument("--attn", choices=["sdpa", "flash_attention_2", "eager"])
    k.add_argument("--optim", choices=["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"])
    k.add_argument("--quant", type=int, choices=[4, 8, 16], dest="quant_bits")
    k.add_argument("--loss", choices=["chunked", "standard"], help="chunked: trl's fused log-probs (default)")
    k.add_argument("--packing", type=_on_off, metavar="on|off")
    k.add_argument("--epochs", type=float)
    k.add_argument("--lr", type=float, dest="learning_rate")
    k.add_argument("--headroom", type=float, default=None, help="fraction of free memory kept spare (default 0.1)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="write the plan as a preset (or --export format) to this file")
    o.add_argument("--export", choices=["preset", "llamafactory", "axolotl"], default="preset")
    o.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    o.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (training only)")
    return p


KNOB_FLAGS = ("cutoff_len", "micro_batch_size", "grad_accum", "lora_rank", "lora_alpha", "target_modules",
              "grad_checkpointing", "attn", "optim", "quant_bits", "loss", "packing", "epochs", "learning_rate")


def request_from_args(args: argparse.Namespace):
    """Turn parsed flags (and an optional preset) into a PlanRequest. Flags beat the preset."""
    from pydantic import ValidationError

    from tuiwiz.data_ref import dataset_ref_from_args
    from tuiwiz.planner import PlanRequest, request_from_preset
    from tuiwiz.planning.knobs import TrainingKnobs
    from tuiwiz.preset import load_preset

    given = {name: getattr(args, name) for name in KNOB_FLAGS if getattr(args, name) is not None}
    if args.preset:
        preset = load_preset(args.preset)
        req = request_from_preset(preset)
        base = req.knobs.model_dump()
    else:
        preset = None
        req = PlanRequest()
        base = TrainingKnobs().model_dump()
    try:
        knobs = TrainingKnobs.model_validate({**base, **given})
    except ValidationError as err:
        e = err.errors()[0]
        flag = "--" + str(e["loc"][0]).replace("_", "-")
        raise UserError(f"{flag}: {e['msg']} (got {e.get('input')!r}).") from None
    changes = dict(knobs=knobs, fixed=req.fixed | frozenset(given))
    if args.model:
        changes.update(model=args.model, model_path=None)
    if args.tokenizer:
        changes["tokenizer"] = args.tokenizer
    if args.dataset or args.layout:
        changes["dataset"] = dataset_ref_from_args(args.dataset, args.layout, req.dataset)
    elif preset is None and not args.model and not args.gpu and not args.cutoff_len:
        changes["dataset"] = dataset_ref_from_args(None, None, None)  # the bundled demo
    if args.gpu:
        changes["gpu"] = args.gpu
        changes["gpu_indices"] = None
    if args.gpus:
        changes["gpu_indices"] = args.gpus
        changes["gpu"] = None
    if args.effective_batch is not None:
        changes["effective_batch"] = args.effective_batch
        changes["fixed"] = changes["fixed"] | {"effective_batch"}
    if args.headroom is not None:
        changes["headroom"] = args.headroom
    if args.sample is not None:
        if args.sample < 1:
            raise UserError("--sample must be a positive number of rows.")
        changes["sample"] = args.sample
    if not 95 <= args.percentile <= 99.9:
        raise UserError(f"--percentile must be between 95 and 99.9, got {args.percentile}.")
    changes.update(percentile=args.percentile, strict=args.strict)
    if args.trust_remote_code:
        changes["trust_remote_code"] = True
    return dataclasses.replace(req, **changes)


def _list_models() -> str:
    from tuiwiz.planner import catalog_specs

    return "\n".join(f"{s.id:<52} {s.params_b:6.2f}B  {s.model_type}" for s in catalog_specs())


def _list_gpus() -> str:
    from tuiwiz.hardware import GPU_CATALOG

    return "\n".join(f"{g.name:<20} {g.published_gb:>4} GB  bf16 {'yes' if g.bf16 else 'no'}" for g in GPU_CATALOG)


def run_auto(args: argparse.Namespace) -> int:
    from tuiwiz.planner import make_plan
    from tuiwiz.report import render_plan

    req = request_from_args(args)
    progress = None
    if req.dataset is not None and not args.json and sys.stderr.isatty():
        from tuiwiz.data import cli_progress_printer

        progress = cli_progress_printer()
    plan = make_plan(req, progress=progress)
    if args.out:
        _write_output(plan, args)
    if args.json:
        sys.stdout.write(json.dumps(plan.to_json(), indent=2) + "\n")
    elif args.export != "preset" and not args.out:
        from tuiwiz.exports import export_text

        sys.stdout.write(export_text(plan.to_preset(), args.export))
    else:
        print(render_plan(plan))
        if args.out:
            print(f"\nwrote {args.out}")
    return EXIT_FITS if plan.advice.fits else EXIT_NO_FIT


def _write_output(plan, args: argparse.Namespace) -> None:
    from tuiwiz.atomic import write_text_atomic
    from tuiwiz.preset import save_preset

    preset = plan.to_preset()
    if args.export == "preset":
        save_preset(preset, args.out, force=args.force)
    else:
        from tuiwiz.exports import export_text

        write_text_atomic(args.out, export_text(preset, args.export), force=args.force)


def run_tui(args: argparse.Namespace) -> int:
    from tuiwiz.tui.app import make_app

    req = request_from_args(args)
    app = make_app(req)
    app.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in RUN_COMMANDS:
            from tuiwiz.runs.cli import run_command

            return run_command(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        if args.list_models:
            print(_list_models())
            return 0
        if args.list_gpus:
            print(_list_gpus())
            return 0
        if args.json and not args.auto:
            args.auto = True
        if args.auto:
            return run_auto(args)
        return run_tui(args)
    except Clobber as e:
        print(f"tuiwiz: {e.path} already exists; pass --force to overwrite it.", file=sys.stderr)
        return EXIT_USAGE
    except UserError as e:
        print(f"tuiwiz: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tuiwiz: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
