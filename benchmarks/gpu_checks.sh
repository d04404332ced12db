#!/usr/bin/env bash
# Every GPU check in one run on a single-GPU machine (no network needed):
# the CUDA tests, the step-time benchmark, the Accelerate launch check and the full study.
# Writes gpu_log.txt, step_time_cuda.json and study.tar.gz under $OUT (default: gpu_out).
# Fashion-MNIST is read from $FASHION_MNIST_DIR (default: .gpu_data/fashion-mnist).
#
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-$PWD/.gpu_data/fashion-mnist}
LOG="$OUT/gpu_log.txt"

section() { printf '\n===== %s (%s) =====\n' "$1" "$(date -u +%H:%M:%S)" | tee -a "$LOG"; }

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

section "CUDA tests"
timeout 180 python -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tail -25 | tee -a "$LOG"

section "step time (benchmarks/step_time.py --device cuda --steps 100 --warmup 10)"
timeout 150 python benchmarks/step_time.py --device cuda --steps 100 --warmup 10 \
  --json "$OUT/step_time_cuda.json" 2>&1 | tee -a "$LOG"

section "accelerate launch"
timeout 100 bash benchmarks/gpu_accelerate_check.sh 2>&1 | tail -40 | tee -a "$LOG"

section "study (full preset)"
timeout "${STUDY_TIMEOUT:-330}" bash benchmarks/run_gpu_study.sh "$OUT/study" 2>&1 | tail -60 | tee -a "$LOG"
tar -czf "$OUT/study.tar.gz" -C "$OUT" study && rm -rf "$OUT/study"
section "done"
