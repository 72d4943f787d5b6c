"""The launch files tuiwiz writes, checked by the engines' own code.

accelerate's config loader (`load_config_from_file`, whose ClusterConfig refuses unknown keys),
its launch argument parser, the validation `accelerate launch` runs on them, and the environment
it gives the workers (`prepare_multi_gpu_env`, `prepare_deepspeed_cmd_env`, the FSDP plugin built
from it); torchrun's argument parser; bash itself, running the scripts with stand-ins for srun,
scontrol and the Python that would start the workers.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

from tuiwiz.cli import main
from tuiwiz.preset import load_preset, preset_from_dict
from tuiwiz.runs.cluster import (ACCELERATE_CONFIG, accelerate_env, cluster_script, trainer_strategy,
                                 write_accelerate_config)
from tuiwiz.runs.launcher import worker_argv

accelerate = pytest.importorskip("accelerate")
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file  # noqa: E402
from accelerate.commands.launch import _validate_launch_command, launch_command_parser  # noqa: E402
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env  # noqa: E402

STRATEGIES = ("ddp", "fsdp", "fsdp_offload", "zero3", "zero3_offload")
ENGINE_TYPE = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "fsdp_offload": "FSDP", "zero3": "DEEPSPEED",
               "zero3_offload": "DEEPSPEED"}


def _preset(strategy: str = "fsdp", count: int = 2, nodes: int = 1, tmp: Path | None = None):
    d = {"version": 1, "name": "big",
         "model": {"id": "meta-llama/Llama-3.1-70B"},
         "hardware": {"gpu": "H100 80GB", "memory_gib": 79.65, "count": count, "nodes": nodes},
         "training": {"strategy": strategy, "residual": "fp32" if strategy == "ddp" else "bf16",
                      "optim": "adamw_torch"}}
    if tmp is not None:
        data = tmp / "data.json"
        data.write_text("[]")
        d["dataset"] = {"path": str(data), "layout": "alpaca"}
    return preset_from_dict(d)


def _launch_args(argv: list[str]) -> Namespace:
    """What `accelerate launch` makes of the options after `-m accelerate.commands.launch`."""
    return launch_command_parser().parse_args(argv[argv.index("accelerate.commands.launch") + 1:])


# ------------------------------------------------------------------ single node: tuiwiz launch


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_key_of_the_config_is_one_accelerate_reads(strategy: str, tmp_path: Path) -> None:
    path = write_accelerate_config(_preset(strategy), tmp_path)
    cfg = load_config_from_file(str(path))  # raises on a key ClusterConfig does not have
    assert isinstance(cfg, ClusterConfig) and cfg.distributed_type.value == ENGINE_TYPE[strategy]
    assert cfg.num_processes == 2 and cfg.num_machines == 1
    dests = set(vars(launch_command_parser().parse_args(["-m", "tuiwiz.train"])))
    for key in cfg.fsdp_config:  # `accelerate launch` turns each into the argument fsdp_<key>
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in dests, key
    for key in cfg.deepspeed_config:
        assert key in dests, key
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(ClusterConfig.__dataclass_fields__)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_launch_line_passes_accelerates_own_validation(strategy: str, tmp_path: Path) -> None:
    preset = _preset(strategy)
    write_accelerate_config(preset, tmp_path)
    argv = worker_argv(preset, tmp_path, resume=True)
    args, defaults, _ = _validate_launch_command(_launch_args(argv))
    assert args.module and args.training_script == "tuiwiz.train"
    assert args.training_script_args == [str(tmp_path), "--resume"]
    assert args.num_processes == 2
    assert (args.use_fsdp, args.use_deepspeed, args.multi_gpu) == (
        strategy.startswith("fsdp"), strategy.startswith("zero3"), strategy == "ddp")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_torchrun_environment_is_what_accelerate_launch_sets(strategy: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The torchrun script exports `accelerate_env`: every variable must have accelerate's value,
    and every plugin variable accelerate sets must be there."""
    for key in list(os.environ):
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.delenv(key)
    preset = _preset(strategy)
    write_accelerate_config(preset, tmp_path)
    args, defaults, mp_from_config = _validate_launch_command(_launch_args(worker_argv(preset, tmp_path)))
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, theirs = prepare_deepspeed_cmd_env(args)
    else:
        theirs = prepare_multi_gpu_env(args)
    ours = accelerate_env(preset)
    assert {k: theirs.get(k) for k in ours} == ours
    plugin_vars = {k for k in theirs if k.startswith(("FSDP_", "ACCELERATE_USE_", "ACCELERATE_DEEPSPEED_",
                                                      "ACCELERATE_CONFIG_DS"))}
    assert plugin_vars <= set(ours)


@pytest.mark.parametrize("strategy, offload", [("fsdp", False), ("fsdp_offload", True)])
def test_fsdp_plugin_built_from_that_environment_is_fsdp_qlora(strategy: str, offload: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils import dataclasses as acc_dc

    for key, value in accelerate_env(_preset(strategy)).items():
        monkeypatch.setenv(key, value)
    # sync_module_states makes the plugin ask for the CUDA device; this machine has none. Builds of
    # accelerate 1.16 ask in one of two ways (is_cuda_available, or get_torch_accelerator_backend).
    monkeypatch.setattr(acc_dc, "is_cuda_available", lambda: True, raising=False)
    monkeypatch.setattr(acc_dc, "get_torch_accelerator_backend", lambda *a, **k: ("cuda", acc_dc.torch.cuda),
                        raising=False)
    monkeypatch.setattr(acc_dc.torch.cuda, "current_device", lambda: 0)
    plugin = acc_dc.FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1 and plugin.sharding_strategy.name == "FULL_SHARD"
    assert plugin.cpu_offload.offload_params is offload
    assert plugin.cpu_ram_efficient_loading and plugin.sync_module_states and not plugin.use_orig_params
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and not plugin.activation_checkpointing


def test_a_one_gpu_ddp_plan_runs_the_worker_directly(tmp_path: Path) -> None:
    argv = worker_argv(_preset("ddp", count=1), tmp_path)
    assert argv[1:] == ["-m", "tuiwiz.train", str(tmp_path)]


# ------------------------------------------------------------------ many nodes: sbatch and torchrun


def _stubs(tmp_path: Path, *, unshared: bool = False) -> dict[str, str]:
    """srun, scontrol and a Python that record what they would start. `unshared`: srun's task runs
    on a node that does not see the files the first node wrote in the run directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    hide = 'for a in "$@"; do case "$a" in */.shared-check-*) rm -f "$a";; esac; done\n' if unshared else ""
    scripts = {
        "srun": "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexport SLURM_NODEID=0\n"
                + hide + 'exec "$@"\n',
        "scontrol": "#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n",
        "python": "#!/bin/bash\nif [ \"$1\" = -c ]; then exit 0; fi\n"
                  f"{json.dumps(str(__import__('sys').executable))} -c 'import json,os,sys; "
                  "print(json.dumps({\"argv\": sys.argv[1:], \"env\": dict(os.environ)}))' \"$@\" "
                  f">> {tmp_path / 'started.jsonl'}\n",
    }
    for name, body in scripts.items():
        f = bin_dir / name
        f.write_text(body)
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TUIWIZ_PYTHON": str(bin_dir / "python"),
            "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node-[a-b]"}


def _started(tmp_path: Path) -> list[dict]:
    f = tmp_path / "started.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def _bash_n(script: Path) -> None:
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_cli_writes_an_sbatch_script_for_two_nodes_that_bash_accepts(tmp_path: Path, capsys) -> None:
    out = tmp_path / "job.sbatch"
    code = main(["--auto", "--model", "meta-llama/Llama-3.1-70B", "--gpu", "H100", "--nodes", "2", "--num-gpus", "8",
                 "--cutoff-len", "2048", "--export", "slurm", "--out", str(out)])
    capsys.readouterr()
    assert code == 0
    text = out.read_text()
    _bash_n(out)
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
    assert "filesystem every node mounts" in text


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_sbatch_script_starts_one_accelerate_launch_per_node_that_accelerate_accepts(
        strategy: str, tmp_path: Path) -> None:
    preset = _preset(strategy, count=8, nodes=2, tmp=tmp_path)
    script = tmp_path / "job.sbatch"
    run_dir = tmp_path / "run"
    script.write_text(cluster_script(preset, "slurm", run_dir=str(run_dir)))
    _bash_n(script)
    done = subprocess.run(["bash", str(script)], env=_stubs(tmp_path), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (started,) = _started(tmp_path)
    argv = started["argv"]
    assert argv[:2] == ["-m", "accelerate.commands.launch"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv[2:]))
    assert (args.num_machines, args.num_processes, str(args.machine_rank)) == (2, 16, "0")
    assert args.main_process_ip == "node-a" and args.main_process_port == 29500
    assert args.module and args.training_script == "tuiwiz.train" and args.training_script_args == [str(run_dir)]
    assert load_preset(run_dir / "preset.yaml").training == preset.training
    assert load_config_from_file(str(run_dir / ACCELERATE_CONFIG)).num_machines == 2
    assert started["env"]["HF_HUB_OFFLINE"] == "1"


def test_sbatch_script_resumes_when_the_run_has_a_checkpoint(tmp_path: Path) -> None:
    preset = _preset("fsdp", count=8, nodes=2, tmp=tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "checkpoint-7").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-7" / "trainer_state.json").write_text("{}")
    script = tmp_path / "job.sbatch"
    script.write_text(cluster_script(preset, "slurm", run_dir=str(run_dir)))
    done = subprocess.run(["bash", str(script)], env=_stubs(tmp_path), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (started,) = _started(tmp_path)
    assert started["argv"][-2:] == [str(run_dir), "--resume"]


def test_sbatch_script_refuses_a_run_directory_the_nodes_do_not_share(tmp_path: Path) -> None:
    preset = _preset("fsdp", count=8, nodes=2, tmp=tmp_path)
    script = tmp_path / "job.sbatch"
    script.write_text(cluster_script(preset, "slurm", run_dir=str(tmp_path / "run")))
    done = subprocess.run(["bash", str(script)], env=_stubs(tmp_path, unshared=True), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "filesystem every node mounts" in done.stderr
    assert _started(tmp_path) == []  # nothing was started


def test_sbatch_script_refuses_a_dataset_a_node_does_not_have(tmp_path: Path) -> None:
    preset = _preset("fsdp", count=8, nodes=2, tmp=tmp_path)
    (tmp_path / "data.json").unlink()
    script = tmp_path / "job.sbatch"
    script.write_text(cluster_script(preset, "slurm", run_dir=str(tmp_path / "run")))
    done = subprocess.run(["bash", str(script)], env=_stubs(tmp_path), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "data.json is missing on this node" in done.stderr


@pytest.mark.parametrize("strategy", ["fsdp_offload", "zero3"])
def test_torchrun_script_parses_with_torchruns_parser_and_carries_accelerates_variables(
        strategy: str, tmp_path: Path) -> None:
    from torch.distributed.run import get_args_parser

    preset = _preset(strategy, count=8, nodes=2, tmp=tmp_path)
    run_dir = tmp_path / "run"
    script = tmp_path / "node.sh"
    script.write_text(cluster_script(preset, "torchrun", run_dir=str(run_dir)))
    _bash_n(script)
    (run_dir / ".nodes").mkdir(parents=True)
    (run_dir / ".nodes" / "rank-1").write_text("1")  # the other node has started
    env = {**_stubs(tmp_path), "MASTER_ADDR": "node-a", "NODE_RANK": "0"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (started,) = _started(tmp_path)
    assert started["argv"][:2] == ["-m", "torch.distributed.run"]
    args = get_args_parser().parse_args(started["argv"][2:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 0)
    assert (args.master_addr, args.master_port) == ("node-a", 29500)
    assert args.module and args.training_script == "tuiwiz.train" and args.training_script_args == [str(run_dir)]
    for key, value in accelerate_env(preset).items():
        assert started["env"][key] == value


def test_torchrun_script_waits_for_every_node_then_gives_up(tmp_path: Path) -> None:
    preset = _preset("fsdp", count=8, nodes=2, tmp=tmp_path)
    script = tmp_path / "node.sh"
    script.write_text(cluster_script(preset, "torchrun", run_dir=str(tmp_path / "run")))
    env = {**_stubs(tmp_path), "MASTER_ADDR": "node-a", "NODE_RANK": "0", "TUIWIZ_WAIT_S": "0"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not every node" in done.stderr and _started(tmp_path) == []


# ------------------------------------------------------------------ other trainers' keys


def test_axolotl_gets_fsdp2_keys_and_llamafactory_its_own_zero3_file() -> None:
    keys, notes = trainer_strategy(_preset("fsdp_offload"), "axolotl", "llama")
    assert keys["fsdp_version"] == 2 and keys["fsdp_config"]["offload_params"] is True
    assert keys["fsdp_config"]["transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    keys, notes = trainer_strategy(_preset("zero3"), "llamafactory")
    assert keys == {"deepspeed": "examples/deepspeed/ds_z3_config.json"} and "FORCE_TORCHRUN=1" in notes[-1]
    assert trainer_strategy(_preset("ddp", count=1), "axolotl") == ({}, [])


#: Axolotl's FSDPConfig fields (axolotl src/axolotl/utils/schemas/fsdp.py, the ones its docs list).
AXOLOTL_FSDP_CONFIG_KEYS = {"fsdp_version", "activation_checkpointing", "offload_params", "cpu_ram_efficient_loading",
                            "state_dict_type", "final_state_dict_type", "auto_wrap_policy",
                            "transformer_layer_cls_to_wrap", "reshard_after_forward", "mixed_precision_policy"}


def test_exports_carry_the_strategy_in_each_trainers_own_keys(capsys) -> None:
    base = ["--auto", "--model", "meta-llama/Llama-3.1-70B", "--gpu", "3090", "--num-gpus", "2", "--cutoff-len", "2048"]
    assert main([*base, "--export", "axolotl"]) == 0
    ax = yaml.safe_load(capsys.readouterr().out)
    assert ax["fsdp_version"] == 2 and set(ax["fsdp_config"]) <= AXOLOTL_FSDP_CONFIG_KEYS
    assert ax["fsdp_config"]["offload_params"] is True  # the plan offloads: so does the export
    assert main([*base, "--strategy", "zero3_offload", "--export", "llamafactory"]) in (0, 3)
    lf = yaml.safe_load(capsys.readouterr().out)
    assert lf["deepspeed"] == "examples/deepspeed/ds_z3_offload_config.json"
