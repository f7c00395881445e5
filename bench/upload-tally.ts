// Where a document preload's upload time goes: the client's wall time and,
// from each upload's reply (stats), the server's time per phase summed over
// requests. With several layers in flight the server phases of different
// requests overlap, so their sum may exceed the wall time; each phase's rate
// is the K/V bytes over that phase's time alone (what it would allow if it
// were the only cost).
import type { KvUploadStats } from '../clients/ts/client.js';

export const SERVER_PHASES = ['read', 'decode', 'queue', 'check', 'append', 'write'] as const;
export type ServerPhase = (typeof SERVER_PHASES)[number];

export const PHASE_MEANING: Record<ServerPhase, string> = {
  read: 'body arriving into one buffer (network included)',
  decode: 'msgpack decode (tensor bytes stay views)',
  queue: "waiting behind the document's earlier requests",
  check: 'shapes, dtypes, NaN/Inf',
  append: 'copy into host memory, prefill queries kept',
  write: "waiting for the previous upload's LMDB commit, staging this one's blocks",
};

export interface UploadPhases {
  requests: number;
  tokens: number;
  /** K/V bytes sent. */
  kvBytes: number;
  /** K/V plus prefill queries as sent. */
  wireBytes: number;
  /** Bodies as the server read them (msgpack framing included). */
  bodyBytes: number;
  /** Wall time of the upload groups (generation excluded). */
  wallSeconds: number;
  /** Sum over requests of the client's wall time per request. */
  requestSeconds: number;
  /** Server time per phase, summed over requests (0 where the server does not report it). */
  serverSeconds: Record<ServerPhase, number>;
}

export class UploadTally {
  readonly phases: UploadPhases = {
    requests: 0,
    tokens: 0,
    kvBytes: 0,
    wireBytes: 0,
    bodyBytes: 0,
    wallSeconds: 0,
    requestSeconds: 0,
    serverSeconds: { read: 0, decode: 0, queue: 0, check: 0, append: 0, write: 0 },
  };
  private since?: number;

  constructor(private readonly onProgress: (tokens: number, note: string) => void) {}

  /** Upload time runs between resume and pause (generation between groups is not counted). */
  resume(): void {
    this.since = performance.now();
  }

  pause(): void {
    if (this.since !== undefined) this.phases.wallSeconds += (performance.now() - this.since) / 1000;
    this.since = undefined;
  }

  request(wallMs: number, tokens: number, kvBytes: number, wireBytes: number, stats?: KvUploadStats): void {
    const p = this.phases;
    p.requests++;
    p.tokens += tokens;
    p.kvBytes += kvBytes;
    p.wireBytes += wireBytes;
    p.requestSeconds += wallMs / 1000;
    if (stats) {
      p.bodyBytes += stats.bytes;
      p.serverSeconds.read += stats.readMs / 1000;
      p.serverSeconds.decode += stats.decodeMs / 1000;
      p.serverSeconds.queue += stats.queueMs / 1000;
      p.serverSeconds.check += stats.checkMs / 1000;
      p.serverSeconds.append += stats.appendMs / 1000;
      p.serverSeconds.write += stats.writeMs / 1000;
    }
    const wall = p.wallSeconds + (this.since === undefined ? 0 : (performance.now() - this.since) / 1000);
    this.onProgress(p.tokens, `${(p.kvBytes / wall / 1e9).toFixed(2)} GB/s K/V`);
  }

  /** K/V bytes per second of upload wall time. */
  get kvGBps(): number {
    return this.phases.kvBytes / this.phases.wallSeconds / 1e9;
  }
}

/** One line: the wall rate, then each server phase's time and rate. */
export function describePhases(p: UploadPhases, concurrency: number): string {
  const rate = (s: number) => (s > 0 ? `${(p.kvBytes / s / 1e9).toFixed(2)} GB/s` : '—');
  const parts = SERVER_PHASES.map((ph) => `${ph} ${p.serverSeconds[ph].toFixed(2)} s (${rate(p.serverSeconds[ph])})`);
  return (
    `${p.requests} requests, ${concurrency} layer${concurrency === 1 ? '' : 's'} in flight: wall ${p.wallSeconds.toFixed(2)} s (${rate(p.wallSeconds)} K/V, ` +
    `${(p.wireBytes / p.wallSeconds / 1e9).toFixed(2)} GB/s as sent); server, summed over requests: ${parts.join(', ')}`
  );
}
