"""What the engines users already have need to run a plan on many GPUs: accelerate config files,
an sbatch script, a per-node torchrun script, and the strategy keys of other trainers' configs.

Nothing here launches anything or imports accelerate, torch or DeepSpeed: it writes their inputs.
`tests/test_cluster.py` checks every key against the engines' own loaders and parsers
(`accelerate.commands.config.config_args.load_config_from_file`, `launch_command_parser`,
`prepare_multi_gpu_env`, `torch.distributed.run.get_args_parser`).

Single node: `tuiwiz launch` writes RUN_DIR/accelerate.yaml and starts
`accelerate launch --config_file RUN_DIR/accelerate.yaml -m tuiwiz.train RUN_DIR`.
Many nodes: the sbatch script runs one `accelerate launch` per node (srun), the torchrun script
is started by hand on every node. Both write the same preset and config into a run directory
that every node must see, check that it does, and resume from its last checkpoint when run again.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from tuiwiz.atomic import write_text_atomic
from tuiwiz.errors import BadValue
from tuiwiz.planning.strategy import TITLES, engine, offloads
from tuiwiz.preset import Preset, preset_to_yaml
from tuiwiz.runs.paths import default_runs_root, new_run_id

ACCELERATE_CONFIG = "accelerate.yaml"
FORMATS = ("slurm", "torchrun")
#: The rendezvous port of a multi-node run (accelerate's and torchrun's default).
DEFAULT_PORT = 29500
#: FSDP settings of the FSDP-QLoRA recipe (PEFT's `fsdp_config_qlora.yaml`, Answer.AI's defaults):
#: FSDP1, because accelerate 1.15's FSDP2 path skips `cpu_ram_efficient_loading` for 4-bit weights
#: and loads a whole quantized replica per GPU. Trainer's own checkpointing recomputes layers
#: (FSDP's `activation_checkpointing` must stay off beside it), and checkpoints are sharded
#: (the worker switches to a full state dict for the final adapter).
FSDP_SETTINGS: dict[str, Any] = {
    "fsdp_version": 1,
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_backward_prefetch": "BACKWARD_PRE",
    "fsdp_cpu_ram_efficient_loading": True,
    "fsdp_forward_prefetch": False,
    "fsdp_sharding_strategy": "FULL_SHARD",
    "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_sync_module_states": True,
    "fsdp_use_orig_params": False,
    "fsdp_activation_checkpointing": False,
}
#: What `accelerate launch` sets for FSDP whatever the config says (its argument parser's defaults).
FSDP_LAUNCH_DEFAULTS = {"FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_MIN_NUM_PARAMS": "100000000",
                        "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "false"}


# ------------------------------------------------------------------ accelerate's config file


def accelerate_config(preset: Preset) -> dict[str, Any]:
    """The accelerate config (`ClusterConfig` keys) that runs the preset's strategy on its GPUs.

    `mixed_precision` is left to the worker's trainer (bf16 or fp16 from the plan), as in PEFT's
    FSDP-QLoRA config; DeepSpeed reads it from the config, so it is set there.
    """
    k, hw = preset.training, preset.hardware
    kind = engine(k.strategy)
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "distributed_type": {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[kind],
        "downcast_bf16": "no",
        "mixed_precision": k.compute_dtype if kind == "deepspeed" else "no",
        "num_machines": hw.nodes,
        "num_processes": hw.count * hw.nodes,
        "machine_rank": 0,
        "gpu_ids": "all",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if hw.nodes == 1:
        cfg["main_process_port"] = 0  # a free port: two runs on one machine do not collide
    if kind == "fsdp":
        cfg["fsdp_config"] = {**FSDP_SETTINGS, "fsdp_offload_params": offloads(k.strategy)}
    elif kind == "deepspeed":
        device = "cpu" if offloads(k.strategy) else "none"
        cfg["deepspeed_config"] = {
            "zero_stage": 3, "offload_optimizer_device": device, "offload_param_device": device,
            "zero3_init_flag": True, "zero3_save_16bit_model": True, "deepspeed_multinode_launcher": "standard",
        }
    return cfg


def accelerate_config_yaml(preset: Preset) -> str:
    return (f"# accelerate config written by tuiwiz: {TITLES[preset.training.strategy]}\n"
            + yaml.safe_dump(accelerate_config(preset), sort_keys=False))


def write_accelerate_config(preset: Preset, run_dir: Path) -> Path:
    """RUN_DIR/accelerate.yaml for this preset (rewritten at every start: the preset decides)."""
    return write_text_atomic(run_dir / ACCELERATE_CONFIG, accelerate_config_yaml(preset), force=True)


def uses_accelerate(preset: Preset) -> bool:
    """More than one process, or a sharding engine even on one GPU (FSDP offload)."""
    return preset.hardware.count * preset.hardware.nodes > 1 or preset.training.strategy != "ddp"


def launch_args(config: str, processes: int, *, machines: int = 1, machine_rank: str | None = None,
                main_ip: str | None = None, main_port: str | None = None) -> list[str]:
    """`accelerate launch` options (after `-m accelerate.commands.launch`) for the worker module."""
    out = ["--config_file", config, "--num_processes", str(processes)]
    if machines > 1:
        out += ["--num_machines", str(machines), "--machine_rank", str(machine_rank),
                "--main_process_ip", str(main_ip), "--main_process_port", str(main_port)]
    return out + ["-m", "tuiwiz.train"]


def accelerate_env(preset: Preset) -> dict[str, str]:
    """The variables `accelerate launch` gives the worker for this config (prepare_multi_gpu_env,
    prepare_deepspeed_cmd_env): what a plain torchrun start needs for the Trainer to pick the same
    FSDP or DeepSpeed plugin. tests/test_cluster.py compares them with accelerate's own."""
    cfg = accelerate_config(preset)
    env = {"ACCELERATE_MIXED_PRECISION": cfg["mixed_precision"]}
    if "fsdp_config" in cfg:
        env["ACCELERATE_USE_FSDP"] = "true"
        for key, value in cfg["fsdp_config"].items():
            env["FSDP_" + key.removeprefix("fsdp_").upper()] = _env_value(value)
        env.update(FSDP_LAUNCH_DEFAULTS)
    if "deepspeed_config" in cfg:
        ds = cfg["deepspeed_config"]
        env.update({
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_CONFIG_DS_FIELDS": ",".join([*ds, "mixed_precision"]).lower(),
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(ds["zero_stage"]),
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ds["offload_optimizer_device"],
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ds["offload_param_device"],
            "ACCELERATE_DEEPSPEED_ZERO3_INIT": _env_value(ds["zero3_init_flag"]),
            "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": _env_value(ds["zero3_save_16bit_model"]),
        })
    return env


def _env_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# ------------------------------------------------------------------ cluster scripts


def _paths_to_check(preset: Preset) -> list[str]:
    """Local files the worker reads (dataset, model folder, tokenizer): every node must have them."""
    out = [preset.dataset.path] if preset.dataset is not None else []
    out += [p for p in (preset.model.path, preset.model.tokenizer) if p]
    return out


def _preamble(preset: Preset, run_dir: str | None, python: str | None) -> list[str]:
    """Run directory, interpreter, environment, preset.yaml and accelerate.yaml: what both scripts share."""
    rid = new_run_id(preset.name or preset.model.id.split("/")[-1])
    default_dir = run_dir or str(default_runs_root() / rid)
    src = str(Path(__file__).resolve().parents[2])
    return [
        "set -euo pipefail",
        "",
        "# The run directory must be on a filesystem every node mounts (NFS, Lustre, GPFS...): every rank",
        "# reads preset.yaml and writes checkpoints there; rank 0 writes events.jsonl and status.json,",
        "# which `tuiwiz attach RUN_DIR` and `tuiwiz runs` read from any machine that mounts it.",
        f"RUN_DIR=\"${{TUIWIZ_RUN_DIR:-{default_dir}}}\"",
        f"PYTHON=\"${{TUIWIZ_PYTHON:-{python or sys.executable}}}\"",
        f"export RUN_DIR PYTHON PYTHONPATH={shlex.quote(src)}\"${{PYTHONPATH:+:$PYTHONPATH}}\"",
        "export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false",
        "# the worker loads local files only, as the plan was made from them (TUIWIZ_ONLINE=1 lets it download)",
        "if [ \"${TUIWIZ_ONLINE:-0}\" != 1 ]; then export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1; fi",
        "",
        "mkdir -p \"$RUN_DIR\"",
        "if [ ! -f \"$RUN_DIR/preset.yaml\" ]; then",
        "  cat > \"$RUN_DIR/preset.yaml.$$\" <<'TUIWIZ_PRESET'",
        preset_to_yaml(preset).rstrip("\n"),
        "TUIWIZ_PRESET",
        "  mv -f \"$RUN_DIR/preset.yaml.$$\" \"$RUN_DIR/preset.yaml\"",
        "fi",
        f"cat > \"$RUN_DIR/{ACCELERATE_CONFIG}.$$\" <<'TUIWIZ_ACCELERATE'",
        accelerate_config_yaml(preset).rstrip("\n"),
        "TUIWIZ_ACCELERATE",
        f"mv -f \"$RUN_DIR/{ACCELERATE_CONFIG}.$$\" \"$RUN_DIR/{ACCELERATE_CONFIG}\"",
        "",
        "# run again after a stop, a failure or the time limit: it resumes from the last complete checkpoint",
        "RESUME=\"\"",
        "if compgen -G \"$RUN_DIR/checkpoints/checkpoint-*/trainer_state.json\" > /dev/null; then RESUME=--resume; fi",
        "export RESUME",
    ]


#: Run on every node before training: the run directory is the one the first node wrote into, and
#: the preset's files and this tuiwiz are there. $1 is the marker file, the rest the paths to check.
NODE_CHECK = (
    'test -f "$1" || { echo "tuiwiz: $(hostname): $RUN_DIR is not the directory the first node wrote: put '
    'the run directory on a filesystem every node mounts (TUIWIZ_RUN_DIR=/shared/...)" >&2; exit 1; }; '
    'shift; for p in "$@"; do test -e "$p" || { echo "tuiwiz: $(hostname): $p is missing on this node" >&2; '
    'exit 1; }; done; "$PYTHON" -c "import tuiwiz" || { echo "tuiwiz: $(hostname): $PYTHON cannot import '
    'tuiwiz" >&2; exit 1; }'
)


def _script_head(preset: Preset) -> list[str]:
    """The first lines of both scripts: the shebang and what runs where."""
    hw, k = preset.hardware, preset.training
    return ["#!/bin/bash",
            f"# tuiwiz: {preset.model.id} on {hw.nodes} node{'s' if hw.nodes > 1 else ''} x {hw.count} x {hw.gpu}, "
            f"strategy {k.strategy} ({TITLES[k.strategy]})."]


def slurm_script(preset: Preset, *, run_dir: str | None = None, python: str | None = None) -> str:
    """An sbatch script: `preset.hardware.nodes` nodes, one `accelerate launch` per node (srun),
    each starting `count` worker processes; rank 0, on the first node, writes the events."""
    hw = preset.hardware
    nodes, per_node = hw.nodes, hw.count
    launch = " ".join(["\"$PYTHON\" -m accelerate.commands.launch",
                       *map(_q, launch_args(f"$RUN_DIR/{ACCELERATE_CONFIG}", nodes * per_node, machines=nodes,
                                            machine_rank="$SLURM_NODEID", main_ip="$MASTER_ADDR",
                                            main_port="$MASTER_PORT")),
                       "\"$RUN_DIR\" $RESUME"])
    checks = " ".join(shlex.quote(p) for p in _paths_to_check(preset))
    lines = [
        *_script_head(preset),
        "# Submit it from a login node: sbatch THIS_FILE   (TUIWIZ_RUN_DIR=/shared/dir sbatch THIS_FILE to choose",
        "# the run directory). Follow it: tuiwiz attach RUN_DIR. Stop it: scancel --signal=TERM JOBID (each",
        "# worker saves a checkpoint; torchrun gives them 30 s) and sbatch it again to resume.",
        "#SBATCH --job-name=" + _job_name(preset),
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={per_node}",
        "#SBATCH --exclusive",
        "#SBATCH --output=%x-%j.out",
        *_preamble(preset, run_dir, python),
        "",
        "# every node must see the run directory this node just wrote, and the preset's files",
        "check=\"$RUN_DIR/.shared-check-${SLURM_JOB_ID:-$$}\"",
        "date +%s > \"$check\"",
        f"if ! srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(NODE_CHECK)} _ \"$check\" {checks}; then",
        "  rm -f \"$check\"; exit 1",
        "fi",
        "rm -f \"$check\"",
        "",
        "# the first node hosts the rendezvous (sed reads every line: no SIGPIPE under pipefail, as head would)",
        "MASTER_ADDR=\"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | sed -n 1p)\"",
        f"MASTER_PORT=\"${{TUIWIZ_PORT:-{DEFAULT_PORT}}}\"",
        "export MASTER_ADDR MASTER_PORT",
        "# the run's lock, held on this node while the job runs, is how `tuiwiz runs` sees it live",
        "if ! flock --nonblock \"$RUN_DIR/.lock\" true; then echo \"tuiwiz: $RUN_DIR is live already\" >&2; exit 1; fi",
        "exec flock --nonblock \"$RUN_DIR/.lock\" srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "
        + shlex.quote(launch),
        "",
    ]
    return "\n".join(lines)


def torchrun_script(preset: Preset, *, run_dir: str | None = None, python: str | None = None) -> str:
    """A script to start by hand on every node (NODE_RANK=0 on MASTER_ADDR's node): torchrun with a
    static rendezvous over `nodes` nodes, `count` workers each, and the variables `accelerate launch`
    would give them, so the Trainer runs the same FSDP or DeepSpeed plugin."""
    hw = preset.hardware
    nodes, per_node = hw.nodes, hw.count
    env = " ".join(f"{key}={shlex.quote(v)}" for key, v in accelerate_env(preset).items())
    run = " ".join(["\"$PYTHON\" -m torch.distributed.run", f"--nnodes {nodes}", f"--nproc-per-node {per_node}",
                    "--node-rank \"$NODE_RANK\"", "--master-addr \"$MASTER_ADDR\"", "--master-port \"$MASTER_PORT\"",
                    "-m tuiwiz.train \"$RUN_DIR\" $RESUME"])
    checks = " ".join(shlex.quote(p) for p in _paths_to_check(preset))
    lines = [
        *_script_head(preset),
        "# Start it on every node, the same way, with that node's rank (0 on the MASTER_ADDR node):",
        f"#   MASTER_ADDR=first-node NODE_RANK=0 bash THIS_FILE   ...   NODE_RANK={nodes - 1} on the last",
        "# Follow it: tuiwiz attach RUN_DIR. Run it again on every node to resume.",
        f"NNODES={nodes}",
        ": \"${MASTER_ADDR:?set MASTER_ADDR to the address of the node with NODE_RANK=0}\"",
        ": \"${NODE_RANK:?set NODE_RANK to the rank of this node, 0 to $((NNODES - 1))}\"",
        f"MASTER_PORT=\"${{MASTER_PORT:-{DEFAULT_PORT}}}\"",
        *_preamble(preset, run_dir, python),
        "",
        "# every node leaves a mark in the run directory and waits for all of them: a directory that is",
        "# not shared never sees the other nodes' marks",
        "mkdir -p \"$RUN_DIR/.nodes\"",
        "date +%s > \"$RUN_DIR/.nodes/rank-$NODE_RANK\"",
        "deadline=$((SECONDS + ${TUIWIZ_WAIT_S:-600}))",
        "until [ \"$(find \"$RUN_DIR/.nodes\" -name 'rank-*' -mmin -30 | wc -l)\" -ge \"$NNODES\" ]; do",
        "  if [ \"$SECONDS\" -ge \"$deadline\" ]; then",
        "    echo \"tuiwiz: not every node marked $RUN_DIR/.nodes: start this on all $NNODES nodes, with the run"
        " directory on a filesystem they all mount (TUIWIZ_RUN_DIR=/shared/...)\" >&2; exit 1",
        "  fi",
        "  sleep 2",
        "done",
        f"bash -c {shlex.quote(NODE_CHECK)} _ \"$RUN_DIR/preset.yaml\" {checks}",
        "",
        "# what `accelerate launch` would set for this config (FSDP / DeepSpeed plugin, precision)",
        f"export {env}",
        "if [ \"$NODE_RANK\" = 0 ]; then  # rank 0 runs here: its lock tells `tuiwiz runs` the run is live",
        "  if ! flock --nonblock \"$RUN_DIR/.lock\" true; then echo \"tuiwiz: $RUN_DIR is live already\" >&2; exit 1; fi",
        f"  exec flock --nonblock \"$RUN_DIR/.lock\" {run}",
        "fi",
        f"exec {run}",
        "",
    ]
    return "\n".join(lines)


def cluster_script(preset: Preset, fmt: str, *, run_dir: str | None = None, python: str | None = None) -> str:
    """The plan as a cluster launch script: "slurm" (sbatch) or "torchrun" (one per node)."""
    if fmt == "slurm":
        return slurm_script(preset, run_dir=run_dir, python=python)
    if fmt == "torchrun":
        return torchrun_script(preset, run_dir=run_dir, python=python)
    raise BadValue("export", fmt, f"unknown format; choose one of {', '.join(FORMATS)}")


def _q(arg: str) -> str:
    """A launch argument for a bash -c body: variables stay live, everything else quoted."""
    return f"\"{arg}\"" if "$" in arg else shlex.quote(arg)


def _job_name(preset: Preset) -> str:
    import re

    base = preset.name or preset.model.id.rsplit("/", 1)[-1]
    return "tuiwiz-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "run")


# ------------------------------------------------------------------ other trainers' keys

#: Each model type's decoder layer class: what FSDP wraps one unit at a time.
DECODER_LAYERS = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "mixtral": "MixtralDecoderLayer",
                  "qwen2": "Qwen2DecoderLayer", "qwen3": "Qwen3DecoderLayer", "qwen3_moe": "Qwen3MoeDecoderLayer",
                  "gemma": "GemmaDecoderLayer", "gemma2": "Gemma2DecoderLayer", "phi3": "Phi3DecoderLayer"}
#: Their own shipped DeepSpeed ZeRO-3 files (paths inside each trainer's repository).
LF_DEEPSPEED = {False: "examples/deepspeed/ds_z3_config.json", True: "examples/deepspeed/ds_z3_offload_config.json"}
LF_FSDP = {False: "examples/accelerate/fsdp_config.yaml", True: "examples/accelerate/fsdp_config_offload.yaml"}
AXOLOTL_DEEPSPEED = {False: "deepspeed_configs/zero3_bf16.json", True: "deepspeed_configs/zero3_bf16_cpuoffload_all.json"}


def strategy_section(preset: Preset, fmt: str) -> tuple[str, list[str], dict[str, Any]] | None:
    """The "multi-GPU" section of an LLaMA-Factory or Axolotl export (title, comment lines, keys),
    or None for a one-GPU plan: what `tuiwiz.exports` appends to its sections."""
    from tuiwiz.errors import UserError
    from tuiwiz.models import resolve_model

    try:
        model_type = resolve_model(preset.model.path or preset.model.id).model_type
    except UserError:
        model_type = None
    keys, comments = trainer_strategy(preset, fmt, model_type)
    return ("multi-GPU", comments, keys) if keys or comments else None


def trainer_strategy(preset: Preset, fmt: str, model_type: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The keys that make LLaMA-Factory or Axolotl run the plan's strategy, and comment lines for
    the file (how to launch it on the plan's GPUs). `tuiwiz.exports` adds both to its output."""
    k, hw = preset.training, preset.hardware
    kind, off = engine(k.strategy), offloads(k.strategy)
    gpus = hw.count * hw.nodes
    if gpus < 2 and kind == "ddp":
        return {}, []
    where = f"{hw.nodes} nodes x {hw.count} GPUs" if hw.nodes > 1 else f"{hw.count} GPUs"
    if fmt == "llamafactory":
        if kind == "deepspeed":
            return ({"deepspeed": LF_DEEPSPEED[off]},
                    [f"strategy {k.strategy}: LLaMA-Factory's own ZeRO-3 file (path in its repository); on {where}:",
                     "  FORCE_TORCHRUN=1 llamafactory-cli train THIS_FILE"])
        if kind == "fsdp":
            return {}, [f"strategy {k.strategy}: FSDP-QLoRA through accelerate (LLaMA-Factory stores the 4-bit "
                        f"weights in the compute dtype itself); on {where}:",
                        f"  accelerate launch --config_file {LF_FSDP[off]} --num_processes {gpus} src/train.py THIS_FILE"]
        return {}, [f"strategy ddp on {where}: FORCE_TORCHRUN=1 llamafactory-cli train THIS_FILE"]
    if fmt == "axolotl":
        if kind == "deepspeed":
            return {"deepspeed": AXOLOTL_DEEPSPEED[off]}, [f"strategy {k.strategy}: Axolotl's own ZeRO-3 file; "
                                                           f"axolotl train THIS_FILE runs it on {where}"]
        if kind == "fsdp":
            fsdp = {"offload_params": off, "cpu_ram_efficient_loading": True,
                    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT",
                    "reshard_after_forward": True}
            layer = DECODER_LAYERS.get(model_type or "")
            if layer:
                fsdp["transformer_layer_cls_to_wrap"] = layer
            return {"fsdp_version": 2, "fsdp_config": fsdp}, [f"strategy {k.strategy}: FSDP2 in Axolotl's own keys; "
                                                              f"axolotl train THIS_FILE runs it on {where}"]
        return {}, [f"strategy ddp: axolotl train THIS_FILE runs it on {where}"]
    raise BadValue("export", fmt, "strategy keys exist for llamafactory and axolotl")
