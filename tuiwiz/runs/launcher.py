"""Start a training worker detached from the terminal, so it survives a dropped SSH session.

The worker runs in its own session (start_new_session), reads nothing from the terminal
(stdin is /dev/null) and writes only to RUN_DIR/train.log. The launcher takes the run's
lock before starting it and hands the locked fd down, so the run is "live" from the very
first instant until the last worker process exits.

Before anything is created, `tuiwiz.runs.preflight` checks what the worker will need
(dataset, model, tokenizer, GPUs, packages, disk), so a run that cannot start is refused
with one line instead of failing a second after it was "launched".
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tuiwiz.errors import UserError
from tuiwiz.preset import Preset, load_preset, save_preset
from tuiwiz.runs.cluster import ACCELERATE_CONFIG, launch_args, uses_accelerate, write_accelerate_config
from tuiwiz.runs.paths import RunPaths, check_run_id, default_runs_root, new_run_id
from tuiwiz.runs.preflight import preflight
from tuiwiz.runs.status import (RunStatus, is_live, last_checkpoint, read_status, summarize, take_lock,
                                write_status)

LOCK_FD_ENV = "TUIWIZ_LOCK_FD"


@dataclass(frozen=True)
class LaunchedRun:
    run_id: str
    paths: RunPaths
    pid: int
    argv: tuple[str, ...]
    cpu: bool = False
    warnings: tuple[str, ...] = ()


def worker_argv(preset: Preset, run_dir: Path, *, resume: bool = False, merge: bool = False,
                python: str | None = None, cpu: bool = False) -> list[str]:
    """`python -m tuiwiz.train RUN_DIR`, or `accelerate launch --config_file RUN_DIR/accelerate.yaml`
    (DDP, FSDP or DeepSpeed as planned, tuiwiz.runs.cluster) for more than one process. A CPU run
    starts as many processes as the plan has GPUs (gloo), through the same config."""
    py = python or sys.executable
    tail = [str(run_dir)]
    if resume:
        tail.append("--resume")
    if merge:
        tail.append("--merge")
    if uses_accelerate(preset):
        processes = preset.hardware.count * preset.hardware.nodes
        return [py, "-m", "accelerate.commands.launch",
                *launch_args(str(run_dir / ACCELERATE_CONFIG), processes), *tail]
    return [py, "-m", "tuiwiz.train", *tail]


def worker_env(preset: Preset, base: dict[str, str] | None = None, *, online: bool = False) -> dict[str, str]:
    """The worker's environment: the preset's GPUs, offline Hugging Face unless `online`, this tuiwiz."""
    env = dict(os.environ if base is None else base)
    if preset.hardware.indices:
        # The indices are NVML's, and NVML numbers cards by PCI bus id; CUDA's default order
        # ("fastest first") can differ on mixed machines, so make CUDA count the same way.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in preset.hardware.indices)
    if online:
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)
    else:
        # A detached worker must not stall on (or fail half-way through) a download: everything
        # it loads is local, as the plan was made from local files.
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    # The worker runs with cwd=RUN_DIR: make sure it imports this very tuiwiz (also when not installed).
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not env.get("PYTORCH_CUDA_ALLOC_CONF") and not env.get("PYTORCH_ALLOC_CONF"):
        # the allocator setting the estimate's slack assumes (memory.ALLOCATOR_SLACK): less fragmentation
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return env


def _spawn(paths: RunPaths, argv: list[str], env: dict[str, str], lock_fd: int) -> int:
    env = {**env, LOCK_FD_ENV: str(lock_fd)}
    with open(os.devnull, "rb") as devnull, open(paths.log, "ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
            argv, stdin=devnull, stdout=log, stderr=subprocess.STDOUT, cwd=str(paths.root),
            env=env, start_new_session=True, close_fds=True, pass_fds=(lock_fd,),
        )
    return proc.pid


def absolute(path: str | Path) -> Path:
    """`path` with ~ expanded, made absolute against the current directory (symlinks kept)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def with_absolute_paths(preset: Preset, base: Path) -> Preset:
    """The preset with its file paths made absolute against `base`.

    The worker runs with cwd=RUN_DIR, so a relative dataset or model path must be pinned to
    where the user meant it (the launching directory) before the preset is copied there.
    """
    def pin(value: str | None) -> str | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else Path(os.path.abspath(base / p)))

    model = preset.model
    changes = {"path": pin(model.path), "tokenizer": pin(model.tokenizer)}
    if model.path is None and (base / Path(model.id).expanduser()).is_dir():
        changes["id"] = pin(model.id)  # the worker loads model.id as a folder when it names one
    update: dict[str, object] = {"model": model.model_copy(update=changes)}
    if preset.dataset is not None:
        update["dataset"] = preset.dataset.model_copy(update={"path": pin(preset.dataset.path)})
    return preset.model_copy(update=update)


def _prepare(preset: Preset, base: Path, env: dict[str, str] | None, *, online: bool,
             cpu: bool) -> tuple[Preset, dict[str, str], bool]:
    """Absolute paths, the worker's environment, and whether it runs on the CPU.

    A CPU run hides every GPU from the worker (CUDA_VISIBLE_DEVICES=""); an environment that
    already hides them all is a CPU run too, since that is what the worker will do.
    """
    preset = with_absolute_paths(preset, base)
    wenv = worker_env(preset, env, online=online)
    if cpu:
        wenv["CUDA_VISIBLE_DEVICES"] = ""
    cpu = wenv.get("CUDA_VISIBLE_DEVICES") == ""
    if cpu and preset.training.strategy != "ddp":
        raise UserError(f"training.strategy {preset.training.strategy} needs GPUs (accelerate's FSDP and DeepSpeed "
                        "refuse the CPU); a CPU test run uses strategy ddp.", field="strategy")
    return preset, wenv, cpu


def _unused_id(root: Path, rid: str) -> str:
    """A generated id that no run has yet (two launches in the same second get -2, -3...)."""
    n, out = 1, rid
    while (root / out).exists():
        n += 1
        out = f"{rid}-{n}"
    return out


def _already_live(rid: str, root: Path) -> UserError:
    return UserError(f"run {rid} is already live in {root}; stop it first (`tuiwiz stop {rid}`).")


def launch(preset: Preset | str | Path, runs_root: Path | None = None, *, run_id: str | None = None,
           merge: bool = False, env: dict[str, str] | None = None, online: bool = False,
           cpu: bool = False) -> LaunchedRun:
    """Check the run can start (pre-flight), create RUN_DIR (preset.yaml as launched, with
    absolute paths), start the worker detached, return at once.

    `cpu` runs it on the CPU (tiny test models); `online` lets the worker download the model.
    """
    if not isinstance(preset, Preset):
        preset = load_preset(preset)
    if preset.hardware.nodes > 1:
        raise UserError(f"the plan is for {preset.hardware.nodes} nodes; `launch` starts one machine's run. Start "
                        "it with the plan's SLURM or torchrun export.", field="nodes")
    if merge and preset.training.quant_bits != 16:
        raise UserError("a merged model needs a non-quantized base (training.quant_bits: 16); a 4/8-bit base "
                        "cannot be merged without loss: train without merging or set quant_bits: 16.", field="merge")
    root = absolute(runs_root or default_runs_root())
    rid = check_run_id(run_id) if run_id else _unused_id(root, new_run_id(preset.name or preset.model.id.split("/")[-1]))
    paths = RunPaths(root / rid)
    if paths.root.exists() and is_live(paths):
        raise _already_live(rid, paths.root)
    if paths.preset.exists():
        raise UserError(f"{paths.root} already holds a run; choose another run id, or resume that run "
                        f"(`tuiwiz resume {rid}`).", field="run_id")
    preset, wenv, cpu = _prepare(preset, Path.cwd(), env, online=online, cpu=cpu)
    warnings = preflight(preset, root, online=online, cpu=cpu, merge=merge, env=wenv)
    paths.root.mkdir(parents=True, exist_ok=True)
    lock_fd = take_lock(paths)
    if lock_fd is None:
        raise _already_live(rid, paths.root)
    try:
        save_preset(preset, paths.preset)
        write_accelerate_config(preset, paths.root)
        argv = worker_argv(preset, paths.root, merge=merge, cpu=cpu)
        status = RunStatus(run_id=rid, state="running", launched_at=time.time(), cpu=cpu, online=online)
        write_status(paths, status)
        pid = _spawn(paths, argv, wenv, lock_fd)
        write_status(paths, status.model_copy(update={"pid": pid}))
    finally:
        os.close(lock_fd)
    return LaunchedRun(rid, paths, pid, tuple(argv), cpu, tuple(warnings))


def check_resumable(paths: RunPaths, *, fresh: bool = False) -> None:
    """Refuse a resume that cannot continue: not a run, finished, live, or no checkpoint (unless `fresh`)."""
    if not paths.preset.exists():
        raise UserError(f"{paths.root}: not a run directory (no preset.yaml).")
    state = summarize(paths)
    if state.state == "finished":
        raise UserError(f"run {paths.run_id} is finished (step {state.step}/{state.total_steps or state.step}); "
                        f"nothing to resume. Its adapter is in {paths.adapter}.")
    if state.state == "running":
        raise UserError(f"run {paths.run_id} is still live; stop it first (`tuiwiz stop {paths.run_id}`).")
    if not fresh and last_checkpoint(paths) is None:
        raise UserError(f"run {paths.run_id} has no complete checkpoint in {paths.checkpoints} to resume from; "
                        "launch it again instead.")


def resume(paths: RunPaths, *, env: dict[str, str] | None = None, online: bool | None = None,
           cpu: bool | None = None, fresh: bool = False) -> LaunchedRun:
    """Start the worker again in the same run directory; it continues from the last checkpoint,
    or with `fresh` from step 0 (a re-planned run that failed before it saved one, tuiwiz.runs.replan).

    `online` and `cpu` default to what the run was launched with. The same pre-flight as
    `launch` runs first (relative paths in an old preset.yaml are the worker's: RUN_DIR's).
    """
    paths = RunPaths(absolute(paths.root))
    check_resumable(paths, fresh=fresh)
    preset = load_preset(paths.preset)
    if preset.hardware.nodes > 1:
        raise UserError(f"run {paths.run_id} is for {preset.hardware.nodes} nodes; run its SLURM or torchrun script "
                        "again to resume it.", field="nodes")
    prev = read_status(paths)
    online = online if online is not None else bool(prev and prev.online)
    cpu = cpu if cpu is not None else bool(prev and prev.cpu)
    preset, wenv, cpu = _prepare(preset, paths.root, env, online=online, cpu=cpu)
    warnings = preflight(preset, paths.root.parent, online=online, cpu=cpu, env=wenv)
    lock_fd = take_lock(paths)
    if lock_fd is None:
        raise _already_live(paths.run_id, paths.root)
    try:
        write_accelerate_config(preset, paths.root)
        argv = worker_argv(preset, paths.root, resume=not fresh, cpu=cpu)
        status = RunStatus(run_id=paths.run_id, state="running", launched_at=time.time(), cpu=cpu, online=online,
                           step=prev.step if prev and not fresh else 0, total_steps=prev.total_steps if prev else None)
        write_status(paths, status)
        pid = _spawn(paths, argv, wenv, lock_fd)
        write_status(paths, status.model_copy(update={"pid": pid}))
    finally:
        os.close(lock_fd)
    return LaunchedRun(paths.run_id, paths, pid, tuple(argv), cpu, tuple(warnings))
