#!/usr/bin/env bash
# One GPU check, meant to finish in under 8 minutes on one H100/H200 with no network.
# Runs the GPU tests (compiled Triton vs torch, CuPy fit/scoring vs numpy) and the GPU benchmarks,
# and writes a CSV/Markdown summary to ${OUT:-benchmarks/results}/gpu_check.{csv,md}.
#
# Needs a Python with torch, triton and cupy (a GPU image has them); the package's other
# dependencies (numpy, scipy, pyarrow, tqdm, psutil, transformers for the extraction tests, pytest)
# may be carried as wheels: set WHEELS=/path/to/wheels to install them with --no-index first.
# Usage: bash benchmarks/gpu_check.sh            (from the repository root)
#        GPU_STEPS=bench_extract_gpu bash benchmarks/gpu_check.sh   (only the named steps, comma list)
# bench_extract_gpu (real-size extraction vs the authors' way, ~5 min) also needs transformers,
# tokenizers, Pillow and pyarrow.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET   # compiled kernels on the GPU
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/scalselect-site "$WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/scalselect-site"
fi
STEPS=",${GPU_STEPS:-tests,tests_syrk,bench_instruction_attended_pool,bench_gpu,bench_extract_gpu},"
# build the extension in place (falls back to numpy if it cannot be built); extraction does not use it
case "$STEPS" in
  *,tests,*|*,tests_syrk,*|*,bench_instruction_attended_pool,*|*,bench_gpu,*)
    $PY setup.py build_ext --inplace -q >"$OUTDIR/gpu_build.log" 2>&1 || echo "native build failed; using the numpy fallback" ;;
esac
$PY - <<'PYEOF'
import torch, sys
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import cupy; print("cupy", cupy.__version__)
except Exception as e:
    print("cupy missing:", e)
PYEOF
status=0
run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  case "$STEPS" in *",$name,"*) ;; *) return 0 ;; esac
  local t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$OUTDIR/gpu_$name.log"
  local rc=${PIPESTATUS[0]} t1=$(date +%s)
  echo "$name,$rc,$((t1 - t0))" >>"$OUTDIR/gpu_check.csv"
  [ "$rc" = 0 ] || status=1
}
echo "step,exit_code,seconds" >"$OUTDIR/gpu_check.csv"
run tests 200 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_instruction_attended_pool.py
run tests_syrk 60 env SCALSELECT_GPU_GRAM=syrk $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "cupy or device_gram"
run bench_instruction_attended_pool 60 $PY benchmarks/bench_instruction_attended_pool.py --gpu-only
run bench_gpu 200 $PY benchmarks/bench_gpu.py --n "${GPU_N:-10000000}" --d "${GPU_D:-4096}" --reps "${GPU_REPS:-10}"
run bench_extract_gpu 420 $PY benchmarks/bench_extract_gpu.py --out "$OUTDIR"
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/device: /'
  echo
  echo "| step | exit code | seconds |"; echo "|---|---|---|"
  tail -n +2 "$OUTDIR/gpu_check.csv" | awk -F, '{print "| "$1" | "$2" | "$3" |"}'
  for f in tests tests_syrk bench_instruction_attended_pool bench_gpu bench_extract_gpu; do
    [ -f "$OUTDIR/gpu_$f.log" ] || continue
    echo; echo "## $f"; echo '```'; tail -n 40 "$OUTDIR/gpu_$f.log"; echo '```'
  done
} >"$OUTDIR/gpu_check.md"
cat "$OUTDIR/gpu_check.md"
exit $status
