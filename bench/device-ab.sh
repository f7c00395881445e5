#!/usr/bin/env bash
# On the lent GPU machine: unpacks snapshots made by bench/device-snapshot.sh
# and runs one command in each, alternated, so builds are compared on one card
# in one sitting (machines are shared and their clocks drift; only ratios from
# one run mean anything). Run from the repository root there, with .device
# carried:
#
#   xz -dc .device/node.xz > /tmp/node && chmod +x /tmp/node && export PATH=/tmp:$PATH &&
#     OUT=$OUT bash bench/device-ab.sh [--rounds N] [--first 'CMD'] -- 'CMD' SNAP[:LABEL] ...
#
# SNAP is a folder under .device; SNAP:LABEL runs that snapshot's dist with its
# kvrecall-LABEL.node (a --variant). --first 'CMD' runs once in the first
# snapshot before the rounds (the GPU tests, a --check). In 'CMD', {tag} is
# replaced by the run's tag (SNAP or SNAP-LABEL, then the round: base-1, new-1,
# base-2, ...). Each run has a limit of 150 s (STEP_S); the log, and every
# .md/.json the runs wrote into bench/results, land in $OUT. Example (the
# wave step's engine call at the llama3.2-1b shape, two builds, twice):
#
#   bash bench/device-ab.sh --first 'node dist/bench/wave-gpu.js --check' -- \
#     'node dist/bench/wave-gpu.js --bench --cluster-size 16 --head-dim 64 --budget-share 0.01 --window 256 --probes 4 --tag {tag}' base new
set -u
ROOT=$PWD
OUT=${OUT:-/tmp/device-ab}
rounds=2 first=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --first) first=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
shift
CMD=${1:?a command}
shift
[ $# -gt 0 ] || { echo "name at least one snapshot" >&2; exit 2; }
source "$ROOT/bench/visit-lib.sh"
nvidia-smi -L | tee -a "$L"; nproc | tee -a "$L"; uptime | tee -a "$L"
dirs=()
for s in "$@"; do
  # A variant's label is SNAP-LABEL: two snapshots' variants of one name
  # (s23bind:lb2, s23base:lb2) get their own folders and tags.
  snap=${s%%:*} variant=${s#*:}; [ "$variant" = "$s" ] && variant=""
  label=$snap${variant:+-$variant}
  d=/tmp/ab-$label
  if [ "$(cat "$d/.rev" 2>/dev/null)" != "$(cat "$ROOT/.device/$snap/rev")" ]; then
    rm -rf "$d"; mkdir -p "$d/build/Release"
    (cd "$d" && xz -dc "$ROOT/.device/$snap/src.tar.xz" | tar x && tar xJf "$ROOT/.device/$snap/dist.tar.xz" && tar xJf "$ROOT/.device/nm-full.tar.xz")
    cp "$ROOT/.device/$snap/rev" "$d/.rev"
  fi
  node=$ROOT/.device/$snap/kvrecall.node.xz
  [ -n "$variant" ] && node=$ROOT/.device/$snap/kvrecall-$variant.node.xz
  xz -dc "$node" > "$d/build/Release/kvrecall.node"
  echo "$label: $(cat "$d/.rev") $(basename "$node")" | tee -a "$L"
  dirs+=("$label=$d")
done
if [ -n "$first" ]; then
  d=${dirs[0]#*=}
  (cd "$d" && export KVRECALL_BENCH_REV="$(cat .rev)" && step "${STEP_S:-150}" "first-${dirs[0]%%=*}" bash -c "$first")
fi
for r in $(seq "$rounds"); do
  for x in "${dirs[@]}"; do
    label=${x%%=*} d=${x#*=}
    (cd "$d" && export KVRECALL_BENCH_REV="$(cat .rev)" && step "${STEP_S:-150}" "$label-$r" bash -c "${CMD//\{tag\}/$label-$r}")
  done
done
for x in "${dirs[@]}"; do find "${x#*=}/bench/results" -newer "$OUT/.start" -type f \( -name '*.md' -o -name '*.json' \) -exec cp {} "$OUT/" \; ; done
stamp done
