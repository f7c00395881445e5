// `attend` with method exact, through the real server on 127.0.0.1 and real
// LMDB files, against float64 dense attention over documents + session
// tokens + the appended current token.
import { describe, expect, it } from 'vitest';
import { tensor } from '../../clients/ts/client.js';
import type { Tensor } from '../../core/tensor.js';
import { asStep, concatValues, f32Tensor, randomKv, randomQ, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { maxRelError, maxRelErrorScalar, referenceAttention } from '../helpers/reference.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`attend-exact: seed ${seed}`);
const { client } = useServer();

/** The same values as f32 bytes (exactly representable in the storage dtype). */
function asF32(t: Tensor, values: Float64Array[]): Tensor {
  const out = new Float32Array(values.reduce((n, v) => n + v.length, 0));
  let at = 0;
  for (const v of values) {
    out.set(v, at);
    at += v.length;
  }
  return f32Tensor(t.shape, out);
}

describe('attend (exact) equals float64 dense attention', () => {
  for (const dtype of ['f16', 'bf16'] as const)
    it(`32 q / 8 kv heads, d=128, ${dtype}: two documents + session tokens + current token`, async () => {
      const rng = new Rng(seed ^ (dtype === 'f16' ? 1 : 2));
      const model = { layers: 2, qHeads: 32, kvHeads: 8, headDim: 128, dtype };
      const { qHeads, kvHeads, headDim: d } = model;
      const docs = [
        { id: `manual-${dtype}`, chunks: [700, 901] },
        { id: `notes-${dtype}`, chunks: [333] },
      ];
      // Per layer, every chunk in context order, for the reference.
      const context: KvChunk[][] = [[], []];
      for (const doc of docs) {
        await client().createDocument(doc.id, model);
        for (let layer = 0; layer < 2; layer++) {
          let start = 0;
          for (const n of doc.chunks) {
            const c = randomKv(rng, dtype, kvHeads, n, d);
            // The second document arrives as f32 and is stored as `dtype`.
            const k = doc.id.startsWith('notes') ? asF32(c.k, c.kValues) : c.k;
            const v = doc.id.startsWith('notes') ? asF32(c.v, c.vValues) : c.v;
            await client().uploadDocumentKv(doc.id, { layer, start, k, v });
            context[layer].push(c);
            start += n;
          }
        }
        const sealed = await client().sealDocument(doc.id);
        expect(sealed.status).toBe('ready');
        expect(sealed.tokens).toBe(doc.chunks.reduce((a, b) => a + b, 0));
      }
      const session = await client().createSession({ model, documents: docs.map((x) => x.id), method: 'exact' });
      expect(session.documentTokens).toBe(1934);
      for (let layer = 0; layer < 2; layer++) {
        const own = randomKv(rng, dtype, kvHeads, 77, d);
        await client().uploadSessionKv(session.id, { layer, start: 0, k: own.k, v: own.v });
        context[layer].push(own);
      }
      for (let step = 0; step < 3; step++)
        for (let layer = 0; layer < 2; layer++) {
          const cur = randomKv(rng, dtype, kvHeads, 1, d);
          context[layer].push(cur);
          const q = randomQ(rng, qHeads, d);
          const got = await client().attend(session.id, { layer, q: tensor('f32', [qHeads, d], q), ...asStep(cur) });
          const ref = referenceAttention(q, concatValues(context[layer], 'kValues'), concatValues(context[layer], 'vValues'), qHeads, d);
          expect(got.stats.tokens).toBe(1934 + 77 + step + 1);
          expect(maxRelError(got.out, ref.out, qHeads)).toBeLessThan(1e-4);
          expect(maxRelErrorScalar(got.lse, ref.lse)).toBeLessThan(1e-4);
        }
    });

  it('returns the selection and the KV it attended when asked', async () => {
    const rng = new Rng(seed ^ 3);
    const model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16 };
    const s = await client().createSession({ model });
    const own = randomKv(rng, 'f16', 2, 10, 16);
    await client().uploadSessionKv(s.id, { layer: 0, start: 0, k: own.k, v: own.v });
    const got = await client().attend(s.id, { layer: 0, q: tensor('f32', [4, 16], randomQ(rng, 4, 16)), return: ['out', 'selection', 'kv'] });
    expect(got.selection!.map((ids) => [...ids])).toEqual([0, 1].map(() => Array.from({ length: 10 }, (_, i) => i)));
    const k0 = new Uint16Array(new Uint8Array(got.kv!.k[0].data).buffer);
    expect([...k0]).toEqual([...new Uint16Array(own.k.data.buffer, 0, 10 * 16)]);
    expect(got.kv!.k[1].shape).toEqual([10, 16]);
  });
});
