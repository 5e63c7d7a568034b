#!/usr/bin/env bash
# Install fp8fx on the GPU machine, run the GPU tests, the Triton config sweep and the GEMM
# benchmark; logs under $OUT (default ./gpu_out); the benchmark table is printed last.
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
python3 -m pytest -q -p no:cacheprovider -o addopts="" -rA tests/test_kernels_gpu.py \
  >"$OUT/gpu_tests.log" 2>&1
echo "gpu tests: $(tail -n 1 "$OUT/gpu_tests.log")"
if [ "${SWEEP:-0}" = 1 ]; then
  python3 -m fp8fx.kernels.bench --sweep --rep 40 --json "$OUT/sweep.json" >"$OUT/sweep.log" 2>&1
  echo "sweep: rc $?"; grep -A200 "best config" "$OUT/sweep.log"
fi
python3 -m fp8fx.kernels.bench --rep ${REP:-60} --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
echo "bench: rc $?"
grep -E "failed|Error" "$OUT/gpu_tests.log" | head -20
sed -n '/^device .*torch/,$p' "$OUT/bench.log" | tail -n 80
