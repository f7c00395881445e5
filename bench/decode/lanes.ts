// The transports of bench:decode's attends (--via). A lane is one transport
// with sessions of its own over the document, one per method (exact first);
// lanes take turns per (step, layer) and send the same requests, so their
// answers must be bit-identical (sameAnswer), and their timings come from
// one sitting.
//
//   stream: one frame per attend on one open WebSocket, each awaited before
//           the next (one connection of an LLM server).
//   stream-spin: as stream, the client's event loop polling for up to
//           SPIN_MS after each request while its answer is owed
//           (openStream({ spinMs })), then sleeping.
//   batch:  per (step, layer) one batch frame on the lane's stream carrying
//           every session's step (the sessions stand for a server's running
//           batch). Each session waits for the whole exchange, so a step is
//           timed as its own server ms (stats.ms) plus the batch's wall −
//           the batch's server ms: per token, RPC = Σ over layers of
//           (batch wall − batch server ms). The batches' own wall time is
//           kept too (summary()).
//   http:   one POST /v1/sessions/:sid/attend per attend (keep-alive).
import { KvrecallRequestError, type AttendReply, type BatchResult, type KvrecallClient, type Tensor } from '../../clients/ts/client.js';
import type { KvrecallStream } from '../../clients/ts/stream.js';
import { mean, percentile } from '../stats.js';
import type { Via } from './options.js';
import type { BatchSummary } from './results.js';
import type { CallKind, Run } from './run.js';
import { log, now } from './util.js';

/** What every session gets at one (step, layer): q, and the new token's k and v (absent in the warm-up). */
export interface StepBody {
  layer: number;
  q: Tensor;
  k?: Tensor;
  v?: Tensor;
}

type Ret = ('out' | 'selection' | 'timing')[];

/** stream-spin's polling per request: a wave step at 1M on the H100 host takes ~0.8 ms; exact's 29 ms calls sleep after it. */
export const SPIN_MS = 2;

const why = (e: unknown) => (e instanceof KvrecallRequestError ? e.message : (e as Error).stack ?? String(e));

export class Lane {
  /** Via batch, per step: the batches' client wall and server ms, summed over layers. */
  private readonly batchWall: number[];
  private readonly batchServer: number[];

  private constructor(
    readonly via: Via,
    /** runs[0] is the exact session. */
    readonly runs: Run[],
    private readonly client: KvrecallClient,
    private readonly stream: KvrecallStream | undefined,
    steps: number,
  ) {
    this.batchWall = new Array<number>(steps).fill(0);
    this.batchServer = new Array<number>(steps).fill(0);
  }

  static async open(via: Via, runs: Run[], client: KvrecallClient, steps: number): Promise<Lane> {
    return new Lane(via, runs, client, via === 'http' ? undefined : await client.openStream({ spinMs: via === 'stream-spin' ? SPIN_MS : 0 }), steps);
  }

  close(): void {
    this.stream?.close();
  }

  /** One attend over this lane's transport (a batch lane's single calls, the warm-up's, go over its stream). */
  private attend(run: Run, body: StepBody & { return?: Ret }): Promise<AttendReply> {
    return this.stream ? this.stream.attend(run.sid, body) : this.client.attend(run.sid, body);
  }

  /**
   * Step s of layer `body.layer` for every session; `ret(run)` says which
   * return the selection too. Sessions take turns going first (`turn`), so
   * whatever the call after the fidelity work pays (a GC pause, a cold
   * socket) is spread over the methods; `afterWork`: this lane's first
   * exchange is that call (recorded apart: CallKind); `only`: the sessions
   * that step (default every one).
   */
  async step(s: number, body: StepBody, turn: number, ret: (run: Run) => Ret, afterWork = false, only?: (run: Run) => boolean): Promise<Map<Run, AttendReply>> {
    const order = turnOrder(this.runs.filter((r) => !r.error && (!only || only(r))), turn);
    return this.via === 'batch' ? this.batchStep(s, body, order, ret, afterWork) : this.singleSteps(s, body, order, ret, afterWork);
  }

  private async singleSteps(s: number, body: StepBody, order: Run[], ret: (run: Run) => Ret, afterWork: boolean): Promise<Map<Run, AttendReply>> {
    const replies = new Map<Run, AttendReply>();
    for (const [i, run] of order.entries()) {
      const t = now();
      try {
        const r = await this.attend(run, { ...body, return: ret(run) });
        run.record(s, now() - t, r, callKind(ret(run), afterWork && i === 0));
        replies.set(run, r);
      } catch (e) {
        run.error = `attend via ${this.via} (step ${s}, layer ${body.layer}): ${why(e)}`;
        log(`${run.method}: ${run.error}`);
      }
    }
    return replies;
  }

  private async batchStep(s: number, body: StepBody, order: Run[], ret: (run: Run) => Ret, afterWork: boolean): Promise<Map<Run, AttendReply>> {
    const replies = new Map<Run, AttendReply>();
    if (order.length === 0) return replies;
    const { layer, ...step } = body;
    const t = now();
    let results: BatchResult[] & { ms?: number };
    try {
      results = await this.stream!.attendBatch(layer, order.map((run) => ({ ...step, session: run.sid, return: ret(run) })));
    } catch (e) {
      for (const run of order) run.error = `batch (step ${s}, layer ${layer}): ${why(e)}`;
      log(`batch: ${order[0].error}`);
      return replies;
    }
    const wall = now() - t, server = results.ms ?? NaN;
    this.batchWall[s] += wall;
    this.batchServer[s] += server;
    order.forEach((run, i) => {
      const r = results[i];
      if ('error' in r) {
        run.error = `batch step (step ${s}, layer ${layer}): ${r.error.code}: ${r.error.message}`;
        log(`${run.method}: ${run.error}`);
        return;
      }
      run.record(s, r.stats.ms + (wall - server), r, callKind(ret(run), afterWork));
      replies.set(run, r);
    });
    return replies;
  }

  /**
   * Warm-up (cold) pass: every session, every layer, the given bodies (no
   * k/v, nothing appended), one session after the other, each over its
   * lane's transport (a batch lane's over its stream, one by one, so each
   * method's cold time is its own).
   */
  async warmUp(bodies: StepBody[]): Promise<void> {
    for (const run of this.runs) {
      if (run.error) continue;
      const t = now();
      try {
        for (const body of bodies) {
          const r = await this.attend(run, body);
          // One-time work (a retention pass) counts towards the scanned fraction, amortised over the decode.
          if (r.stats.tokens > 0) run.scanned.push((r.stats.scanned ?? 0) / r.stats.tokens);
        }
        run.coldMs = now() - t;
      } catch (e) {
        run.error = `warm-up attend via ${this.via}: ${why(e)}`;
        log(`${run.method}: ${run.error}`);
      }
    }
  }

  /** Via batch: the batches per token (steps every session finished). */
  summary(): BatchSummary | undefined {
    if (this.via !== 'batch') return undefined;
    const n = Math.min(...this.runs.map((r) => r.perToken().length));
    const wall = this.batchWall.slice(0, n), meanMs = mean(wall), serverMs = mean(this.batchServer.slice(0, n));
    const rpcP50Ms = percentile(wall.map((w, i) => w - this.batchServer[i]), 50);
    return { size: this.runs.length, perTokenMs: wall, p50Ms: percentile(wall, 50), meanMs, serverMs, rpcMs: meanMs - serverMs, rpcShare: (meanMs - serverMs) / meanMs, rpcP50Ms };
  }
}

/** The order `turn` gives: `items` rotated by turn places (turn 0: as given). */
export function turnOrder<T>(items: T[], turn: number): T[] {
  const k = items.length ? turn % items.length : 0;
  return [...items.slice(k), ...items.slice(0, k)];
}

/** A call's kind: the first after the fidelity work, else by what it asks. */
const callKind = (ret: Ret, afterWork: boolean): CallKind => (afterWork ? 'afterWork' : ret.includes('selection') ? 'sampled' : 'plain');

const bytes = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/** Where two answers to the same step differ (out, lse or selection, bit for bit), or undefined when they do not. */
export function sameAnswer(a: AttendReply, b: AttendReply): string | undefined {
  const differ = (x: ArrayBufferView, y: ArrayBufferView) => x.byteLength !== y.byteLength || Buffer.compare(bytes(x), bytes(y)) !== 0;
  if (a.outDtype !== b.outDtype || differ(a.out, b.out)) {
    let worst = 0;
    for (let i = 0; i < Math.min(a.out.length, b.out.length); i++) worst = Math.max(worst, Math.abs(a.out[i] - b.out[i]));
    return `out differs (largest difference ${worst.toExponential(2)})`;
  }
  if (differ(a.lse, b.lse)) return 'lse differs';
  if ((a.selection?.length ?? 0) !== (b.selection?.length ?? 0)) return 'selection returned by one only';
  for (let h = 0; h < (a.selection?.length ?? 0); h++) if (differ(a.selection![h], b.selection![h])) return `selection of kv head ${h} differs`;
  return undefined;
}
