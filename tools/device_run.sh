#!/usr/bin/env bash
# Run a prepared study or benchmark on a lent GPU machine and collect what it wrote.
#
# Usage (repository root on the device machine; OUT is the folder whose files come back):
#   OUT=$OUT [DEADLINE=540] [WORK=/tmp/device_work] [DATA=/tmp/device_data] [PACK=1] \
#     bash tools/device_run.sh COMMAND [ARGS...]
# e.g.
#   OUT=$OUT DEADLINE=560 bash tools/device_run.sh python -m holons study run \
#     configs/studies/anatomy_proof.yaml --out /tmp/device_work --jobs 6 --set device=cuda --set batch_size=64
#   OUT=$OUT bash tools/device_run.sh python -m holons study run configs/studies/karyotype_ablation.yaml \
#     --out /tmp/device_work --jobs 4 --set manifest=/tmp/device_data/pki3_gband/manifest.csv \
#     --set config=configs/finetune/karyotype_pki3_gpu.yaml --set 'sets=[train.device=cuda, train.threads=3]'
#   OUT=$OUT bash tools/device_run.sh python benchmarks/run.py pretrain -- --device cuda
#
# What it does, in order:
#   1. wheels in .whl/ (e.g. pydicom, timm for a machine without holons' dependencies) are installed
#      into /tmp/site, without the network;
#   2. every archive .device/*.tgz is unpacked once into DATA (data the machine lacks travels this way,
#      carried as an ignored path: e.g. `tar czf .device/pki3.tgz -C ../shared/data/chromosomes pki3_gband`,
#      a 31 MiB archive; delete it afterwards, it is derived from the shared data);
#   3. OUT/gpu.txt: the GPU, its memory, torch and CUDA;
#   4. COMMAND runs with its output in OUT/run.log; it gets SIGTERM DEADLINE seconds after the start (less
#      the collection's 20 s) and SIGKILL 15 s later, so a study checkpoints its jobs and can be resumed
#      with the same call on the same machine (holons study run ... --resume);
#   5. WORK (the study folder) is packed into OUT by `python -m holons.study.transfer pack`: the text files
#      in outputs.tar, exported weights as float16 in weights_<k>.tar (PACK=0: text files only); the study
#      records (*.md, *.json at WORK's top level) are also copied to OUT as they are.
# Back here: `python -m holons.study.transfer unpack FILES_DIR STUDY_DIR`, then `holons study report STUDY_DIR`.
# Exits with COMMAND's status (124 / 137 when the deadline stopped it).
set -u
OUT=${OUT:-/tmp/device_out}
DEADLINE=${DEADLINE:-540}
WORK=${WORK:-/tmp/device_work}
DATA=${DATA:-/tmp/device_data}
PACK=${PACK:-1}
PY=${PY:-python3}
[ $# -ge 1 ] || { sed -n '2,30p' "$0"; exit 2; }
t_start=$(date +%s)
mkdir -p "$OUT" "$DATA"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
for archive in .device/*.tgz; do
  [ -f "$archive" ] || continue
  stamp="$DATA/.$(basename "$archive").done"
  [ -f "$stamp" ] || { tar xzf "$archive" -C "$DATA" && touch "$stamp"; } || exit 4
  echo "unpacked $archive into $DATA"
done
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi") \
  > "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >> "$OUT/gpu.txt" || exit 4
cat "$OUT/gpu.txt"
args=()
for a in "$@"; do [ "$a" = python ] && [ ${#args[@]} -eq 0 ] && a=$PY; args+=("$a"); done
left=$(( DEADLINE - ($(date +%s) - t_start) - 20 ))
timeout --signal=TERM --kill-after=15 "$left" "${args[@]}" > "$OUT/run.log" 2>&1
rc=$?
tail -30 "$OUT/run.log"
if [ -d "$WORK" ]; then
  if [ "$PACK" = 1 ]; then
    $PY -m holons.study.transfer pack "$WORK" "$OUT"
  else
    (cd "$WORK" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.log' -o -name '*.yaml' \) \
      -not -path './cache/*' -print0 | tar czf "$OUT/outputs.tgz" --null -T -)
  fi
  cp "$WORK"/*.md "$WORK"/*.json "$OUT/" 2>/dev/null
fi
echo "== rc $rc, elapsed $(( $(date +%s) - t_start )) s"
exit $rc
