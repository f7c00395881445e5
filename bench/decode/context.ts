// One context point of the sweep: check the server has room, preload the
// document, open one session per method for each transport (--via), a
// warm-up pass, the timed decode, clean up, and summarise each method.
import type { RunningServer } from '../../api/server.js';
import { tensor, type KvrecallClient } from '../../clients/ts/client.js';
import { percentile } from '../stats.js';
import type { LayerDecode } from './layer-data.js';
import { Lane } from './lanes.js';
import { decodeSteps } from './loop.js';
import { gpuPool, serverMemory } from './machine.js';
import type { Options, Via } from './options.js';
import { Preloader } from './preload.js';
import { RETRIEVAL_ATTENTION } from '../../index/retrieval-attention.js';
import { baselines, type ContextResult, type Preload, type TransportResult } from './results.js';
import { Run } from './run.js';
import { fmtBytes, fmtTokens, log, now } from './util.js';

type Health = Record<string, unknown>;

export class Bench {
  private readonly preloader: Preloader;

  constructor(
    readonly o: Options,
    readonly client: KvrecallClient,
    readonly server: RunningServer | undefined,
    readonly dataDir: string | undefined,
  ) {
    this.preloader = new Preloader(o, client);
  }

  private get model() {
    return { ...this.o.shape, dtype: 'f16' as const };
  }

  private async fetchHealth(): Promise<Health> {
    return (await this.client.health()) as unknown as Health;
  }

  /** Throws when the server's host KV budget cannot take the document. */
  private async checkRoom(kvBytes: number): Promise<void> {
    const h0 = await this.fetchHealth();
    const mem = h0.memory as { used?: number; budget?: number } | undefined;
    if (mem?.budget !== undefined && kvBytes * 1.02 > mem.budget - (mem.used ?? 0))
      throw new Error(
        `the document needs ${fmtBytes(kvBytes)} of host KV; the server's budget has ${fmtBytes(mem.budget - (mem.used ?? 0))} free. Use fewer --tokens or --layers.`,
      );
  }

  /** One session per method (exact first) for transport `via`; a failed create is recorded on its Run. */
  private async openSessions(doc: string, budgetTokens: number, steps: number, via: Via, attachMs: Record<string, number>): Promise<Run[]> {
    const o = this.o;
    const runs: Run[] = [];
    for (const method of o.methods) {
      const spec = {
        model: this.model,
        documents: [doc],
        method,
        budget: budgetTokens,
        sinks: o.sinks,
        window: o.window,
        ...(o.ef !== undefined && { ef: o.ef }),
        ...(o.chunk !== undefined && { chunk: o.chunk }),
        ...(o.span !== undefined && { span: o.span }),
        // The walk's options are retrieval-attention's alone: the server refuses them for the other methods.
        ...(method === RETRIEVAL_ATTENTION && o.codeWalk && { codeWalk: true }),
        ...(method === RETRIEVAL_ATTENTION && o.codeShare !== undefined && { codeShare: o.codeShare }),
        ...(method === RETRIEVAL_ATTENTION && o.scanShare !== undefined && { scanShare: o.scanShare }),
      };
      const t = now();
      try {
        const { id } = await this.client.createSession(spec);
        // The first transport's sessions attach first, loading the indexes: theirs is the attach time.
        attachMs[method] ??= now() - t;
        runs.push(new Run(method, id, steps, via));
      } catch (e) {
        const run = new Run(method, '', steps, via);
        run.error = `createSession: ${(e as Error).message}`;
        log(`${method}: ${run.error}`);
        runs.push(run);
      }
    }
    return runs;
  }

  /** Sessions, then the document. */
  private async cleanUp(lanes: Lane[], doc: string): Promise<void> {
    for (const lane of lanes) lane.close();
    for (const run of lanes.flatMap((x) => x.runs))
      if (run.sid)
        try {
          await this.client.deleteSession(run.sid);
        } catch {
          /* already gone */
        }
    try {
      await this.client.deleteDocument(doc);
    } catch (e) {
      log(`delete document ${doc}: ${(e as Error).message}`);
    }
  }

  async runContext(tokens: number, steps: number, index: number, count: number): Promise<ContextResult> {
    const o = this.o, { layers: L, kvHeads: K, headDim: d } = o.shape;
    const budgetTokens = o.budget >= 1 ? Math.round(o.budget) : Math.max(1, Math.round(o.budget * tokens));
    const doc = `bench-decode-${process.pid}-${tokens}`;
    log(`context ${index + 1}/${count}: ${fmtTokens(tokens)} tokens × ${L} layers, ${steps} steps, methods ${o.methods.join(', ')}, budget ${budgetTokens}`);
    const kvBytes = L * K * d * 2 * 2 * tokens;
    await this.checkRoom(kvBytes);
    try {
      await this.client.deleteDocument(doc);
    } catch {
      /* not there */
    }
    // The tokens hint reserves the document's host memory up front (no regrowth while uploading).
    await this.client.createDocument(doc, this.model, { methods: this.preloader.indexedMethods(), queryStride: o.queryStride, tokens, ...(o.clusterSize !== undefined && { clusterSize: o.clusterSize }) });
    const { decodeData, samples, generateSeconds, tally } = await this.preloader.load(doc, tokens, steps);
    const sealed = await this.preloader.seal(doc);
    const attachMs: Record<string, number> = {};
    const lanes: Lane[] = [];
    for (const via of o.vias) lanes.push(await Lane.open(via, await this.openSessions(doc, budgetTokens, steps, via, attachMs), this.client, steps));

    const afterSeal = serverMemory(this.server !== undefined, o.serverPid, this.dataDir);
    const h1 = await this.fetchHealth();
    const preload: Preload = {
      tokens,
      layers: L,
      kvBytes,
      wireBytes: tally.phases.wireBytes,
      generateSeconds,
      uploadSeconds: tally.phases.wallSeconds,
      uploadGBps: tally.kvGBps,
      concurrency: o.concurrency,
      upload: tally.phases,
      sealSeconds: sealed.seconds,
      buildSeconds: sealed.build,
      sealWriteSeconds: sealed.write,
      attachMs,
      ...afterSeal,
      kvAccountedBytes: (h1.memory as { used?: number } | undefined)?.used,
      gpuPool: gpuPool(h1),
    };
    log(
      `preload: ${fmtBytes(kvBytes)} K/V in ${preload.uploadSeconds.toFixed(1)} s (${preload.uploadGBps.toFixed(2)} GB/s), seal ${sealed.seconds.toFixed(1)} s` +
        (afterSeal.rssBytes ? `, RSS ${fmtBytes(afterSeal.rssBytes)}` : ''),
    );

    // Warm-up (cold) pass: step 0's queries without k/v (nothing appended). It pays JIT and lazy per-session
    // work (e.g. infiniretri's retention) outside the timed steps, and is reported as the cold first token.
    const { qHeads: Q } = o.shape;
    const warm = decodeData.map((ld, l) => ({ layer: l, q: tensor('f32', [Q, d], ld.q[0]) }));
    for (const lane of lanes) await lane.warmUp(warm);
    await decodeSteps({ shape: o.shape, tokens, steps, budgetTokens, decodeData, samples, timing: o.timing, exactApart: o.exact === 'apart' }, lanes);
    const h2 = await this.fetchHealth();
    const server = { backend: String(h2.backend ?? 'unknown'), ...(h2.gpu !== undefined && { gpu: h2.gpu }) };
    if (server.backend === 'cuda') log(`GPU after decode: ${JSON.stringify(h2.gpu)}`);
    await this.cleanUp(lanes, doc);

    const transports: TransportResult[] = lanes.map((lane) => {
      const exactP50 = percentile(lane.runs[0].perToken(), 50);
      const methods = lane.runs.map((r) => r.result(exactP50, L));
      for (const m of methods)
        log(
          `${fmtTokens(tokens)} ${m.method} via ${lane.via}: p50 ${m.latency.p50Ms.toFixed(2)} ms/token, RPC ${m.latency.rpcMs.toFixed(2)} (${(m.latency.rpcShare * 100).toFixed(1)}%), ` +
            `recall ${m.fidelity.recallMean.toFixed(3)}, out err ${(m.fidelity.outputErrorMean * 100).toFixed(2)}%, scanned ${(m.scannedFraction * 100).toFixed(2)}%` +
            `${m.mismatch ? ` (DIFFERS ${m.mismatches}×: ${m.mismatch})` : ''}${m.error ? ` (ERROR ${m.error})` : ''}`,
        );
      const batch = lane.summary();
      return { via: lane.via, methods, ...(batch && { batch }) };
    });
    return { tokens, steps, budgetTokens, preload, methods: transports[0].methods, transports, baselines: baselines(o.shape, tokens), server };
  }
}
