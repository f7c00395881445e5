#!/usr/bin/env bash
# bench:model on a lent GPU machine (the `device` tool: one H200 and 16 cores, or x2/x4/x8 with 32-128 cores;
# Python with torch and transformers, no Node, no network, no ../shared; 10 minutes a command; at most 64 MiB of
# ignored paths carried).
#
# Here, once:  python3 bench/model/pack.py --seeds 0,1   (model + held-out text + pure-Python msgpack into
# .device/model/, 21 MiB), npx tsc -p tsconfig.json (dist/), the addon built (build/Release/kvrecall.node), and
# .device/node.xz + .device/node_modules.tar.xz (the lead's device prep). Carry, 57.7 MiB in all:
#   .device/node.xz  .device/node_modules.tar.xz  .device/model  dist  build/Release/kvrecall.node
# There:  bash bench/model/device.sh [run.py flags, appended to the defaults below: the last of a flag wins]
#   e.g.  CHECK=0 bash bench/model/device.sh --first-trial 500 --tag h200-b       # more 16K trials, to merge
#         CHECK=0 bash bench/model/device.sh --lengths 32768 --tag h200-32k                # 32K
#         CHECK=0 bash bench/model/device.sh --methods wave,hnsw,ivf,retrieval-attention --tag h200-ivf  # issue #16's
#           four at 16K (on nvidia-h100-x4 / h200-x4: 32 workers, >= 100 trials in the 8.2 minutes)
#         (x8, 128 cores) bash bench/model/device.sh --lengths 16384,32768 --trials 110 --shares 0.3,0.7 --tag h200x8
#
# Stages, each under its own time limit (so one hang cannot eat the command), everything under $OUT:
#   check  bench/model/check_backends.py at 2K and 8K bytes: numpy vs torch vs transformers, and the float64
#          reference numpy vs torch ($OUT/results/model-backends-h200.{json,md}). When transformers is out of
#          tolerance (or does not load) and torch within, the bench runs --backend torch (and --held numpy if
#          the torch reference differs). CHECK=0 skips it.
#   bench  bench/model/run.py with $WORKERS workers (default one per 2 cores: a trial's seal keeps ~2 busy), each
#          with its own server and its model on a GPU (worker w on GPU w mod count). Workers still running at
#          $HARD minutes (7.3; 8.2 with CHECK=0) after the bench started are ended, and a trial counts only once
#          finished, so a worker starts no trial that its previous one's time (+10%) says would end later; nor
#          after $MINUTES (default $HARD; --shares splits it over --lengths). Results
#          $OUT/results/model-<tag>.{md,json,svg}; the workers' states $OUT/work.tar.xz
#          (runs with distinct --first-trial ranges merge here: untar each, run.py --merge dirA,dirB --tag h200).
# The servers attend on the host backend as on the VM (KVRECALL_GPU_BUDGET=0); KVRECALL_GPU_BUDGET=4294967296
# gives each its CUDA backend with 4 GiB. Typical: setup 15 s, check 40 s (limit 90), bench up to 7.3 min + the
# report: under 9 minutes in all (9.2 with CHECK=0 and 8.2).
set -o pipefail
OUT=${OUT:-/tmp/model-out}
mkdir -p "$OUT/results"
L=$OUT/log.txt
T0=$(date +%s)
stamp() { echo "== $1 $(( $(date +%s) - T0 ))s" | tee -a "$L"; }
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network there: never wait on the hub

stamp setup
if ! command -v node >/dev/null; then
  xz -dc .device/node.xz > /tmp/node && chmod +x /tmp/node && export PATH=/tmp:$PATH || exit 3
fi
[ -d node_modules ] || tar -xJf .device/node_modules.tar.xz || exit 3
M=/tmp/kvrecall-models/kvrecall-code-13M
mkdir -p "$M" && cp .device/model/kvrecall-code-13M/*.json "$M/" || exit 3
for f in .device/model/kvrecall-code-13M/*.safetensors.xz; do
  [ -s "$M/$(basename "$f" .xz)" ] || xz -dc "$f" > "$M/$(basename "$f" .xz)" &
done
wait
export KVRECALL_MODELS_DIR=/tmp/kvrecall-models KVRECALL_HELDOUT_PACK=$PWD/.device/model
if ! python3 -c 'import msgpack' 2>/dev/null; then
  export PYTHONPATH=$PWD/.device/model/py${PYTHONPATH:+:$PYTHONPATH} MSGPACK_PUREPYTHON=1
fi
export KVRECALL_GPU_BUDGET=${KVRECALL_GPU_BUDGET:-0}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # 8 workers share one device
{ node --version; python3 -c 'import sys, numpy, torch; print(sys.version.split()[0], numpy.__version__, torch.__version__, torch.cuda.is_available())'
  python3 -c 'import transformers; print("transformers", transformers.__version__)'
  python3 -c 'import msgpack; print("msgpack", msgpack.version)'
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; nproc; free -g | head -2; } 2>&1 | tee -a "$L"

if [ "${CHECK:-1}" != 0 ]; then
  stamp check
  timeout 90 python3 bench/model/check_backends.py --lengths 2048,8192 --out "$OUT/results/model-backends-h200.json" --md "$OUT/results/model-backends-h200.md" 2>&1 | tee -a "$L"
  echo "check rc=${PIPESTATUS[0]}" | tee -a "$L"
  PICK=$(python3 - "$OUT/results/model-backends-h200.json" <<'PY' 2>/dev/null
import json, sys
f = json.load(open(sys.argv[1]))["failures"]
bad = lambda name: any(x.startswith(name) or f" {name}:" in x for x in f)  # noqa: E731
print("--backend", "torch" if bad("transformers") and not bad("torch") else "auto",
      "--held", "numpy" if any("TorchHeld" in x for x in f) else "auto")
PY
  )
  echo "model for the bench: ${PICK:=--backend auto --held auto}" | tee -a "$L"
fi

stamp bench
WORK=/tmp/kvrecall-bench-work
rm -rf "$WORK"
if [ "${CHECK:-1}" != 0 ]; then HARD=${HARD:-7.3}; else HARD=${HARD:-8.2}; fi
MINUTES=${MINUTES:-$HARD}  # a worker starts no trial that its last one's time says would end past $HARD
timeout $(python3 -c "print(int(60 * $HARD) + 30)") python3 bench/model/run.py \
  --lengths 16384 --trials 1000 --workers "${WORKERS:-$(( $(nproc) / 2 ))}" --budget 0.024 ${PICK:-} \
  --methods wave,retrieval-attention,hnsw,topk-blocks,nosa --minutes "$MINUTES" --hard-minutes "$HARD" \
  --work "$WORK" --out-dir "$OUT/results" --tag h200 "$@" > "$OUT/bench.txt" 2>&1
rc=$?
grep -v '^|' "$OUT/bench.txt" | grep -v '^$' | tail -30 | tee -a "$L"
echo "bench rc=$rc" | tee -a "$L"
if [ "$rc" != 0 ] && ls "$WORK"/w*.json >/dev/null 2>&1; then
  stamp merge  # the bench was cut short: its workers' saved trials
  python3 bench/model/run.py --merge "$WORK" --out-dir "$OUT/results" --tag h200-partial 2>&1 | tail -3 | tee -a "$L"
fi
for f in "$OUT"/results/model-*.json; do
  case $f in *model-backends-*) ;; *) python3 bench/model/chart.py "$f" 2>&1 | tee -a "$L" ;; esac
done
[ -d "$WORK" ] && tar -cJf "$OUT/work.tar.xz" -C "$WORK" . 2>/dev/null
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv 2>&1 | tee -a "$L"
stamp done
