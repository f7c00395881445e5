#!/usr/bin/env bash
# Issue #14's transport and preload numbers on the 16-core GPU host, in one
# visit of about 4 minutes (no network there: node and node_modules carried
# as for bench/gpu-visit.sh, whose header says how; no npm). From the
# repository root there:
#
#   bash bench/transport-visit.sh [stage ...]   stages: transport cuda preload python (default: all), ts-stacked
#
# transport: bench:transport on the CPU backend (comparable with the 2-core
#   VM's bench/results/transport-vm.md), 300 calls per row in 3 rounds;
# cuda: the same with the CUDA backend (the issue's batch target is there);
# preload: bench/preload.js, 2 layers x 262144 tokens (2.1 GB of K/V), 2
#   rounds: over the stream (2 and 4 uploads ahead of their answers; a
#   layer per stream), over HTTP as before (one upload in flight), and the
#   Python client over the stream (kvrecall.bench_preload), all with the
#   server's main-thread CPU beside its process's; and LMDB's block writes
#   alone (bench/lmdb-write.js: the store's ceiling for a preload);
# python: the Python client's per-call overhead, when python3 has numpy and
#   msgpack (skipped otherwise);
# ts-stacked (only when named): the TypeScript client's stacked batch of 32
#   through the shared-memory segment against one stream attend, CUDA
#   backend (bench/transport-stacked.ts; TAG names the host, default h100);
# dim (only when named, ~2 min): one stream attend's RPC by head dim (64,
#   128) and by the server's step time, the client asleep, polling, or woken
#   0.2 ms ahead of the answer, with the same bytes over plain node:net
#   beside it, held 0.1-3 ms
#   (bench/transport-dim.ts; CPU backend, the step's time set by the
#   document's length), then the same attends on the CUDA backend (the
#   GPU pool's exact; no floor); TAG names the host, default h200: issue
#   #13's 8b-shape RPC, bytes or wait; and each process's CPU a call at both
#   head dims at the shortest step, with the JS stages of a call's bytes
#   timed apart (bench/transport-dim-cost.ts), CPU and CUDA backends.
# Each stage has its own time limit; the log and every results file written
# land in $OUT (results/), to commit from the development machine.
OUT=${OUT:-/tmp/transport-visit}
mkdir -p "$OUT/results"
source "$(dirname "$0")/visit-lib.sh"

node --version | tee -a "$L"
nproc | tee -a "$L"
uptime | tee -a "$L"
for s in ${*:-transport cuda preload python}; do
  case $s in
    transport) step 130 transport env KVRECALL_BENCH_TAG=h200 node dist/bench/transport.js --calls 300 --rounds 3 ;;
    cuda) step 90 transport-cuda env KVRECALL_BENCH_TAG=h200-cuda KVRECALL_GPU_BUDGET=8589934592 node dist/bench/transport.js --calls 300 --rounds 3 ;;
    preload)
      step 60 preload env KVRECALL_BENCH_TAG=h200 node dist/bench/preload.js --tokens 262144 --layers 2 --rounds 2 --via stream --window 2
      step 60 preload-window4 env KVRECALL_BENCH_TAG=h200-window4 node dist/bench/preload.js --tokens 262144 --layers 2 --rounds 2 --via stream --window 4
      step 60 preload-inflight2 env KVRECALL_BENCH_TAG=h200-inflight2 node dist/bench/preload.js --tokens 262144 --layers 2 --rounds 2 --via stream --inflight 2
      step 60 preload-http env KVRECALL_BENCH_TAG=h200-http node dist/bench/preload.js --tokens 262144 --layers 2 --rounds 2 --via http
      step 60 lmdb-write env KVRECALL_BENCH_TAG=h200 node dist/bench/lmdb-write.js --rounds 3
      if python3 -c 'import numpy, msgpack' 2>/dev/null; then
        (cd clients/python && step 90 preload-python env KVRECALL_NODE="$(command -v node)" python3 -m kvrecall.bench_preload --serve --tokens 262144 --layers 2 --rounds 2 --out "$OUT/results/preload-python-h200.json")
      fi ;;
    python)
      if python3 -c 'import numpy, msgpack' 2>/dev/null; then
        (cd clients/python && step 60 python env KVRECALL_NODE="$(command -v node)" python3 -m kvrecall.bench_transport --serve --out "$OUT/results/transport-python-h200.json")
      else
        echo "python: skipped (python3 lacks numpy or msgpack)" | tee -a "$L"
      fi ;;
    dim)
      step 100 transport-dim env KVRECALL_BENCH_TAG="${TAG:-h200}" node dist/bench/transport-dim.js --tokens 16,2048,8192,16384,32768,65536 --holds 0.1,0.3,0.45,0.5,0.65,0.7,1,1.5,3 --calls 150 --rounds 5
      step 70 transport-dim-cuda env KVRECALL_BENCH_TAG="${TAG:-h200}-cuda" KVRECALL_GPU_BUDGET=8589934592 node dist/bench/transport-dim.js --tokens 16,32768,65536,131072,196608,262144 --floor 0 --calls 120 --rounds 4
      step 40 transport-dim-cost env KVRECALL_BENCH_TAG="${TAG:-h200}-poll1000" node dist/bench/transport-dim-cost.js --calls 4000 --rounds 40
      step 40 transport-dim-cost-cuda env KVRECALL_BENCH_TAG="${TAG:-h200}-cuda-poll1000" KVRECALL_GPU_BUDGET=8589934592 node dist/bench/transport-dim-cost.js --calls 4000 --rounds 40 ;;
    ts-stacked) step 150 ts-stacked env KVRECALL_BENCH_TAG="${TAG:-h100}-cuda" KVRECALL_GPU_BUDGET=8589934592 node dist/bench/transport.js --stacked --calls 300 ;;
    *) echo "unknown stage $s" | tee -a "$L" ;;
  esac
done
find bench/results -newer "$OUT/.start" -type f -exec cp {} "$OUT/results/" \;
stamp done
