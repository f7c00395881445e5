#!/usr/bin/env bash
# Packs a committed revision, built here, for a visit to the lent GPU machine
# (the `device` tool: 64 MiB carried, no Node, no network, no compiler for
# the addon there). Why a snapshot and not the working tree: helpers commit
# and edit beside the lead, so what runs on the device is a clean tree of one
# revision, named in every result, with the addon built from that tree.
#
#   bash bench/device-snapshot.sh NAME [REV] [--patch FILE]... [--variant LABEL FILE]...
#
# Makes .device/NAME/ (git-ignored): rev, src.tar.xz (git archive of REV, the
# patches applied), dist.tar.xz (tsc's output), kvrecall.node.xz (the addon),
# and for each --variant one more addon, kvrecall-LABEL.node.xz, built from
# the same tree with FILE (a patch of native code only) applied on top: an
# A/B of native changes on one dist. REV defaults to HEAD. Each build is a
# full `node-gyp rebuild` in a temporary worktree (~2.5 min on the 2-core VM;
# a variant ~1 min more), its node_modules a link to this checkout's.
#
# .device/node.xz (../shared/tools/device-prep) and .device/nm-full.tar.xz
# (`tar cf - --exclude=node_modules/typescript node_modules | xz -T2 -6`, the
# modules with vitest, ~11 MB) are made once; bench/device-ab.sh unpacks all
# of it on the device.
set -eu -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=${1:?usage: device-snapshot.sh NAME [REV] [--patch FILE]... [--variant LABEL FILE]...}
shift
REV=HEAD
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then REV=$1; shift; fi
patches=() variants=()
while [ $# -gt 0 ]; do
  case $1 in
    --patch) patches+=("$(realpath "$2")"); shift 2 ;;
    --variant) variants+=("$2=$(realpath "$3")"); shift 3 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
OUTDIR=$ROOT/.device/$NAME
WT=$(mktemp -d /tmp/kvr-snap.XXXXXX)
trap 'git -C "$ROOT" worktree remove --force "$WT" >/dev/null 2>&1 || true' EXIT
git -C "$ROOT" worktree add --detach "$WT" "$REV" >/dev/null
cd "$WT"
for p in "${patches[@]}"; do git apply "$p"; done
ln -s "$ROOT/node_modules" node_modules
mkdir -p "$OUTDIR"
echo "$(git rev-parse --short HEAD)${patches:+ +${#patches[@]} patch(es)}" > "$OUTDIR/rev"
npx tsc -p tsconfig.json
echo "device-snapshot: building the addon at $(cat "$OUTDIR/rev") ..." >&2
npx node-gyp rebuild > "$OUTDIR/build.log" 2>&1
tar cf - dist | xz -T2 -6 > "$OUTDIR/dist.tar.xz"
{ git ls-files -z; git ls-files -z --others --exclude-standard; } | grep -zv '^node_modules$' | tar cf - --null -T - | xz -T2 -6 > "$OUTDIR/src.tar.xz"
xz -T2 -c build/Release/kvrecall.node > "$OUTDIR/kvrecall.node.xz"
for v in "${variants[@]}"; do
  label=${v%%=*} file=${v#*=}
  git apply "$file"
  # gyp's nvcc rule does not track headers: touch every .cu so a .cuh change is rebuilt.
  touch native/cuda/*.cu
  echo "device-snapshot: variant $label ..." >&2
  npx node-gyp build >> "$OUTDIR/build.log" 2>&1
  xz -T2 -c build/Release/kvrecall.node > "$OUTDIR/kvrecall-$label.node.xz"
  git apply -R "$file"
  touch native/cuda/*.cu
done
du -sh "$OUTDIR" >&2
