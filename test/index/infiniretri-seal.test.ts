// InfiniRetri's seal-time reading (index/infiniretri*.ts): the document's
// prefill queries read it chunk by chunk and keep their evidence, stored as
// an artifact that a session loads without reading the document again.
import { beforeAll, describe, expect, it } from 'vitest';
import { tensor, type KvrecallClient } from '../../clients/ts/client.js';
import type { Tensor } from '../../core/tensor.js';
import { decodeKept, encodeKept, INFINIRETRI_VERSION } from '../../index/infiniretri-artifact.js';
import { phraseScores, readChunks } from '../../index/infiniretri-read.js';
import { infiniretriBuilder, KeptHead, mergeKept } from '../../index/infiniretri.js';
import { isStaleArtifact } from '../../index/method.js';
import { f16Bits } from '../helpers/half.js';
import { f32Tensor, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, referenceAttention } from '../helpers/reference.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`infiniretri-seal: seed ${seed}`);
const rng = new Rng(seed);
const model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
const d = model.headDim, G = 2, TOKENS = 9001, NEEDLE = 6151, STRIDE = 8;
// The question that asks for the needle: 4 prefill rows at kept query positions (multiples of the
// stride). One row's +1 of attention mass would sit within the spread the random rows' mass has over
// ordinary keys (±0.2 per token, summed over a 5-token phrase), as a one-token question would in the paper.
const ASKERS = [3000, 3008, 3016, 3024];
const dir = Float32Array.from({ length: d }, () => rng.normal());
const dnorm = Math.hypot(...dir);
dir.forEach((x, i) => (dir[i] = x / dnorm));

// Keys N(0, 0.5²); the needle's key has an ordinary norm (0.5·√d), so only the asking query singles it out.
const doc = randomKv(rng, 'f16', model.kvHeads, TOKENS, d, 0.5);
function plant(k: Tensor, values: Float64Array[]): void {
  const words = new Uint16Array(k.data.buffer, k.data.byteOffset, k.data.byteLength / 2);
  for (let h = 0; h < model.kvHeads; h++)
    for (let j = 0; j < d; j++) {
      words[(h * TOKENS + NEEDLE) * d + j] = f16Bits(dir[j] * 0.5 * Math.sqrt(d));
      values[h][NEEDLE * d + j] = dir[j] * 0.5 * Math.sqrt(d);
    }
}
plant(doc.k, doc.kValues);
// Prefill queries [qHeads, tokens, d]: N(0, 1), except q heads 0 and 2 (one per kv head) at ASKERS, which ask for the needle.
const prefill = new Float32Array(model.qHeads * TOKENS * d).map(() => rng.normal());
for (const qh of [0, 2]) for (const at of ASKERS) for (let j = 0; j < d; j++) prefill[(qh * TOKENS + at) * d + j] = dir[j] * 40;

/** kv head h's keys and the prefill rows of its group at the kept positions, as a seal's build sees them. */
function buildInput(h: number) {
  const keys = new Uint16Array(doc.k.data.buffer, doc.k.data.byteOffset + h * TOKENS * d * 2, TOKENS * d);
  const rows: number[] = [];
  for (let t = 0; t < TOKENS; t += STRIDE) for (let g = 0; g < G; g++) rows.push(...prefill.subarray(((h * G + g) * TOKENS + t) * d, ((h * G + g) * TOKENS + t + 1) * d));
  return { keys, tokens: TOKENS, headDim: d, dtype: 'f16' as const, queries: Float32Array.from(rows), queryCount: rows.length / d };
}

describe('infiniretri: the seal read', () => {
  it('keeps a needle that the prefill queries of one question ask about, with its phrase', async () => {
    for (let h = 0; h < model.kvHeads; h++) {
      const kept = decodeKept(await infiniretriBuilder.build(buildInput(h)), TOKENS);
      expect(kept.ids.length).toBe(Math.ceil(0.01 * TOKENS));
      const ids = new Set(kept.ids);
      for (let t = NEEDLE - 2; t <= NEEDLE + 2; t++) expect(ids.has(t)).toBe(true);
      // Best first: a phrase holding the needle outranks everything the random rows spread their mass over.
      expect([...kept.ids.subarray(0, 5)]).toContain(NEEDLE);
    }
  });

  it('phrase scores are the window sums of the mass over positions (float64 reference)', () => {
    const ids = Int32Array.from([0, 1, 2, 5, 6, 9, 20]);
    const mass = Float64Array.from(ids, () => rng.next());
    const got = phraseScores(ids, mass, 2);
    ids.forEach((t, i) => {
      let want = 0;
      ids.forEach((u, j) => (want += Math.abs(u - t) <= 2 ? mass[j] : 0));
      expect(got[i]).toBeCloseTo(want, 12);
    });
  });

  it('a budget covering the head keeps every token', async () => {
    const input = buildInput(0);
    const kept = await readChunks(input, input.queries.subarray(0, 64 * d), 64, { chunk: 1000, span: 2, budget: TOKENS, scale: 1 / Math.sqrt(d) });
    expect([...kept.ids].sort((a, b) => a - b)).toEqual(Array.from({ length: TOKENS }, (_, i) => i));
  });
});

describe('infiniretri: the artifact', () => {
  it('round-trips and refuses stale or mismatched bytes', () => {
    const ids = Int32Array.from([7, 3, 11]), scores = Float32Array.from([3.5, 2.25, 1]);
    const bytes = encodeKept({ ids, scores, tokens: 20, chunk: 4096, span: 2 });
    // At an odd offset, as a store may hand bytes back.
    const shifted = new Uint8Array(bytes.length + 1);
    shifted.set(bytes, 1);
    const back = decodeKept(shifted.subarray(1), 20);
    expect([...back.ids]).toEqual([7, 3, 11]);
    expect([...back.scores]).toEqual([3.5, 2.25, 1]);
    expect([back.chunk, back.span]).toEqual([4096, 2]);
    const stale = new Uint8Array(bytes);
    new DataView(stale.buffer).setUint32(4, INFINIRETRI_VERSION + 1, true);
    expect(() => decodeKept(stale, 20)).toThrow(/stale/);
    let err: unknown;
    try {
      decodeKept(stale, 20);
    } catch (e) {
      err = e;
    }
    expect(isStaleArtifact(err)).toBe(true);
    expect(() => decodeKept(bytes, 21)).toThrow(/20 tokens/);
    expect(isStaleArtifact(new Error('infiniretri artifact: built for 20 tokens, the head holds 21'))).toBe(false);
    expect(() => decodeKept(bytes.subarray(0, bytes.length - 4), 20)).toThrow(/size/);
    const bad = new Uint8Array(bytes);
    new DataView(bad.buffer).setInt32(24, 20, true);
    expect(() => decodeKept(bad, 20)).toThrow(/out of range/);
  });

  it('merges the seal evidence and the question read: the seal share, then the best of the question, then the rest', () => {
    const seal = { ids: Int32Array.from([1, 2, 3, 4]), scores: new Float32Array(4) };
    const question = { ids: Int32Array.from([2, 9, 8, 7]), scores: new Float32Array(4) };
    expect([...mergeKept(seal, question, 4, 0.5)]).toEqual([1, 2, 8, 9]);
    expect([...mergeKept(seal, question, 10)]).toEqual([1, 2, 3, 4, 7, 8, 9]);
    // The default share: a tenth of the budget from the seal.
    const ten = (from: number) => ({ ids: Int32Array.from({ length: 10 }, (_, i) => from + i), scores: new Float32Array(10) });
    expect([...mergeKept(ten(1), ten(20), 10)]).toEqual([1, 20, 21, 22, 23, 24, 25, 26, 27, 28]);
    expect([...mergeKept(seal, question, 4)]).toEqual([1, 2, 8, 9]);
    expect([...mergeKept(seal, { ids: new Int32Array(0), scores: new Float32Array(0) }, 3)]).toEqual([1, 2, 3]);
    expect([...mergeKept({ ids: Int32Array.from([5]), scores: new Float32Array(1) }, question, 4, 0.5)]).toEqual([2, 5, 8, 9]);
    expect([...mergeKept({ ids: Int32Array.from([5, 6]), scores: new Float32Array(2) }, question, 20)]).toEqual([2, 5, 6, 7, 8, 9]);
  });
});

describe('infiniretri: through the server', () => {
  const live = useServer();
  let client: KvrecallClient;
  beforeAll(async () => {
    client = live.client();
    await client.createDocument('book', model, { methods: ['infiniretri'], queryStride: STRIDE });
    await client.uploadDocumentKv('book', { layer: 0, start: 0, k: doc.k, v: doc.v, q: f32Tensor([model.qHeads, TOKENS, d], prefill) });
    await client.sealDocument('book');
  });

  it('a session attends the needle the seal kept, loaded without reading the document again', async () => {
    const { id } = await client.createSession({ model, documents: ['book'], method: 'infiniretri', budget: 90, chunk: 2048, span: 2, sinks: 4, window: 8 });
    // Random decode queries: nothing in the session asks for the needle; the seal's evidence holds it.
    const r = await client.attend(id, { layer: 0, q: tensor('f32', [model.qHeads, d], randomQ(rng, model.qHeads, d)), return: ['selection'] });
    for (const sel of r.selection!) {
      expect(new Set(sel).has(NEEDLE)).toBe(true);
      expect(sel.length).toBeLessThanOrEqual(4 + 90 + 8);
    }
    expect(live.server().engine.documents.buildsAfterSeal).toBe(0);
  });

  it('with a budget covering the document answers exact attention (float64 reference)', async () => {
    const { id } = await client.createSession({ model, documents: ['book'], method: 'infiniretri', budget: TOKENS, chunk: 2048, span: 2, sinks: 4, window: 8 });
    for (let i = 0; i < 3; i++) {
      const q = randomQ(rng, model.qHeads, d, 2.5);
      const r = await client.attend(id, { layer: 0, q: tensor('f32', [model.qHeads, d], q), return: ['out', 'selection'] });
      expect(r.selection!.map((s) => s.length)).toEqual([TOKENS, TOKENS]);
      const ref = referenceAttention(q, doc.kValues, doc.vValues, model.qHeads, d);
      // The f32 kernel sums 9001 terms; the output, an average of random values, is ~1/√n of their
      // scale, so its relative error is ~100 f32 epsilons (measured ≤ 1.2e-5).
      expect(maxRelError(r.out, ref.out, model.qHeads)).toBeLessThan(5e-5);
    }
  });
});
