#!/usr/bin/env bash
# One prepared GPU check (issue 26): the GPU-marked tests, ViT-B/32 labelling and fine-tuning
# throughput, and the label-precision table on the device, in under 8 minutes on one H100/H200.
#
#   benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --cpu      # a short smoke of the same steps on a CPU
#
# Needs the project's .venv (nothing is installed: the GPU machine may have no network). Figures
# go to $OUT (or ./gpu-check when OUT is unset): bench-gpu.json, label-precision.md and
# summary.md, a markdown block to paste into docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT_DIR="${OUT:-gpu-check}"
mkdir -p "$OUT_DIR"
export PYTHONPATH=.

if [[ "${1:-}" == "--cpu" ]]; then
    DEVICE=cpu
    GPU_ARGS=(--images 2 --label-batch 2 --budget 60 --steps 2 --batch 2)
    PRECISION_ARGS=(--b32-images 0 --vit16-images 1 --tiny-images 1 --reference-budget 300)
elif "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    DEVICE=cuda
    GPU_ARGS=(--images 2048 --label-batch 64 --steps 30 --batch 128)
    # the same labelling in fp16 autocast, for its speed-up (labels: docs/benchmarks.md)
    FP16_ARGS=(--images 1024 --label-batch 64 --steps 1 --batch 8 --precision fp16)
    PRECISION_ARGS=(--b32-images 8)
else
    echo "error: no CUDA device visible to torch (run with --cpu for a CPU smoke)" >&2
    exit 2
fi

step() {  # step SECONDS NAME COMMAND...: one bounded step, timed
    local limit=$1 name=$2
    shift 2
    local start=$SECONDS
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@"
    echo "== $name: $((SECONDS - start)) s"
}

"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
    [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
if [[ $DEVICE == cuda ]]; then
    # -m gpu selects the GPU-marked tests; exit 5 (none collected) is not a failure.
    step 120 "GPU-marked tests" "$PY" -m pytest -q -m gpu -p no:cacheprovider || [[ $? == 5 ]]
fi
step 150 "labelling and fine-tuning throughput" \
    "$PY" -m benchmarks.bench_gpu --device "$DEVICE" "${GPU_ARGS[@]}" --out "$OUT_DIR/bench-gpu.json"
if [[ $DEVICE == cuda ]]; then
    step 90 "labelling throughput in fp16" \
        "$PY" -m benchmarks.bench_gpu --device cuda "${FP16_ARGS[@]}" --out "$OUT_DIR/bench-gpu-fp16.json"
fi
step 120 "label precision" "$PY" -m benchmarks.bench_label_precision --device "$DEVICE" \
    "${PRECISION_ARGS[@]}" --out "$OUT_DIR/label-precision.md"

{
    echo "### gpu_check.sh on $DEVICE, $(date -u +%Y-%m-%d)"
    echo
    echo '```json'
    cat "$OUT_DIR/bench-gpu.json"
    [[ -f "$OUT_DIR/bench-gpu-fp16.json" ]] && { echo; cat "$OUT_DIR/bench-gpu-fp16.json"; }
    echo
    echo '```'
    echo
    cat "$OUT_DIR/label-precision.md"
} > "$OUT_DIR/summary.md"
echo "== figures in $OUT_DIR/summary.md"
