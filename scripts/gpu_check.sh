#!/usr/bin/env bash
# Install fp8fx on the GPU machine, run the GPU tests (TESTS=...), the Triton config sweep
# (SWEEP=1) and the GEMM benchmark (BENCH=0 skips it); logs under $OUT (default ./gpu_out); the benchmark table is printed last.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv >"$OUT/env.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" >>"$OUT/env.txt" 2>&1
if [ -f pyproject.toml ]; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || echo "pip install failed: using PYTHONPATH" | tee -a "$OUT/install.log"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# GPU test files (TESTS overrides), one log each; a line per file with its pytest summary.
for t in ${TESTS:-tests/test_kernels_gpu.py tests/test_moe_gpu.py tests/test_backend_gpu.py}; do
  log="$OUT/$(basename "$t" .py).log"
  python3 -m pytest -q -p no:cacheprovider -o addopts="" -rf "$t" >"$log" 2>&1
  echo "$t: $(tail -n 1 "$log")"
  grep -E "^FAILED|^ERROR" "$log" | head -20
done
[ "${BENCH:-1}" = 1 ] || exit 0
if [ "${SWEEP:-0}" = 1 ]; then
  python3 -m fp8fx.kernels.bench --sweep --rep 40 --json "$OUT/sweep.json" >"$OUT/sweep.log" 2>&1
  echo "sweep: rc $?"; grep -A200 "best config" "$OUT/sweep.log"
fi
python3 -m fp8fx.kernels.bench --rep ${REP:-60} --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
echo "bench: rc $?"
sed -n '/^device .*torch/,$p' "$OUT/bench.log" | tail -n 80
