// One session's measurements over a context's decode, summed over layers
// per token, and their summary as a MethodResult.
import type { AttendReply } from '../../clients/ts/client.js';
import { mean, percentile } from '../stats.js';
import type { Via } from './options.js';
import type { CallSplit, MethodResult } from './results.js';
import { round } from './util.js';

/**
 * Where a call stood in the loop: `plain`, back to back after the call
 * before, asking only `out` (an LLM server's call); `sampled`, back to back
 * on a quality-sampled layer, asking the selection too; `afterWork`, the
 * first call after the loop's fidelity work on a sampled layer (float64
 * attention over the whole context in this process: ~1 s at 1M tokens, and
 * a 20 ms sleep after it), whatever it asks: both processes come to it
 * cold, which is the loop's, not the call's.
 */
export type CallKind = 'plain' | 'sampled' | 'afterWork';
export const CALL_KINDS: readonly CallKind[] = ['plain', 'sampled', 'afterWork'];

/** One call's client wall and the parts of its server stats (ms). */
interface CallRecord {
  kind: CallKind;
  wall: number;
  server: number;
  select: number;
  attend: number;
  kernel: number;
  /** stats.gpu.host (--timing): a device step's host stages. */
  host?: Record<string, number>;
}

/** One session's measurements. */
export class Run {
  error?: string;
  readonly wall: number[];
  readonly server: number[];
  readonly select: number[];
  readonly attendK: number[];
  readonly transfer: number[];
  /** Every timed call, in order (the per-call splits by CallKind). */
  readonly calls: CallRecord[] = [];
  scanned: number[] = [];
  /** stats.codes / stats.tokens of the calls that report codes (a code-walk session's). */
  codes: number[] = [];
  attended: number[] = [];
  blocksSelected = 0;
  blocksHits = 0;
  blocksBytesIn = 0;
  blocksCalls = 0;
  outErr: number[] = [];
  outErrWorst = 0;
  recall: number[] = [];
  oracleRecall: number[] = [];
  topK: number[] = [];
  needles = 0;
  needlesHit = 0;
  duplicates = 0;
  kernelErr?: number;
  coldMs = NaN;
  /** Steps whose answer was not bit-identical to the same method's on the first transport; the first such, described. */
  mismatches = 0;
  mismatch?: string;

  constructor(
    readonly method: string,
    readonly sid: string,
    readonly steps: number,
    readonly via: Via,
  ) {
    this.wall = new Array<number>(steps).fill(0);
    this.server = new Array<number>(steps).fill(0);
    this.select = new Array<number>(steps).fill(0);
    this.attendK = new Array<number>(steps).fill(0);
    this.transfer = new Array<number>(steps).fill(0);
  }

  /** wallMs: the call's (for a batch step: its own stats.ms plus the batch's wall − server ms); kind: where it stood (CallKind). */
  record(step: number, wallMs: number, r: AttendReply, kind: CallKind): void {
    const st = r.stats as AttendReply['stats'] & { gpu?: { residentMs: number; kernelMs?: number; host?: Record<string, number> } };
    this.calls.push({ kind, wall: wallMs, server: st.ms ?? 0, select: st.selectMs ?? 0, attend: st.attendMs ?? 0, kernel: st.gpu?.kernelMs ?? NaN, ...(st.gpu?.host && { host: st.gpu.host }) });
    this.wall[step] += wallMs;
    this.server[step] += st.ms ?? 0;
    this.select[step] += st.selectMs ?? 0;
    this.attendK[step] += st.attendMs ?? 0;
    this.transfer[step] += st.gpu?.residentMs ?? 0;
    if (st.tokens > 0) this.scanned.push((st.scanned ?? 0) / st.tokens);
    if (st.tokens > 0 && st.codes !== undefined) this.codes.push(st.codes / st.tokens);
    this.attended.push(st.attended ?? 0);
    if (st.blocks) {
      this.blocksCalls++;
      this.blocksSelected += st.blocks.selected;
      this.blocksHits += st.blocks.hits;
      this.blocksBytesIn += st.blocks.bytesIn;
    }
  }

  /** p50s over the calls of one kind (NaN where there were none): wall, server stats.ms and its parts, wall − stats.ms. */
  private split(kind: CallKind): CallSplit {
    const c = this.calls.filter((x) => x.kind === kind);
    const p50 = (f: (x: CallRecord) => number) => (c.length ? percentile(c.map(f), 50) : NaN);
    return {
      calls: c.length,
      wallP50Ms: p50((x) => x.wall),
      serverP50Ms: p50((x) => x.server),
      selectP50Ms: p50((x) => x.select),
      attendP50Ms: p50((x) => x.attend),
      otherP50Ms: p50((x) => x.server - x.select - x.attend),
      kernelP50Ms: c.some((x) => Number.isFinite(x.kernel)) ? percentile(c.filter((x) => Number.isFinite(x.kernel)).map((x) => x.kernel), 50) : NaN,
      rpcP50Ms: p50((x) => x.wall - x.server),
      ...(c.some((x) => x.host) && { hostP50Ms: hostStages(c) }),
    };
  }

  /** Steps completed by every layer (a failed run keeps what it finished). */
  perToken(): number[] {
    return this.wall.filter((w) => w > 0);
  }

  result(exactP50: number, layers: number): MethodResult {
    const wall = this.perToken(), n = wall.length;
    const take = (xs: number[]) => xs.slice(0, n);
    const p50 = percentile(wall, 50);
    const meanMs = mean(wall);
    const serverMs = mean(take(this.server));
    const isExact = this.method === 'exact';
    const calls = Object.fromEntries(CALL_KINDS.map((k) => [k, this.split(k)])) as Record<CallKind, CallSplit>;
    return {
      method: this.method,
      via: this.via,
      ...(this.error && { error: this.error }),
      ...(this.mismatch && { mismatches: this.mismatches, mismatch: this.mismatch }),
      steps: n,
      latency: {
        perTokenMs: wall.map((x) => round(x)),
        p50Ms: p50,
        p99Ms: percentile(wall, 99),
        meanMs,
        coldMs: this.coldMs,
        rpcMs: meanMs - serverMs,
        rpcShare: (meanMs - serverMs) / meanMs,
        rpcP50Ms: percentile(wall.map((w, i) => w - this.server[i]), 50),
        rpcCall: {
          plainP50Ms: calls.plain.rpcP50Ms,
          plainCalls: calls.plain.calls,
          sampledP50Ms: calls.sampled.rpcP50Ms,
          sampledCalls: calls.sampled.calls,
          afterWorkP50Ms: calls.afterWork.rpcP50Ms,
          afterWorkCalls: calls.afterWork.calls,
        },
        calls,
        serverMs,
        retrievalMs: mean(take(this.select)),
        attentionMs: mean(take(this.attendK)),
        otherServerMs: serverMs - mean(take(this.select)) - mean(take(this.attendK)),
        transferMs: mean(take(this.transfer)),
        tokensPerSecond: 1000 / meanMs,
        ratioToExact: p50 / exactP50,
      },
      scannedFraction: mean(this.scanned),
      ...(this.codes.length > 0 && { codesFraction: mean(this.codes) }),
      attended: mean(this.attended),
      ...(this.blocksCalls > 0 && {
        blocks: {
          selectedPerCall: this.blocksSelected / this.blocksCalls,
          hitRate: this.blocksSelected > 0 ? this.blocksHits / this.blocksSelected : NaN,
          bytesInPerToken: (this.blocksBytesIn / this.blocksCalls) * layers,
        },
      }),
      fidelity: {
        outputErrorMean: isExact ? 0 : mean(this.outErr),
        outputErrorWorst: isExact ? 0 : this.outErrWorst,
        recallMean: isExact ? 1 : mean(this.recall),
        recallWorst: isExact ? 1 : this.recall.length ? Math.min(...this.recall) : NaN,
        oracleRecallMean: isExact ? 1 : mean(this.oracleRecall),
        topKRecallMean: isExact ? 1 : mean(this.topK),
        recallSamples: this.recall.length,
        needlesHit: this.needlesHit,
        needles: this.needles,
        duplicateSelections: this.duplicates,
        ...(this.kernelErr !== undefined && { kernelErrorVsFloat64: this.kernelErr }),
      },
    };
  }
}

/** p50 per host stage over the calls that reported them (--timing). */
function hostStages(c: CallRecord[]): Record<string, number> {
  const withHost = c.filter((x) => x.host);
  const keys = [...new Set(withHost.flatMap((x) => Object.keys(x.host!)))];
  return Object.fromEntries(keys.map((k) => [k, percentile(withHost.map((x) => x.host![k] ?? NaN).filter(Number.isFinite), 50)]));
}
