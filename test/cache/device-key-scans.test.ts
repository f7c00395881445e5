// The key scanner GPU sessions offer retrieval-attention (engine/cache/device-key-scans.ts), over stores that
// run the host's code scan (RaGraph searchSync with codeScan) head by head in place of the device's kernels,
// so that it runs here: the device store answers as that scan does up to near-ties (test/native/ra-scan-gpu),
// which the GPU visit checks. Here: a session's searchHeads with codeScan asks the scanner, searches on the host
// while the layer's store is made, then takes the scanner's answers, which equal the host path's given the
// same seeds (the last step's ids), free keys (the steady zone), k, cap and scanKeep (the PQ first pass: a store is
// made with the PQ codes for a session that asks it, or has them added later where the budget has room); a store larger than the budget is
// never made; idle stores are evicted for another layer's, warm ones and busy ones are not; a store that fails
// to open leaves its layer on the host with its bytes given back.
import { describe, expect, it } from 'vitest';
import { attend } from '../../addon/kernels.js';
import { RaGraph } from '../../addon/ra-graph.js';
import type { RaScanSearchArgs } from '../../addon/ra-scan.js';
import { DeviceKeyScans, scanPqBytes, scanStoreBytes, type ScanStore, type ScanStoreBackend } from '../../engine/cache/device-key-scans.js';
import type { HeadIndex, ScanHead, SearchMemo } from '../../index/method.js';
import { retrievalAttentionBuilder } from '../../index/retrieval-attention.js';
import { bitsOf } from '../helpers/half.js';
import { freshSeed, Rng } from '../helpers/random.js';

const seed = freshSeed();
console.log(`device-key-scans: seed ${seed}`);
const d = 32, n = 6000, heads = 2, G = 4;

/** The host's code scan head by head, as a store (what the device's answers are checked against). */
class HostScanStore implements ScanStore {
  closed = false;
  pqAdded = 0;
  searches: RaScanSearchArgs[] = [];
  constructor(readonly heads: readonly ScanHead[], public hasPq: boolean) {}
  async addPq() {
    this.pqAdded++;
    this.hasPq = true;
  }
  async searchIds(a: RaScanSearchArgs) {
    // As the binding: scanKeep needs the PQ codes.
    if (a.scanKeep !== undefined && !this.hasPq) throw new Error('RaScanStore: this store holds no PQ codes');
    this.searches.push(a);
    return this.heads.map((h, i) => {
      const outIds = new Int32Array(a.k), outScores = new Float32Array(a.k);
      const r = h.graph.searchSync({
        keys: h.keys, tokens: h.tokens, headDim: h.headDim, dtype: h.dtype, q: a.q.subarray(i * a.group * d, (i + 1) * a.group * d),
        group: a.group, k: a.k, ef: 0, aggregate: 'attention', codeScan: true, maxScanned: a.maxScanned, outIds, outScores,
        ...(a.seeds?.[i].length && { seeds: a.seeds[i] }), ...(a.free && { freeSeeds: a.free[i] }), ...(a.scanKeep !== undefined && { scanKeep: a.scanKeep }),
      });
      return { ids: outIds.subarray(0, r.count), scores: outScores.subarray(0, r.count), scanned: r.scanned, ...(r.codesKept !== undefined && { codesKept: r.codesKept }) };
    });
  }
  /** The host kernel over the ranges' rows and the lists', as the device's store attends them. */
  readonly hasValues = true;
  attends = 0;
  async attend(a: { q: Float32Array; group: number; scale: number; ids: readonly Int32Array[]; ranges?: Int32Array }) {
    this.attends++;
    const H = this.heads.length, out = new Float32Array(H * a.group * d), lse = new Float32Array(H * a.group);
    const k = this.heads.map((h) => h.keys), v = this.heads.map((h) => h.values!);
    const ranges = Array.from({ length: (a.ranges?.length ?? 0) / 2 }, (_, r) => ({ k, v, tokens: n, begin: a.ranges![2 * r], end: a.ranges![2 * r + 1] }));
    await attend({ q: a.q, qHeads: H * a.group, kvHeads: H, headDim: d, dtype: 'f16', scale: a.scale, segments: [...ranges, { k, v, tokens: n, ids: [...a.ids] }], out, lse });
    return { out, lse };
  }
  bytes() {
    return scanStoreBytes(this.heads, this.hasPq);
  }
  close() {
    this.closed = true;
  }
}

function backend(fail = false) {
  const made: HostScanStore[] = [];
  const b: ScanStoreBackend = {
    open: async (hs, _maxGroup, pq) => {
      if (fail) throw new Error('no device memory');
      const s = new HostScanStore(hs, pq);
      made.push(s);
      return s;
    },
    supported: (headDim, group) => headDim % 8 === 0 && group <= 16,
  };
  return { b, made };
}

async function layer(rng: Rng): Promise<HeadIndex[]> {
  const out: HeadIndex[] = [];
  for (let h = 0; h < heads; h++) {
    const bits = Uint16Array.from({ length: n * d }, () => bitsOf('f16')(rng.normal()));
    const keys = { keys: bits, values: bits, tokens: n, headDim: d, dtype: 'f16' as const };
    const queries = Float32Array.from({ length: 256 * d }, () => rng.normal());
    out.push(retrievalAttentionBuilder.load(await retrievalAttentionBuilder.build({ ...keys, queries, queryCount: 256 }), keys));
  }
  return out;
}
const headsOf = (idx: HeadIndex[]) => idx.map((x) => x as unknown as { graph: RaGraph; keys: ScanHead });
const steady = Int32Array.from({ length: 4 + 64 }, (_, i) => (i < 4 ? i : n - 64 + (i - 4)));
const walk = { codeScan: true };

describe('device key scans', () => {
  for (const scanKeep of [undefined, 0.1])
    it(`scans on the host while the store is made, then answers through it as the host path does${scanKeep ? ` (scanKeep ${scanKeep})` : ''}`, async () => {
      const rng = new Rng(seed);
      const walk = { codeScan: true, ...(scanKeep !== undefined && { scanKeep }) };
      const idx = await layer(rng);
      const { b, made } = backend();
      const scans = new DeviceKeyScans(1e12, b);
      const k = 60 + steady.length;
      const memoA: SearchMemo = { steady }, memoB: SearchMemo = { steady };
      for (let step = 0; step < 4; step++) {
        const q = Float32Array.from({ length: heads * G * d }, () => rng.normal());
        const viaScanner = await retrievalAttentionBuilder.searchHeads!(idx, q, G, [k, k], 0, memoA, false, walk, scans);
        const onHost = await retrievalAttentionBuilder.searchHeads!(idx, q, G, [k, k], 0, memoB, false, walk);
        // Same ids as sets (the device's come unordered), the same scanned counts and codes read.
        for (let h = 0; h < heads; h++) {
          expect([...viaScanner[h].ids].sort((x, y) => x - y)).toEqual([...onHost[h].ids].sort((x, y) => x - y));
          expect(viaScanner[h].scanned).toBe(onHost[h].scanned);
          expect(viaScanner[h].codes).toBe(n);
        }
        expect(memoA.last?.map((x) => x.length)).toEqual([60, 60]);
        if (step === 0) {
          expect(scans.stats.steps).toBe(0);  // made in the background, the host searched
          await scans.settled();
          expect(scans.stats.opened).toBe(1);
        } else expect(scans.stats.steps).toBe(step);
      }
      // The store was asked with the session's seeds (the last step's ids), its steady zone free, k and the cap.
      const last = made[0].searches.at(-1)!;
      expect(last.k).toBe(60);
      expect(last.free?.[0]).toBe(steady);
      expect(last.seeds?.length).toBe(heads);
      expect(last.maxScanned).toBe(Math.max(Math.ceil(0.03 * n), 3 * 60));
      expect(last.scanKeep).toBe(scanKeep);
      // Made with the PQ codes where the session that asked first has scanKeep.
      expect(made[0].hasPq).toBe(scanKeep !== undefined);
      expect(scans.stats.bytes).toBe(scanStoreBytes(headsOf(idx).map((x) => ({ ...x.keys, graph: x.graph })), scanKeep !== undefined));
    });

  it('never makes a store larger than its budget, and gives back the bytes of one that failed', async () => {
    const rng = new Rng(seed + 1);
    const idx = await layer(rng);
    const q = Float32Array.from({ length: heads * G * d }, () => rng.normal());
    const small = backend();
    const tight = new DeviceKeyScans(1000, small.b);
    for (let i = 0; i < 2; i++) await retrievalAttentionBuilder.searchHeads!(idx, q, G, [100, 100], 0, { steady }, false, walk, tight);
    await tight.settled();
    expect(small.made.length).toBe(0);
    expect(tight.stats.failures).toBe(1);
    const failing = backend(true);
    const scans = new DeviceKeyScans(1e12, failing.b);
    await retrievalAttentionBuilder.searchHeads!(idx, q, G, [100, 100], 0, { steady }, false, walk, scans);
    await scans.settled();
    expect(scans.stats.failures).toBe(1);
    expect(scans.stats.bytes).toBe(0);
    // Refused from then on: the host answers, nothing is retried.
    const r = await retrievalAttentionBuilder.searchHeads!(idx, q, G, [100, 100], 0, { steady }, false, walk, scans);
    expect(r[0].ids.length).toBe(100 - steady.length);
    expect(scans.stats.steps).toBe(0);
  });

  it('adds the PQ codes to a store made without them once a session asks scanKeep, where the budget has room', async () => {
    const rng = new Rng(seed + 3);
    const idx = await layer(rng);
    const hs = headsOf(idx).map((x) => ({ ...x.keys, graph: x.graph }));
    const q = Float32Array.from({ length: heads * G * d }, () => rng.normal());
    const ask = (s: DeviceKeyScans, scanKeep?: number) =>
      retrievalAttentionBuilder.searchHeads!(idx, q, G, [100, 100], 0, { steady }, false, { codeScan: true, ...(scanKeep !== undefined && { scanKeep }) }, s);
    for (const room of [true, false]) {
      const { b, made } = backend();
      const scans = new DeviceKeyScans(scanStoreBytes(hs) + (room ? scanPqBytes(hs) : 0), b);
      await ask(scans);
      await scans.settled();
      await ask(scans);
      expect(scans.stats.steps).toBe(1);
      expect(made[0].hasPq).toBe(false);
      // A session with scanKeep: the host answers (the host's two-pass search) while the codes are added, or for good
      // where they do not fit; sessions without it keep the store.
      const host = await retrievalAttentionBuilder.searchHeads!(idx, q, G, [100, 100], 0, { steady }, false, { codeScan: true, scanKeep: 0.2 });
      const first = await ask(scans, 0.2);
      expect(first.map((r) => Array.from(r.ids))).toEqual(host.map((r) => Array.from(r.ids)));
      expect(scans.stats.steps).toBe(1);
      const again = await ask(scans, 0.2);
      expect(made[0].pqAdded).toBe(room ? 1 : 0);
      expect(scans.stats.steps).toBe(room ? 2 : 1);
      expect(made[0].searches.at(-1)?.scanKeep).toBe(room ? 0.2 : undefined);
      expect(again.map((r) => [...r.ids].sort((x, y) => x - y))).toEqual(host.map((r) => [...r.ids].sort((x, y) => x - y)));
      expect(scans.stats.bytes).toBe(scanStoreBytes(hs, room));
      await ask(scans);
      expect(scans.stats.steps).toBe(room ? 3 : 2);
      expect(made.length).toBe(1);
    }
  });

  it("hands its answer the store's rows, which attend the ranges and lists there, or decline while the PQ codes are added", async () => {
    const rng = new Rng(seed + 4);
    const idx = await layer(rng);
    const { b, made } = backend();
    const scans = new DeviceKeyScans(1e12, b);
    const q = Float32Array.from({ length: heads * G * d }, () => rng.normal());
    const ask = (scanKeep?: number) =>
      retrievalAttentionBuilder.searchHeads!(idx, q, G, [100, 100], 0, { steady }, false, { codeScan: true, ...(scanKeep !== undefined && { scanKeep }) }, scans);
    await ask();
    await scans.settled();
    const [res] = await ask();
    const rows = res.rows!;
    expect(rows).toBeDefined();
    // Sinks and window as pairs, then the ids: the host kernel over the same rows (keys = values here).
    const ids = idx.map(() => res.ids), ranges = Int32Array.of(0, 4, n - 64, n);
    const got = (await rows.attend(ids, q, G, 0.1, ranges))!;
    const keys = headsOf(idx).map((x) => x.keys.keys);
    const out = new Float32Array(heads * G * d), lse = new Float32Array(heads * G);
    await attend({ q, qHeads: heads * G, kvHeads: heads, headDim: d, dtype: 'f16', scale: 0.1, segments: [{ k: keys, v: keys, tokens: n, begin: 0, end: 4 }, { k: keys, v: keys, tokens: n, begin: n - 64, end: n }, { k: keys, v: keys, tokens: n, ids }], out, lse });
    expect(Array.from(got.lse)).toEqual(Array.from(lse));
    expect(Array.from(got.out)).toEqual(Array.from(out));
    expect([made[0].attends, scans.stats.attends]).toEqual([1, 1]);
    // A session with scanKeep has the PQ codes added; meanwhile the store's rows decline (the host attends them).
    let release!: () => void;
    made[0].addPq = () => new Promise<void>((r) => (release = () => ((made[0].hasPq = true), r())));
    await ask(0.2);
    expect(await rows.attend(ids, q, G, 0.1, ranges)).toBeUndefined();
    release();
    await new Promise((r) => setImmediate(r));
    expect(await rows.attend(ids, q, G, 0.1, ranges)).toBeDefined();
    expect(made[0].attends).toBe(2);
  });

  it('evicts an idle store for another layer\'s, never a warm one', async () => {
    const rng = new Rng(seed + 2);
    const a = await layer(rng), bLayer = await layer(rng);
    const one = scanStoreBytes(headsOf(a).map((x) => ({ ...x.keys, graph: x.graph })));
    const q = Float32Array.from({ length: heads * G * d }, () => rng.normal());
    const ask = (idx: HeadIndex[], s: DeviceKeyScans) => retrievalAttentionBuilder.searchHeads!(idx, q, G, [100, 100], 0, { steady }, false, walk, s);
    // Warm for an hour: the second layer waits on the host.
    const warm = backend();
    const keep = new DeviceKeyScans(1.5 * one, warm.b, 3_600_000);
    await ask(a, keep);
    await keep.settled();
    await ask(a, keep);
    await ask(bLayer, keep);
    await keep.settled();
    expect(warm.made.length).toBe(1);
    expect(keep.stats.evicted).toBe(0);
    // Idle at once: the first layer's store goes, closed, and the second's is made.
    const idle = backend();
    const swap = new DeviceKeyScans(1.5 * one, idle.b, 0);
    await ask(a, swap);
    await swap.settled();
    await ask(a, swap);
    await ask(bLayer, swap);
    await swap.settled();
    expect(idle.made.length).toBe(2);
    expect(idle.made[0].closed).toBe(true);
    expect(swap.stats.evicted).toBe(1);
    expect(swap.stats.bytes).toBe(one);
    const r = await ask(bLayer, swap);
    expect(swap.stats.steps).toBe(2);
    expect(r[1].ids.length).toBe(100 - steady.length);
  });
});
