# Shared by the device-visit scripts (bench/gpu-visit.sh, bench/transport-visit.sh):
# a log under $OUT, and `step <seconds> <label> <command...>`, which runs a
# stage under its own time limit (one hang cannot eat a visit) and logs its
# exit status; and await_health PORT. Sourced after OUT is set.
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
# Waits (up to 20 s) until a server started in the background answers GET /v1/health on 127.0.0.1:PORT.
await_health() {
  for _ in $(seq 100); do node -e "fetch('http://127.0.0.1:$1/v1/health').then(()=>process.exit(0),()=>process.exit(1))" && return 0; sleep 0.2; done
  return 1
}
