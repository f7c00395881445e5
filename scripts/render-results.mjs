#!/usr/bin/env node
// Renders the README's result blocks from the committed result files, so that
// every number the README quotes comes from a file in bench/results/ or
// clients/python/results/ (each block names its files).
//
//   node scripts/render-results.mjs           rewrite README.md's blocks in place
//   node scripts/render-results.mjs --check   exit 1 if README.md is out of date
//
// A block is the text between `<!-- results:NAME begin -->` and
// `<!-- results:NAME end -->`; everything outside the markers is left as it
// is. Every block named below must appear exactly once, and every block in
// the README must be one named below. Plain Node ESM, no dependencies.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
// A run that passed no --cluster-size ran at the documents' default (index/wave/cluster-build.ts DEFAULT_CLUSTER_OPTIONS).
const DEFAULT_CLUSTER_SIZE = 16;

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const README = join(ROOT, 'README.md');

// ---------------------------------------------------------------- inputs

const text = (path) => readFileSync(join(ROOT, path), 'utf8');
const json = (path) => JSON.parse(text(path));

// ---------------------------------------------------------------- formatting

/** n significant digits, trailing zeros dropped: 0.340 → "0.34", 10.01 → "10". */
const sig = (x, n = 2) => String(Number(x.toPrecision(n)));
/** Milliseconds as the README quotes them: whole above 10, two significant digits below. */
const ms = (x) => (x >= 10 ? x.toFixed(0) : x.toPrecision(2));
/** A fraction as a percentage with n significant digits (more when the integer part needs them: 102%). */
const pct = (x, n = 2) => `${pctNumber(x, n)}%`;
const pctNumber = (x, n = 2) => sig(x * 100, Math.max(n, Math.floor(Math.log10(Math.abs(x * 100) || 1)) + 1));
/** Fractions as one percentage range: "25–27%". */
const pctSpan = (values, n = 2) => `${span(values, (v) => pctNumber(v, n))}%`;
/** Small errors: 1.1e-6. */
const sci = (x) => x.toExponential(1);
const fix = (x, d) => x.toFixed(d);
/** Token counts: 131072 → "128K", 1048576 → "1M". */
const tok = (n) => (n >= 1 << 20 && n % (1 << 20) === 0 ? `${n >> 20}M` : n >= 1024 && n % 1024 === 0 ? `${n >> 10}K` : String(n));
const mib = (bytes) => bytes / 2 ** 20;
const gib = (bytes) => bytes / 2 ** 30;
/** "a–b" over the formatted values; one value when they format the same. */
function span(values, f) {
  const lo = f(Math.min(...values)), hi = f(Math.max(...values));
  return lo === hi ? lo : `${lo}–${hi}`;
}
/** Needle hits "a/n" over rows: "a–b/n". */
function needleSpan(rows) {
  const hits = rows.map((r) => Number(r.needleHits.split('/')[0]));
  const of = rows[0].needleHits.split('/')[1];
  return `${span(hits, String)}/${of}`;
}
function table(header, align, rows) {
  return [`| ${header.join(' | ')} |`, `| ${align.map((a) => (a === 'r' ? '---:' : '---')).join(' | ')} |`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
}
/** The machine a result file names, in a few words. */
function machine(m) {
  if (typeof m === 'string') return m.replace(/ \(native pool \d+ threads\)/, '').replace('Intel(R) Xeon(R) Processor', 'Xeon');
  return `${m.cpu.replace('Intel(R) Xeon(R) Processor', 'Xeon')}, ${m.cores} cores, ${fix(m.memoryGiB, 1)} GiB`;
}
const day = (iso) => iso.slice(0, 10);

/**
 * LMDB block shards, alternated in one sitting per machine: the writes alone
 * (bench/results/lmdb-write-<tag>-shards.json) and the preload over the
 * stream (preload-<tag>-shards*.json), GB/s ranges per shard count.
 */
function shardLines() {
  const gb = (j, s) => j.bytes / s / 1e9;
  const byShards = (rounds, f) => {
    const counts = [...new Set(rounds.map((r) => r.shards))];
    return counts.map((n) => `${n || 'default'}: ${span(rounds.filter((r) => r.shards === n).map(f), (v) => fix(v, 2))}`).join(', ');
  };
  const lines = ['', `**LMDB block shards** (\`--lmdb-shards\`, DESIGN.md "Durability"; counts alternated within each round of one sitting, GB/s by shard count):`];
  for (const tag of ['vm', 'h100', 'h200']) {
    const w = `bench/results/lmdb-write-${tag}-shards.json`;
    if (!existsSync(join(ROOT, w))) continue;
    const lw = json(w);
    const pre = ['', '-b'].map((x) => `bench/results/preload-${tag}-shards${x}.json`).filter((f) => existsSync(join(ROOT, f)));
    const runs = pre.flatMap((f) => json(f).rounds.map((r) => ({ ...r, j: json(f) })));
    const p0 = json(pre[0]);
    lines.push(
      `- ${machine(lw.machine)}, load ${span(lw.rounds.map((r) => r.load), (v) => fix(v, 1))}: writes alone (\`${w}\`, 1.07 GB, libuv pool ${lw.uvThreadpool}) ${byShards(lw.rounds, (r) => lw.bytes / r.seconds / 1e9)};` +
        ` the preload (\`${pre.join('`, `')}\`, ${fix(p0.bytes / 1e9, 2)} GB, server's pool ${p0.uvThreadpool}, load ${span(runs.map((r) => r.load), (v) => fix(v, 1))}) ${byShards(runs, (r) => gb(r.j, r.uploadS))}, seal ${byShards(runs, (r) => gb(r.j, r.sealS))}.`,
    );
  }
  return lines;
}

/**
 * One server, preload after preload with deletes between (bench/preload-rounds.ts), before and after each document had
 * LMDB environments of its own, alternated in one sitting (bench/results/preload-vm-rounds.json).
 */
function roundsLines() {
  const f = 'bench/results/preload-vm-rounds.json';
  if (!existsSync(join(ROOT, f))) return [];
  const { runs } = json(f);
  const later = (pred) => runs.filter(pred).flatMap((r) => r.preloads.slice(1).map((p) => ({ ...p, bytes: r.bytes })));
  const cpu = (ps) => span(ps.map((p) => p.serverUploadCpuS), (v) => fix(v, 1));
  const gbs = (ps, k) => span(ps.map((p) => p.bytes / p[k] / 1e9), (v) => fix(v, 2));
  const s4 = (t) => (r) => r.shards === 4 && r.tag.includes(t);
  const before = later(s4('before')), after = later(s4('after'));
  const first = runs.filter(s4('before')).map((r) => r.preloads[0]);
  return [
    '',
    `**Preload after delete** (\`bench/preload-rounds.ts\`: one server, the TypeScript client, the Python client and \`kvrecall preload\` in turn, each preload of ${fix(runs[0].bytes / 1e9, 2)} GB sealed and deleted; \`${f}\`, ${machine(runs[0].machine)}, load ${span(runs.flatMap((r) => r.preloads.map((p) => p.load)), (v) => fix(v, 1))}; 4 block environments):` +
      ` with blocks in shared environments, a preload after a delete cost the server ${cpu(before)} CPU s (its first ${cpu(first)}), upload ${gbs(before, 'uploadS')} GB/s;` +
      ` with each document's own, ${cpu(after)} CPU s, ${gbs(after, 'uploadS')} GB/s, seal (exact only) ${gbs(after, 'sealS')} GB/s.`,
    ...hostRoundsLines(),
  ];
}

/** The same rounds on the GPU host, by path (issue #14's 2 GB/s for each of the three), one line per run that exists. */
function hostRoundsLines() {
  const runs = [['preload-h100-rounds', ''], ['preload-h100-cli-split', ', the CLI loading only the client (e5444a2)'],
    ['preload-h100-rounds-1m-wb0', ', at 1M tokens (the LMDB write-back off, the default)'], ['preload-h100-rounds-1m-wb', ', at 1M tokens with `--lmdb-write-back 268435456`']];
  return runs.map(([f, what]) => [`bench/results/${f}.json`, what]).filter(([f]) => existsSync(join(ROOT, f))).map(([f, what]) => {
    const j = json(f), by = (path, k) => span(j.preloads.filter((p) => p.path === path).map((p) => j.bytes / p[k] / 1e9), (v) => fix(v, 2));
    const paths = [...new Set(j.preloads.map((p) => p.path))], seal = span(j.preloads.map((p) => j.bytes / p.sealS / 1e9), (v) => fix(v, 2));
    return `\nThe same rounds on the GPU host${what} (\`${f}\`, ${machine(j.machine)}, ${j.date.slice(0, 10)}, ${fix(j.bytes / 1e9, 2)} GB each): upload ${paths.map((p) => `${p} ${by(p, 'uploadS')}`).join(', ')} GB/s; seal (exact only) ${seal} GB/s.`;
  });
}

// ---------------------------------------------------------------- blocks

/** bench:model at the server's default budgets: which methods lose a pass key dense finds. */
function defaultsLine(files) {
  return `At the server's default budgets: ${files.filter((f) => existsSync(join(ROOT, f))).map(defaultsOf).join('; ')}.`;
}
function defaultsOf(f) {
  const j = json(f);
  const parts = j.lengths.map((r) => {
    const methods = r.configs.filter((c) => c.label !== 'exact');
    const dense = r.configs.find((c) => c.label === 'exact').pass_key;
    const lost = methods.filter((c) => c.pass_key.lost_vs_dense > 0).map((c) => `\`${c.label}\` loses ${c.pass_key.lost_vs_dense}`);
    const shares = methods.map((c) => c.exact_share);
    return `${tok(r.length)} bytes, ${r.trials} trials, ${methods.length} methods at ${pctSpan(shares)} exact, dense ${dense.hits}/${dense.trials} keys: ` +
      (lost.length ? lost.join(', ') : 'no method loses a key dense finds') +
      `, agreement ${span(methods.map((c) => c.agreement), (x) => fix(x, 3))}, worst layer ${fix(Math.max(...methods.map((c) => Math.max(...c.layers.map((l) => l.err)))), 3)}`;
  });
  return `${parts.join('; ')} (\`${f}\`, ${machine(`${j.machine.cpu}, ${j.machine.cores} cores`)}, ${j.date.slice(0, 10)})`;
}

/** The batch's overhead traced at both ends, and the batch answer packer alternated with the tree before it (bench/transport-ab.ts). */
function batchLines() {
  const trace = 'bench/results/transport-vm-batch-trace.json', abs = ['bench/results/transport-vm-batch-ab.json', 'bench/results/transport-vm-batch-ab-2.json'];
  if (!existsSync(join(ROOT, trace)) || !abs.every((f) => existsSync(join(ROOT, f)))) return [];
  const t = json(trace).sides.before, runs = abs.map(json);
  const change = (row) => runs.map((a) => `${fix(a.overheadMs.before[row].p50, 2)} → ${fix(a.overheadMs.after[row].p50, 2)}`).join(' and ');
  const shares = Object.values(t).filter((k) => typeof k === 'object' && 'movingShare' in k);
  const batch = [t['2'], t['3']];
  return [
    '',
    `AMD EPYC, 2 cores, the batch traced at both ends (\`${trace}\`, load ${json(trace).loadAverage}): from the sender's write call until the receiver holds the whole message (kernel copies, waking the receiver, its reads) is ${span(shares.map((k) => k.movingShare), (x) => fix(x, 2))} of a call's overhead p50, one step's as much as a batch's; of the JS work, the largest is the server's after the batch (${span(batch.map((k) => k.serverEncodeUs / 1000), (x) => fix(x, 2))} ms, everything it touches cold). ` +
      `Batch answers packed straight into their frame (\`api/batch-pack.ts\`), two servers side by side, two runs (${abs.map((f) => `\`${f}\``).join(', ')}, load ${span(runs.flatMap((a) => a.loadPerRound), (x) => fix(x, 1))}): stream batch of 32 ${change('batch')} ms (f32), ${change('batch16')} ms (f16); after, ${span(runs.map((a) => a.ratios.after.p50.batchVsStream), (x) => fix(x, 1))}× (f32) and ${span(runs.map((a) => a.ratios.after.p50.batch16VsStream16), (x) => fix(x, 1))}× (f16) one stream attend (target 2×).`,
  ];
}

const BLOCKS = {
  'gpu-dense': () => {
    const f = 'bench/results/gpu-dense-h200.json';
    const j = json(f);
    const sdpa = (r) => j.sdpa.cases.find((x) => x.headDim === r.headDim && x.tokens === r.tokens).sdpa_enable_gqa.p50;
    const rows = j.rows.map((r) => [`${r.headDim}`, tok(r.tokens), fix(sdpa(r), 3), fix(r.ours.p50, 3), `${fix(r.ours.p50 / sdpa(r), 2)}×`, `${sig(r.oursGBps / 1000)} TB/s`]);
    return [
      `**Dense decode kernel vs torch SDPA** (\`${f}\`, ${j.device}, ${day(j.date)}, \`bench/dense-vs-sdpa.ts\` + \`bench/sdpa_reference.py\` in one visit):`,
      `one layer, one query token, 32 q / 8 kv heads, f16, every block resident; p50 of CUDA-event times.`,
      '',
      table(['d', 'tokens', 'SDPA ms', 'kvrecall ms', 'ratio', 'K+V read'], ['r', 'r', 'r', 'r', 'r', 'r'], rows),
    ].join('\n');
  },

  fidelity: () => {
    const f = 'bench/results/fidelity-131072.json';
    const j = json(f);
    const o = j.options;
    const rows = j.rows.map((r) => [r.config, r.method, r.estimate ? 'on' : 'off', pct(r.exactShare, 3), fix(r.outError, 3), fix(r.oracleError, 3), `${r.needlesFound}/${r.needleSteps}`]);
    return [
      `**Fidelity with and without the estimation zone** (\`${f}\`, ${machine(j.machine)}, ${day(j.date)}, \`npm run bench:fidelity\`):`,
      `${tok(o.tokens)} tokens, ${o.kvHeads} kv heads × 4 q heads, d=128, ${o.steps} decode steps of the generator in its default and broad`,
      `configurations; budget ${pct(o.budget)} of the context + 16 sinks + 64 window; mean output error per q head against float64;`,
      `\`oracle\` is the exact top-k as a method; the last error column is the exact top-k at the same exact count, without estimation.`,
      '',
      table(['config', 'method', 'estimate', 'exact', 'output error', 'top-k oracle, same count', 'needles'], ['l', 'l', 'l', 'r', 'r', 'r', 'r'], rows),
    ].join('\n');
  },

  model: () => {
    const files = ['bench/results/model-tally-16k.json', 'bench/results/model-tally-32k.json'];
    const misses = (c) => Object.entries({ exact_share: '> 3% exact', agreement: 'agreement', layer_err: 'a layer > 0.05', pass_key: `keys ${-c.key_gap_points > 0 ? '+' : ''}${fix(-c.key_gap_points, 1)} points`, trials: '< 100 trials' })
      .filter(([k]) => !c.meets[k]).map(([, why]) => why);
    const rows = files.flatMap((f) => json(f).configs.map((c) => {
      const worst = c.layers_err.indexOf(c.worst_layer_err);
      const miss = misses(c);
      return [tok(json(f).length), c.label, String(c.trials), pct(c.exact_share), fix(c.agreement, 3), `${fix(c.worst_layer_err, 3)} (L${worst})`,
        `${c.pass_key.hits} / ${c.pass_key.dense_hits}`, String(c.pass_key.lost_vs_dense), miss.length ? `no: ${miss.join(', ')}` : 'yes'];
    }));
    const sources = files.map((f) => `${tok(json(f).length)}: ${json(f).files.map((x) => `\`${x.file}\` (${x.configurations.join(', ')}; ${x.machine.replace(/Intel\(R\) Xeon\(R\) Processor/g, 'Xeon')})`).join(', ')}`);
    const p = json(files[0]).params;
    return [
      `**kvrecall-code-13M through kvrecall** (\`bench/model/tally.py\` over the result files below, \`npm run bench:model\`): bytes of held-out code`,
      `with a planted pass key, every layer's attention a session's answer; budget ${pct(p.budget)} of the context + ${p.sinks} sinks + ${p.window} window, estimation on;`,
      `agreement is next-byte top-1 with dense (\`exact\`) over ${p.steps} teacher-forced positions a trial; worst layer: the highest per-layer mean attention`,
      `output error against float64; pass keys: the method's / dense's on the same trials. Issue #16's targets: ≤ 3% exact, agreement ≥ 0.99, every`,
      `layer ≤ 0.05, keys within 2 points of dense over ≥ 100 trials.`,
      '',
      table(['bytes', 'method', 'trials', 'exact', 'agreement', 'worst layer', 'pass keys', 'lost vs dense', 'targets met'], ['r', 'l', 'r', 'r', 'r', 'r', 'r', 'r', 'l'], rows),
      '',
      ...sources.map((s) => `- ${s}`),
      '',
      defaultsLine(['bench/results/model-vm-defaults-f157a3b.json', 'bench/results/model-vm-defaults-16k-32k.json']),
    ].join('\n');
  },

  transport: () => {
    const files = ['bench/results/transport-vm.json', 'bench/results/transport-h200.json'];
    const rows = files.map((f) => {
      const j = json(f);
      const half = j.f16 ? `${fix(j.f16.batchOverheadMsP50, 2)} (${fix(j.f16.batchVsSingleStream, 1)}× one f16 step)` : '—';
      return [`${machine(j.machine)} (\`${f}\`)`, fix(j.healthMsP50, 2), `${fix(j.httpOverheadMsP50, 2)} (${fix(j.httpVsHealth, 2)}×)`, `${fix(j.streamOverheadMsP50, 2)} (${fix(j.streamVsHealth, 2)}×)`, `${fix(j.batchOverheadMsP50, 2)} (${fix(j.batchVsSingleStream, 1)}× one step)`, half];
    });
    return [
      `**Decode-call overhead** (client wall − server \`stats.ms\`, p50, TypeScript client, \`npm run bench:transport\`): one layer, 32 q / 8 kv heads,`,
      `d=128, \`exact\` over 4K tokens; a bare \`GET /v1/health\` on the same keep-alive connection for scale; the batch carries 32 sessions' steps;`,
      `f16: q and out in the model's dtype (\`outDtype\`), half the tensor bytes.`,
      '',
      table(['machine', 'bare health ms', 'HTTP attend ms', 'stream attend ms', 'stream batch of 32 ms', 'stream batch of 32, f16 ms'], ['l', 'r', 'r', 'r', 'r', 'r'], rows),
      ...files.flatMap((f) => {
        // The floor after the server's time (bench/transport.ts): bare TCP, the same bytes, the peer waiting the server's p50 time first.
        const j = json(f), p = j.pausedFloor;
        if (!p) return [];
        const single = j.f16.streamOverheadMsP50 - p.single16MsP50, batch = j.f16.batchOverheadMsP50 - p.batch16MsP50;
        return [
          '',
          `${machine(j.machine)}: a bare TCP exchange of the same bytes, its peer first waiting the server's p50 time, takes ${fix(p.single16MsP50, 2)} ms beyond the wait for one f16 step and ${fix(p.batch16MsP50, 2)} ms for the f16 batch (${fix(p.batch16MsP50 / p.single16MsP50, 1)}×): above that floor, one f16 stream step costs ${fix(single, 2)} ms and the batch ${fix(batch, 2)} ms (${fix(batch / single, 1)}×).`,
        ];
      }),
      ...batchLines(),
    ].join('\n');
  },

  preload: () => {
    // The 2-core VM's before/after runs, alternated (bench/preload-ab.ts), the Python client's, the 16-core host's latest
    // before LMDB shards, and the shard counts alternated (bench/lmdb-write.ts, bench/preload.ts --shards).
    const ab = 'bench/results/preload-ab-vm.json', py = 'bench/results/preload-python-vm.json', host = 'bench/results/preload-h100.json';
    const a = json(ab), p = json(py), h = json(host);
    const rows = a.runs.map((r) => {
      const mine = a.rows.filter((x) => x.label === r.label);
      const gbps = (x, s) => x.bytes / s / 1e9;
      return [r.label, span(mine.map((x) => gbps(x, x.round.uploadS)), (v) => fix(v, 2)), span(mine.map((x) => x.round.serverMainCpuS / (x.bytes / 1e9)), (v) => fix(v, 2)), span(mine.map((x) => x.round.serverUploadCpuS / (x.bytes / 1e9)), (v) => fix(v, 1))];
    });
    const pyVia = (via) => p.runs.filter((r) => r.via === via);
    const hostVia = h.via ?? 'http';
    const hostGb = h.rounds.map((r) => h.bytes / r.uploadS / 1e9), hostSeal = h.rounds.map((r) => h.bytes / r.sealS / 1e9);
    return [
      `**Preload** (\`bench/preload.ts\`: the TypeScript client → a server in its own process on 127.0.0.1, LMDB store, 2 layers × 8 kv heads × d=128 f16 in uploads`,
      `of 4096 tokens (16 MiB), exact only). Over the stream (\`GET /v1/stream\`) two uploads go ahead of their answers and the server reads each`,
      `straight from the socket; \`kvrecall preload\`, bench:decode and the Python client's \`push_document\` upload this way. ${machine(a.machine)},`,
      `${fix(a.rows[0].bytes / 1e9, 2)} GB per run, the variants alternated ${a.reps} times in one sitting (\`${ab}\`, load ${span(a.rows.map((x) => x.load), (v) => fix(v, 1))} from other work):`,
      '',
      table(['variant', 'upload GB/s', "server's main thread, CPU s per GB", 'server process, CPU s per GB'], ['l', 'r', 'r', 'r'], rows),
      '',
      `The Python client (\`kvrecall.bench_preload\`, ${fix(p.runs[0].kvBytes / 1e9, 2)} GB per run, alternated, \`${py}\`): ${span(pyVia('stream').map((r) => r.uploadGBps), (v) => fix(v, 2))} GB/s over the stream against ${span(pyVia('http').map((r) => r.uploadGBps), (v) => fix(v, 2))} over HTTP,`,
      `client CPU ${span(pyVia('stream').map((r) => r.round.clientCpuS), (v) => fix(v, 2))} s against ${span(pyVia('http').map((r) => r.round.clientCpuS), (v) => fix(v, 2))} s.`,
      `${machine(h.machine)} (\`${host}\`, ${day(h.date)}, over ${hostVia === 'stream' ? `the stream, ${h.window ?? 2} ahead` : 'HTTP, before the stream'}, ${fix(h.bytes / 1e9, 2)} GB):`,
      `upload ${span(hostGb, (v) => fix(v, 2))} GB/s, seal (exact only) ${span(hostSeal, (v) => fix(v, 2))} GB/s; targets 2 and 1 GB/s.`,
      ...shardLines(),
      ...roundsLines(),
    ].join('\n');
  },

  'attend-cpu': () => {
    const f = 'bench/results/attend-cpu.json';
    const j = json(f);
    const s = j.config.shape;
    const kernel = j.kernel.results.map((r) => `${tok(r.tokens)} ${ms(r.medianMs)} ms`).join(', ');
    const last = j.kernel.results[j.kernel.results.length - 1];
    const h = j.http;
    return [
      `**Exact CPU attention per layer-step** (${s.qHeads} q / ${s.kvHeads} kv heads, d=${s.headDim}, ${s.dtype};`,
      `\`${f}\`, ${machine(j.machine)}, ${day(j.date)}): ${kernel} (median;`,
      `≈ ${sig(last.gbPerS)} GB/s of K/V at ${tok(last.tokens)}; a single-thread memcpy moves ${sig(j.kernel.memcpyGbPerS)} GB/s).`,
      `HTTP \`attend\` round trip p50 ${fix(h.kvrecall.p50Ms, 2)} ms vs ${fix(h.echo.p50Ms, 2)} ms for a raw node:http echo of the same`,
      `payload sizes (ratio ${sig(h.ratioP50)}); the server's own step is ${fix(h.serverDecodeMsP50, 2)} ms of it.`,
    ].join('\n');
  },

  'gpu-kernel': () => {
    const f = 'bench/results/gpu-h100.json', c = 'bench/results/gpu-h100-check.txt';
    const j = json(f);
    const checks = text(c).split('\n').filter((l) => /^(ok|FAIL)\b/.test(l));
    const passed = checks.filter((l) => l.startsWith('ok')).length;
    const cases = checks.filter((l) => / d=\d+ /.test(l));
    const values = (re) => [...new Set(cases.map((l) => Number(l.match(re)[1])))].sort((a, b) => a - b);
    const errs = (label) => checks.flatMap((l) => (l.match(new RegExp(`${label} ([^ ]+)/([^ ]+)`)) ?? []).slice(1).map(Number));
    const evictions = checks.filter((l) => l.includes('eviction')).map((l) => Number(l.match(/\((\d+) evictions\)/)[1]));
    const dtypes = [...new Set(checks.map((l) => l.split(/\s+/)[1]))];
    const blocks = values(/blocks=(\d+)/);
    const a = j.attend, first = a[0], lastA = a[a.length - 1];
    const h = j.h2d;
    return [
      `**GPU** (\`${f}\`, ${j.device}, ${day(j.date)}): the decode kernel matches the CPU path and a float64`,
      `reference (\`${c}\`: ${passed}/${checks.length} checks, d ${values(/ d=(\d+)/).join('/')}, GQA ${values(/ G=(\d+)/).join('/')},`,
      `${blocks[0]}–${blocks[blocks.length - 1]} blocks, ${dtypes.join('/')}, eviction under pressure (${evictions.join(' and ')} evictions);`,
      `max abs error ${sci(Math.max(...errs('gpu-ref')))} against float64, ${sci(Math.max(...errs('gpu-cpu')))} against the CPU path);`,
      `${ms(first.kernelMsMedian)} ms at ${tok(first.tokens)}, ${ms(lastA.kernelMsMedian)} ms at ${tok(lastA.tokens)} tokens resident`,
      `(≈${sig(lastA.GBps / 1000)} TB/s, ${pct(lastA.fractionOf3TBps)} of the ~3 TB/s HBM); pool uploads ${fix(h.uploadGBps, 1)} GB/s`,
      `end to end (${pct(h.uploadGBps / h.referencePinnedGBps)} of the ${h.referencePinnedGBps} GB/s pinned copy), bare pinned copies`,
      `${fix(h.pinnedProbeGBps, 1)} GB/s.`,
    ].join('\n');
  },

  'gpu-decode': () => {
    const f = 'bench/results/gpu-decode-h200.json';
    const j = json(f);
    const s = j.shape, c = j.configs;
    const sparse = c.filter((x) => x.method !== 'exact');
    const roomy = sparse.filter((x) => x.poolShareOfKv > 0.03), tight = sparse.filter((x) => x.poolShareOfKv <= 0.03);
    const rows = c.map((x) => [
      x.method === 'exact' ? `${x.config}, all resident` : x.config,
      pct(x.poolShareOfKv),
      ms(x.stepMsP50),
      ms(x.selectMsP50),
      `${ms(x.attendMsP50)} (${ms(x.kernelMsP50)})`,
      fix(x.hitRate, 3),
      `${sig(mib(x.bytesInPerStepMean))} MiB`,
      fix(x.outErrorMean, 2),
    ]);
    const by = (list, m) => list.find((x) => x.method === m);
    const tn = by(tight, 'nosa'), tt = by(tight, 'topk-blocks');
    return [
      `**GPU decode loop at ${tok(s.tokens)} tokens per layer** (\`${f}\`, ${j.device}, ${day(j.date)}, \`npm run bench:gpu\`):`,
      `${j.workload.steps} steps of \`decodeStep\` in process over the seeded workload (${s.qHeads} q / ${s.kvHeads} kv heads,`,
      `d=${s.headDim}, ${sig(gib(s.layerKvBytes))} GiB of K+V per layer). Sparse methods select ${pct(sparse[0].budgetTokensPerHead / s.tokens, 1)} of tokens per kv head`,
      `plus sinks and window, with a pool of ${span(roomy.map((x) => x.poolShareOfKv), (v) => pct(v, 1))} or ${span(tight.map((x) => x.poolShareOfKv), (v) => pct(v, 2))} (tight) of the KV; step 0 fills the pool and is left out:`,
      '',
      table(
        ['config', 'pool (of KV)', 'step p50 ms', 'select', 'resident + attend (kernel)', 'hit rate', 'H2D per step', 'output error vs dense'],
        ['l', 'r', 'r', 'r', 'r', 'r', 'r', 'r'],
        rows,
      ),
      '',
      `A sparse step takes ${span(sparse.map((x) => x.stepMsP50), ms)} ms against dense's ${ms(c.find((x) => x.method === 'exact').stepMsP50)} ms in this loop: the kernel over the selected`,
      `blocks ${span(sparse.map((x) => x.kernelMsP50), ms)} ms, residency (page-table lookups and copies of misses) ${span(sparse.map((x) => x.residentMsP50), ms)} ms, and choosing the blocks`,
      `(every block mean of every kv head scored and each head's top candidates selected on the GPU in one call, then the method's`,
      `candidate logic over those candidates in JS) ${span(sparse.map((x) => x.selectMsP50), ms)} ms. At ${pct(sparse[0].budgetTokensPerHead / s.tokens, 1)} the block selection loses ${span(sparse.map((x) => x.outErrorMean), (v) => fix(v, 2))} of the output`,
      `on this workload, whose attention is broad (see below). With the tight pool \`nosa\` hit ${fix(tn.hitRate, 3)} vs ${fix(tt.hitRate, 3)}`,
      `for plain LRU and copied ${sig(mib(tn.bytesInPerStepMean))} vs ${sig(mib(tt.bytesInPerStepMean))} MiB per step.`,
    ].join('\n');
  },

  retrieval: () => {
    const f = 'bench/results/retrieval-1048576.json', fh = 'bench/results/retrieval-1048576-hnsw.json', f64 = 'bench/results/retrieval-65536.json';
    const j = json(f), jh = json(fh), j64 = json(f64);
    const o = j.options;
    const rows = j.rows.map((r) => [
      r.method,
      String(r.ef),
      fix(r.buildSeconds, 1),
      fix(r.searchMs, 1),
      pct(r.scanned, 3),
      fix(r.attentionRecall, 3),
      fix(r.oracleRecall, 3),
      fix(r.topKRecall, 3),
      pct(r.outputError, 3),
      r.needleHits,
    ]);
    const hr = jh.rows;
    const of = (rs, m) => rs.filter((r) => r.method === m);
    const at64 = (m) => {
      const rs = of(j64.rows, m);
      if (rs.length === 0) return '';
      return `\`${m}\` ${span(rs.map((r) => r.attentionRecall), (v) => fix(v, 2))} scanning ${span(rs.map((r) => r.scanned * 100), (v) => v.toFixed(0))}%, ${needleSpan(rs)} needles`;
    };
    return [
      `**Retrieval at ${tok(o.tokens[0])} tokens per kv head** (budget ${pct(o.budgets[0])} + ${o.sinks} sinks + ${o.window} window;`,
      `oracle = exact top tokens by attention, same count; \`${f}\`, ${machine(j.machine)}, ${o.heads} kv head × ${o.steps} steps):`,
      '',
      table(
        ['method', 'ef', 'build s', 'search ms', 'scanned', 'attention recall', 'oracle', 'top-k recall', 'output error', 'needles'],
        ['l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r'],
        rows,
      ),
      '',
      `\`hnsw\` at ${tok(jh.options.tokens[0])} (\`${fh}\`, a separate run on ${machine(jh.machine)}, ${jh.options.heads} kv head × ${jh.options.steps} steps, keys centred):`,
      `build ${fix(hr[0].buildSeconds, 0)} s per head (hnswlib-node inserts one point at a time from JS, single-threaded;`,
      `${fix(hr[0].artifactMB, 0)} MB per head), attention recall ${hr.map((r) => fix(r.attentionRecall, 3)).join(' / ')} scanning`,
      `${hr.map((r) => pct(r.scanned)).join(' / ')} (its run's oracle: ${fix(hr[0].oracleRecall, 3)}), top-k recall ${span(hr.map((r) => r.topKRecall), (v) => fix(v, 2))},`,
      `output error ${span(hr.map((r) => r.outputError * 100), (v) => v.toFixed(0))}%, ${needleSpan(hr)} needles, ${span(hr.map((r) => r.searchMs), (v) => v.toFixed(0))} ms per search.`,
      `At ${tok(j64.options.tokens[0])} (\`${f64}\`, ${machine(j64.machine)}, budget ${pct(j64.options.budgets[0])}): ${at64('hnsw')}`,
      `(without centring, the keys' shared mean turns the inner-product graph into a few hubs,`,
      `\`bench/results/workload.md\`); ${[at64('ivf'), at64('retrieval-attention')].filter(Boolean).join('; ')}; the oracle ${fix(j64.rows[0].oracleRecall, 2)}.`,
      `The graph after issue #15's changes against hnsw at 64K, default and broad configurations: \`bench/results/graph-65536.md\`.`,
    ].join('\n');
  },

  documents: () => {
    const f = 'bench/results/documents-1048576.json';
    const j = json(f);
    const o = j.options;
    const rows = j.rows.map((r) => [
      r.method === 'exact' ? 'oracle' : r.method,
      pct(r.budget),
      r.method === 'exact' ? '—' : fix(r.buildSeconds, 1),
      r.artifactMB ? fix(r.artifactMB, 1) : '—',
      r.loadMs ? fix(r.loadMs, 0) : '—',
      ms(r.searchMs),
      pct(r.scanned, 2),
      `${fix(r.attentionRecall, 2)} (${fix(r.oracleRecall, 2)})`,
      pct(r.outputError),
      r.needleHits,
    ]);
    return [
      `**Documents at ${tok(o.tokens[0])} tokens per kv head** (\`${f}\`, ${machine(j.machine)}, ${o.heads} kv head × ${o.steps} steps;`,
      `${o.sinks} sinks + ${o.window} window + the method's tokens at each kept fraction; \`oracle\` = the exact top tokens of`,
      `the same count; build = seal per head, for infiniretri its retention pass; attach = index load per head):`,
      '',
      table(
        ['method', 'kept', 'build s', 'artifact MB', 'attach ms', 'search ms', 'scanned', 'attention recall (oracle)', 'output error', 'needles'],
        ['l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r'],
        rows,
      ),
    ].join('\n');
  },

  'decode-full': () => {
    // The current full runs: every wave layer held on the device, the server in its own process, one stream.
    // Older runs (block methods before wave, HTTP) stay in bench/results/ and are named below the table.
    // -s27: the first two tensor-core paths on (session 27), another H100 host than the first file's; -s28: all three
    // (session 28). The session-27 runs are named below the table.
    const files = ['bench/results/decode-full-llama3.2-1b-h100-16layers-cs16-poll.json', 'bench/results/decode-full-llama3.2-1b-h100-16layers-cs16-poll-s28.json',
      'bench/results/decode-full-llama3.2-1b-h200-16layers-cs16-poll.json', 'bench/results/decode-full-llama3-8b-h200-8layers-cs16-poll.json',
      'bench/results/decode-full-llama3-8b-h100-8layers-cs16-s28.json'].filter((f) => existsSync(f));
    const runs = files.map((f) => ({ f, j: json(f) }));
    const rows = [];
    for (const { f, j } of runs) {
      const r = j.results[0], sh = j.options.shape;
      // Each transport of the run (a lane: the plain stream, the client's loop polling), or the methods of its one transport.
      const lanes = r.transports ?? [{ via: j.options.vias?.[0] ?? 'http', methods: r.methods }];
      const card = (j.server?.health?.gpu?.device ?? '').replace(/^NVIDIA /, '').replace(/ 80GB HBM3$/, '');
      let first = true;
      for (const lane of lanes) {
        for (const m of lane.methods) {
          const l = m.latency, q = m.fidelity, L = sh.layers;
          rows.push([
            first ? `${j.options.preset}, ${L} layers × ${sh.kvHeads} kv × d=${sh.headDim}, ${tok(r.tokens)}, ${card} (\`${f.split('/').pop()}\`)` : '',
            `${m.method === 'exact' ? 'exact (dense on GPU)' : m.method}${lanes.length > 1 ? `, ${lane.via}` : ''}`,
            ms(l.p50Ms),
            ms(l.p50Ms / L),
            `${ms(l.rpcMs)} (${pct(l.rpcShare, 3)})`,
            ms(l.retrievalMs + l.attentionMs),
            m.method === 'exact' ? '100%' : pct(m.scannedFraction, 3),
            m.method === 'exact' ? '0 (ref.)' : `${pct(q.outputErrorMean, 3)} (${pct(q.outputErrorWorst, 3)})`,
          ]);
          first = false;
        }
      }
    }
    const j1 = runs[0].j;
    return [
      `**Decode end to end on the GPU machines** (\`npm run bench:decode -- --full\`, ${j1.backend.toUpperCase()} backend, the card named per run, the server in`,
      `its own process on the machine's host (${machine(j1.machine)}), \`wave\` layers held on the device; per generated token = one \`attend\``,
      `frame per layer on one WebSocket stream (stream-spin: the client's loop polling for each answer), summed; the server started with \`--poll-us 1000\`; budget ${pct(j1.options.budget)} + ${j1.options.sinks} sinks + ${j1.options.window} window, clusters of ${j1.options.clusterSize ?? DEFAULT_CLUSTER_SIZE};`,
      `ms per token; RPC = client wall − server ms (its share of the token); server = retrieval + attention; output error`,
      `against the exact session's answers, mean (worst head), every layer and step):`,
      '',
      table(
        ['shape, context', 'method', 'p50 ms/token', 'ms/layer-step', 'RPC', 'server', 'scanned', 'output error'],
        ['l', 'l', 'r', 'r', 'r', 'r', 'r', 'r'],
        rows,
      ),
      '',
      `Before \`wave\`, the block methods' full runs over HTTP (\`bench/results/decode-full-llama3.2-1b.json\`, \`decode-full-llama3-8b.json\`):`,
      `nosa and topk-blocks 105–120 ms a token at 16 layers, output error 75–79%.`,
    ].join('\n');
  },

  summary: () => {
    const f64 = 'bench/results/retrieval-65536.json', f = 'bench/results/retrieval-1048576.json';
    const j64 = json(f64), j = json(f);
    const oracles = [j64.rows[0].oracleRecall, j.rows[0].oracleRecall];
    const ra = j.rows.filter((r) => r.method === 'retrieval-attention');
    return [
      `What these show: on the generated workload (\`workload/\`, properties in \`bench/results/workload.md\`)`,
      `attention is broad: even the oracle keeps only ${span(oracles, (v) => fix(v, 2))} of the mass at ${pct(j.options.budgets[0])}`,
      `(\`${f64}\`, \`${f}\`), so no method reaches the 5% output-error target at ${pct(j.options.budgets[0])}.`,
      `The attention-aware graph comes closest to the oracle and is the only method that finds the planted needles, but`,
      `at ${tok(j.options.tokens[0])} it scans ${span(ra.map((r) => r.scanned * 100), (v) => v.toFixed(0))}% of keys, not 3%, and one search takes`,
      `${span(ra.map((r) => r.searchMs), (v) => v.toFixed(0))} ms, not 1 ms.`,
    ].join('\n');
  },

  'hf-sparse': () => {
    const f = 'clients/python/results/hf-sparse-agreement.json', ft = 'clients/python/results/hf-sparse-tests-h100.txt';
    const j = json(f);
    const tests = text(ft).match(/Ran (\d+) tests[\s\S]*?\n(OK|FAILED[^\n]*)/);
    const budgets = [...new Set(j.rows.map((r) => r.budget).filter((b) => typeof b === 'number'))].sort((a, b) => a - b);
    const methods = [...new Set(j.rows.map((r) => r.method))].filter((m) => m !== 'exact');
    const rows = methods.map((m) => {
      const rs = j.rows.filter((r) => r.method === m);
      const cell = (b) => {
        const r = rs.find((x) => x.budget === b);
        return r ? `${fix(r.forced_agreement, 3)} / ${fix(r.agreement, 2)}` : 'not run';
      };
      const same = rs.filter((r) => typeof r.budget === 'number' && r.identical === r.prompts).sort((a, b) => a.budget - b.budget)[0];
      return [m, ...budgets.map(cell), same ? `${same.budget} (${pct(same.kept)} attended)` : '—'];
    });
    const exact = j.rows.find((r) => r.method === 'exact');
    return [
      `\`python3 -m kvrecall.demo_sparse\` runs Karpathy's stories260K (a trained Llama, head_dim 8, converted so that it`,
      `reproduces upstream's greedy output) over ${j.prompts.length} prompts of ${span(j.prompts.map((p) => p.tokens), String)} tokens and compares`,
      `${j.new_tokens} greedy tokens with dense decoding (\`${f}\`, ${j.device.replace(/ \(.*/, '')}, ${j.server.backend.toUpperCase()} backend;`,
      `sinks ${j.params.sinks}, window ${j.params.window}). \`exact\` agrees ${fix(exact.agreement, 3)} (${exact.identical}/${exact.prompts} prompts identical), and`,
      `\`${ft}\` (${tests ? `${tests[1]} tests ${tests[2]}` : 'no summary'}) checks that every method at a full budget decodes`,
      `exactly the dense tokens. Per budget (retrieved prompt tokens per kv head), teacher-forced / free-running agreement:`,
      '',
      table(['method', ...budgets.map(String), 'identical from budget'], ['l', ...budgets.map(() => 'r'), 'r'], rows),
      '',
      `Free-running agreement compounds (one early divergence makes the rest a different text), so the teacher-forced`,
      `figure is the steadier one. The complete grid on the CPU backend is \`clients/python/results/hf-sparse-agreement-cpu.md\`.`,
    ].join('\n');
  },
};

// ---------------------------------------------------------------- README

const MARK = /<!-- results:([a-z0-9-]+) (begin|end) -->/g;

function render(readme) {
  const seen = new Map();
  for (const m of readme.matchAll(MARK)) {
    const [, name, edge] = m;
    const s = seen.get(name) ?? { begin: 0, end: 0 };
    s[edge]++;
    seen.set(name, s);
  }
  const problems = [];
  for (const [name, s] of seen) {
    if (!BLOCKS[name]) problems.push(`README.md has a block "${name}" this script does not render`);
    if (s.begin !== 1 || s.end !== 1) problems.push(`block "${name}" needs exactly one begin and one end marker (has ${s.begin} and ${s.end})`);
  }
  for (const name of Object.keys(BLOCKS)) if (!seen.has(name)) problems.push(`README.md lacks the block "${name}" (<!-- results:${name} begin --> … end)`);
  if (problems.length) throw new Error(problems.join('\n'));
  const changed = [];
  let out = readme;
  for (const [name, renderBlock] of Object.entries(BLOCKS)) {
    const begin = `<!-- results:${name} begin -->`, end = `<!-- results:${name} end -->`;
    const a = out.indexOf(begin) + begin.length, b = out.indexOf(end);
    if (b < a) throw new Error(`block "${name}": its end marker comes before its begin marker`);
    const body = `\n${renderBlock()}\n`;
    if (out.slice(a, b) !== body) changed.push(name);
    out = out.slice(0, a) + body + out.slice(b);
  }
  return { out, changed };
}

function main(args) {
  const check = args.includes('--check');
  const unknown = args.filter((a) => a !== '--check');
  if (unknown.length) {
    console.error(`usage: node scripts/render-results.mjs [--check]  (unknown: ${unknown.join(' ')})`);
    return 2;
  }
  const readme = readFileSync(README, 'utf8');
  let result;
  try {
    result = render(readme);
  } catch (e) {
    console.error(`render-results: ${e.message}`);
    return 1;
  }
  if (check) {
    if (result.changed.length === 0) {
      console.log(`render-results: README.md is up to date (${Object.keys(BLOCKS).length} blocks)`);
      return 0;
    }
    console.error(`render-results: README.md is out of date in: ${result.changed.join(', ')}; run \`npm run results\``);
    return 1;
  }
  if (result.changed.length) writeFileSync(README, result.out);
  console.log(result.changed.length ? `render-results: rendered ${result.changed.join(', ')}` : 'render-results: README.md already up to date');
  return 0;
}

process.exitCode = main(process.argv.slice(2));
