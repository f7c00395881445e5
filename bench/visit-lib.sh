# Shared by the device-visit scripts (bench/gpu-visit.sh, bench/transport-visit.sh):
# a log under $OUT, and `step <seconds> <label> <command...>`, which runs a
# stage under its own time limit (one hang cannot eat a visit) and logs its
# exit status. Sourced after OUT is set.
set -o pipefail
mkdir -p "$OUT"
L=$OUT/log.txt
T0=$(date +%s)
touch "$OUT/.start"
stamp() { echo "== $1 $(( $(date +%s) - T0 ))s" | tee -a "$L"; }
step() { # step <seconds> <label> <command...>
  local limit=$1 label=$2; shift 2
  stamp "$label"
  timeout "$limit" "$@" 2>&1 | tee -a "$L"
  echo "$label rc=${PIPESTATUS[0]}" | tee -a "$L"
}
