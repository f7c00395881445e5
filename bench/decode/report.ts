// bench:decode's markdown report (decode-<mode>-<preset>.md). The tables'
// columns and wording are what results/ readers and DESIGN.md quote: keep
// them stable.
import { describePhases, PHASE_MEANING, SERVER_PHASES } from '../upload-tally.js';
import type { Machine } from './machine.js';
import type { Options, Via } from './options.js';
import { H100_PINNED_GBPS, type ContextResult, type MethodResult, type TransportResult } from './results.js';
import { fmtBytes, fmtTokens } from './util.js';
import { SPIN_MS } from './lanes.js';
import { CALL_KINDS, type CallKind } from './run.js';

const pct = (x: number, digits = 2) => (Number.isFinite(x) ? `${(x * 100).toFixed(digits)}%` : '—');
const ms = (x: number | undefined) => (x === undefined || !Number.isFinite(x) ? '—' : x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));

/** What the report's header line states about the run. */
export interface RunInfo {
  machine: Machine;
  health: Record<string, unknown>;
  date: string;
  wallSeconds: number;
  loadEnd: number;
}

/** Title, machine and workload, and the preload table with its notes. */
function preloadSection(lines: string[], o: Options, info: RunInfo, results: ContextResult[], main: ContextResult): void {
  const s = o.shape, { machine: m, health, date, wallSeconds, loadEnd } = info;
  lines.push(
    `## Decode, ${o.mode}: ${o.preset} shape (${s.layers} layer${s.layers === 1 ? '' : 's'}, ${s.qHeads} q / ${s.kvHeads} kv heads, d=${s.headDim}, f16), ${fmtTokens(o.tokens)}-token document`,
    '',
    `${m.cpu}, ${m.cores} cores, ${m.memoryGiB} GiB, Node ${m.node} (${m.platform}); server ${o.url ? o.url : 'in-process'}: kvrecall ${String(health.version)}, ${String(health.backend)} backend, ${String(health.threads)} native threads. ${date}, ${(wallSeconds / 60).toFixed(1)} min; load average ${m.loadAverage} at the start, ${loadEnd.toFixed(2)} at the end.`,
    '',
    `Workload: workload/, seed ${o.seed}, ${o.layerData === 'distinct' ? 'every layer generated with its own seed' : 'one layer generated per context and its K/V reused for every layer'}; prefill queries ${o.prefillQ ? `uploaded for the tokens the server keeps (f16, 1 token in ${o.queryStride}, declared with queryStride)` : 'not uploaded'}. Sessions: budget ${o.budget >= 1 ? `${o.budget} tokens` : `${pct(o.budget, 0)} of the document (${main.budgetTokens} tokens)`} per kv head + ${o.sinks} sinks + ${o.window} window${o.ef !== undefined ? `, ef ${o.ef}` : ''}${o.clusterSize !== undefined ? `; the document's clusterSize ${o.clusterSize}` : ''}. Each step sends every layer one attend (q f32 [${s.qHeads},${s.headDim}], new k/v f16 [${s.kvHeads},${s.headDim}]) to every session in turn${o.exact === 'apart' ? ", the exact sessions' whole decode first and alone (--exact apart: their replies kept for the fidelity; a batch lane's batches keep them), so no other call follows a dense attend over the whole context" : ' (--exact interleaved: exact among them)'}. Transport${o.vias.length > 1 ? 's' : ''}: ${o.vias.map((v) => `**${v}**`).join(', ')}${o.vias.length > 1 ? ` (each with sessions of its own, taking turns per (step, layer) in one sitting; answers checked bit for bit against ${o.vias[0]}'s)` : ''}.`,
    '',
    '### Preload',
    '',
    '| context | K/V | sent (with q) | generate s | upload s | upload GB/s (K/V) | seal s | index build s | seal write s | host RSS | data.mdb (allocated) | KV accounted | GPU pool |',
    '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |',
  );
  for (const r of results) {
    const p = r.preload;
    const build = Object.entries(p.buildSeconds).map(([k, v]) => `${k} ${v.toFixed(1)}`).join(', ') || '—';
    lines.push(
      `| ${fmtTokens(r.tokens)} | ${fmtBytes(p.kvBytes)} | ${fmtBytes(p.wireBytes)} | ${p.generateSeconds.toFixed(1)} | ${p.uploadSeconds.toFixed(1)} | ${p.uploadGBps.toFixed(2)} | ${p.sealSeconds.toFixed(1)} | ${build} | ${p.sealWriteSeconds.toFixed(2)} | ${p.rssBytes ? fmtBytes(p.rssBytes) : 'n/a'} | ${p.dataMdbBytes !== undefined ? `${fmtBytes(p.dataMdbBytes)} (${fmtBytes(p.dataMdbAllocatedBytes ?? 0)})` : 'n/a'} | ${p.kvAccountedBytes !== undefined ? fmtBytes(p.kvAccountedBytes) : 'n/a'} | ${p.gpuPool} |`,
    );
  }
  lines.push(
    '',
    `Host RSS: ${main.preload.rssNote}, after seal and session attach; data.mdb = every LMDB environment's under the data folder (the documents' own included); peak ${main.preload.peakRssBytes ? fmtBytes(main.preload.peakRssBytes) : 'n/a'}. Session attach (index load) at ${fmtTokens(main.tokens)}: ${Object.entries(main.preload.attachMs).map(([k, v]) => `${k} ${ms(v)} ms`).join(', ')}.`,
    '',
    `Upload at ${fmtTokens(main.tokens)}: ${describePhases(main.preload.upload, main.preload.concurrency)}. Phases: ${SERVER_PHASES.map((ph) => `${ph} = ${PHASE_MEANING[ph]}`).join('; ')}. Seal write = the seal's own LMDB transaction and flush.`,
    ...(main.server.backend === 'cuda' ? ['', `GPU after the decode (/v1/health): ${JSON.stringify(main.server.gpu)}.`] : []),
  );
}

/** What a per-token time and its RPC are, per transport. */
function viaMeaning(via: Via, t: TransportResult): string {
  if (via === 'stream') return 'one attend per layer as a frame on one open WebSocket stream (GET /v1/stream), each awaited before the next; client wall time (encode, frame, server, decode)';
  if (via === 'stream-spin') return `one attend per layer as a frame on one open WebSocket stream, each awaited before the next, the client's event loop polling up to ${SPIN_MS} ms for the answer before it sleeps (openStream({ spinMs: ${SPIN_MS} }): one core busy for the wait); client wall time`;
  if (via === 'http') return 'one attend per layer as POST /v1/sessions/:sid/attend on a kept-alive connection; client wall time (encode, HTTP, server, decode)';
  return `per layer one batch frame on one WebSocket stream carrying the step of every session (${t.batch?.size ?? t.methods.length} sessions, standing for a server's running batch); the batch's wall time is shared, so a session's time per layer is its step's server stats.ms plus the batch's wall − the batch's server ms (every session waits for the whole exchange), and RPC per token = Σ over layers of (batch wall − batch server ms)`;
}

/** Per call RPC p50, plain / sampled (older results have neither). */
const rpcCalls = (c: MethodResult['latency']['rpcCall'] | undefined) => (c ? `${c.plainCalls ? c.plainP50Ms.toFixed(3) : '—'} / ${c.sampledCalls ? c.sampledP50Ms.toFixed(3) : '—'}` : '—');

/** One transport's per-method table at the main context. */
function transportTable(lines: string[], o: Options, main: ContextResult, t: TransportResult): void {
  const layers = o.shape.layers;
  lines.push(
    '',
    `#### Via ${t.via}`,
    '',
    `Per generated token = the sum over layers of ${viaMeaning(t.via, t)}. RPC share = RPC / mean per-token time; RPC/call = RPC per token / ${layers} layers. Per call, p50 of wall − stats.ms apart: plain = the calls that ask only \`out\` (an LLM server's), sampled = the calls on the quality-sampled layer(s), which ask the selection too, both back to back after the call before (the first call after the fidelity work is apart, in the per-call table below); plain share = ${layers} × plain p50 / p50 per token, the RPC share a server asking only \`out\` would see.`,
    '',
    '| method | p50 ms/token | p99 | cold first | RPC | RPC share | RPC/call | RPC/call p50 plain / sampled | plain share | retrieval | attention | other | transfers | tokens/s | × exact | scanned | attended/head | attn recall mean | worst | oracle @count | top-k recall | out err mean | worst | needles |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  );
  for (const r of t.methods) {
    const L = r.latency, F = r.fidelity, isExact = r.method === 'exact';
    lines.push(
      `| ${r.method}${r.error || r.mismatch ? ' ⚠' : ''} | ${ms(L.p50Ms)} | ${ms(L.p99Ms)} | ${ms(L.coldMs)} | ${ms(L.rpcMs)} | ${pct(L.rpcShare, 1)} | ${ms(L.rpcMs / layers)} | ${rpcCalls(L.rpcCall)} | ${L.rpcCall ? pct((layers * L.rpcCall.plainP50Ms) / L.p50Ms, 1) : '—'} | ${ms(L.retrievalMs)} | ${ms(L.attentionMs)} | ${ms(L.otherServerMs)} | ${ms(L.transferMs)} | ${L.tokensPerSecond.toFixed(1)} | ${L.ratioToExact.toFixed(3)} | ${pct(r.scannedFraction)}${r.codesFraction !== undefined ? ` (+ codes ${pct(r.codesFraction)})` : ''} | ${r.attended.toFixed(0)} | ${isExact ? '1 (dense)' : F.recallMean.toFixed(4)} | ${isExact ? '—' : F.recallWorst.toFixed(4)} | ${isExact ? '—' : F.oracleRecallMean.toFixed(4)} | ${isExact ? '—' : F.topKRecallMean.toFixed(3)} | ${isExact ? '0 (ref.)' : pct(F.outputErrorMean)} | ${isExact ? '—' : pct(F.outputErrorWorst)} | ${isExact ? '—' : `${F.needlesHit}/${F.needles}`} |`,
    );
  }
  callTable(lines, t);
  const b = t.batch;
  if (b)
    lines.push(
      '',
      `The batches themselves (${b.size} sessions each), summed over layers per token: wall p50 ${ms(b.p50Ms)} ms, mean ${ms(b.meanMs)}, server (the batch's stats.ms) ${ms(b.serverMs)}, RPC ${ms(b.rpcMs)} (${pct(b.rpcShare, 1)} of the batch's wall; ${ms(b.rpcMs / layers)} ms per batch; p50 over tokens ${ms(b.rpcP50Ms)}).`,
  );
}

const KIND_NAMES: Record<CallKind, string> = { plain: 'plain', sampled: 'sampled', afterWork: 'after the fidelity work' };

/** Each method's calls split by where they stood (CallKind): p50s of the wall and its parts. */
function callTable(lines: string[], t: TransportResult): void {
  if (!t.methods.some((r) => r.latency.calls)) return;
  lines.push(
    '',
    `Per call, by where it stood: plain and sampled as above; after the fidelity work = the first exchange after this process computed float64 attention over the whole context for the sampled layer (and slept 20 ms where that took over 0.5 s), whatever it asks: both processes come to it cold. p50s over the calls, each its own (they do not add up exactly): wall = the client's; server = stats.ms, of it select = selectMs (on a GPU wave step, the device call with the own tokens attended beside it), attend = attendMs, other = the rest; kernel = stats.gpu.kernelMs, the device's time for the call (a GPU wave step: its one native call; — where none is reported); RPC = wall − stats.ms call by call.`,
    '',
    '| method | calls | n | wall | server | select | attend | other | kernel | RPC |',
    '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  );
  for (const r of t.methods)
    for (const k of CALL_KINDS) {
      const c = r.latency.calls?.[k];
      if (!c || c.calls === 0) continue;
      lines.push(`| ${r.method} | ${KIND_NAMES[k]} | ${c.calls} | ${ms(c.wallP50Ms)} | ${ms(c.serverP50Ms)} | ${ms(c.selectP50Ms)} | ${ms(c.attendP50Ms)} | ${ms(c.otherP50Ms)} | ${Number.isFinite(c.kernelP50Ms) ? c.kernelP50Ms.toFixed(3) : '—'} | ${c.rpcP50Ms.toFixed(3)} |`);
    }
  // --timing: where a device step's select time goes on the server's host.
  const staged = t.methods.flatMap((r) => CALL_KINDS.map((k) => [r, k, r.latency.calls?.[k]?.hostP50Ms] as const)).filter(([, , h]) => h);
  if (staged.length) {
    lines.push('', 'Host stages of a device step (--timing, stats.gpu.host, p50 ms): queue (the call to its work\'s start on a worker thread), prep, launch, overlap, wait (the stream), copy (outputs read back), back (the work\'s end to the event loop), convert (the answer objects); overlap = the own tokens attended inside the call; own = their attend (inside the call, or settled from the step\'s start where they run on the host); device = the call and the own tokens settled, from the step\'s start (before visit AQ: the store\'s promise alone).', '');
    for (const [r, k, h] of staged) lines.push(`- ${r.method}, ${KIND_NAMES[k]}: ${Object.entries(h!).map(([n, v]) => `${n} ${v.toFixed(3)}`).join(', ')}`);
  }
}

/** With several transports: each method's time and RPC side by side, and whether the answers matched. */
function comparison(lines: string[], o: Options, main: ContextResult): void {
  const layers = o.shape.layers;
  lines.push(
    '',
    `#### Transports compared at ${fmtTokens(main.tokens)} (one sitting; the transports take turns per (step, layer))`,
    '',
    `p50 ms per token / RPC ms per token, mean (its share of the mean per-token time; per call) and p50 over tokens.`,
    '',
    `| method | ${main.transports.map((t) => `${t.via}: p50 / RPC mean (share, per call) / RPC p50`).join(' | ')} | answers vs ${o.vias[0]} |`,
    `| --- | ${main.transports.map(() => '---:').join(' | ')} | --- |`,
  );
  main.methods.forEach((m0, i) => {
    const cells = main.transports.map((t) => {
      const L = t.methods[i]?.latency;
      return L ? `${ms(L.p50Ms)} / ${ms(L.rpcMs)} (${pct(L.rpcShare, 1)}, ${ms(L.rpcMs / layers)}) / ${ms(L.rpcP50Ms)}` : '—';
    });
    const differ = main.transports.slice(1).flatMap((t) => (t.methods[i]?.mismatch ? [`${t.via}: ${t.methods[i].mismatches} differ (${t.methods[i].mismatch})`] : []));
    const compared = Math.min(...main.transports.map((t) => t.methods[i]?.steps ?? 0));
    lines.push(`| ${m0.method} | ${cells.join(' | ')} | ${differ.length ? `⚠ ${differ.join('; ')}` : `bit-identical (${compared} steps × ${layers} layers)`} |`);
  });
}

/** The main context's per-transport tables, GPU references, fidelity notes and warnings. */
function decodeSection(lines: string[], o: Options, results: ContextResult[], main: ContextResult): void {
  const s = o.shape;
  lines.push(
    '',
    `### Decode at ${fmtTokens(main.tokens)} tokens (${main.steps} steps × ${s.layers} layers)`,
    '',
    'Cold first = a warm-up pass before the timed steps (step 0\'s queries, no k/v appended; one session at a time over its transport, a batch lane\'s over its stream): JIT, lazy per-session work such as infiniretri\'s retention. Scanned = mean over calls (warm-up included, so one-time passes are amortised over the steps) of stats.scanned / stats.tokens. RPC = wall − server stats.ms; retrieval = stats.selectMs; attention = stats.attendMs; other = the rest of stats.ms (parse, append, selection positions); transfers = stats.gpu.residentMs, making the selected blocks resident in the GPU pool (page tables, copies of misses issued; part of attention; 0 on the CPU backend). Split columns are means per token.',
  );
  if (main.transports.length > 1) comparison(lines, o, main);
  for (const t of main.transports) transportTable(lines, o, main, t);
  const b = main.baselines;
  lines.push(
    '',
    `GPU reference per token at ${fmtTokens(main.tokens)} (DESIGN.md, H100): dense SDPA with the KV in HBM ${b.gpuDenseMs !== undefined ? `${ms(b.gpuDenseMs)} ms${b.extrapolated ? ' (straight-line extrapolation of the 128K/1M figures)' : ''}` : 'n/a for this shape'}; KV streamed from pinned host memory at ${H100_PINNED_GBPS} GB/s ${ms(b.gpuStreamMs)} ms.`,
    '',
    `Fidelity: output error = ‖o − o_exact‖/‖o_exact‖ per q head against the exact session's reply (all layers, all steps; worst = worst head). Attention recall, oracle recall at the same count, top-k recall (k = budget) and needles: layer(s) ${o.sampleLayers.join(', ') || 'none (--sample-layers none: nothing judged)'}, kv heads 0 and ${s.kvHeads - 1}, every step, the method's returned selection against float64 exact attention (bench/quality.ts); needles are the workload's planted needles on the sampled layer(s), hit when the needle's step selects its position in its kv head. Exact session vs float64: worst head error ${pct(main.methods[0].fidelity.kernelErrorVsFloat64 ?? NaN, 4)}.`,
  );
  const blocks = main.methods.filter((r) => r.blocks);
  if (blocks.length)
    lines.push(
      '',
      `${main.server.backend === 'cuda' ? 'GPU block pool, measured' : 'Simulated GPU block pool'} (stats.blocks, via ${o.vias[0]}): ${blocks.map((r) => `${r.method} ${r.blocks!.selectedPerCall.toFixed(0)} blocks/call, hit rate ${pct(r.blocks!.hitRate, 1)}, ${fmtBytes(r.blocks!.bytesInPerToken)} host→device per token`).join('; ')}.`,
    );
  for (const r of results)
    for (const t of r.transports)
      for (const m of t.methods) {
        if (m.error) lines.push('', `⚠ ${fmtTokens(r.tokens)} ${m.method} via ${t.via}: ${m.error}`);
        if (m.mismatch) lines.push('', `⚠ ${fmtTokens(r.tokens)} ${m.method} via ${t.via}: ${m.mismatches} layer-step answers differ from via ${o.vias[0]}'s; first: ${m.mismatch}`);
        if (m.fidelity.duplicateSelections > 0) lines.push('', `⚠ ${fmtTokens(r.tokens)} ${m.method} via ${t.via}: ${m.fidelity.duplicateSelections} selections held a position twice.`);
      }
}

/** Latency and recall per context, when the sweep has more than one point. */
function sweepSections(lines: string[], o: Options, results: ContextResult[]): void {
  lines.push(
    '',
    '### Latency vs context (p50 ms per token, all layers)',
    '',
    `| method | ${results.map((r) => fmtTokens(r.tokens)).join(' | ')} |`,
    `| --- | ${results.map(() => '---:').join(' | ')} |`,
  );
  for (const name of o.methods)
    lines.push(`| ${name} | ${results.map((r) => ms(r.methods.find((m) => m.method === name)?.latency.p50Ms)).join(' | ')} |`);
  lines.push(`| H100 dense, HBM (DESIGN.md) | ${results.map((r) => ms(r.baselines.gpuDenseMs)).join(' | ')} |`);
  lines.push(`| H100 streamed at ${H100_PINNED_GBPS} GB/s | ${results.map((r) => ms(r.baselines.gpuStreamMs)).join(' | ')} |`);
  lines.push(
    '',
    '### Recall and scanned fraction vs context',
    '',
    `| method | ${results.map((r) => `${fmtTokens(r.tokens)} recall / scanned`).join(' | ')} |`,
    `| --- | ${results.map(() => '---:').join(' | ')} |`,
  );
  for (const name of o.methods.filter((n) => n !== 'exact'))
    lines.push(
      `| ${name} | ${results
        .map((r) => {
          const m = r.methods.find((x) => x.method === name);
          return m ? `${m.fidelity.recallMean.toFixed(3)} / ${pct(m.scannedFraction)}` : '—';
        })
        .join(' | ')} |`,
    );
  lines.push('', `Sweep points other than ${fmtTokens(o.tokens)} ran ${o.sweepSteps} steps each.`);
}

export function markdown(o: Options, info: RunInfo, results: ContextResult[]): string {
  const main = results.find((r) => r.tokens === o.tokens)!;
  const lines: string[] = [];
  preloadSection(lines, o, info, results, main);
  decodeSection(lines, o, results, main);
  if (results.length > 1) sweepSections(lines, o, results);
  const tag = o.tag ? `-${o.tag}` : '';
  lines.push('', `Charts: decode-latency${tag}.svg (latency vs context), decode-recall${tag}.svg (recall vs scanned fraction), via ${o.vias[0]}.`, '');
  return lines.join('\n');
}
