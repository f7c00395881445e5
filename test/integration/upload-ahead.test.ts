// A document upload read straight from the socket (api/websocket.ts) also
// reads what has already come after it; those bytes are the stream's next
// ones. Against a real server and real LMDB files, over a raw WebSocket:
// what comes right behind a large upload (a ping, a small upload, the
// header and first bytes of another large one, each masked with its own
// key) is taken as if node had read it: the uploads answered in order, the
// ping with its pong, and the document holds exactly the bytes sent.
import { pack, unpack } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import { directReadTotals } from '../../api/websocket.js';
import { tensor } from '../../clients/ts/client.js';
import type { Tensor } from '../../core/tensor.js';
import { randomKv, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';
import { clientFrame, openRawWs } from '../helpers/ws-raw.js';

const seed = freshSeed();
console.log(`upload-ahead: seed ${seed}`);
// 512 bytes of K/V per token: 2048 tokens and up are read directly (1 MiB).
const model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 64, dtype: 'f16' as const, blockSize: 16 };
const { client, port } = useServer();

const upload = (id: number, start: number, c: KvChunk, key: number[]) => clientFrame(0x2, Buffer.from(pack({ id, document: 'ahead', layer: 0, start, k: c.k, v: c.v })), key);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('reading on past a large upload', () => {
  it('takes a ping, a small upload and the start of a large one from the bytes read ahead, in order, intact', async () => {
    const rng = new Rng(seed);
    await client().createDocument('ahead', model, { methods: ['exact'] });
    const a = randomKv(rng, 'f16', model.kvHeads, 3000, model.headDim);
    const b = randomKv(rng, 'f16', model.kvHeads, 37, model.headDim);
    const c = randomKv(rng, 'f16', model.kvHeads, 2600, model.headDim);
    const fa = upload(1, 0, a, [0x12, 0x34, 0x56, 0x78]);
    const ping = clientFrame(0x9, Buffer.from('are you there'), [9, 8, 7, 6]);
    const fb = upload(2, 3000, b, [0xaa, 0, 0x55, 1]);
    const fc = upload(3, 3037, c, [0x0f, 0xf0, 0x3c, 0xc3]);
    const raw = await openRawWs(port());
    const before = { ...directReadTotals };
    // All of a but its last byte (its direct read is under way), then its last byte with what follows in one write.
    raw.socket.write(fa.subarray(0, fa.byteLength - 1));
    await sleep(150);
    raw.socket.write(Buffer.concat([fa.subarray(fa.byteLength - 1), ping, fb, fc.subarray(0, 20_000)]));
    await sleep(150);
    raw.socket.write(fc.subarray(20_000));
    await raw.until(() => raw.frames.filter((f) => f.opcode === 0x2).length === 3, 20_000);
    expect(directReadTotals.aheadBytes - before.aheadBytes).toBeGreaterThan(0);
    // c was read directly too, from the bytes read ahead on.
    expect(directReadTotals.messages - before.messages).toBe(2);
    // Answers in order; the pong goes at once (before upload 1 is answered, as it would have through node's reads).
    expect(raw.frames.filter((f) => f.opcode === 0x2).map((f) => (unpack(f.payload) as { id: number }).id)).toEqual([1, 2, 3]);
    expect(raw.frames.filter((f) => f.opcode === 0xa).map((f) => f.payload.toString())).toEqual(['are you there']);
    for (const f of raw.frames.filter((x) => x.opcode === 0x2)) expect(unpack(f.payload)).not.toHaveProperty('error');
    raw.socket.destroy();
    await client().sealDocument('ahead');
    const s = await client().createSession({ model, documents: ['ahead'], method: 'exact' });
    const r = await client().attend(s.id, { layer: 0, q: tensor('f32', [model.qHeads, model.headDim], new Float32Array(model.qHeads * model.headDim)), return: ['kv'] });
    const want = (which: 'k' | 'v', h: number) =>
      Buffer.concat([a, b, c].map((x) => {
        const n = x.k.shape[1], t = x[which].data, bytes = n * model.headDim * 2;
        return Buffer.from(t.buffer, t.byteOffset + h * bytes, bytes);
      }));
    for (let h = 0; h < model.kvHeads; h++) {
      expect(Buffer.from((r.kv!.k[h] as Tensor).data).equals(want('k', h)), `k head ${h}`).toBe(true);
      expect(Buffer.from((r.kv!.v[h] as Tensor).data).equals(want('v', h)), `v head ${h}`).toBe(true);
    }
  });
});

