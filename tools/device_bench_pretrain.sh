#!/usr/bin/env bash
# Issue 22's throughput measurement in one device run (about 8 minutes on one H200), through
# tools/device_run.sh (GPU description in OUT/gpu.txt, output in OUT/run.log, SIGTERM at DEADLINE).
#
# What benchmarks/bench_pretrain.py measures here, all in the same run, paper config
# (configs/pretrain/gpu_convnext_b.yaml, ConvNeXt-B, 224 / 96 px views), global batch 64, on a phantom
# cache built on the machine:
#   (b) the full part-whole step against the bare student step on the same views, split into teacher
#       forward, heads + losses, optimizer + clipping + centre, EMA;
#   (e) the bare backbone forward + backward: counted TFLOP, achieved TFLOP/s, and the fraction of the
#       bf16 matmul peak measured on the same card;
#   (f) samples/s of localizability and part-whole steps for the reference step, each perf knob on
#       alone (channels_last, foreach / fused AdamW, teacher inference mode, uint8 transfer,
#       prefetch, compile) and all together.
# It prints one table and writes OUT/bench_pretrain.json (rewritten after each part and each knob
# variant, so a run stopped at the deadline keeps what it measured).
#
# Usage (repository root):
#   OUT=$OUT bash tools/device_bench_pretrain.sh                 # on the GPU machine
#   PY=.venv/bin/python bash tools/device_bench_pretrain.sh --device cpu   # tiny CPU check (~2 min)
# Extra arguments go to bench_pretrain.py after the defaults (e.g. --knobs reference,compile).
set -u
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
if [ "${1:-}" = "--device" ] && [ "${2:-}" = "cpu" ]; then
  shift 2
  args=(--device cpu --only bef --n-images 24 --cache-size 64 --batch 8 --peak-size 512 --repeats 2 --warmup 1
        --knob-steps 2 --knob-warmup 1 --workers 0
        --knobs reference,channels_last,adamw_fused,teacher_inference_mode,uint8_transfer,prefetch)
else
  args=(--device cuda --config configs/pretrain/gpu_convnext_b.yaml --batch 64 --n-images 512 --cache-size 256
        --only bef --repeats 10 --warmup 3 --threads 0 --peak-size 8192 --knob-steps 10 --knob-warmup 3
        --workers 0)
fi
DEADLINE=${DEADLINE:-500} WORK=${WORK:-/tmp/device_bench_work_none} \
  bash "$(dirname "$0")/device_run.sh" python benchmarks/bench_pretrain.py "${args[@]}" "$@" \
  --json "$OUT/bench_pretrain.json"
