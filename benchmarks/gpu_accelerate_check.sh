#!/usr/bin/env bash
# Runs examples/accelerate_large_batch.py on one GPU through `accelerate launch`, with the
# single-GPU config and with FSDP2 on one process (DTensor parameters, sharded norm path),
# a few steps each, as the configs are shipped (single_gpu in bf16, fsdp2 in float32). About
# a minute on one H100 (under 90 seconds); needs no network. That FSDP2 reproduces the
# unsharded run exactly is the CUDA test in tests/test_accelerate_large_batch.py.
#
#   bash benchmarks/gpu_accelerate_check.sh            # logs under $OUT if set, else a temp dir
#
# Environment: PYTHON (default python3), FASHION_MNIST_DIR (default: .gpu_data/fashion-mnist
# in the repository if present, else the loader's standard places). Exits non-zero when a
# run fails, skips a step, or stops short.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${FASHION_MNIST_DIR:-}" && -d .gpu_data/fashion-mnist ]]; then
  export FASHION_MNIST_DIR="$PWD/.gpu_data/fashion-mnist"
fi
RUN_DIR=${RUN_DIR:-$(mktemp -d)}  # checkpoints and tracker files stay here; only logs go to $OUT
LOG_DIR=${OUT:-$RUN_DIR}/gpu_accelerate_check
mkdir -p "$LOG_DIR"

"$PYTHON" - <<'EOF' | tee "$LOG_DIR/environment.txt"
import accelerate, torch
print(f"torch {torch.__version__}, accelerate {accelerate.__version__}, "
      f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
EOF

STEPS=12
RUN_ARGS=(--model resnet20 --subset 16384 --eval-subset 2000 --per-device-batch 512
          --grad-accum 2 --lr 0.5 --max-steps "$STEPS" --warmup-fraction 0.25
          --checkpoint-every 6 --log-every 3)
for config in single_gpu fsdp2; do
  echo "== $config: accelerate launch --config_file examples/accelerate_configs/$config.yaml"
  started=$SECONDS
  timeout 40 "$PYTHON" -m accelerate.commands.launch \
    --config_file "examples/accelerate_configs/$config.yaml" --num_processes 1 \
    examples/accelerate_large_batch.py "${RUN_ARGS[@]}" --output-dir "$RUN_DIR/$config" \
    > "$LOG_DIR/$config.log" 2>&1 || { tail -n 40 "$LOG_DIR/$config.log"; exit 1; }
  grep -oE "(effective batch|epoch [0-9]+:) .*" "$LOG_DIR/$config.log" || true
  echo "   finished in $((SECONDS - started)) s (launch and data loading included)"
done

"$PYTHON" - "$RUN_DIR" "$STEPS" <<'EOF' | tee "$LOG_DIR/summary.txt"
import json, math, sys
from pathlib import Path
from safetensors.torch import load_file

run_dir, steps = Path(sys.argv[1]), int(sys.argv[2])
runs = {name: json.loads((run_dir / name / "metrics.json").read_text())
        for name in ("single_gpu", "fsdp2")}
print(f"{'config':<11} {'steps':>5} {'skipped':>7} {'eval loss':>9} {'eval acc':>8} {'train s':>7}")
for name, m in runs.items():
    print(f"{name:<11} {m['optimizer_steps']:>5} {m['skipped_steps']:>7} {m['eval/loss']:>9.4f} "
          f"{m['eval/accuracy']:>8.4f} {m['train_seconds']:>7.2f}")
problems = [f"{n}: {m['optimizer_steps']} steps, {m['skipped_steps']} skipped"
            for n, m in runs.items() if m["optimizer_steps"] != steps or m["skipped_steps"]]
problems += [f"{n}: eval loss {m['eval/loss']}" for n, m in runs.items()
             if not math.isfinite(m["eval/loss"])]
single, sharded = (load_file(run_dir / n / "model" / "model.safetensors") for n in runs)
if single.keys() != sharded.keys():
    problems.append("single_gpu and fsdp2 saved different parameter names")
print("FAIL: " + "; ".join(problems) if problems else "PASS")
sys.exit(1 if problems else 0)
EOF
