// A document upload's NaN/Inf scan runs off the event loop, fused with its
// copy into the layer (engine/documents.ts, storage/kv-segment.ts), so the
// next body is read meanwhile. Against a real server and real LMDB files:
// with uploads in flight one behind another on a stream, a bad one is
// refused naming its first non-finite value (k before v, heads in order,
// as the scan on the event loop named it), the one sent behind it is
// judged against the document as the bad one left it (unchanged), and
// nothing of the bad one shows in the sealed document, though its bytes
// were copied past the layer's rows before the scan reached its NaN. A bad
// upload that would grow the layer reserves no memory; a NaN outranks a
// wrong start; bodies in another dtype (converted on the loop) are scanned
// off it too.
import { describe, expect, it } from 'vitest';
import { tensor } from '../../clients/ts/client.js';
import type { Tensor } from '../../core/tensor.js';
import { randomKv, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`upload-checked: seed ${seed}`);
// 4096 tokens: 2 MiB of k (read straight from the socket), 512 KiB per head (8 of the scan's 64 KiB chunks).
const model = { layers: 2, qHeads: 8, kvHeads: 4, headDim: 64, dtype: 'f16' as const, blockSize: 16 };
const N = 4096, PER_HEAD = N * model.headDim;
const { server, client } = useServer();

const chunk = (rng: Rng) => randomKv(rng, 'f16', model.kvHeads, N, model.headDim);
const words = (t: Tensor) => new Uint16Array(t.data.buffer, t.data.byteOffset, t.data.byteLength / 2);
/** A copy of c with f16 words set at flat indexes of k or v. */
function poisoned(c: KvChunk, hits: [which: 'k' | 'v', at: number, word: number][]): KvChunk {
  const copy = (t: Tensor): Tensor => ({ ...t, data: t.data.slice() });
  const out = { ...c, k: copy(c.k), v: copy(c.v) };
  for (const [which, at, word] of hits) words(out[which])[at] = word;
  return out;
}
const NAN = 0x7e00, INF = 0x7c00, NEG_INF = 0xfc00;

/** Per head, K and V of layer `layer` of a ready document, as its exact session returns them. */
async function readBack(doc: string, layer: number): Promise<{ k: Uint8Array[]; v: Uint8Array[] }> {
  const s = await client().createSession({ model, documents: [doc], method: 'exact' });
  const r = await client().attend(s.id, { layer, q: tensor('f32', [model.qHeads, model.headDim], new Float32Array(model.qHeads * model.headDim)), return: ['kv'] });
  await client().deleteSession(s.id);
  return { k: r.kv!.k.map((t: Tensor) => t.data), v: r.kv!.v.map((t: Tensor) => t.data) };
}

/** Head h's bytes of k or v of the chunks, one after another. */
function expected(chunks: KvChunk[], which: 'k' | 'v', h: number): Buffer {
  return Buffer.concat(chunks.map((c) => Buffer.from(c[which].data.buffer, c[which].data.byteOffset + h * PER_HEAD * 2, PER_HEAD * 2)));
}

async function expectLayer(doc: string, layer: number, chunks: KvChunk[]): Promise<void> {
  const got = await readBack(doc, layer);
  for (let h = 0; h < model.kvHeads; h++) {
    expect(Buffer.from(got.k[h]).equals(expected(chunks, 'k', h)), `k head ${h}`).toBe(true);
    expect(Buffer.from(got.v[h]).equals(expected(chunks, 'v', h)), `v head ${h}`).toBe(true);
  }
}

describe('upload scan off the event loop', () => {
  it('with uploads in flight on a stream, a bad one is refused for its first NaN, the next judged as if it never came, and none of it lands', async () => {
    const rng = new Rng(seed);
    await client().createDocument('pair', model, { tokens: 3 * N });
    const a = chunk(rng), d = chunk(rng), c = chunk(rng);
    // v head 2's NaN sits 3 chunks into its range (the scan has copied those); v head 3's comes earlier in its own.
    const bad = poisoned(chunk(rng), [['v', 2 * PER_HEAD + 100_000, NAN], ['v', 3 * PER_HEAD + 10, INF]]);
    // k is scanned before v: its one infinity, in its last head, is the one named.
    const badK = poisoned(chunk(rng), [['v', 0, NAN], ['k', 3 * PER_HEAD + 5, NEG_INF]]);
    const stream = await client().openStream();
    await stream.uploadDocumentKv('pair', { layer: 0, start: 0, k: a.k, v: a.v });
    const used = server().engine.budget.used;
    // Sent back to back, before either is answered.
    const inFlight = [
      stream.uploadDocumentKv('pair', { layer: 0, start: N, k: bad.k, v: bad.v }),
      stream.uploadDocumentKv('pair', { layer: 0, start: 2 * N, k: c.k, v: c.v }),
      stream.uploadDocumentKv('pair', { layer: 0, start: N, k: badK.k, v: badK.v }),
    ];
    const settled = await Promise.allSettled(inFlight);
    expect(settled[0]).toMatchObject({ status: 'rejected', reason: { status: 422, code: 'invalid' } });
    expect((settled[0] as PromiseRejectedResult).reason.message).toMatch(new RegExp(`v holds a NaN or infinite value at flat index ${2 * PER_HEAD + 100_000}$`));
    expect(settled[1]).toMatchObject({ status: 'rejected', reason: { status: 409, code: 'conflict' } });
    expect((settled[1] as PromiseRejectedResult).reason.message).toMatch(new RegExp(`holds ${N} tokens; the next upload must start there, not at ${2 * N}`));
    expect(settled[2]).toMatchObject({ status: 'rejected', reason: { status: 422, code: 'invalid' } });
    expect((settled[2] as PromiseRejectedResult).reason.message).toMatch(new RegExp(`k holds a NaN or infinite value at flat index ${3 * PER_HEAD + 5}$`));
    expect(server().engine.budget.used).toBe(used);
    expect((await client().getDocument('pair')).tokens).toBe(0); // layer 1 holds none yet
    // The stream goes on; d takes the rows the bad uploads were copied into.
    await expect(stream.uploadDocumentKv('pair', { layer: 0, start: N, k: d.k, v: d.v })).resolves.toMatchObject({ tokens: 2 * N });
    await stream.uploadDocumentKv('pair', { layer: 1, start: 0, k: c.k, v: c.v });
    await stream.uploadDocumentKv('pair', { layer: 1, start: N, k: a.k, v: a.v });
    stream.close();
    await client().sealDocument('pair');
    await expectLayer('pair', 0, [a, d]);
    await expectLayer('pair', 1, [c, a]);
  });

  it('a bad upload that would grow the layer reserves nothing; a NaN outranks a wrong start', async () => {
    const rng = new Rng(seed ^ 0x21);
    // No tokens hint: the layers start small, and the first upload of N tokens grows them.
    await client().createDocument('grow', model);
    const used = server().engine.budget.used;
    const bad = poisoned(chunk(rng), [['k', PER_HEAD - 1, NAN]]);
    await expect(client().uploadDocumentKv('grow', { layer: 0, start: 0, k: bad.k, v: bad.v })).rejects.toMatchObject({ status: 422, message: expect.stringMatching(new RegExp(`k holds a NaN or infinite value at flat index ${PER_HEAD - 1}$`)) });
    expect(server().engine.budget.used).toBe(used);
    await expect(client().uploadDocumentKv('grow', { layer: 0, start: 7, k: bad.k, v: bad.v })).rejects.toMatchObject({ status: 422, code: 'invalid' });
    const good = chunk(rng);
    await expect(client().uploadDocumentKv('grow', { layer: 0, start: 7, k: good.k, v: good.v })).rejects.toMatchObject({ status: 409, code: 'conflict' });
    expect(server().engine.budget.used).toBe(used);
    await expect(client().uploadDocumentKv('grow', { layer: 0, start: 0, k: good.k, v: good.v })).resolves.toMatchObject({ tokens: N });
    expect(server().engine.budget.used).toBeGreaterThan(used);
    await client().uploadDocumentKv('grow', { layer: 1, start: 0, k: good.k, v: good.v });
    await client().sealDocument('grow');
    await expectLayer('grow', 0, [good]);
  });

  it('k and v in f32 for an f16 document are scanned before they are converted', async () => {
    const rng = new Rng(seed ^ 0x22);
    await client().createDocument('wide', model);
    const n = 40, count = model.kvHeads * n * model.headDim;
    const k = new Float32Array(count).map(() => rng.normal()), v = new Float32Array(count).map(() => rng.normal());
    const shape = [model.kvHeads, n, model.headDim];
    const vBad = v.slice();
    vBad[2 * n * model.headDim + 9] = Number.NEGATIVE_INFINITY;
    vBad[3 * n * model.headDim] = Number.NaN;
    await expect(client().uploadDocumentKv('wide', { layer: 0, start: 0, k: tensor('f32', shape, k), v: tensor('f32', shape, vBad) })).rejects.toMatchObject({
      status: 422,
      message: expect.stringMatching(new RegExp(`v holds a NaN or infinite value at flat index ${2 * n * model.headDim + 9}$`)),
    });
    expect((await client().getDocument('wide')).tokens).toBe(0);
    await expect(client().uploadDocumentKv('wide', { layer: 0, start: 0, k: tensor('f32', shape, k), v: tensor('f32', shape, v) })).resolves.toMatchObject({ tokens: n });
  });
});
