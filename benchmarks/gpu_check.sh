#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU and CuPy:
#
#   1. what the machine is: nvidia-smi, Python and package versions;
#   2. the whole test suite on the CuPy backend (MINILORA_BACKEND=cupy), under a time limit;
#   3. benchmarks/backends.py: NumPy against CuPy, its table, JSON and plot.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh     # default OUT: runs/gpu_check
#
# It uses only what the machine's python3 already has (cupy, numpy, pytest, hypothesis,
# matplotlib, safetensors, tqdm; no network, no virtual environment): tests that need what is
# missing there (nbclient for the notebooks, bitsandbytes) skip themselves. Everything it prints
# also goes to files under $OUT: env.txt, pytest.log, backends.log, summary.txt and
# backends/backends.{json,md,png}. Steps 2 and 3 both run whatever the other does; the exit status
# is 0 only if both pass. About 8 minutes at most on an H200; set PYTEST_TIMEOUT or
# BENCH_TIMEOUT (seconds) to change the limits, PYTEST_ARGS to change pytest's options (default
# -x: stop at the first failure) or choose tests, BENCH_ARGS to pass options to the benchmark.

set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || exit 2
OUT="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2  # absolute, before leaving the caller's folder
cd "$ROOT" || exit 2
PYTHON="${PYTHON:-python3}"
PYTEST_TIMEOUT="${PYTEST_TIMEOUT:-270}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-180}"
PYTEST_ARGS="${PYTEST_ARGS:--x}"
BENCH_ARGS="${BENCH_ARGS:-}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
START=$SECONDS

section() { printf '\n===== %s (%ds)\n' "$1" "$((SECONDS - START))"; }

{
  section "machine"
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  echo "cpu cores: $(nproc 2>/dev/null || echo '?')"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  section "versions"
  "$PYTHON" - <<'EOF'
import importlib
import platform

print("python", platform.python_version())
for name in ("numpy", "cupy", "pytest", "hypothesis", "matplotlib", "safetensors", "tqdm",
             "torch", "nbclient"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # absent, or present but broken (no driver)
        print(f"{name}: not usable ({type(exc).__name__}: {exc})")
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
    minilora.use_backend("cupy")
    print("minilora", minilora.__version__, "runs on backend", minilora.get_backend())
except minilora.errors.BackendError as exc:
    raise SystemExit(f"minilora cannot use CuPy here: {exc}") from None
EOF
  echo "versions exit status: $?"
} 2>&1 | tee "$OUT/env.txt"

section "tests on CuPy (limit ${PYTEST_TIMEOUT}s)" | tee "$OUT/pytest.log"
# SIGINT first: pytest then stops cleanly and still prints its summary of what failed
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of options
MINILORA_BACKEND=cupy timeout -s INT -k 30 "$PYTEST_TIMEOUT" \
  "$PYTHON" -m pytest -q -p no:cacheprovider --durations=15 $PYTEST_ARGS 2>&1 \
  | tee -a "$OUT/pytest.log"
PYTEST_STATUS=$?

section "benchmarks/backends.py (limit ${BENCH_TIMEOUT}s)" | tee "$OUT/backends.log"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout -s INT -k 30 "$BENCH_TIMEOUT" \
  "$PYTHON" benchmarks/backends.py --out "$OUT/backends" $BENCH_ARGS 2>&1 \
  | tee -a "$OUT/backends.log"
BENCH_STATUS=$?

{
  section "summary"
  describe() {
    case "$1" in
      0) echo "passed" ;;
      124|130) echo "TIMED OUT (status $1)" ;;
      *) echo "FAILED (status $1)" ;;
    esac
  }
  echo "tests on CuPy: $(describe "$PYTEST_STATUS")"
  grep -E '^(FAILED|ERROR) |(passed|failed|error|no tests ran).* in [0-9.]+s' \
    "$OUT/pytest.log" | tail -n 25
  echo "benchmarks/backends.py: $(describe "$BENCH_STATUS")"
  grep -E '^GPT-2 small training|^FAILED|^interrupted' "$OUT/backends.log"
  echo "total ${SECONDS}s"
} 2>&1 | tee "$OUT/summary.txt"

[ "$PYTEST_STATUS" -eq 0 ] && [ "$BENCH_STATUS" -eq 0 ]
