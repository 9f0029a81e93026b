#!/usr/bin/env bash
# The pki-3 karyotype ablation (issue 5) on one GPU, sized to a short lease.
#
# pki-3 is 28,137 small TIFFs (about 57 x 22 px each, 32 MB of file content; `du` shows 172 MB only
# because of file-system blocks and directories), so it travels to the device machine as one
# 31 MiB archive. Prepare it here, once (.device/ is ignored by git: add it to .git/info/exclude):
#   mkdir -p .device && tar czf .device/pki3.tgz -C ../shared/data/chromosomes pki3_gband
# then run this script there with `carry: [".device", ".whl"]`:
#   OUT=$OUT DEADLINE=540 bash benchmarks/device_karyotype.sh [--variants g_only varifocal ...] [--set ...]
# Extra arguments go to benchmarks/karyotype_ablation.py; `--jobs N --set train.threads=T` trains N rows
# side by side on the one GPU (one small ResNet-18 run leaves most of an H200 idle), e.g. the four
# random-init rows of the table in one lease:
#   OUT=$OUT DEADLINE=560 bash benchmarks/device_karyotype.sh --variants l_whole varifocal \
#     varifocal_cutmix g_only --jobs 4 --set train.threads=3
# Results land in $OUT (results.md / .json, and in runs.tgz each run's metrics, logs and confusion
# matrix); a run cut by the deadline is resumable with the same call on the same machine.
# On a machine without holons' own dependencies, wheels in .whl/ (pydicom, timm) are installed first.
set -u
OUT=${OUT:-/tmp/device_out}
DEADLINE=${DEADLINE:-540}        # seconds this whole script may take
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-configs/finetune/karyotype_pki3_gpu.yaml}
ARCHIVE=${ARCHIVE:-.device/pki3.tgz}
DATA=${DATA:-/tmp/pki3}
RUNS=${RUNS:-/tmp/kabl_gpu}
mkdir -p "$OUT" "$DATA"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
t_start=$(date +%s)
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
[ -f "$ARCHIVE" ] || { echo "no $ARCHIVE: build it first (see the header of this script)"; exit 4; }
[ -f "$DATA/pki3_gband/manifest.csv" ] || tar xzf "$ARCHIVE" -C "$DATA" || exit 4
echo "pki-3: $(($(wc -l < "$DATA/pki3_gband/manifest.csv") - 1)) chromosomes, unpacked in $(( $(date +%s) - t_start )) s"
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi") > "$OUT/gpu.txt"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" \
  >> "$OUT/gpu.txt" || exit 4
cat "$OUT/gpu.txt"
left=$(( DEADLINE - ($(date +%s) - t_start) - 20 ))
timeout --signal=TERM --kill-after=15 "$left" $PY benchmarks/karyotype_ablation.py --config "$CONFIG" \
  --manifest "$DATA/pki3_gband/manifest.csv" --out "$RUNS" --device "$DEVICE" "$@" > "$OUT/ablation.log" 2>&1
rc=$?
tail -30 "$OUT/ablation.log"
(cd "$RUNS" && find . \( -name 'results.*' -o -name 'job*.log' -o -name 'train.log' -o -name 'metrics*.json*' \
  -o -name '*.png' -o -name 'split.csv' -o -name 'config.yaml' \) -print0 | tar czf "$OUT/runs.tgz" --null -T -) \
  2>/dev/null
cp "$RUNS"/results.* "$OUT/" 2>/dev/null
echo "== rc $rc, elapsed $(( $(date +%s) - t_start )) s"
exit $rc
