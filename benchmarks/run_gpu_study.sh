#!/usr/bin/env bash
# The full large-batch study on one CUDA GPU, results in the folder given as $1.
#
#   benchmarks/run_gpu_study.sh OUT_DIR [more sngm-study arguments]
#
# Runs `sngm-study --preset full` with bf16 autocast, several runs at once sharing the
# GPU (WORKERS, default 6) and a time budget (TIME_BUDGET seconds, default 420) after which
# no new run starts. HARD_LIMIT (seconds, default 510) stops the study with SIGTERM even
# mid-run, so one call fits a 9-minute device slot; finished runs are always saved, and
# rerunning with the same OUT_DIR resumes (the full preset takes several calls, each one
# recorded in OUT_DIR/study.json). Fashion-MNIST is read from FASHION_MNIST_DIR, else
# .gpu_data/fashion-mnist, else the Debian package's /usr/share/datasets/fashion-mnist.
# The console output is appended to OUT_DIR/console.log.
set -euo pipefail
out=${1:?usage: benchmarks/run_gpu_study.sh OUT_DIR [sngm-study arguments]}
shift
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if [ -z "${FASHION_MNIST_DIR:-}" ] && [ -d .gpu_data/fashion-mnist ]; then
  export FASHION_MNIST_DIR="$PWD/.gpu_data/fashion-mnist"
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/console.log"
timeout --signal=TERM "${HARD_LIMIT:-510}" \
  "${PYTHON:-python3}" -m sngm_integrations.study --preset full --device cuda \
  --workers "${WORKERS:-6}" --time-budget "${TIME_BUDGET:-420}" --no-progress \
  --out "$out" "$@" 2>&1 | tee -a "$out/console.log"
