// bench:decode's markdown report (decode-<mode>-<preset>.md). The tables'
// columns and wording are what results/ readers and DESIGN.md quote: keep
// them stable.
import { describePhases, PHASE_MEANING, SERVER_PHASES } from '../upload-tally.js';
import type { Machine } from './machine.js';
import type { Options } from './options.js';
import { H100_PINNED_GBPS, type ContextResult } from './results.js';
import { fmtBytes, fmtTokens } from './util.js';

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
    `Workload: workload/, seed ${o.seed}, ${o.layerData === 'distinct' ? 'every layer generated with its own seed' : 'one layer generated per context and its K/V reused for every layer'}; prefill queries ${o.prefillQ ? `uploaded for the tokens the server keeps (f16, 1 token in ${o.queryStride}, declared with queryStride)` : 'not uploaded'}. Sessions: budget ${o.budget >= 1 ? `${o.budget} tokens` : `${pct(o.budget, 0)} of the document (${main.budgetTokens} tokens)`} per kv head + ${o.sinks} sinks + ${o.window} window${o.ef !== undefined ? `, ef ${o.ef}` : ''}. Each step sends every layer one attend (q f32 [${s.qHeads},${s.headDim}], new k/v f16 [${s.kvHeads},${s.headDim}]) to every session in turn.`,
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
    `Host RSS: ${main.preload.rssNote}, after seal and session attach; peak ${main.preload.peakRssBytes ? fmtBytes(main.preload.peakRssBytes) : 'n/a'}. Session attach (index load) at ${fmtTokens(main.tokens)}: ${Object.entries(main.preload.attachMs).map(([k, v]) => `${k} ${ms(v)} ms`).join(', ')}.`,
    '',
    `Upload at ${fmtTokens(main.tokens)}: ${describePhases(main.preload.upload, main.preload.concurrency)}. Phases: ${SERVER_PHASES.map((ph) => `${ph} = ${PHASE_MEANING[ph]}`).join('; ')}. Seal write = the seal's own LMDB transaction and flush.`,
    ...(main.server.backend === 'cuda' ? ['', `GPU after the decode (/v1/health): ${JSON.stringify(main.server.gpu)}.`] : []),
  );
}

/** The main context's per-method table, GPU references, fidelity notes and warnings. */
function decodeSection(lines: string[], o: Options, results: ContextResult[], main: ContextResult): void {
  const s = o.shape;
  lines.push(
    '',
    `### Decode at ${fmtTokens(main.tokens)} tokens (${main.steps} steps × ${s.layers} layers)`,
    '',
    'Per generated token = the sum over layers of one attend each, client wall time (encode, HTTP, server, decode). Cold first = a warm-up pass before the timed steps (step 0\'s queries, no k/v appended): JIT, lazy per-session work such as infiniretri\'s retention. Scanned = mean over calls (warm-up included, so one-time passes are amortised over the steps) of stats.scanned / stats.tokens. RPC = wall − server stats.ms; retrieval = stats.selectMs; attention = stats.attendMs; other = the rest of stats.ms (parse, append, selection positions); transfers = stats.gpu.residentMs, making the selected blocks resident in the GPU pool (page tables, copies of misses issued; part of attention; 0 on the CPU backend). Split columns are means per token.',
    '',
    '| method | p50 ms/token | p99 | cold first | RPC | retrieval | attention | other | transfers | tokens/s | × exact | scanned | attended/head | attn recall mean | worst | oracle @count | top-k recall | out err mean | worst | needles |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  );
  for (const r of main.methods) {
    const L = r.latency, F = r.fidelity, isExact = r.method === 'exact';
    lines.push(
      `| ${r.method}${r.error ? ' ⚠' : ''} | ${ms(L.p50Ms)} | ${ms(L.p99Ms)} | ${ms(L.coldMs)} | ${ms(L.rpcMs)} | ${ms(L.retrievalMs)} | ${ms(L.attentionMs)} | ${ms(L.otherServerMs)} | ${ms(L.transferMs)} | ${L.tokensPerSecond.toFixed(1)} | ${L.ratioToExact.toFixed(3)} | ${pct(r.scannedFraction)} | ${r.attended.toFixed(0)} | ${isExact ? '1 (dense)' : F.recallMean.toFixed(4)} | ${isExact ? '—' : F.recallWorst.toFixed(4)} | ${isExact ? '—' : F.oracleRecallMean.toFixed(4)} | ${isExact ? '—' : F.topKRecallMean.toFixed(3)} | ${isExact ? '0 (ref.)' : pct(F.outputErrorMean)} | ${isExact ? '—' : pct(F.outputErrorWorst)} | ${isExact ? '—' : `${F.needlesHit}/${F.needles}`} |`,
    );
  }
  const b = main.baselines;
  lines.push(
    '',
    `GPU reference per token at ${fmtTokens(main.tokens)} (DESIGN.md, H100): dense SDPA with the KV in HBM ${b.gpuDenseMs !== undefined ? `${ms(b.gpuDenseMs)} ms${b.extrapolated ? ' (straight-line extrapolation of the 128K/1M figures)' : ''}` : 'n/a for this shape'}; KV streamed from pinned host memory at ${H100_PINNED_GBPS} GB/s ${ms(b.gpuStreamMs)} ms.`,
    '',
    `Fidelity: output error = ‖o − o_exact‖/‖o_exact‖ per q head against the exact session's reply (all layers, all steps; worst = worst head). Attention recall, oracle recall at the same count, top-k recall (k = budget) and needles: layer(s) ${o.sampleLayers.join(', ')}, kv heads 0 and ${s.kvHeads - 1}, every step, the method's returned selection against float64 exact attention (bench/quality.ts); needles are the workload's planted needles on the sampled layer(s), hit when the needle's step selects its position in its kv head. Exact session vs float64: worst head error ${pct(main.methods[0].fidelity.kernelErrorVsFloat64 ?? NaN, 4)}.`,
  );
  const blocks = main.methods.filter((r) => r.blocks);
  if (blocks.length)
    lines.push(
      '',
      `${main.server.backend === 'cuda' ? 'GPU block pool, measured' : 'Simulated GPU block pool'} (stats.blocks): ${blocks.map((r) => `${r.method} ${r.blocks!.selectedPerCall.toFixed(0)} blocks/call, hit rate ${pct(r.blocks!.hitRate, 1)}, ${fmtBytes(r.blocks!.bytesInPerToken)} host→device per token`).join('; ')}.`,
    );
  for (const r of results) for (const m of r.methods) if (m.error) lines.push('', `⚠ ${fmtTokens(r.tokens)} ${m.method}: ${m.error}`);
  for (const r of results)
    for (const m of r.methods)
      if (m.fidelity.duplicateSelections > 0) lines.push('', `⚠ ${fmtTokens(r.tokens)} ${m.method}: ${m.fidelity.duplicateSelections} selections held a position twice.`);
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
  lines.push('', 'Charts: decode-latency.svg (latency vs context), decode-recall.svg (recall vs scanned fraction).', '');
  return lines.join('\n');
}
