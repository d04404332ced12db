#!/usr/bin/env bash
# The GPU checks, on a single-GPU machine with no network, in two parts that can run as
# separate calls:
#
#   bash benchmarks/gpu_checks.sh core    # CUDA tests, step-time and kernel-time tables
#   bash benchmarks/gpu_checks.sh study   # the full large-batch study (STUDY_BUDGET seconds)
#   bash benchmarks/gpu_checks.sh all     # both
#
# Writes gpu_log.txt (appended to), pytest_cuda.log, step_time_cuda.json,
# step_time_cuda_graphs.json, step_time_cuda_allreduce_norm.json and study.tar.gz under
# $OUT (default: gpu_out). The study reads
# Fashion-MNIST from $FASHION_MNIST_DIR (default: .gpu_data/fashion-mnist) and takes extra
# sngm-study arguments from $STUDY_ARGS.
set -uo pipefail
part=${1:-all}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-$PWD/.gpu_data/fashion-mnist}
LOG="$OUT/gpu_log.txt"

section() { printf '\n===== %s (%s) =====\n' "$1" "$(date -u +%H:%M:%S)" | tee -a "$LOG"; }

core() {
  section "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
  python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

  section "CUDA tests"
  timeout 240 python -m pytest -q -rsfE --tb=short -p no:cacheprovider tests/test_cuda.py \
    tests/test_triton_sngm.py \
    tests/test_accelerate_large_batch.py::test_fsdp2_run_matches_the_unsharded_run \
    > "$OUT/pytest_cuda.log" 2>&1
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/pytest_cuda.log" | tail -40 | tee -a "$LOG"

  section "step time, eager (benchmarks/step_time.py --device cuda --steps 100 --warmup 10)"
  timeout 150 python benchmarks/step_time.py --device cuda --steps 100 --warmup 10 \
    --json "$OUT/step_time_cuda.json" 2>&1 | tee -a "$LOG"

  section "step time, CUDA graphs (--cuda-graphs --steps 200 --warmup 20)"
  timeout 120 python benchmarks/step_time.py --device cuda --steps 200 --warmup 20 --cuda-graphs \
    --optimizers "SGD foreach,SGD fused,SNGM foreach,SNGM fused (default),SNGM fused + weight decay,SNGM fused torch-kernel,SNGM fused torch-kernel + weight decay" \
    --json "$OUT/step_time_cuda_graphs.json" 2>&1 | tee -a "$LOG"

  section "step time with the all-reduce hook's norm (one-process DDP, --steps 200 --warmup 20)"
  timeout 90 python benchmarks/step_time.py --device cuda --steps 200 --warmup 20 \
    --optimizers "SGD fused,SNGM fused (default),SNGM fused with the all-reduce norm" \
    --json "$OUT/step_time_cuda_allreduce_norm.json" 2>&1 | tee -a "$LOG"

  for shapes in gpt2-medium resnet50; do
    section "kernel times ($shapes)"
    timeout 60 python benchmarks/kernel_times.py --shapes "$shapes" 2>&1 | tee -a "$LOG"
  done
}

study() {
  section "study (full preset, ${STUDY_BUDGET:-240} s budget)"
  TIME_BUDGET=${STUDY_BUDGET:-240} HARD_LIMIT=$(( ${STUDY_BUDGET:-240} + 90 )) \
    timeout $(( ${STUDY_BUDGET:-240} + 100 )) bash benchmarks/run_gpu_study.sh "$OUT/study" ${STUDY_ARGS:-} 2>&1 \
    | tail -60 | tee -a "$LOG"
  tar -czf "$OUT/study.tar.gz" -C "$OUT" study && rm -rf "$OUT/study"
}

case $part in
  core) core ;;
  study) study ;;
  all) core; study ;;
  *) echo "usage: $0 core|study|all" >&2; exit 2 ;;
esac
section "done"
