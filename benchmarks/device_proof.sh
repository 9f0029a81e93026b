#!/usr/bin/env bash
# The anatomy proof (issue 4, section 9) on one GPU, sized to a short lease (about 8 minutes):
#   1. a calibration run (seed 0, 60 steps, both methods in parallel) that also smoke-tests CUDA + bf16;
#   2. the proof with 3 pretraining seeds, all 6 runs in parallel on the GPU (--jobs 6), with the
#      step budget chosen from the calibration so that everything ends inside DEADLINE seconds.
# Usage (repo root; OUT is where results land; extra args go to anatomy_proof.py):
#   OUT=/tmp/device_out DEADLINE=420 bash benchmarks/device_proof.sh [--set loss.w_koleo=0.1 ...]
# On a machine without holons' own dependencies, wheels in .whl/ (pydicom, timm) are installed first.
set -u
OUT=${OUT:-/tmp/device_out}
DEADLINE=${DEADLINE:-420}  # seconds this whole script may take
CAL_STEPS=${CAL_STEPS:-60}
N_PHANTOMS=${N_PHANTOMS:-960}
BATCH=${BATCH:-64}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
t_start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" \
  >> "$OUT/gpu.txt" || exit 4
cat "$OUT/gpu.txt"

common=(--device "$DEVICE" --n-phantoms "$N_PHANTOMS" --batch-size "$BATCH" --threads 2 --students)
echo "== calibration"
timeout 180 $PY benchmarks/anatomy_proof.py --out /tmp/proof "${common[@]}" --seeds 0 --steps "$CAL_STEPS" --jobs 2 \
  --eval-stages 3 --pairs 20 --bootstrap 200 "$@" > "$OUT/calibration.log" 2>&1
rc=$?
tail -5 "$OUT/calibration.log"
[ $rc -eq 0 ] || { echo "calibration failed (rc $rc)"; tail -60 "$OUT/calibration.log"; exit 5; }
cp /tmp/proof/results.json "$OUT/calibration.json" && rm -f /tmp/proof/results.json /tmp/proof/results.md

# steps: the slower method's seconds per step with 2 parallel runs (less ~8 s of start-up), times 3
# for 6 parallel runs; evaluation: 15 model evaluations of 60 pairs (primary setting only), from the
# calibration's 5 evaluations of 20 pairs. Measured on an H200 (2026-11-27): 6 parallel runs of
# convnext_atto at 64/32 px take ~0.26 s per step each (launch-bound), one evaluation ~12 s.
left=$(( DEADLINE - ($(date +%s) - t_start) - 30 ))
steps=$($PY - "$left" "$OUT/calibration.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[2]))
walls = [run["0"]["wall_s"] for run in r["runs"].values()]
per_step = max((run["0"]["wall_s"] - 8.0) / run["0"]["steps"] for run in r["runs"].values())
eval_each = max(1.0, (r["elapsed_s"] - max(walls) - 30.0) / 5.0)
budget = float(sys.argv[1]) - 15 * 3 * eval_each - 20.0
print(max(100, min(4000, int(budget / (3.0 * per_step)) // 20 * 20)))
EOF
)
steps=${STEPS:-$steps}
echo "== proof: $steps steps per run, 3 seeds, 6 parallel runs (calibration $(( $(date +%s) - t_start )) s so far)"
timeout "$left" $PY benchmarks/anatomy_proof.py --out /tmp/proof --reuse "${common[@]}" \
  --seeds 0 1 2 --steps "$steps" --jobs 6 --eval-sizes 128 --eval-stages 3 "$@" > "$OUT/proof.log" 2>&1
rc=$?
tail -3 "$OUT/proof.log"
for f in results.json results.md; do cp "/tmp/proof/$f" "$OUT/proof_$f" 2>/dev/null; done
[ $rc -eq 0 ] || { echo "proof failed (rc $rc)"; tail -60 "$OUT/proof.log"; }
cat "$OUT/proof_results.md" 2>/dev/null
echo "== elapsed $(( $(date +%s) - t_start )) s"
