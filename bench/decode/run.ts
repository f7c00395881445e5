// One session's measurements over a context's decode, summed over layers
// per token, and their summary as a MethodResult.
import type { AttendReply } from '../../clients/ts/client.js';
import { mean, percentile } from '../stats.js';
import type { Via } from './options.js';
import type { MethodResult } from './results.js';
import { round } from './util.js';

/** One session's measurements. */
export class Run {
  error?: string;
  readonly wall: number[];
  readonly server: number[];
  readonly select: number[];
  readonly attendK: number[];
  readonly transfer: number[];
  /** Per call, wall − stats.ms: calls that asked only `out`, and those that asked the selection too (the quality-sampled layers). */
  readonly rpcPlain: number[] = [];
  readonly rpcSampled: number[] = [];
  scanned: number[] = [];
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

  /** wallMs: the call's (for a batch step: its own stats.ms plus the batch's wall − server ms); sampled: it asked the selection too. */
  record(step: number, wallMs: number, r: AttendReply, sampled: boolean): void {
    const st = r.stats as AttendReply['stats'] & { gpu?: { residentMs: number } };
    (sampled ? this.rpcSampled : this.rpcPlain).push(wallMs - (st.ms ?? 0));
    this.wall[step] += wallMs;
    this.server[step] += st.ms ?? 0;
    this.select[step] += st.selectMs ?? 0;
    this.attendK[step] += st.attendMs ?? 0;
    this.transfer[step] += st.gpu?.residentMs ?? 0;
    if (st.tokens > 0) this.scanned.push((st.scanned ?? 0) / st.tokens);
    this.attended.push(st.attended ?? 0);
    if (st.blocks) {
      this.blocksCalls++;
      this.blocksSelected += st.blocks.selected;
      this.blocksHits += st.blocks.hits;
      this.blocksBytesIn += st.blocks.bytesIn;
    }
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
          plainP50Ms: this.rpcPlain.length ? percentile(this.rpcPlain, 50) : NaN,
          plainCalls: this.rpcPlain.length,
          sampledP50Ms: this.rpcSampled.length ? percentile(this.rpcSampled, 50) : NaN,
          sampledCalls: this.rpcSampled.length,
        },
        serverMs,
        retrievalMs: mean(take(this.select)),
        attentionMs: mean(take(this.attendK)),
        otherServerMs: serverMs - mean(take(this.select)) - mean(take(this.attendK)),
        transferMs: mean(take(this.transfer)),
        tokensPerSecond: 1000 / meanMs,
        ratioToExact: p50 / exactP50,
      },
      scannedFraction: mean(this.scanned),
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
