#!/usr/bin/env bash
# The Python client's whole unittest suite, the transformers adapter's tests
# included (test_hf_adapter.py, test_hf_sparse.py: they need torch and
# transformers, which CI does not have), against this checkout's server, on a
# machine with torch (the GPU machine). Run from anywhere:
#
#   bash clients/python/tests/run_on_device.sh
#
# Needs, relative to the repository root:
#   - a built server: dist/cli/cli.js (npx tsc -p tsconfig.json), build/Release/kvrecall.node
#     and node_modules/ (its runtime dependencies);
#   - node: env KVRECALL_NODE, else .device/node, else `node` on PATH;
#   - the stories260K folder: env KVRECALL_STORIES260K (the folder) or KVRECALL_MODELS_DIR
#     (the folder holding stories260K/), else .device/models/stories260K when present, else
#     <repo>/../shared/data/models/stories260K (which does not travel to the device machine);
#   - python3 with torch, transformers, numpy and msgpack.
# Env: KVRECALL_URL (use that running server instead of starting one), KVRECALL_CLI (default
# dist/cli/cli.js), KVRECALL_SERVE_ARGS (more `serve` options), KVRECALL_HF_BUDGETS (the sparse
# budgets to hold to the committed floors; default 16), KVRECALL_HF_DEVICE (the model's torch
# device; default cuda when available), PYTHON (default python3).
#
# Node (about 95 MiB) and node_modules/ (about 90 MiB) do not fit the device machine's 64 MiB
# carry limit as they are; `bash clients/python/tests/run_on_device.sh --stage`, run HERE (not on the
# device), packs into .device/ (git-ignored): node.xz (node from KVRECALL_NODE or PATH), node_modules.tar.xz
# (the production dependencies only, from `npm ls --omit=dev`) and models/stories260K/ (its two files);
# on the device this script unpacks node.xz and node_modules.tar.xz when .device/node or node_modules/
# is missing. Carry: .device, dist, build/Release.
#
# Writes into $OUT when set (the device machine's output folder), else clients/python/results/:
#   hf-adapter-device.json        date, GPU name (torch.cuda.get_device_name), versions, the
#                                 unittest exit status, each test's status, and the sparse run's
#                                 agreement numbers with each row's committed floor and threshold;
#   hf-adapter-device-tests.txt   the unittest log;
#   hf-adapter-device-server.log  the server's log (when this script started it).
# Exits non-zero when a test fails or when a torch test did not run (skipped counts as a failure here).
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$ROOT" || exit 2
# The stories260K folder as test_hf_sparse.py finds it (kvrecall.stories260k loaded alone: numpy only).
find_model() {
  "$1" -c 'import importlib.util, sys
spec = importlib.util.spec_from_file_location("stories260k", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
print(m.find_model_dir(anchor=sys.argv[2]) or "")' "$ROOT/clients/python/kvrecall/stories260k.py" "$ROOT/clients/python/tests/test_hf_sparse.py"
}

if [ "${1:-}" = "--stage" ]; then
  set -e
  mkdir -p .device/models/stories260K
  SRC=$(find_model python3)
  [ -n "$SRC" ] || { echo "run_on_device --stage: stories260K not found" >&2; exit 2; }
  cp -f "$SRC/stories260K.bin" "$SRC/tok512.bin" .device/models/stories260K/
  if [ ! -e .device/node ] && [ ! -e .device/node.xz ]; then
    xz -T0 -6 -c "$(command -v "${KVRECALL_NODE:-node}")" >.device/node.xz
  fi
  npm ls --omit=dev --all --parseable | tail -n +2 | sed "s#^$ROOT/##" | tar -cJf .device/node_modules.tar.xz -T -
  du -sh .device/* dist build/Release
  echo "run_on_device --stage: carry .device, dist and build/Release"
  exit 0
fi

DEST=${OUT:-$ROOT/clients/python/results}
mkdir -p "$DEST"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

if [ -z "${KVRECALL_STORIES260K:-}" ] && [ -z "${KVRECALL_MODELS_DIR:-}" ] && [ -d .device/models/stories260K ]; then
  export KVRECALL_MODELS_DIR="$ROOT/.device/models"
fi
MODEL_DIR=$(find_model "$PY") || exit 2
if [ -z "$MODEL_DIR" ]; then
  echo "run_on_device: stories260K not found (set KVRECALL_MODELS_DIR or KVRECALL_STORIES260K, or copy it to .device/models/stories260K)" >&2
  exit 2
fi
echo "run_on_device: model $MODEL_DIR"
"$PY" -c 'import torch, transformers, numpy, msgpack; print("run_on_device: torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))' || {
  echo "run_on_device: $PY lacks torch, transformers, numpy or msgpack" >&2
  exit 2
}

SERVER_PID=
DATA=
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$SERVER_PID" 2>/dev/null
  fi
  [ -n "$DATA" ] && rm -rf "$DATA"
}
trap cleanup EXIT

if [ -z "${KVRECALL_URL:-}" ]; then
  NODE=${KVRECALL_NODE:-}
  if [ -z "$NODE" ] && [ ! -x .device/node ] && [ -f .device/node.xz ]; then
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' .device/node.xz .device/node &&
      chmod +x .device/node || exit 2
  fi
  if [ -z "$NODE" ]; then
    if [ -x .device/node ]; then NODE=$ROOT/.device/node; else NODE=node; fi
  fi
  # test_transports.py starts a server of its own (with --token) with this node.
  export KVRECALL_NODE=${KVRECALL_NODE:-$(command -v "$NODE")}
  if [ ! -d node_modules ] && [ -f .device/node_modules.tar.xz ]; then
    "$PY" -c 'import sys, tarfile; t = tarfile.open(sys.argv[1]); t.extractall(".", **({"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}))' \
      .device/node_modules.tar.xz || exit 2
  fi
  CLI=${KVRECALL_CLI:-dist/cli/cli.js}
  [ -f "$CLI" ] || { echo "run_on_device: $CLI not found: build the server (npx tsc -p tsconfig.json) and carry dist/" >&2; exit 2; }
  [ -f build/Release/kvrecall.node ] || echo "run_on_device: warning: build/Release/kvrecall.node not found" >&2
  [ -d node_modules ] || echo "run_on_device: warning: node_modules/ not found" >&2
  DATA=$(mktemp -d "${TMPDIR:-/tmp}/kvrecall-device-XXXXXX")
  LOG=$DEST/hf-adapter-device-server.log
  # shellcheck disable=SC2086
  "$NODE" "$CLI" serve --host 127.0.0.1 --port 0 --data "$DATA" ${KVRECALL_SERVE_ARGS:-} >"$LOG" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 600); do
    KVRECALL_URL=$(grep -o -m1 'listening on http://[^ ]*' "$LOG" | sed 's/^listening on //')
    [ -n "$KVRECALL_URL" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$KVRECALL_URL" ]; then
    echo "run_on_device: the server did not start ($NODE $CLI):" >&2
    cat "$LOG" >&2
    exit 2
  fi
  echo "run_on_device: $(head -n1 "$LOG")"
fi
export KVRECALL_URL

SPARSE_JSON=$(mktemp "${TMPDIR:-/tmp}/kvrecall-sparse-XXXXXX.json")
TESTS_LOG=$DEST/hf-adapter-device-tests.txt
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
KVRECALL_HF_RESULTS=$SPARSE_JSON "$PY" -m unittest discover -s clients/python/tests -v 2>&1 | tee "$TESTS_LOG"
RC=${PIPESTATUS[0]}

"$PY" - "$TESTS_LOG" "$SPARSE_JSON" "$DEST/hf-adapter-device.json" "$RC" "$START" "$KVRECALL_URL" <<'EOF'
import datetime, json, os, platform, re, sys

log_path, sparse_path, out_path, rc, start, url = sys.argv[1:7]
log = open(log_path, errors="replace").read()
tests, current = {}, None
for line in log.splitlines():
    m = re.match(r"^(test_\w+) \((\S+)\)", line)
    if m:
        current = m.group(2) if "." in m.group(2) and m.group(2).endswith(m.group(1)) else f"{m.group(2)}.{m.group(1)}"
    if current and " ... " in line:
        tests[current] = line.rsplit(" ... ", 1)[1].strip()
        current = None
for kind, name in re.findall(r"^(FAIL|ERROR): (test_\w+) ", log, re.M):
    for k in tests:
        if k.endswith("." + name) and tests[k] == "ok":
            tests[k] = kind  # a failed subtest
# The adapter's tests must have run here, not been skipped.
required = ["test_hf_adapter.HfAdapter.test_float32_greedy_tokens_identical",
            "test_hf_adapter.HfAdapter.test_stacked_by_default_bit_identical_to_byte_batch",
            "test_hf_adapter.HfAdapter.test_stacked_lost_connection_resends_without_appending_twice",
            "test_hf_sparse.SparseAgreement.test_sparse_budget_agreement",
            "test_hf_sparse.SparseAgreement.test_full_budget_every_method_identical_to_dense",
            "test_hf_sparse.CommittedFloors.test_thresholds_can_fail"]
not_run = [t for t in required if not tests.get(t, "").startswith("ok")]
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {"torch": torch.__version__}
    import transformers
    versions["transformers"] = transformers.__version__
except Exception as e:  # recorded, not fatal
    gpu, versions = None, {"error": repr(e)}
try:
    sys.path.insert(0, os.path.join(os.getcwd(), "clients", "python"))
    from kvrecall import Client

    with Client(url, token=os.environ.get("KVRECALL_TOKEN") or None) as c:
        health = c.health()
except Exception as e:  # recorded, not fatal
    health = f"unavailable: {e!r}"
sparse = None
if os.path.getsize(sparse_path) > 0:
    with open(sparse_path) as f:
        sparse = json.load(f)
result = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "started": start,
    "gpu": gpu,
    "host": f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    **versions,
    "server_health": health,
    "command": "bash clients/python/tests/run_on_device.sh",
    "unittest_rc": int(rc),
    "required_not_ok": not_run,
    "counts": {s: sum(1 for v in tests.values() if v.split(" ")[0].rstrip(":") == s) for s in ("ok", "FAIL", "ERROR", "skipped")},
    "tests": tests,
    "sparse_agreement": sparse,
}
with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
print(f"run_on_device: wrote {out_path}")
if sparse:
    print(f"{'method':<20} {'budget':>6} {'agreement':>9} {'>= thr':>7} {'forced':>7} {'>= thr':>7} {'kept':>6}")
    for row in sparse["rows"]:
        t = row["threshold"] or {}
        print(f"{row['method']:<20} {str(row['budget']):>6} {row['agreement']:9.4f} {t.get('agreement', float('nan')):7.4f} "
              f"{row['forced_agreement']:7.4f} {t.get('forced_agreement', float('nan')):7.4f} {row['kept']:6.3f}")
if not_run:
    print("run_on_device: these tests did not pass here (skipped or failed): " + ", ".join(not_run))
    sys.exit(1)
EOF
PRC=$?
rm -f "$SPARSE_JSON"
[ "$RC" -ne 0 ] && exit "$RC"
exit "$PRC"
