// The fixture the code walk's and the code scan's session tests share
// (test/index/retrieval-attention-code-{walk,scan}.test.ts): a real server on
// 127.0.0.1 with one retrieval-attention document (keys N(0, 1), prefill
// queries of another draw, every 4th token kept), decode queries, sessions,
// steps, and each kv head's exact top-k (one q head per kv head: q·k).
import { tensor } from '../../clients/ts/client.js';
import { f32Tensor, randomKv, randomQ } from './kv-data.js';
import { freshSeed, Rng } from './random.js';
import { useServer } from './server.js';

export function raCodeSession(name: string) {
  const seed = freshSeed();
  console.log(`${name}: seed ${seed}`);
  const model = { layers: 1, qHeads: 2, kvHeads: 2, headDim: 32, dtype: 'f16' as const };
  const N = 8192, BUDGET = 82, SINKS = 4, WINDOW = 16, STEPS = 6, d = model.headDim;
  const live = useServer();
  const rng = new Rng(seed);
  const kv = randomKv(rng, 'f16', model.kvHeads, N, d);
  const queries = Array.from({ length: STEPS }, () => randomQ(rng, model.qHeads, d, 2.5));
  const isSteady = (t: number) => t < SINKS || t >= N - WINDOW;

  let ready: Promise<void> | undefined;
  /** The document, once. */
  const documentReady = (): Promise<void> =>
    (ready ??= (async () => {
      const client = live.client();
      await client.createDocument('doc', model, { methods: ['retrieval-attention'], queryStride: 4 });
      const q = new Float32Array(model.qHeads * (N / 4) * d).map(() => rng.normal());
      await client.uploadDocumentKv('doc', { layer: 0, start: 0, k: kv.k, v: kv.v, queryStride: 4, q: f32Tensor([model.qHeads, N / 4, d], q) });
      await client.sealDocument('doc');
    })());

  const session = async (extra: Record<string, unknown>) =>
    (await live.client().createSession({ model, documents: ['doc'], method: 'retrieval-attention', budget: BUDGET, sinks: SINKS, window: WINDOW, ...extra })).id;
  const attend = (sid: string, q: Float32Array) => live.client().attend(sid, { layer: 0, q: tensor('f32', [model.qHeads, d], q), return: ['out', 'selection'] });

  /** The exact top BUDGET of the non-steady keys of kv head h for q (one q head per kv head). */
  function exactTop(q: Float32Array, h: number): Set<number> {
    const k = kv.kValues[h], score = new Float64Array(N);
    for (let t = 0; t < N; t++) for (let j = 0; j < d; j++) score[t] += q[h * d + j] * k[t * d + j];
    return new Set([...Array(N).keys()].filter((t) => !isSteady(t)).sort((a, b) => score[b] - score[a] || a - b).slice(0, BUDGET));
  }

  return { model, N, BUDGET, SINKS, WINDOW, STEPS, d, live, kv, queries, isSteady, documentReady, session, attend, exactTop };
}
