"""Download the wheel kit that lets a lent GPU machine run the grid on OUR stack, into .whl/.

    .venv/bin/python bench/device/fetch_wheels.py           # download, slim bitsandbytes, check sizes
    .venv/bin/python bench/device/fetch_wheels.py --verify  # + install the kit for cp312 here and import what can be

The lent machine (Python 3.12, torch cu130, no network) lacks trl, bitsandbytes, datasets and
pydantic and has other versions of transformers and peft. This script downloads, for cp312
manylinux x86_64, the exact version installed in this checkout's .venv of every package the
machine lacks, has in another version, or has in an unknown version (when the wheel is small),
and writes .whl/kit.json (what was carried and the stack versions run.sh must find).
Never carried: torch, numpy, pandas and pyarrow (large; the machine has them; check_stack.py
reports a version a requirement rejects, e.g. pyarrow for datasets).

The bitsandbytes wheel (43 MB) is slimmed to the CUDA major of the machine's torch (13: the
cuda130/cuda132 libraries, ~7 MB) plus the CPU library: bitsandbytes/cextension.py picks
`libbitsandbytes_cuda{major}{minor}.so` by torch.version.cuda and falls back only within the
same major. The wheel's RECORD is rewritten to match, so pip accepts it.

Finally it checks that .whl plus the working tree (`git ls-files -co --exclude-standard`) fit
in the 64 MiB a device call may carry, with margin.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHL = REPO / ".whl"
MIB = 1024**2
CARRY_LIMIT = 64 * MIB
MARGIN = 8 * MIB  # keep this much of the limit free (results copied into bench/results grow the tree)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

#: What the lent machine has (docs/gpu_grid.md). None: installed, version unknown.
DEVICE: dict[str, str | None] = {
    "torch": "2.11.0", "transformers": "5.17.0", "accelerate": "1.15.0", "huggingface-hub": "1.33.0",
    "tokenizers": "0.23.2", "safetensors": "0.8.0", "numpy": "2.5.2", "tiktoken": "0.14.0",
    "nvidia-ml-py": None, "psutil": None, "pyyaml": None, "jinja2": None, "pandas": None, "pyarrow": None,
    "peft": None, "fsspec": None, "typing-extensions": None,
}
#: What tuiwiz's estimate was measured against: these must be exactly the .venv's versions.
STACK = ("transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate")
#: Needed by the stack and small: carried unless the machine has the same version.
DEPS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "dill",
        "multiprocess", "xxhash", "fsspec")
#: Needed, never carried (too large or tied to the machine's CUDA build).
NEVER = ("torch", "numpy", "pandas", "pyarrow")
#: Needed and present on the machine in a version the stack accepts (checked below against the
#: stack's requirements), or pulled in by torch / huggingface_hub there.
ASSUMED = ("huggingface-hub", "tokenizers", "safetensors", "psutil", "pyyaml", "jinja2", "markupsafe", "packaging",
           "filelock", "tqdm", "regex", "nvidia-ml-py", "python-dateutil", "mpmath", "sympy", "networkx",
           "setuptools", "tiktoken")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def venv_version(name: str) -> str:
    return md.version(name)


def runtime_closure() -> set[str]:
    """Distributions whose modules the stack really imports (this interpreter, CPU)."""
    code = ("import importlib.metadata as md, sys, json\n"
            "import torch, transformers, peft, trl, bitsandbytes, datasets, accelerate\n"
            "from trl import SFTConfig, SFTTrainer\nfrom tuiwiz.train import build\n"
            "m = md.packages_distributions()\n"
            "print(json.dumps(sorted({d for n in list(sys.modules) for d in m.get(n.split('.')[0], [])})))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return {norm(d) for d in json.loads(out.stdout.strip().splitlines()[-1])}


def requirements_on(name: str) -> list[tuple[str, str]]:
    """(dependent, specifier) for every STACK/DEPS package that requires `name` (no extras)."""
    from packaging.requirements import Requirement

    out = []
    for dist in STACK + DEPS:
        for raw in md.distribution(dist).requires or []:
            req = Requirement(raw)
            if norm(req.name) == norm(name) and (req.marker is None or req.marker.evaluate({"extra": ""})):
                out.append((dist, str(req.specifier)))
    return out


def choose() -> tuple[dict[str, str], list[str]]:
    """{dist: version} to carry, and lines explaining every decision."""
    from packaging.version import Version

    carry: dict[str, str] = {}
    lines = []
    for dist in STACK + DEPS:
        want = venv_version(dist)
        have = DEVICE[norm(dist)] if norm(dist) in DEVICE else "absent"
        if have == want:
            lines.append(f"  skip   {dist} {want}: the machine has it")
        else:
            carry[dist] = want
            there = "none" if have == "absent" else have or "an unknown version"
            lines.append(f"  carry  {dist} {want}: the machine has {there}")
    for dist in ASSUMED + NEVER:
        have = DEVICE.get(norm(dist))
        reqs = requirements_on(dist)
        spec = "; ".join(f"{d} {s or 'any'}" for d, s in reqs) or "no stack requirement"
        if have:
            bad = [(d, s) for d, s in reqs if s and not _contains(s, Version(have))]
            verdict = f"REJECTED by {bad}" if bad else "ok"
            lines.append(f"  device {dist} {have}: {verdict} ({spec})")
            if bad and dist not in NEVER:
                carry[dist] = venv_version(dist)
        elif reqs:
            lines.append(f"  device {dist} (version unknown there): needs {spec}; check_stack.py checks it")
    return carry, lines


def _contains(spec: str, v) -> bool:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec).contains(v, prereleases=True)


def download(carry: dict[str, str]) -> list[Path]:
    WHL.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", str(WHL), "-q"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += [f"{d}=={v}" for d, v in sorted(carry.items())]
    subprocess.run(cmd, check=True)
    wanted = {(norm(d), v) for d, v in carry.items()}
    kept = []
    for f in sorted(WHL.glob("*.whl")):
        name, version = f.name.split("-")[:2]
        if (norm(name), version) in wanted:
            kept.append(f)
        else:
            f.unlink()  # another version from an earlier kit
            print(f"  removed stale {f.name}")
    return kept


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_bitsandbytes(wheel: Path, cuda_major: int) -> tuple[int, int]:
    """Drop the native libraries torch cu{major}x cannot load; rewrite RECORD. Returns sizes before/after."""
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda_major}\d+)\.so$")
    drop = re.compile(r"bitsandbytes/libbitsandbytes_\w+\.so$")
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as z:
        infos = z.infolist()
        if not any(drop.search(i.filename) and not keep.search(i.filename) for i in infos):
            return before, before  # already slim
        record = next(i.filename for i in infos if i.filename.endswith(".dist-info/RECORD"))
        tmp = wheel.with_suffix(".tmp")
        rows = []
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for i in infos:
                if i.filename == record or (drop.search(i.filename) and not keep.search(i.filename)):
                    continue
                data = z.read(i.filename)
                out.writestr(i, data, compress_type=zipfile.ZIP_DEFLATED)
                rows.append(f"{i.filename},{_record_hash(data)},{len(data)}")
            rows.append(f"{record},,")
            out.writestr(record, "\n".join(rows) + "\n")
    os.replace(tmp, wheel)
    return before, wheel.stat().st_size


def tree_bytes() -> tuple[int, int]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                         check=True).stdout.split(b"\0")
    files = [REPO / f.decode() for f in out if f]
    sizes = [f.stat().st_size for f in files if f.is_file()]
    return sum(sizes), len(sizes)


def verify(python: str) -> int:
    """Install the kit with the device's command for `python` (3.12) and import what needs no torch."""
    site = Path(tempfile.mkdtemp(prefix="tuiwiz-site-"))
    try:
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, sorted(WHL.glob("*.whl")))],
                       check=True)
        code = ("import importlib.metadata as md, json, sys\n"
                "kit = json.load(open(sys.argv[1]))['carried']\n"
                "bad = {d: md.version(d) for d, v in kit.items() if md.version(d) != v}\n"
                "assert not bad, bad\n"
                "import pydantic, pydantic_core, annotated_types, typing_inspection, typing_extensions, dill, "
                "multiprocess, xxhash, fsspec\n"
                "from tuiwiz.planning.advisor import advise\n"
                "import pathlib; import importlib.util as u\n"
                "bnb = pathlib.Path(u.find_spec('bitsandbytes').submodule_search_locations[0])\n"
                "print('cp312 imports ok; bitsandbytes libraries:', sorted(p.name for p in bnb.glob('*.so')))\n")
        env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "PYTHONNOUSERSITE": "1"}
        r = subprocess.run([python, "-c", code, str(WHL / "kit.json")], env=env, capture_output=True, text=True)
        print(r.stdout.strip() or r.stderr.strip()[-2000:])
        return r.returncode
    finally:
        shutil.rmtree(site, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda-major", type=int, default=13, help="CUDA major of the machine's torch (cu130: 13)")
    ap.add_argument("--verify", nargs="?", const="/root/.pyenv/versions/3.12.1/bin/python3.12", default=None,
                    metavar="PYTHON3.12", help="install the kit for cp312 with this interpreter and import it")
    ap.add_argument("--no-download", action="store_true", help="only check .whl and the sizes")
    args = ap.parse_args()

    carry, lines = choose()
    print("kit decisions (versions from this .venv):")
    print("\n".join(lines))
    closure = runtime_closure()
    known = {norm(d) for d in STACK + DEPS + NEVER + ASSUMED} | {"tuiwiz"}
    # hub 2.x's own HTTP stack here; the machine's hub 1.33 brings its own
    hub_here = {"anyio", "h11", "httpcore2", "httpx2", "idna", "truststore", "hf-xet", "rich", "click", "typer",
                "shellingham", "certifi"}
    unknown = sorted(closure - known - hub_here)
    if unknown:
        print(f"WARNING: the stack imports distributions no table classifies: {unknown}; add them to DEVICE/DEPS")
    if not args.no_download:
        print(f"downloading {len(carry)} wheels into {WHL} ...")
        wheels = download(carry)
        for w in wheels:
            if w.name.startswith("bitsandbytes-"):
                b, a = slim_bitsandbytes(w, args.cuda_major)
                print(f"  slimmed {w.name}: {b / MIB:.1f} MiB -> {a / MIB:.1f} MiB (kept cpu + cuda{args.cuda_major}x)")
        (WHL / "kit.json").write_text(json.dumps({
            "carried": carry, "stack": {d: venv_version(d) for d in STACK},
            "cuda_major": args.cuda_major}, indent=1) + "\n")
    wheels = sorted(WHL.glob("*.whl"))
    missing = [d for d, v in carry.items() if not any(norm(w.name.split("-")[0]) == norm(d) and
                                                      w.name.split("-")[1] == v for w in wheels)]
    kit = sum(f.stat().st_size for f in WHL.iterdir() if f.is_file())
    tree, n = tree_bytes()
    print("\n.whl/ kit:")
    for w in wheels:
        print(f"  {w.stat().st_size / MIB:7.2f} MiB  {w.name}")
    total = kit + tree
    print(f"kit {kit / MIB:.2f} MiB + working tree {tree / MIB:.2f} MiB ({n} files) = {total / MIB:.2f} MiB "
          f"of {CARRY_LIMIT / MIB:.0f} MiB (margin wanted {MARGIN / MIB:.0f} MiB)")
    ok = not missing and total <= CARRY_LIMIT - MARGIN
    if missing:
        print(f"MISSING wheels: {missing}")
    if total > CARRY_LIMIT - MARGIN:
        print("TOO LARGE: drop files from the working tree (untracked artefacts travel too) or slim the kit")
    if ok and args.verify:
        ok = verify(args.verify) == 0
    print("kit: " + ("ok" if ok else "NOT ready"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
