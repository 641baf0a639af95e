#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA GPU and no network, within 8 minutes:
#   1. the tests marked `cuda` (fused shared-input path, per-row batches, torch.compile, lowrank);
#   2. the training (bf16 autocast), inference (fp32, then bf16 weights) and per-row benchmarks (fp32)
#      against PEFT on the GPU,
#      first without the compiled contenders (figures are certain), then again with them while time is left;
#   3. benchmarks/results/<gpu>.json, the "(GPU)" sections of BENCHMARKS.md and a "## GPU run" section.
#
#   benchmarks/gpu.sh [OUT_DIR]      copies the results, BENCHMARKS.md and the logs into OUT_DIR too
#   benchmarks/gpu.sh --rehearse     the same steps on this CPU at tiny sizes (checks the script itself)
#
# It uses whatever python3 holds torch (PYTHON=... to choose) and says so if that torch has no CUDA.
# Packages the machine lacks travel as wheels in .whl/ (git-ignored), installed offline:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform any -d .whl gguf==0.19.0
# On an NVIDIA H200 (torch 2.11 + CUDA 13.0, 2026-12-04) it ran in 5.2 minutes with gguf the only wheel carried.
# The embedded models (182 MB) do not travel: the benchmarks build MiniLM-L6 and SmolLM2-135M from
# their configs (benchmarks/configs/) with random weights, which times the same computation.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${GPU_SCRIPT_SECONDS:-480}
START=$(date +%s)
REHEARSE=0
OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --rehearse) REHEARSE=1 ;;
    *) OUT_DIR="$arg" ;;
  esac
done
left() { echo $((LIMIT - ($(date +%s) - START))); }
say() { echo "== gpu.sh [$(($(date +%s) - START)) s] $*"; }
LOGS=$(mktemp -d)

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/lorakit-site .whl/*.whl \
    || { echo "gpu.sh: installing the carried wheels in .whl/ failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/lorakit-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

$PY - "$REHEARSE" <<'EOF' || exit 2
import importlib, sys
try:
    import torch
except ImportError:
    sys.exit(f"gpu.sh: {sys.executable} cannot import torch; set PYTHON to a python that has a CUDA build of torch")
if sys.argv[1] != "1" and not torch.cuda.is_available():
    sys.exit(f"gpu.sh: torch {torch.__version__} at {torch.__file__} "
             + ("is a CPU-only build (torch.version.cuda is None)" if torch.version.cuda is None else
                f"is built for CUDA {torch.version.cuda} but sees no GPU")
             + "; install a CUDA build of torch or run where a GPU is visible")
missing = [name for name in ("transformers", "peft", "safetensors", "tokenizers", "psutil", "pytest", "yaml", "tqdm")
           if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"gpu.sh: missing packages {missing}; carry them as wheels in .whl/ (see the top of this script)")
where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (rehearsal)"
print(f"gpu.sh: torch {torch.__version__} (CUDA {torch.version.cuda}) on {where}; "
      + ", ".join(f"{n} {importlib.import_module(n).__version__}" for n in ("transformers", "peft")))
EOF

# 1. the tests marked cuda (only the files holding some: others may import what this machine lacks)
files=$(grep -l "mark.cuda" tests/test_*.py | tr '\n' ' ')
say "tests marked cuda: $files"
timeout $(( $(left) > 330 ? 150 : $(left) / 3 )) $PY -m pytest -m cuda -q -p no:cacheprovider $files 2>&1 \
  | tee "$LOGS/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
tests_line=$(grep -E "passed|failed|skipped|error" "$LOGS/gpu-tests.log" | tail -1)

# 2. the benchmarks: certain figures first, the compiled contenders while time is left
quick=""
[ "$REHEARSE" = 1 ] && quick="--quick"
export LORAKIT_BENCH_RANDOM_WEIGHTS=1 LORAKIT_BENCH_PASS=1
[ "$REHEARSE" = 1 ] || export LORAKIT_BENCH_DEVICE=cuda
bench() {  # bench LOGNAME COMPILE NAMES...: one benchmark run within the time left (minus a margin)
  local log=$1 compile=$2; shift 2
  local budget=$(( $(left) - 20 ))
  if [ "$budget" -lt 30 ]; then say "no time left for $*"; return 124; fi
  say "benchmarks $* (compile: $compile), at most $budget s"
  LORAKIT_BENCH_COMPILE=$compile timeout "$budget" $PY -m benchmarks $quick "$@" >"$LOGS/$log.log" 2>&1
  local rc=$?
  tail -3 "$LOGS/$log.log"
  return $rc
}
bench bench-adapters 0 adapters; adapters_rc=$?
export LORAKIT_BENCH_AUTOCAST=bf16  # training as on a GPU: bf16 autocast, fp32 factors
export LORAKIT_BENCH_INFER_DTYPES=fp32,bf16  # inference in fp32, then with the weights in bf16 (how GPUs serve)
bench bench-eager 0 inference training; eager_rc=$?
compiled="not run"
if bench bench-compiled inductor inference training; then compiled="run"; else compiled="not finished in time"; fi

# 3. the summary section, and the files for OUT_DIR
total=$(($(date +%s) - START))
$PY - "$tests_rc" "$tests_line" "$adapters_rc" "$eager_rc" "$compiled" "$total" "$REHEARSE" <<'EOF'
import sys, time
from benchmarks.__main__ import write_section
from benchmarks.harness import describe, machine, machine_name
tests_rc, tests_line, adapters_rc, eager_rc, compiled, total, rehearse = sys.argv[1:]
info = machine()
section = f"""## GPU run

`benchmarks/gpu.sh` ({time.strftime('%Y-%m-%d')}, {int(total) / 60:.1f} min in all). Machine: {describe(info)}
Models: the architectures of MiniLM-L6 and SmolLM2-135M with random weights (the embedded models do not
travel to a machine without network). Results: `benchmarks/results/{machine_name(info)}.json`.

- tests marked `cuda`: {tests_line or 'no output'} (exit {tests_rc})
- benchmarks: adapters exit {adapters_rc}; inference and training exit {eager_rc}; with `torch.compile`: {compiled}
"""
if rehearse == "1":
    print(section)
else:
    write_section(section)
EOF
if [ -n "$OUT_DIR" ]; then
  mkdir -p "$OUT_DIR"
  cp "$LOGS"/*.log BENCHMARKS.md "$OUT_DIR"/ 2>/dev/null
  cp benchmarks/results/cuda-*.json "$OUT_DIR"/ 2>/dev/null
fi
say "done in $total s (limit $LIMIT s)"
[ "$tests_rc" = 0 ] && [ "$eager_rc" = 0 ] && [ "$adapters_rc" = 0 ]
