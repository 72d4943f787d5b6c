#!/usr/bin/env bash
# What a device `run` command calls (docs/gpu_grid.md), from the repository root, carry [".whl"]:
#
#   bash bench/device/run.sh check          # ~1 min: install, versions, GPU, stack check, 3 tiny QLoRA points
#   bash bench/device/run.sh grid 540       # one slice of the grid: stops starting points so that the
#                                           # whole command ends within 540 s (use timeout_s 600)
#   bash bench/device/run.sh grid 540 --retry-errors   # further arguments go to bench/memory_grid.py
#
# Everything it writes lands flat in $OUT (5 files): run.log (this output) and, for `grid`,
# memory_grid.{jsonl,json,csv,md}: the repo's bench/results/memory_grid.jsonl plus this slice's
# points. Copy them back into bench/results/ so that the next call's working tree carries them.
# `check` writes its tiny records under $OUT/check/ (4 more files; never copy them into bench/results).
#
# Rehearsal on a machine without a GPU (tests the flow, not the numbers):
#   RUN_SH_CPU=1 PYTHON=.venv/bin/python OUT=/tmp/out bash bench/device/run.sh grid 120
# uses the current interpreter's packages (no kit install) and runs the grid with --device cpu --tiny.
set -uo pipefail

MODE=${1:-check}
BUDGET=${2:-540}
EXTRA=("${@:3}")
T0=$SECONDS
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${OUT:-/tmp/tuiwiz-out}
PY=${PYTHON:-python3}
CPU=${RUN_SH_CPU:-0}

say() { echo "[run.sh +$((SECONDS - T0))s] $*"; }
die() { say "FAILED: $*"; exit 3; }

main() {
  cd "$REPO" || die "no repository at $REPO"
  case "$MODE" in check|grid) ;; *) die "usage: run.sh check | run.sh grid [BUDGET_S]";; esac
  say "mode $MODE, budget ${BUDGET}s, repo $REPO, OUT $OUT, $($PY --version 2>&1)"
  local grid_args=() check_args=()
  if [ "$CPU" = 1 ]; then
    grid_args=(--device cpu --tiny --scratch /tmp/tuiwiz-rehearsal)
    check_args=(--allow-cpu)
    say "REHEARSAL on CPU: no kit install, --device cpu --tiny"
  else
    install_kit
  fi
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

  # machine and stack: versions, GPU, imports (fail fast, naming what is missing or too old)
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>/dev/null \
    || say "nvidia-smi not available"
  say "cpus $(nproc), RAM $(free -g | awk '/Mem:/{print $2}') GiB," \
      "/dev/shm free $(df -h --output=avail /dev/shm 2>/dev/null | tail -1 | tr -d ' ')," \
      "/tmp free $(df -h --output=avail /tmp | tail -1 | tr -d ' ')"
  $PY bench/device/check_stack.py "${check_args[@]}" || die "the stack check failed (see the FATAL lines above)"
  say "stack ok"

  if [ "$MODE" = check ]; then
    # one tiny real QLoRA point of each kind (grid, plan at 80 GB, its step-up under the capped allocator)
    local dev=(--device cuda --tiny --scratch /tmp/tuiwiz-check)
    [ "$CPU" = 1 ] && dev=("${grid_args[@]}")
    $PY bench/memory_grid.py "${dev[@]}" --only 'Qwen/Qwen2.5-0.5B' --per-kind 1 --redo \
        --results "$OUT/check" --deadline $((BUDGET - (SECONDS - T0) - 15)) || die "the tiny points failed"
    $PY - "$OUT/check/memory_grid.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print({k: r.get(k) for k in ("kind", "status", "max_allocated", "max_reserved", "nvml_peak", "nvml_source",
                                 "ctx_at_init", "cap_bytes", "child_mode", "wall_s", "error")})
EOF
    $PY bench/memory_grid.py --list | tail -4
    say "check done"
    return 0
  fi

  # one slice of the grid, resuming from the records the working tree carried
  if [ "$CPU" = 1 ]; then
    [ -f "$OUT/memory_grid.jsonl" ] || : > "$OUT/memory_grid.jsonl"
  elif [ -f bench/results/memory_grid.jsonl ]; then
    cp bench/results/memory_grid.jsonl "$OUT/memory_grid.jsonl"
  fi
  local remain=$((BUDGET - (SECONDS - T0) - 25))  # 25 s: the last point's grace, the summary, the copy back
  say "grid slice: deadline ${remain}s ($(wc -l < "$OUT/memory_grid.jsonl" 2>/dev/null || echo 0) records carried)"
  $PY bench/memory_grid.py "${grid_args[@]}" --results "$OUT" --deadline "$remain" --grace 10 "${EXTRA[@]}"
  local rc=$?
  [ -f "$OUT/memory_grid.md" ] && head -n 24 "$OUT/memory_grid.md"
  say "grid exit $rc; copy $OUT/memory_grid.* into bench/results/ before the next call"
  return $rc
}

install_kit() {
  # the kit, installed once per machine (a warm machine keeps /tmp/site; the stamp names the kit)
  ls .whl/*.whl >/dev/null 2>&1 || die ".whl/ has no wheels: run bench/device/fetch_wheels.py here and carry ['.whl']"
  local site=/tmp/site stamp
  stamp="$site/.kit-$(ls -l .whl/*.whl | awk '{print $5, $9}' | sha1sum | cut -c1-12)"
  if [ ! -e "$stamp" ]; then
    rm -rf "$site"
    if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    then
      # no pip, or pip refused: these wheels install by extraction (no compiled steps; only dill has scripts)
      say "pip install failed; extracting the wheels into $site instead"
      rm -rf "$site" && mkdir -p "$site" \
        && $PY -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
             "$site" .whl/*.whl \
        || die "could not install .whl/*.whl into $site"
    fi
    touch "$stamp"
    say "installed $(ls .whl/*.whl | wc -l) wheels into $site"
  else
    say "kit already installed in $site (warm machine)"
  fi
  export PYTHONPATH="$site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
}

mkdir -p "$OUT"
main 2>&1 | tee -a "$OUT/run.log"
exit "${PIPESTATUS[0]}"
