"""The worst-case probe: the first step of every (re)start takes the longest rows, the rest keeps the
Trainer's seeded shuffle, and the `memory` event puts the measurement next to the estimate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tuiwiz.runs.events import (EstimateLevels, MemoryEvent, MemoryLevels, ReplanEvent, StartEvent, parse_event,
                                read_events)
from tuiwiz.runs.paths import RunPaths
from tuiwiz.runs.view import RunView, memory_levels, memory_summary

REPO = Path(__file__).resolve().parents[1]


def _lengths(n: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randint(5, 500) for _ in range(n)]


def _accelerate_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order the Trainer draws without the probe: accelerate's seedable sampler."""
    from accelerate.data_loader import SeedableRandomSampler

    s = SeedableRandomSampler(range(n), data_seed=seed)
    s.set_epoch(epoch)
    return list(s)


# ---- ordering ----------------------------------------------------------------------------

def test_first_step_holds_the_longest_rows_and_the_rest_keeps_the_trainers_shuffle() -> None:
    from tuiwiz.train.probe import WorstFirstSampler

    lengths, seed = _lengths(101), 42
    sampler = WorstFirstSampler(lengths, micro_batch=2, grad_accum=3, world=1, seed=seed)
    order = list(sampler)
    k = 6
    assert sorted(lengths[i] for i in order[:k]) == sorted(lengths, reverse=True)[:k][::-1]
    assert [lengths[i] for i in order[:k]] == sorted((lengths[i] for i in order[:k]), reverse=True)
    trainer_order = _accelerate_order(101, seed, 0)
    assert order[k:] == [i for i in trainer_order if i not in set(order[:k])]
    assert sorted(order) == list(range(101))


def test_later_epochs_are_the_trainers_own_order() -> None:
    from tuiwiz.train.probe import WorstFirstSampler

    lengths = _lengths(50)
    sampler = WorstFirstSampler(lengths, micro_batch=4, grad_accum=2, world=1, seed=7)
    sampler.set_epoch(1)
    assert list(sampler) == _accelerate_order(50, 7, 1)


def test_data_already_in_the_probe_order_is_not_moved() -> None:
    from tuiwiz.train.probe import worst_first_order

    lengths = _lengths(40)
    perm = sorted(range(40), key=lambda i: -lengths[i])
    assert worst_first_order(perm, lengths, 8, [0]) == perm


def test_a_resume_keeps_what_was_trained_and_starts_with_the_longest_of_the_rest() -> None:
    from tuiwiz.train.probe import WorstFirstSampler

    lengths, k = _lengths(90, seed=3), 8  # micro 2 x accum 2 x 2 GPUs
    first = WorstFirstSampler(lengths, micro_batch=2, grad_accum=2, world=2, seed=1, starts=[0]).order(0)
    resumed = WorstFirstSampler(lengths, micro_batch=2, grad_accum=2, world=2, seed=1, starts=[0, 5]).order(0)
    assert resumed[:5 * k] == first[:5 * k]  # the Trainer skips exactly the rows the first start trained
    rest = resumed[5 * k:]
    assert sorted(lengths[i] for i in rest[:k]) == sorted((lengths[i] for i in rest), reverse=True)[:k][::-1]
    assert sorted(resumed) == list(range(90))  # every row once in the epoch
    again = WorstFirstSampler(lengths, micro_batch=2, grad_accum=2, world=2, seed=1, starts=[0, 5, 9]).order(0)
    assert again[:9 * k] == resumed[:9 * k]  # a second resume replays both earlier starts


@pytest.mark.parametrize("rows,micro,accum,world", [(101, 2, 3, 1), (100, 4, 4, 1), (37, 2, 2, 3), (5, 8, 2, 1)])
def test_steps_per_epoch_is_the_trainers_count(rows: int, micro: int, accum: int, world: int) -> None:
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    from tuiwiz.train.probe import steps_per_epoch

    batches = BatchSampler(SequentialSampler(range(rows)), micro, drop_last=False)
    per_process = len(BatchSamplerShard(batches, num_processes=world, process_index=0, even_batches=True)) \
        if world > 1 else len(batches)
    trainer = max(per_process // accum + int(per_process % accum > 0), 1)  # transformers' formula
    assert steps_per_epoch(rows, micro, accum, world) == trainer


def test_start_chain_follows_resumes_and_forgets_discarded_futures() -> None:
    from tuiwiz.train.probe import start_chain

    def start(step: int, resumed: bool) -> StartEvent:
        return StartEvent(run_id="r", pid=1, device="cpu", versions={}, config={}, total_steps=100, start_step=step,
                          resumed_from="ckpt" if resumed else None, train_samples=9, eval_samples=0)

    assert start_chain([], 0) == [0]
    assert start_chain([start(0, False)], 10) == [0, 10]
    assert start_chain([start(0, False), start(10, True), start(20, True)], 30) == [0, 10, 20, 30]
    # resumed from checkpoint 15 after a start at 20: the start at 20 never happened for this run
    assert start_chain([start(0, False), start(10, True), start(20, True)], 15) == [0, 10, 15]
    # a fresh start (a re-plan before any checkpoint) begins a new chain
    assert start_chain([start(0, False), start(10, True), start(0, False)], 0) == [0]


# ---- measuring -----------------------------------------------------------------------------

@pytest.mark.parametrize("padding_free", [False, True])
def test_real_tokens_count_what_trls_collator_built_without_padding(padding_free: bool) -> None:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tuiwiz.train.probe import TokenMeter

    rows = [{"input_ids": list(range(1, n + 1)), "completion_mask": [1] * n} for n in (7, 3, 5, 2)]
    meter = TokenMeter(first_step_batches=2, inner=DataCollatorForLanguageModeling(pad_token_id=0,
                                                                                 padding_free=padding_free))
    for i in range(0, 4, 2):
        meter(rows[i:i + 2])
    assert meter.first == [10, 7] and meter.first_step == 10 and meter.largest == 10


def test_oom_message_sizes_give_the_overshoot() -> None:
    import torch

    from tuiwiz.train.classify import oom_sizes

    exc = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity of 23.54 GiB of which "
        "1.25 GiB is free. Process 4242 has 22.28 GiB memory in use. Of the allocated memory 20.10 GiB is "
        "allocated by PyTorch, and 1.70 GiB is reserved by PyTorch but unallocated.")
    s = oom_sizes(exc)
    assert s is not None and s.tried == 3 * 2**30 and s.free == round(1.25 * 2**30)
    assert s.overshoot == round(1.75 * 2**30)
    assert oom_sizes(torch.OutOfMemoryError("CUDA out of memory (injected)")) is None


def test_memory_summary_compares_each_level_with_the_same_level() -> None:
    ev = MemoryEvent(step=1, probe=True, batch_tokens=4096, gpu="NVIDIA GeForce RTX 4090",
                     measured=MemoryLevels(allocated_gib=11.0, reserved_gib=12.0, nvml_gib=13.0),
                     estimate=EstimateLevels(allocated_gib=10.0, reserved_gib=11.5, peak_gib=14.0))
    assert memory_levels(ev) == [("allocated", 11.0, 10.0), ("reserved", 12.0, 11.5), ("driver peak", 13.0, 14.0)]
    head, line = memory_summary(ev)
    assert head == "step 1 (worst case, 4096 tokens)"
    assert line == "allocated 11.0/10.0 GiB +10%, driver peak 13.0/14.0 GiB -7%"
    assert "-21%" not in line  # 11 allocated against the 14 GiB driver-level peak is the old mistake
    cpu = MemoryEvent(step=1, probe=True, batch_tokens=64)
    assert "CPU" in memory_summary(cpu)[1]
    assert parse_event(cpu.model_dump_json(exclude_none=True)) == cpu


def test_the_slack_term_names_the_allocator_setting_the_worker_sets() -> None:
    from tuiwiz.models import resolve_model
    from tuiwiz.planning.knobs import TrainingKnobs
    from tuiwiz.planning.memory import estimate_memory
    from tuiwiz.preset import preset_from_dict
    from tuiwiz.runs.launcher import worker_env

    est = estimate_memory(resolve_model("meta-llama/Llama-3.2-1B"), TrainingKnobs())
    setting = worker_env(preset_from_dict({"model": {"id": "m"}, "hardware": {"gpu": "g", "memory_gib": 24}}),
                         {})["PYTORCH_CUDA_ALLOC_CONF"]
    assert setting.split(":")[0] in est.term("allocator_slack").why
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    preset = preset_from_dict({"model": {"id": "m"}, "hardware": {"gpu": "g", "memory_gib": 24}})
    assert worker_env(preset, mine)["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in worker_env(preset, {"PYTORCH_ALLOC_CONF": "expandable_segments:False"})


def test_the_view_keeps_the_memory_event_and_a_fresh_replan_starts_a_new_curve() -> None:
    from tuiwiz.runs.events import ErrorEvent, LogEvent

    start = StartEvent(run_id="r", pid=1, device="cuda", versions={}, config={}, total_steps=9,
                       train_samples=9, eval_samples=0)
    mem = MemoryEvent(step=1, probe=True, measured=MemoryLevels(allocated_gib=1.0))
    view = RunView().fold([start, mem, LogEvent(step=1, loss=2.0),
                           ErrorEvent(kind="oom", message="m", suggestion="s", step=1, smaller_plan={"a": 1}),
                           ReplanEvent(attempt=2, knobs={}, changed={"micro_batch_size": [2, 1]})])
    assert view.attempt == 2 and view.train_curve == [] and view.memory is None and view.step == 0
    assert parse_event(view.replans[0].model_dump_json(exclude_none=True)) == view.replans[0]
    view.apply(start.model_copy(update={"attempt": 2}))
    assert view.state == "running" and view.error is None and view.attempt == 2


# ---- the tiny CPU run --------------------------------------------------------------------

@pytest.mark.slow
def test_probe_step_takes_the_longest_sample_even_when_it_is_the_last_row(tmp_path: Path) -> None:
    import torch
    import yaml
    from transformers import AutoTokenizer

    from tiny_model import build_model, corpus_rows, tiny_preset_dict
    from tuiwiz.runs.launcher import launch
    from tuiwiz.runs.status import is_live
    from waiting import wait_until

    model = build_model(tmp_path / "model")
    rows = corpus_rows(30)
    rows.append({"instruction": "say the answer", "input": "", "output": " ".join(["one two three"] * 30)})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    tok = AutoTokenizer.from_pretrained(str(model))
    msgs = [{"role": "user", "content": rows[-1]["instruction"]}, {"role": "assistant", "content": rows[-1]["output"]}]
    longest = len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    cutoff, micro = 64, 2
    # a seed whose plain shuffle would NOT put the last row in the first step (so the probe must move it)
    seed = next(s for s in range(42, 100)
                if torch.randperm(len(rows), generator=torch.Generator().manual_seed(s)).tolist().index(len(rows) - 1)
                >= micro)
    preset = tiny_preset_dict(model, data, max_steps=2, val_ratio=0.0, save_steps=100, eval_steps=100,
                              micro_batch_size=micro, grad_accum=1, cutoff_len=cutoff, seed=seed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUIWIZ_")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TUIWIZ_CALIBRATION": str(tmp_path / "cal.jsonl")})
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(preset))
    run = launch(tmp_path / "preset.yaml", tmp_path / "runs", run_id="probe", env=env, cpu=True)
    wait_until(lambda: run.paths.events.exists() and not is_live(run.paths), "the run to end", timeout=180)
    events = read_events(run.paths.events)
    memory = [e for e in events if isinstance(e, MemoryEvent)]
    assert events[-1].event == "done", run.paths.log.read_text()[-2000:]
    probe, end = memory
    assert probe.probe and probe.step == 1 and probe.batch_tokens is not None
    assert probe.batch_tokens >= min(longest, cutoff) and longest > cutoff
    assert probe.gpu is None and probe.measured == MemoryLevels()  # CPU: nothing measured, still written
    assert probe.estimate is not None and probe.estimate.peak_gib >= probe.estimate.reserved_gib
    assert not end.probe and end.step == 2
    assert not (tmp_path / "cal.jsonl").exists()  # no GPU, no calibration record


def test_runs_lists_the_memory_event_level_by_level_within_80_columns(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from tuiwiz.runs.cli import run_command
    from tuiwiz.runs.events import DoneEvent, EventWriter

    run = tmp_path / "a-long-run-identifier-for-the-memory-line-20260101-000000"
    run.mkdir()
    (run / "preset.yaml").write_text("version: 1\n")  # what makes a folder a run
    with EventWriter(run / "events.jsonl") as w:
        w.write(StartEvent(run_id=run.name, pid=1, device="cuda", versions={}, config={}, total_steps=10,
                           train_samples=9, eval_samples=0))
        w.write(MemoryEvent(step=1, probe=True, batch_tokens=16384, gpu="NVIDIA H200",
                            measured=MemoryLevels(allocated_gib=133.1, reserved_gib=135.0, nvml_gib=140.9),
                            estimate=EstimateLevels(allocated_gib=128.8, reserved_gib=131.0, peak_gib=135.3)))
        w.write(DoneEvent(step=10, adapter_path="a"))
    assert run_command("runs", ["--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines())
    assert "allocated 133.1/128.8 GiB +3%, driver peak 140.9/135.3 GiB +4%" in out
    assert run_command("runs", ["--json", "--runs-dir", str(tmp_path)]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["memory"]["measured"]["nvml_gib"] == 140.9 and row["memory"]["estimate"]["peak_gib"] == 135.3


class _FakeNvml:
    """pynvml as far as GpuMeter uses it: one card, and a process list that may not show us."""

    def __init__(self, used: int, procs: list) -> None:  # noqa: ANN001
        self.used, self.procs = used, procs

    def nvmlInit(self) -> None:  # noqa: N802
        pass

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int):  # noqa: ANN201, N802
        from types import SimpleNamespace

        return SimpleNamespace(used=self.used, total=80 * 2**30)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list:  # noqa: N802
        return self.procs

    def nvmlDeviceGetName(self, h: int) -> str:  # noqa: N802
        return "NVIDIA H100 80GB HBM3"


def test_nvml_reading_is_the_process_else_the_device_above_its_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    from types import SimpleNamespace

    import torch

    from tuiwiz.train.probe import GpuMeter

    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda i: i)
    fake = _FakeNvml(used=3 * 2**30, procs=[])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpu = GpuMeter("cuda:0")
    gpu.read_baseline()
    fake.used = 20 * 2**30
    assert gpu.process_bytes() == 17 * 2**30  # NVML cannot see our pid (a container): device minus baseline
    fake.procs = [SimpleNamespace(pid=1, usedGpuMemory=5), SimpleNamespace(pid=os.getpid(), usedGpuMemory=2**34)]
    assert gpu.process_bytes() == 2**34 and gpu.name() == "NVIDIA H100 80GB HBM3"
    assert GpuMeter("cpu").process_bytes() is None and GpuMeter("cpu").name() is None


def test_the_worker_records_the_uncalibrated_estimate_after_the_probe(tmp_path: Path) -> None:
    import threading

    from tiny_model import tiny_preset_dict
    from tuiwiz.models import resolve_model
    from tuiwiz.planning.calibration import read_records
    from tuiwiz.planning.memory import estimate_memory
    from tuiwiz.preset import preset_from_dict
    from tuiwiz.train.probe import GpuMeter
    from tuiwiz.train.worker import Worker

    worker = Worker(RunPaths(tmp_path / "r"), resume=False, merge=False, rank=0, stop_flag=threading.Event())
    worker.preset = preset_from_dict(tiny_preset_dict(tmp_path / "m", tmp_path / "d.json"))
    worker.preset = worker.preset.model_copy(update={"model": worker.preset.model.model_copy(
        update={"id": "meta-llama/Llama-3.2-1B", "path": None})})
    worker.estimate = estimate_memory(resolve_model("meta-llama/Llama-3.2-1B"), worker.preset.training)
    worker.gpu = GpuMeter("cpu")  # no NVML total: the preset's card size is used
    ev = MemoryEvent(step=1, probe=True, gpu="NVIDIA GeForce RTX 4090",
                     measured=MemoryLevels(allocated_gib=3.0, reserved_gib=3.4, nvml_gib=4.1))
    worker._record_calibration(ev)
    worker._record_calibration(ev.model_copy(update={"measured": MemoryLevels(allocated_gib=3.0)}))  # no NVML
    (rec,) = read_records().records  # conftest points TUIWIZ_CALIBRATION at a temporary store
    assert rec.gpu == "NVIDIA GeForce RTX 4090" and rec.measured.nvml_gib == 4.1
    assert rec.estimate.peak_gib == pytest.approx(worker.estimate.peak_gib)
    assert rec.knobs["micro_batch_size"] == worker.preset.training.micro_batch_size


@pytest.mark.slow
def test_the_first_step_after_a_resume_takes_the_longest_remaining_row(tmp_path: Path) -> None:
    import yaml

    from tiny_model import build_model, corpus_rows, tiny_preset_dict
    from tuiwiz.preset import load_preset
    from tuiwiz.runs.control import stop_run
    from tuiwiz.runs.launcher import launch, resume
    from tuiwiz.runs.status import is_live
    from tuiwiz.train.dataset import build_examples
    from waiting import wait_until

    model = build_model(tmp_path / "model")
    rows = corpus_rows(12) + [{"instruction": "say it", "input": "", "output": " ".join(["one two"] * n)}
                              for n in (4, 8, 12, 16, 20)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    preset = tiny_preset_dict(model, data, max_steps=8, val_ratio=0.0, save_steps=100, eval_steps=100,
                              micro_batch_size=1, grad_accum=1, cutoff_len=128)
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(preset))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUIWIZ_")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TUIWIZ_STEP_DELAY": "0.5"})
    run = launch(tmp_path / "preset.yaml", tmp_path / "runs", run_id="resumed", env=env, cpu=True)
    wait_until(lambda: any(isinstance(e, MemoryEvent) for e in read_events(run.paths.events)), "the probe",
               timeout=180)
    assert stop_run(run.paths, wait=60) == "stopped"
    stopped = read_events(run.paths.events)[-1].step
    resume(run.paths, env={**env, "TUIWIZ_STEP_DELAY": "0"})
    wait_until(lambda: not is_live(run.paths), "the resumed run to end", timeout=180)
    events = read_events(run.paths.events)
    assert events[-1].event == "done", run.paths.log.read_text()[-2000:]
    probes = [e for e in events if isinstance(e, MemoryEvent) and e.probe]
    assert [p.step for p in probes] == [1, stopped + 1]
    lengths = [len(r["input_ids"]) for r in build_examples(load_preset(run.paths.preset)).train]
    plain = _accelerate_order(len(lengths), 42, 0)  # the Trainer's own shuffle (seed 42, epoch 0)
    longest = max(range(len(lengths)), key=lambda i: lengths[i])
    first_run = [longest] + [i for i in plain if i != longest]
    remaining = first_run[stopped:]
    assert probes[0].batch_tokens == lengths[longest]
    assert probes[1].batch_tokens == max(lengths[i] for i in remaining)
