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


class UsageError(UserError):
    """Flags that contradict each other."""


def render_error(e: UserError) -> str:
    """A core error in the CLI's words: fields become the flags the user typed."""
    from tuiwiz.planner import flag_for

    if isinstance(e, Clobber):
        return f"{e.path} already exists; pass --force to overwrite it."
    return e.render(flag_for)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _gpu_list(v: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in v.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1, got {v!r}") from None
    if not out or any(i < 0 for i in out):
        raise argparse.ArgumentTypeError(f"expected GPU indices (0 or more) like 0,1, got {v!r}")
    return out


def _count(flag: str):
    """The argparse type of a count flag: a whole number, 1 or more."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"expected 1 or more, got {n}")
        return n

    parse.__name__ = flag.lstrip("-")
    return parse


def _knob_type(name: str):
    """The argparse type of a knob flag: the registry's parser, with its message on failure."""
    from tuiwiz.errors import BadValue
    from tuiwiz.planning.knobs import parse_knob

    def parse(text: str) -> object:
        try:
            return parse_knob(name, text)
        except BadValue as e:
            raise argparse.ArgumentTypeError(f"{e.why} (got {text!r})") from None

    parse.__name__ = name
    return parse


def _knob_metavar(info) -> str:
    if info.kind == "switch":
        return "on|off"
    if info.kind == "choice":
        joined = "|".join(map(str, info.choices))
        return joined if len(joined) <= 20 else "NAME"
    if info.kind == "targets":
        return "attn|all-linear|LIST"
    return "N" if info.kind == "int" else "X"


def _add_knob_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per TrainingKnobs field, generated from its metadata (tuiwiz.planning.knobs.KNOBS)."""
    from tuiwiz.planning.knobs import KNOBS

    for info in KNOBS:
        more = [f"one of {', '.join(map(str, info.choices))}"] if _knob_metavar(info) == "NAME" else []
        if info.optional:
            more.append("none: unset")
        text = info.help + (f" ({'; '.join(more)})" if more else "")
        group.add_argument(info.flag, dest=info.name, type=_knob_type(info.name), metavar=_knob_metavar(info),
                           help=text.replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    from tuiwiz.data.layouts import LAYOUTS
    from tuiwiz.data.stats import PERCENTILE_RANGE

    p = _Parser(
        prog="tuiwiz",
        description="Plan, launch and monitor QLoRA fine-tuning. With no arguments: the wizard on the bundled demo.",
        epilog="Run management: tuiwiz launch PRESET | runs | attach RUN | stop RUN | resume RUN (each has --help). "
               "Measured runs: tuiwiz calibration [--clear].",
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
    g.add_argument("--layout", metavar="NAME", help=f"one of {', '.join(LAYOUTS)} (default: detect)")
    g.add_argument("--sample", type=int, metavar="N", help="profile a uniform random sample of N rows")
    g.add_argument("--percentile", type=float, default=99.0,
                   help=f"cutoff percentile, {PERCENTILE_RANGE[0]:g}-{PERCENTILE_RANGE[1]:g} (default 99)")
    g.add_argument("--strict", action="store_true", help="fail on the first malformed row instead of skipping")
    g.add_argument("--gpu", help="plan for a catalog card (4090, A100-80GB, H100...) or a size (24GB); 'auto' detects")
    g.add_argument("--gpus", type=_gpu_list, metavar="LIST", help="GPU indices to use on this machine, e.g. 0,1")
    g.add_argument("--num-gpus", type=_count("--num-gpus"), metavar="N",
                   help="GPUs per node: N of the --gpu card, or this machine's first N")
    g.add_argument("--nodes", type=_count("--nodes"), metavar="M",
                   help="machines with --num-gpus GPUs each (run it with --export slurm or torchrun)")
    g.add_argument("--preset", help="start from a preset file (its knobs are held fixed)")
    g.add_argument("--no-calibration", action="store_true",
                   help="plan with the priors only, ignoring this GPU's measured runs (tuiwiz calibration)")
    k = p.add_argument_group("training knobs (any you give is held fixed; the advisor chooses the rest)")
    _add_knob_flags(k)
    k.add_argument("--effective-batch", type=int, metavar="E", help="target effective batch (default 16)")
    k.add_argument("--headroom", type=float, default=None, help="fraction of free memory kept spare (default 0.1)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="write the plan as a preset (or --export format) to this file")
    from tuiwiz.exports import EXPORT_FORMATS

    o.add_argument("--export", choices=[f.key for f in EXPORT_FORMATS], default="preset",
                   help="what --out holds: a preset, another trainer's config, an sbatch script (slurm) or a "
                        "per-node launch script (torchrun)")
    o.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    o.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (training only)")
    return p


def _model_changes(ref: str) -> dict[str, object]:
    """A local model folder (or config.json) keeps its path; anything else is a hub id."""
    from pathlib import Path

    from tuiwiz.errors import BadValue

    if not ref.strip():
        raise BadValue("model", ref, "is empty; give a hub id or a model folder")
    if Path(ref).expanduser().exists():
        return {"model": Path(ref).expanduser().resolve().name, "model_path": str(Path(ref).expanduser().resolve())}
    return {"model": ref, "model_path": None}


def request_from_args(args: argparse.Namespace):
    """Turn parsed flags (and an optional preset) into a PlanRequest. Flags beat the preset."""
    from tuiwiz.data_ref import dataset_ref_from_args
    from tuiwiz.errors import BadValue
    from tuiwiz.planner import PlanRequest, request_from_preset
    from tuiwiz.data.stats import PERCENTILE_RANGE
    from tuiwiz.planning.knobs import KNOBS, knobs_from
    from tuiwiz.planning.stacks import residual_conflict
    from tuiwiz.preset import load_preset

    given = {k.name: getattr(args, k.name) for k in KNOBS if getattr(args, k.name) is not None}
    if args.gpu and args.gpus:
        raise UsageError("--gpu (plan for a catalog card) and --gpus (use this machine's GPUs) do not go "
                         "together; give one.")
    _check_shape(args)
    preset = load_preset(args.preset) if args.preset else None
    req = request_from_preset(preset) if preset is not None else PlanRequest()
    if args.export in ("llamafactory", "axolotl"):  # the export runs on that trainer: plan for its stack
        if given.setdefault("trainer", args.export) != args.export:
            raise UsageError(f"--trainer {given['trainer']} and --export {args.export} disagree; "
                             "the exported file runs on the trainer it is written for.")
    knobs = knobs_from({**req.knobs.model_dump(), **given})
    if "residual" in given and (why := residual_conflict(knobs.trainer, knobs.residual)):
        raise BadValue("residual", knobs.residual, why)
    changes: dict[str, object] = dict(knobs=knobs, fixed=req.fixed | frozenset(given))
    if args.model is not None:
        changes.update(_model_changes(args.model))
    if args.tokenizer:
        changes["tokenizer"] = args.tokenizer
    if args.dataset is not None or args.layout:
        changes["dataset"] = dataset_ref_from_args(args.dataset, args.layout, req.dataset)
    elif preset is None and args.model is None and not args.gpu and not args.cutoff_len:
        changes["dataset"] = dataset_ref_from_args(None, None, None)  # the bundled demo
    if args.gpu:
        changes.update(gpu=args.gpu, gpu_indices=None)
    if args.gpus:
        changes.update(gpu_indices=args.gpus, gpu=None, gpu_count=len(args.gpus))
    if args.num_gpus is not None and not args.gpus:
        changes.update(gpu_count=args.num_gpus, gpu_indices=None)
    if args.nodes is not None:
        changes["nodes"] = args.nodes
    if args.effective_batch is not None:
        changes["effective_batch"] = args.effective_batch
        changes["fixed"] = changes["fixed"] | {"effective_batch"}
    if args.headroom is not None:
        changes["headroom"] = args.headroom
    if args.sample is not None:
        if args.sample < 1:
            raise BadValue("sample", args.sample, "must be a positive number of rows")
        changes["sample"] = args.sample
    if not PERCENTILE_RANGE[0] <= args.percentile <= PERCENTILE_RANGE[1]:
        raise BadValue("percentile", args.percentile,
                       f"must be between {PERCENTILE_RANGE[0]:g} and {PERCENTILE_RANGE[1]:g}")
    changes.update(percentile=args.percentile, strict=args.strict)
    if args.trust_remote_code:
        changes["trust_remote_code"] = True
    return dataclasses.replace(req, **changes)


def _check_shape(args: argparse.Namespace) -> None:
    """Hardware-shape flags that contradict each other are a usage error, never silently dropped."""
    if args.gpus and args.num_gpus is not None and args.num_gpus != len(args.gpus):
        raise UsageError(f"--gpus names {len(args.gpus)} GPU(s) but --num-gpus says {args.num_gpus}; give one.")
    if args.gpus and args.nodes is not None and args.nodes > 1:
        raise UsageError("--gpus picks devices on this machine; a run over --nodes gives each node's count "
                         "with --num-gpus (and a card with --gpu).")


def _list_models() -> str:
    from tuiwiz.planner import catalog_specs

    return "\n".join(f"{s.id:<52} {s.params_b:6.2f}B  {s.model_type}" for s in catalog_specs())


def _list_gpus() -> str:
    from tuiwiz.hardware import GPU_CATALOG

    return "\n".join(f"{g.name:<20} {g.published_gb:>4} GB  bf16 {'yes' if g.bf16 else 'no'}" for g in GPU_CATALOG)


def run_auto(args: argparse.Namespace) -> int:
    from tuiwiz.planner import plan_request
    from tuiwiz.report import render_plan

    req = request_from_args(args)
    progress = None
    if req.dataset is not None and not args.json and sys.stderr.isatty():
        from tuiwiz.data import cli_progress_printer

        progress = cli_progress_printer()
    plan = plan_request(req, progress=progress, calibrate=not args.no_calibration)
    if args.out:
        from tuiwiz.exports import write_plan_export

        write_plan_export(plan.to_preset(), args.export, args.out, force=args.force)
    if args.json:
        sys.stdout.write(json.dumps(plan.to_json(), indent=2) + "\n")
    elif args.export != "preset" and not args.out:
        from tuiwiz.exports import plan_export_text

        sys.stdout.write(plan_export_text(plan.to_preset(), args.export))
    else:
        print(render_plan(plan))
        if args.out:
            print(f"\nwrote {args.out}")
    return EXIT_FITS if plan.advice.fits else EXIT_NO_FIT


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
        if argv and argv[0] == "calibration":
            from tuiwiz.calibration_cli import run_calibration

            return run_calibration(argv[1:])
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help, --version, or a usage error already printed in one line
            return e.code if isinstance(e.code, int) else EXIT_USAGE
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
    except UserError as e:
        print(f"tuiwiz: {render_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tuiwiz: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
