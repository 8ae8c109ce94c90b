#!/usr/bin/env bash
# Kernel GPU suite: compiled-Triton kernel tests, then the kernel benchmarks, then a short table with the issue's
# targets (PASS/FAIL per line) printed last. Sized for < 8 minutes on one H100/H200.
#
# Needs: python with torch + triton + pytest (no DALI/Ray/DeepSpeed; kernels/ and tests/kernels/ import none of them).
# Outputs go to $OUT if set, else benchmarks/results/:
#   kernels_gpu_pytest.txt, kernels_gpu_junit.xml, kernels_gpu_bench.txt, kernels_gpu.csv (appended), gpu_info.txt,
#   memory_gpu.txt / memory_gpu.csv (a backbone step's memory with and without grad_checkpointing: not a target)
# Usage: bash benchmarks/gpu_suite.sh            (PYTHON=/path/to/python to pick the interpreter; default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"  # the GPU image has python3 only
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
# Compiled kernels only: the interpreter switch must not leak in (tests/conftest.py sets it only without CUDA).
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

t0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
            "cuda", torch.version.cuda, torch.cuda.get_device_name())'; } > "$DEST/gpu_info.txt" 2>&1
cat "$DEST/gpu_info.txt"

echo "== kernel tests (all of tests/kernels, compiled on the GPU; the AOT-compile check is for GPU-less boxes)"
# Default blocks in the tests (each autotuning candidate is pinned and checked by its own test); the benchmarks
# below autotune as training does.
# With them, the trainer's per-step stop check under NCCL (pretrain.dist.LaggedAny; torch only), which no CPU box runs.
# Triton compiles each test's kernels on the host's cores: with pytest-xdist (in the GPU image) 8 processes share
# the GPU and the Triton cache, and the compiles run side by side.
XDIST=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8" || echo "")
# shellcheck disable=SC2086
SSL_KERNELS_AUTOTUNE=0 timeout 200 "$PY" -m pytest tests/kernels tests/pretrain/test_stop_request.py -q -p no:cacheprovider \
  $XDIST --deselect tests/kernels/test_aot_compile.py \
  --junitxml="$DEST/kernels_gpu_junit.xml" > "$DEST/kernels_gpu_pytest.txt" 2>&1
rc_tests=$?
tail -n 15 "$DEST/kernels_gpu_pytest.txt"
t1=$(date +%s)

echo "== kernel benchmarks"
# BENCH_ARGS=--smoke runs this whole script on a CPU box in about a minute (a check of the script, no numbers).
# shellcheck disable=SC2086
timeout 280 "$PY" benchmarks/bench_kernels.py ${BENCH_ARGS:-} --out "$DEST/kernels_gpu.csv" > "$DEST/kernels_gpu_bench.txt" 2>&1
rc_bench=$?
t2=$(date +%s)

echo "== activation memory: ViT-S/16 and ViT-B/16 at 224, batch 32, with and without grad_checkpointing"
# shellcheck disable=SC2086
timeout 60 "$PY" benchmarks/bench_memory.py ${MEMORY_ARGS:-} --out "$DEST/memory_gpu.csv" > "$DEST/memory_gpu.txt" 2>&1
rc_memory=$?
tail -n 8 "$DEST/memory_gpu.txt"
t3=$(date +%s)

echo
# The device torch sees (gpu_info.txt's second line was a traceback on a box without CUDA)
device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")' \
  2>/dev/null || echo "torch did not import")
echo "== summary ($device)"
# The bench's table: from its header line to the end (targets included).
sed -n '/^op  *shape/,$p' "$DEST/kernels_gpu_bench.txt"
if [ "$rc_bench" -ne 0 ]; then
  echo "bench exited with rc=$rc_bench (124 = timeout); its last lines, then the rows it measured:"
  tail -n 5 "$DEST/kernels_gpu_bench.txt"
  "$PY" benchmarks/bench_kernels.py --report "$DEST/kernels_gpu.csv"
fi
# On a GPU nothing may skip: a skip means the GPU-marked tests did not see CUDA.
if [ "$rc_tests" -ne 0 ]; then tests_status="FAIL (rc=$rc_tests)"
elif tail -n 1 "$DEST/kernels_gpu_pytest.txt" | grep -q skipped; then tests_status="FAIL (tests skipped: no CUDA?)"
else tests_status=PASS; fi
echo "TARGET kernel tests on GPU: $(tail -n 1 "$DEST/kernels_gpu_pytest.txt") -> $tests_status"
echo "TARGET suite time: tests $((t1 - t0)) s + bench $((t2 - t1)) s + memory $((t3 - t2)) s = $((t3 - t0)) s \
(< 480 s) -> $([ $((t3 - t0)) -lt 480 ] && echo PASS || echo FAIL)"
# Not a target, but a failed case or run is a failure of the suite (its exit status had been ignored)
if [ "$rc_memory" -ne 0 ]; then
  echo "memory benchmark: FAIL (rc=$rc_memory; 124 = timeout): $(grep -m 1 -E '^(error|Stopped)' "$DEST/memory_gpu.txt" \
|| tail -n 1 "$DEST/memory_gpu.txt")"
else echo "memory benchmark: PASS"; fi
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ] && [ "$rc_memory" -eq 0 ]
