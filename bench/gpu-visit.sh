#!/usr/bin/env bash
# One batched visit to a lent GPU machine (the `device` tool: 10 minutes per
# command, 30 minutes a session, no Node and no network there), for what only
# a GPU can answer: the CUDA tests, the wave step and block selection on the
# device, the dense kernel against torch SDPA in the same visit, the decode
# loop at 1M. Run it from the repository root there, with the node binary,
# a node_modules that has vitest, dist/ and build/Release/kvrecall.node
# carried: here, ../shared/tools/device-prep packs the node binary into
# .device/node.xz and `tar cf - node_modules | xz -T2 -3 >
# .device/nm-full.tar.xz` the modules; the command there starts with
# `xz -dc .device/node.xz > /tmp/node && chmod +x /tmp/node && export
# PATH=/tmp:$PATH && tar -xJf .device/nm-full.tar.xz && bash bench/gpu-visit.sh`.
#
#   bash bench/gpu-visit.sh [stage ...]   stages: tests wave wave16 wave-probes wave-ab wave-paged rest blocks block-groups block-stages decode-select-stages dense decode decode-wave decode-rpc decode-rpc-trace pool-ranges device-sync device-sync-gap decode-16 decode-8b decode-prof decode-scan ncu-wave ncu-wave128 ncu-blocks ra-scan ra-search preload-shards (default: tests wave blocks dense decode)
#
# ra-search needs no GPU but the 16-core host's CPUs: issue #15's search
# target (8 kv heads of one layer-step at 1M) is set there. Its first run
# generates the keys and builds the graph (minutes); later runs reuse them.
#
# preload-shards needs no GPU but the host's cores (issue #14's preload at
# >= 2 GB/s): LMDB block writes alone over 1, 2, 4, 8 shards (libuv pool 16,
# then 1 vs 4 with libuv's 4), the preload over the stream with the server's
# default (kvrecall.cjs: pool 16) against 1, 4 and 8 shards alternated,
# and one layer per stream (--inflight 2), and the Python client with 1 shard
# and the default; about 3 minutes, results tagged with the card's name.
#
# Each stage has its own time limit so one hang cannot eat the visit; the
# log and every bench/results file the visit wrote land in $OUT.
OUT=${OUT:-/tmp/gpu-visit}
source "$(dirname "$0")/visit-lib.sh"

node --version | tee -a "$L"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | tee -a "$L"
stages=${*:-tests wave blocks dense decode}
for s in $stages; do
  case $s in
    tests) step 240 tests node node_modules/vitest/vitest.mjs run test/cache/simulated-pool.test.ts test/cache/wave-on-device.test.ts test/integration/device-release.test.ts test/integration/gpu-backend.test.ts test/integration/gpu-rest.test.ts test/integration/gpu-wave.test.ts test/integration/rest-beside-attend.test.ts test/native/block-scores.test.ts test/native/gpu-range.test.ts test/native/gpu-sync.test.ts test/native/gpu.test.ts test/native/kmeans-device.test.ts test/native/wave-gpu-paged.test.ts test/native/wave-gpu-page-cap.test.ts test/native/wave-gpu-rest.test.ts test/native/wave-gpu.test.ts test/native/device-calls.test.ts test/native/upload-check.test.ts test/native/ra-scan-gpu.test.ts test/integration/gpu-scan.test.ts ;;  # every test file that needs the device (~30 s on an H100)
    wave)
      step 120 wave-check node dist/bench/wave-gpu.js --check
      step 150 wave-bench node dist/bench/wave-gpu.js --bench
      step 150 wave-bench-cs16 node dist/bench/wave-gpu.js --bench --cluster-size 16 ;;
    wave16)  # the check and clusters of 16 only
      step 120 wave-check node dist/bench/wave-gpu.js --check
      step 150 wave-bench-cs16 node dist/bench/wave-gpu.js --bench --cluster-size 16 ;;
    wave-probes)  # the check, then clusters of 16 with the engine's call at probes 4 and 2 too (results tagged probes)
      step 120 wave-check node dist/bench/wave-gpu.js --check
      step 180 wave-bench-probes node dist/bench/wave-gpu.js --bench --cluster-size 16 --probes 4,2 --tag probes ;;
    wave-graph)  # the check (the lean call replayed from its graph on fresh queries), then the bench: graph against one by one
      step 120 wave-check node dist/bench/wave-gpu.js --check
      step 180 wave-bench-graph node dist/bench/wave-gpu.js --bench --cluster-size 16 --probes 4,2 --tag graph ;;
    wave-ab)  # the wave kernels against their old path (KVRECALL_WAVE_LEGACY=1): the host check, both paths alternated step by step with every answer compared bit for bit, then the bench at clusters of 16 (limits 500 s in all: one device command)
      step 120 wave-check node dist/bench/wave-gpu.js --check
      step 200 wave-ab node dist/bench/wave-gpu-ab.js --steps 50 --cluster-size 16
      step 180 wave-bench-ab node dist/bench/wave-gpu.js --bench --cluster-size 16 --probes 4,2 --tag ab ;;
    wave-paged)  # the paged wave store (K/V on the host, a device row cache; native/cuda/wave_cache.cuh) against the dense one: its GPU tests and the server's, the check, the 1M bench (dense vs paged, 2 query regimes; limits 540 s: one device command)
      step 180 wave-paged-tests node node_modules/vitest/vitest.mjs run test/native/wave-gpu-paged.test.ts test/integration/gpu-wave.test.ts
      step 120 wave-paged-check node dist/bench/wave-gpu-paged.js --check
      step 240 wave-paged-bench node dist/bench/wave-gpu-paged.js --bench ;;
    wave-page-cap)  # the paged store's cap on the bytes a step pages (native/cuda/wave_page_cap.cuh): its GPU test and the paged store's (the cap off must not move it), then at 1M the host-to-device MiB a step and the error against attention over every row, capped (2 MiB from step 16) and uncapped (limits 560 s: one device command; --graph times the steps as the engine runs them)
      step 240 wave-page-cap-tests node node_modules/vitest/vitest.mjs run test/native/wave-gpu-page-cap.test.ts test/native/wave-gpu-paged.test.ts
      step 200 wave-page-cap-bench node dist/bench/wave-gpu-page-cap.js --bench --steps 48
      step 120 wave-page-cap-graph node dist/bench/wave-gpu-page-cap.js --bench --graph --steps 40 --stays 0.9,1 --tag graph ;;
    rest)  # non-wave methods' estimate on the device (engine/rest-on-device.ts): its checks, the call against the host's estimate at 1M, the decode loop's nosa/topk-blocks estimating on the host and on the device
      step 150 rest-tests node node_modules/vitest/vitest.mjs run test/native/wave-gpu-rest.test.ts test/integration/gpu-rest.test.ts
      step 150 rest-bench node dist/bench/wave-gpu-rest.js --bench --steps 30
      step 420 decode-rest node dist/bench/gpu.js --decode --tokens 1048576 --steps 64 --configs nosa-estimate,topk-blocks-estimate ;;
    blocks) step 90 blocks node dist/bench/block-select-gpu.js --steps 200 ;;
    block-groups)  # the device block top-k ranking a block's rows as one group (fd229e2): its GPU tests (grouped answers vs the host's rows; GPU sessions' block selections vs CPU sessions'), rows vs groups on the device at 1M, then the decode loop's selectMs at 1M (limits 540 s: one device command)
      step 150 block-groups-tests node node_modules/vitest/vitest.mjs run test/native/block-scores.test.ts test/integration/gpu-backend.test.ts test/integration/gpu-rest.test.ts
      step 90 block-groups node dist/bench/block-select-groups-gpu.js --steps 200
      step 300 decode-block-groups node dist/bench/gpu.js --decode --tokens 1048576 --steps 32 --configs nosa,topk-blocks --pool-path ab ;;
    block-stages)  # issue #13's block selection, split (bench/block-select-stages-gpu.ts: the select's JS, the device call's host stages, its time on the device, the kernels one by one on the old paths and the new (the pipelined score kernel, the select in two launches), cold and warm), its GPU tests first, then the same with the engine's scorer on the old paths (KVRECALL_BLOCK_SCORES_PIPED=0 KVRECALL_BLOCK_SELECT_SLICED=0; the new are the default since session 28) (limits 360 s)
      step 120 block-stages-tests node node_modules/vitest/vitest.mjs run test/native/block-scores.test.ts test/cache/device-block-scorer.test.ts test/integration/gpu-backend.test.ts
      step 120 block-stages node dist/bench/block-select-stages-gpu.js --steps 300
      step 120 block-stages-old env KVRECALL_BLOCK_SCORES_PIPED=0 KVRECALL_BLOCK_SELECT_SLICED=0 node dist/bench/block-select-stages-gpu.js --steps 300 ;;
    decode-select-stages)  # the decode loop's block selects at 1M split the same way (gpu.js --decode --select-stages: the scorer's call, its wait, its device time, the JS around it)
      step 300 decode-select-stages node dist/bench/gpu.js --decode --tokens 1048576 --steps 64 --configs nosa,topk-blocks --select-stages ;;
    dense)
      step 90 sdpa python3 bench/sdpa_reference.py --out "$OUT/sdpa.json"
      step 120 dense node dist/bench/dense-vs-sdpa.js --sdpa "$OUT/sdpa.json" ;;
    decode) step 300 decode node dist/bench/gpu.js --decode --tokens 1048576 --steps 64 ;;
    decode-wave) step 240 decode-wave node dist/bench/gpu.js --decode --tokens 1048576 --steps 64 --configs wave ;;
    pool-ranges)  # the pool's range tables (native/cuda/block_pool_ranges.cu): the GPU tests (range path vs block by block bit for bit and vs float64, through eviction and while held; PoolModel vs the native pool), then the decode loop at 1M with range parts both ways on one pool, alternating step by step (dense, nosa, topk-blocks; limits 540 s: one device command)
      step 180 pool-ranges-tests node node_modules/vitest/vitest.mjs run test/native/gpu-range.test.ts test/cache/simulated-pool.test.ts test/integration/gpu-backend.test.ts test/native/gpu.test.ts
      step 360 decode-pool-ab node dist/bench/gpu.js --decode --tokens 1048576 --steps 64 --configs nosa,topk-blocks --pool-path ab ;;
    preload-shards)
      g=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o 'H[0-9]00' | tr A-Z a-z); g=${g:-host}
      nproc | tee -a "$L"; uptime | tee -a "$L"
      step 60 lmdb-write-shards env KVRECALL_BENCH_TAG=$g-shards UV_THREADPOOL_SIZE=16 node dist/bench/lmdb-write.js --rounds 3 --shards 1,2,4,8
      step 30 lmdb-write-pool4 env KVRECALL_BENCH_TAG=$g-shards-pool4 node dist/bench/lmdb-write.js --rounds 2 --shards 1,4
      step 100 preload-shards env KVRECALL_BENCH_TAG=$g-shards node dist/bench/preload.js --tokens 262144 --layers 2 --rounds 2 --warmup 1 --via stream --window 2 --shards 0,1,4,8
      step 40 preload-shards-pool4 env KVRECALL_BENCH_TAG=$g-shards-pool4 node dist/bench/preload.js --tokens 262144 --layers 2 --rounds 2 --via stream --window 2 --shards 1,2 --pool 4
      step 40 preload-shards-inflight2 env KVRECALL_BENCH_TAG=$g-shards-inflight2 node dist/bench/preload.js --tokens 262144 --layers 2 --rounds 2 --via stream --inflight 2 --shards 1,0
      if python3 -c 'import numpy, msgpack' 2>/dev/null; then
        mkdir -p "$OUT/results"  # the Python bench writes there; the copy of bench/results comes at the end
        for n in 1 4; do
          (cd clients/python && step 45 preload-python-shards$n env KVRECALL_LMDB_SHARDS=$n UV_THREADPOOL_SIZE=16 KVRECALL_NODE="$(command -v node)" python3 -m kvrecall.bench_preload --serve --tokens 262144 --layers 2 --rounds 2 --out "$OUT/results/preload-python-$g-shards$n.json")
        done
      fi
      uptime | tee -a "$L" ;;
    device-sync)  # GPU calls on the event loop's thread when short (addon/device-calls.ts): sync vs pool answers (GPU test) and the GPU tests that run through both, then the decode loop at 1M with the two ways alternated step by step, back to back (limits 540 s: one device command)
      step 180 device-sync-tests node node_modules/vitest/vitest.mjs run test/native/gpu-sync.test.ts test/native/gpu.test.ts test/native/wave-gpu.test.ts test/native/wave-gpu-rest.test.ts test/native/wave-gpu-paged.test.ts test/integration/gpu-backend.test.ts test/integration/gpu-wave.test.ts test/integration/gpu-rest.test.ts
      step 350 decode-sync-ab node dist/bench/gpu.js --decode --tokens 1048576 --steps 64 --configs wave,nosa-estimate --device-sync ab ;;
    device-sync-gap)  # the same decode A/B after 25 ms asleep before each step, then a stream attend's overhead end to end on the CUDA backend, the two ways alternated on one in-process server (limits 540 s)
      g=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o 'H[0-9]00' | tr A-Z a-z); g=${g:-gpu}
      step 330 decode-sync-ab-gap node dist/bench/gpu.js --decode --tokens 1048576 --steps 64 --configs wave,nosa-estimate --device-sync ab --gap 25
      step 200 transport-gap-gpu env KVRECALL_GPU_BUDGET=4294967296 KVRECALL_BENCH_TAG=$g-gpu-sync-inproc node dist/bench/transport-gap.js --ab inproc --gaps 1,25 --calls 120 --rounds 6 ;;
    decode-rpc|decode-rpc-trace)  # issue #14: bench:decode out of process as visit N (2 layers at 1M, exact + wave, stream, 16 steps) with its per-call table (plain / sampled back to back, the call after the fidelity work apart), then with --sample-layers none (every call back to back, an LLM server's); decode-rpc-trace: one sampled run with bench/decode-rpc-trace.patch applied here (rebuilt) and the stage table of its marks (the patch stays applied for later stages: run it last; limits 500 s: one device command)
      g=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o 'H[0-9]00' | tr A-Z a-z); g=${g:-host}
      runs="rpc:0 rpc-none:none"; tr=""
      if [ "$s" = decode-rpc-trace ]; then
        { git apply bench/decode-rpc-trace.patch || patch -p1 < bench/decode-rpc-trace.patch; } && node node_modules/typescript/bin/tsc -p tsconfig.json || { echo "trace patch failed" | tee -a "$L"; continue; }
        runs="rpc-trace:0"; tr=$OUT/tr; mkdir -p "$tr"
      fi
      uptime | tee -a "$L"
      for r in $runs; do
        tag=${r%%:*} samples=${r#*:}; data=/tmp/kvd-$tag; rm -rf "$data"
        env ${tr:+KVR_TR=$tr/tr-server} KVRECALL_GPU_BUDGET=36500000000 KVRECALL_GPU_WAVE_BUDGET=24000000000 KVRECALL_GPU_KMEANS=1 node dist/cli/cli.js serve --port 8711 --data "$data" > "$OUT/serve-$tag.log" 2>&1 &
        pid=$!
        await_health 8711
        step 240 decode-$tag env ${tr:+KVR_TR=$tr/tr-bench} node dist/bench/decode.js --full --url http://127.0.0.1:8711 --data "$data" --server-pid $pid --layers 2 --tokens ${RPC_TOKENS:-1M} --steps 16 --sweep none --methods wave --via stream --sample-layers $samples --tag $g-2layers-outproc-$tag
        kill -INT $pid; wait $pid
      done
      [ -n "$tr" ] && (cd "$tr" && python3 "$OLDPWD/bench/decode-rpc-trace.py" 'tr-*.json' | tee -a "$L")
      uptime | tee -a "$L" ;;
    decode-16|decode-8b|decode-prof)  # issue #13's decode targets, bench:decode --full at 1M, the server in its own process (its loop polling by default on a GPU host of 8 cores or more). decode-16: the end to end (<= 8 ms a token including RPC, H200), 16 layers of the llama3.2-1b shape, exact + wave, --poll-us 1000 given, two lanes (the plain stream; the client's loop polling too); ~5 min (bench/results/decode-full-llama3.2-1b-h200-16layers-cs16-poll.md). decode-8b: llama3-8b (<= 0.6 ms a layer-step including RPC, >= 8 layers), 8 layers, exact + wave, the same two lanes (a host's RPC with the client asleep was 0.09-0.28 ms a call, session 33). decode-prof: 2 layers of the llama3.2-1b shape, wave alone, 256 steps, the server under V8's sampling profiler (100 us) to find the JS time around a device step (bench/results/decode-prof-h200.md; read with bench/cpuprofile-summary.py). Limits 540 s: one device command each
      g=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o 'H[0-9]00' | tr A-Z a-z); g=${g:-gpu}
      data=/tmp/kvd-$s; rm -rf /tmp/kvd-*; prof="" poll=""
      [ "$s" = decode-prof ] && prof="--cpu-prof --cpu-prof-dir $OUT/prof --cpu-prof-interval 100"
      [ "$s" = decode-16 ] && poll="--poll-us 1000"
      KVRECALL_GPU_BUDGET=20000000000 KVRECALL_GPU_WAVE_BUDGET=40000000000 KVRECALL_GPU_KMEANS=1 node $prof dist/cli/cli.js serve --port 8711 --data "$data" $poll > "$OUT/serve-$s.log" 2>&1 &
      pid=$!
      await_health 8711
      run="node dist/bench/decode.js --full --url http://127.0.0.1:8711 --data $data --server-pid $pid --tokens 1M --sweep none --sample-layers none"
      case $s in
        decode-16) step 500 decode-16 $run --layers 16 --steps 64 --methods exact,wave --via stream,stream-spin --tag $g-16layers-cs16-poll${TAGX:-} ;;
        decode-8b) step 500 decode-8b $run --preset llama3-8b --layers 8 --steps 64 --methods exact,wave --via stream,stream-spin --tag $g-8layers-cs16${TAGX:-} ;;
        *) step 400 decode-prof $run --layers 2 --steps 256 --methods wave --via stream --timing --tag $g-2layers-prof ;;
      esac
      kill -INT $pid; wait $pid; rm -rf "$data"
      [ -d "$OUT/prof" ] && xz -T4 "$OUT"/prof/*.cpuprofile
      uptime | tee -a "$L" ;;
    ncu-wave|ncu-wave128)  # the wave step's kernels one by one under Nsight Compute at the llama3.2-1b shape (bench/results/wave-step-ncu-d64-h100-b2.md: how to read it); ncu-wave128: at the issue's and llama3-8b's d = 128, budget 1% as the decode runs it (is rescoring, ~0.16 ms there, bound by its scattered K rows? it reads them by token through the member map)
      hd=64; [ "$s" = ncu-wave128 ] && hd=128
      step 300 $s /usr/local/cuda/bin/ncu --target-processes all --kernel-name-base function --kernel-name 'regex:Score|Histogram|FindBin|CollectBin|Resolve|TakeWeights|Gather|Rescore|Partial|Attend|Estimate|Merge|Scatter|Pack|Exact|StepClear|OrderRange' --launch-skip 30 --launch-count 40 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --csv --log-file "$OUT/$s.csv" node dist/bench/wave-gpu.js --profile --steps 2 --cluster-size 16 --head-dim $hd --budget-share 0.01 --window 256 ;;
    ncu-blocks)  # the block scorer's kernels (ScoreBlocksStaged, SelectTop) under Nsight Compute at 1M, 8 kv heads, 4 rows a block: the engine's replayed graph and the kernels launched one by one (bench/block-select-stages-gpu.ts --profile writes no results)
      step 300 ncu-blocks /usr/local/cuda/bin/ncu --target-processes all --kernel-name-base function --kernel-name 'regex:ScoreBlocks|SelectTop' --launch-skip 40 --launch-count 12 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats --csv --log-file "$OUT/ncu-blocks.csv" node dist/bench/block-select-stages-gpu.js --steps 4 --profile ;;
    ra-scan)  # issue #15's device code scan (native/cuda/ra_scan*.cu*): its GPU tests (the scanKeep PQ pass against the host's two-pass scan included), the scan test under compute-sanitizer's synccheck and racecheck (barriers and shared memory of the cuts), then the 1M layer-step, one pass and --keep 0.08 (the first run builds the workload and graph, cached in /tmp; limits 560 s: one device command)
      step 120 scan-tests node node_modules/vitest/vitest.mjs run test/native/ra-scan-gpu.test.ts test/integration/gpu-scan.test.ts
      for tool in synccheck racecheck; do
        step 90 scan-$tool /usr/local/cuda/bin/compute-sanitizer --tool $tool --target-processes all --error-exitcode 9 node node_modules/vitest/vitest.mjs run test/native/ra-scan-gpu.test.ts -t scanKeep
      done
      step 200 ra-scan-gpu node dist/bench/ra-scan-gpu.js --reps 3 --tag ${TAG:-visit}
      step 90 ra-scan-gpu-keep node dist/bench/ra-scan-gpu.js --reps 3 --keep 0.08 --tag ${TAG:-visit} ;;
    decode-scan) step 300 decode-scan node dist/bench/gpu.js --decode --tokens 1048576 --steps 64 --configs ra-scan,ra-scan-keep ;;
    ra-search) step 420 ra-search node dist/bench/ra-search.js --reps 3 --out bench/results/ra-search-1048576-host.md ;;
    *) echo "unknown stage $s" | tee -a "$L" ;;
  esac
done
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | tee -a "$L"
# What the benches wrote, to commit from the development machine.
mkdir -p "$OUT/results"
find bench/results -newer "$OUT/.start" -type f -exec cp {} "$OUT/results/" \;
stamp done
