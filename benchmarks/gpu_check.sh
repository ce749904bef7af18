#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU and CuPy, in 5 minutes at most:
#
#   1. what the machine is: nvidia-smi, Python and package versions;
#   2. benchmarks/backends.py, NumPy against CuPy: the table (backends.md), the plot (backends.png)
#      and every figure (backends.json) that benchmarks/RESULTS.md and tutorial 06 take;
#   3. the test suite on CuPy (MINILORA_BACKEND=cupy), going on past failures (--maxfail=30), and
#      how many of its tests ran on CuPy: did device work there (tests/conftest.py counts them).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh   # default OUT: runs/gpu_check
#   QUICK=1 bash benchmarks/gpu_check.sh            # backends.py --quick and a named subset
#   STRICT=1 QUICK=1 bash benchmarks/gpu_check.sh   # the same on a CPU, on minilora.strict
#
# STRICT=1 runs everything on minilora.strict, the NumPy stand-in for CuPy, instead of CuPy: no
# GPU needed, which is how tests/test_gpu_check.py checks this script (its times are not a GPU's,
# and the table says so). QUICK=1 runs backends.py --quick and only the tests in QUICK_TESTS.
#
# It uses only what the machine's python3 already has (cupy, numpy, pytest, hypothesis,
# matplotlib, safetensors, tqdm, torch; no network, no virtual environment, no pip): tests that need
# what is missing there (nbclient for the notebooks, transformers, peft, bitsandbytes) skip
# themselves. It writes under $OUT: log.txt (everything it printed), summary.txt (the verdicts and
# counts), device_work.json (the device-work count and the tests that did none) and backends/
# (backends.json, backends.md, backends.png and their manifest). To record a GPU run, copy
# $OUT/backends/ to benchmarks/gpu/: RESULTS.md quotes its table and tutorial 06 shows it.
#
# Time: DEADLINE (default 290 s) bounds the whole script. The benchmark runs first, stopped after
# BENCH_TIMEOUT (default 110 s) if need be; the tests get what is left, less the summary's 15 s.
# A part stopped by its limit still writes what it measured, and reports how far it got; the
# exit status is then not 0. PYTEST_ARGS (default --maxfail=30) and BENCH_ARGS pass options on;
# TESTS (default: the whole suite, or QUICK_TESTS) chooses the tests. Exit status 0 only if the
# benchmark and the tests both pass.

set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || exit 2
OUT="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2  # absolute, before leaving the caller's folder
cd "$ROOT" || exit 2
# the machine's python3 (a GPU machine has what this needs there); a rehearsal on a CPU (STRICT=1)
# takes the project's own environment when there is one, which dev.py setup makes
if [ -z "${PYTHON:-}" ] && [ "${STRICT:-0}" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then
  PYTHON="$ROOT/.venv/bin/python"
fi
PYTHON="${PYTHON:-python3}"
STRICT="${STRICT:-0}"
QUICK="${QUICK:-0}"
DEADLINE="${DEADLINE:-290}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-110}"
PYTEST_ARGS="${PYTEST_ARGS:---maxfail=30}"
BENCH_ARGS="${BENCH_ARGS:-}"
# the quick subset: the ops and their gradients, the step's shards, checkpoints, LoRA on a GPT,
# 4-bit quantization (not the test of this script, tests/test_gpu_check.py, which runs it)
QUICK_TESTS="${QUICK_TESTS:-tests/test_functional.py tests/test_step.py tests/test_checkpoint.py tests/test_lora_gpt.py tests/test_quant.py}"
if [ "$STRICT" = 1 ]; then
  BACKEND=strict; LABEL="the strict stand-in for CuPy"
  # on a small CPU a second BLAS thread only waits for the first (benchmarks/RESULTS.md)
  export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
else
  BACKEND=cupy; LABEL=CuPy
fi
if [ "$QUICK" = 1 ]; then
  TESTS="${TESTS:-$QUICK_TESTS}"
  BENCH_ARGS="--quick $BENCH_ARGS"
else
  TESTS="${TESTS:-tests}"
fi
LOG="$OUT/log.txt"
: >"$LOG"
PARTS="$(mktemp -d)" || exit 2  # each part's own output, for the summary's greps
trap 'rm -rf "$PARTS"' EXIT
rm -f "$OUT/device_work.json" "$OUT/summary.txt"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
unset MINILORA_REFERENCE  # the fast forms, as a user runs them
START=$SECONDS

section() { printf '\n===== %s (%ds)\n' "$1" "$((SECONDS - START))"; }

{
  section "machine"
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  echo "cpu cores: $(nproc 2>/dev/null || echo '?'); backend for this check: $BACKEND"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  section "versions"
  MINILORA_BACKEND= "$PYTHON" - "$BACKEND" <<'EOF'
import importlib
import platform
import sys

print("python", platform.python_version())
for name in ("numpy", "cupy", "pytest", "hypothesis", "matplotlib", "safetensors", "tqdm",
             "torch", "nbclient"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # absent, or present but broken (no driver)
        print(f"{name}: not usable ({type(exc).__name__}: {exc})")
if sys.argv[1] == "cupy":
    try:
        import cupy

        rt, drv = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        print(f"cupy: CUDA runtime {rt}, driver {drv}, device 0 {name}, "
              f"{props['totalGlobalMem'] / 2**30:.0f} GiB")
    except Exception as exc:
        print(f"cupy device query failed: {type(exc).__name__}: {exc}")
import minilora

try:
    minilora.use_backend(sys.argv[1])
    print("minilora", minilora.__version__, "runs on backend", minilora.get_backend())
except minilora.errors.BackendError as exc:
    raise SystemExit(f"minilora cannot use {sys.argv[1]} here: {exc}") from None
EOF
  echo "versions exit status: $?"
} 2>&1 | tee -a "$LOG"

section "benchmarks/backends.py on numpy and $BACKEND (limit ${BENCH_TIMEOUT}s)" | tee -a "$LOG"
# SIGINT first: the script then writes what it measured and says it was interrupted
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
MINILORA_BACKEND= timeout -s INT -k 20 "$BENCH_TIMEOUT" \
  "$PYTHON" benchmarks/backends.py --backends "numpy,$BACKEND" --out "$OUT/backends" $BENCH_ARGS \
  2>&1 | tee "$PARTS/bench.log" | tee -a "$LOG"
BENCH_STATUS=$?

LEFT=$((DEADLINE - (SECONDS - START) - 15))
[ "$LEFT" -lt 30 ] && LEFT=30
{ section "tests on $LABEL (MINILORA_BACKEND=$BACKEND; limit ${LEFT}s)"; echo "tests: $TESTS"; } \
  | tee -a "$LOG"
# SIGINT first: pytest then stops cleanly and still prints its summary and the device-work count
# shellcheck disable=SC2086  # PYTEST_ARGS and TESTS are lists
MINILORA_BACKEND="$BACKEND" MINILORA_DEVICE_WORK_FILE="$OUT/device_work.json" \
  timeout -s INT -k 20 "$LEFT" \
  "$PYTHON" -m pytest -q -p no:cacheprovider --durations=10 $PYTEST_ARGS $TESTS 2>&1 \
  | tee "$PARTS/pytest.log" | tee -a "$LOG"
PYTEST_STATUS=$?

{
  section "summary"
  describe() {
    case "$1" in
      0) echo "passed" ;;
      124|130|2) echo "STOPPED by its time limit or interrupted (status $1)" ;;
      *) echo "FAILED (status $1)" ;;
    esac
  }
  echo "benchmarks/backends.py: $(describe "$BENCH_STATUS")"
  grep -E '^GPT-2 small training|^FAILED|^interrupted' "$PARTS/bench.log"
  echo "tests on $LABEL: $(describe "$PYTEST_STATUS")"
  grep -E '^(FAILED|ERROR)[ :]|^device work|(passed|failed|error|no tests ran).* in [0-9.]+s' \
    "$PARTS/pytest.log" | tail -n 35
  "$PYTHON" - "$OUT/device_work.json" "$LABEL" <<'EOF'
import json
import sys

try:
    with open(sys.argv[1], encoding="utf-8") as f:
        d = json.load(f)
except (OSError, ValueError) as exc:
    raise SystemExit(f"tests that ran on {sys.argv[2]}: not counted ({type(exc).__name__}: the "
                     f"test run ended before its summary)") from None
share = f"{d['device_work'] / d['counted']:.1%}" if d["counted"] else "-"
print(f"tests that ran on {sys.argv[2]} (did device work there): {d['device_work']} of "
      f"{d['counted']} not marked host_only ({share}); {d['host_only']} host_only tests left out")
EOF
  echo "files: $OUT/log.txt, summary.txt, device_work.json, backends/backends.{md,png,json}"
  echo "total ${SECONDS}s"
} 2>&1 | tee "$OUT/summary.txt" | tee -a "$LOG"

[ "$PYTEST_STATUS" -eq 0 ] && [ "$BENCH_STATUS" -eq 0 ]
