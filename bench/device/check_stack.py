"""Fail-fast check of the training stack on a lent GPU machine (run by bench/device/run.sh).

Prints the versions of torch, transformers, peft, trl, bitsandbytes, datasets, pyarrow and
accelerate, the GPU, and then checks, in order, naming what is wrong:
1. every wheel of the kit (.whl/kit.json, written by fetch_wheels.py) is the version imported;
2. the requirements of the kit's packages hold for what the machine has (a package the kit does
   not carry, such as pyarrow for datasets, is named with the version it has and the one needed);
3. the stack imports, bitsandbytes loaded its CUDA library, and a datasets.Dataset can be built.
Exit 0 when the grid can run, 3 when it cannot. Warnings (a requirement not met by a package
that still imports and works) do not stop it; the tiny QLoRA point of `run.sh check` decides.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # after /tmp/site (PYTHONPATH), for tuiwiz
KIT = REPO / ".whl" / "kit.json"
SHOWN = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "pyarrow", "accelerate",
         "huggingface_hub", "tokenizers", "safetensors", "pydantic", "numpy", "pandas")
IMPORTS = ("torch", "numpy", "pyarrow", "pandas", "pydantic", "transformers", "accelerate", "peft", "datasets", "trl",
           "bitsandbytes", "pynvml", "psutil", "yaml", "tuiwiz.train.build")


def version_of(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def requirement_problems(dists: list[str]) -> list[str]:
    """Requirements of `dists` (markers evaluated, extras ignored) that the installed versions miss."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    out = []
    for dist in dists:
        try:
            reqs = md.distribution(dist).requires or []
        except md.PackageNotFoundError:
            continue
        for raw in reqs:
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = version_of(req.name)
            if have is None:
                out.append(f"{req.name} is missing ({dist} {version_of(dist)} needs {req.name}{req.specifier})")
            elif req.specifier and not req.specifier.contains(Version(have.split("+")[0]), prereleases=True):
                out.append(f"{req.name} {have} does not satisfy {dist} {version_of(dist)}: {req.name}{req.specifier}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--allow-cpu", action="store_true", help="rehearsal: no CUDA is a warning, not fatal")
    args = ap.parse_args()
    fatal: list[str] = []
    warn: list[str] = []
    print(f"python {platform.python_version()} at {sys.executable}")
    print("versions: " + ", ".join(f"{d} {version_of(d) or 'MISSING'}" for d in SHOWN))

    kit = json.loads(KIT.read_text()) if KIT.is_file() else {}
    if not kit:
        warn.append(f"{KIT} not found: cannot check the kit's versions (run fetch_wheels.py here and carry .whl)")
    for dist, want in kit.get("carried", {}).items():
        have = version_of(dist)
        if have != want:
            fatal.append(f"{dist}: kit has {want} but {have or 'nothing'} is imported (is /tmp/site first on "
                         "PYTHONPATH? did the pip install fail?)")
    for dist, want in kit.get("stack", {}).items():  # must equal the versions tuiwiz was measured with
        have = version_of(dist)
        if have != want:
            fatal.append(f"{dist} {have or 'missing'} is not the stack version {want}")
    try:
        warn.extend(requirement_problems(sorted(kit.get("stack", {}))))
    except ImportError as e:
        fatal.append(f"cannot check requirements: {e} (packaging comes with transformers' dependencies)")

    for mod in IMPORTS:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - report every broken import
            fatal.append(f"import {mod} failed: {type(e).__name__}: {str(e)[:300]}")

    if "torch" in sys.modules:
        import torch

        print(f"torch CUDA {torch.version.cuda}, available {torch.cuda.is_available()}")
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            print(f"GPU {p.name}, {p.total_memory / 2**30:.2f} GiB, capability {p.major}.{p.minor}, "
                  f"bf16 {torch.cuda.is_bf16_supported()}")
        else:
            (warn if args.allow_cpu else fatal).append("torch sees no CUDA device")
    try:
        import pynvml

        pynvml.nvmlInit()
        print(f"NVML driver {pynvml.nvmlSystemGetDriverVersion()}, devices {pynvml.nvmlDeviceGetCount()}")
    except Exception as e:  # noqa: BLE001
        warn.append(f"NVML not usable ({e}): the grid cannot read NVML peaks")
    if "bitsandbytes" in sys.modules:
        from bitsandbytes import cextension

        lib = type(cextension.lib).__name__
        print(f"bitsandbytes native library: {lib}")
        if lib != "CudaBNBNativeLibrary" and not args.allow_cpu:
            names = sorted(p.name for p in Path(cextension.__file__).parent.glob("libbitsandbytes_*"))
            fatal.append(f"bitsandbytes did not load a CUDA library ({lib}); torch CUDA {torch.version.cuda}; "
                         f"packaged: {', '.join(names)} (fetch_wheels.py --cuda-major keeps which to carry)")
    if "datasets" in sys.modules:
        try:
            from datasets import Dataset

            Dataset.from_list([{"input_ids": [1, 2, 3], "completion_mask": [1, 1, 1]}])
        except Exception as e:  # noqa: BLE001
            fatal.append(f"datasets.Dataset.from_list failed: {type(e).__name__}: {e} "
                         f"(pyarrow {version_of('pyarrow')}; datasets needs "
                         f"{[r for r in (md.requires('datasets') or []) if r.startswith('pyarrow')]})")

    for w in warn:
        print(f"WARNING: {w}")
    for f in fatal:
        print(f"FATAL: {f}")
    print("stack check: " + ("FAILED" if fatal else "ok"))
    return 3 if fatal else 0


if __name__ == "__main__":
    raise SystemExit(main())
