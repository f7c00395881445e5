// An index artifact written by an older build (another format version) is
// rebuilt from the keys at attach and stored once, not a failed session.
import { afterAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { decodeClusters, encodeClusters, encodeWordMoments } from '../../index/wave/cluster-codec.js';
import { decodeMoments } from '../../index/wave/moment-code.js';
import { bitsOf } from '../helpers/half.js';
import { randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';

const seed = freshSeed();
console.log(`stale-artifact: seed ${seed}`);
const model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' as const };
const tmp = tempDataDir();
let server: RunningServer;
afterAll(async () => {
  await server?.close();
  tmp.cleanup();
});

describe('stale index artifacts', () => {
  it('are rebuilt at attach and stored, and the session answers', async () => {
    const rng = new Rng(seed);
    server = await startInProcess(tmp.dir);
    let client = new KvrecallClient({ url: server.url });
    await client.createDocument('doc', model, { methods: ['squeezed'] });
    const c = randomKv(rng, 'f16', model.kvHeads, 300, model.headDim);
    await client.uploadDocumentKv('doc', { layer: 0, start: 0, k: c.k, v: c.v });
    await client.sealDocument('doc');
    // Rewrite the stored artifacts as an older version (squeezed's header: version at byte 4).
    const store = server.engine.store;
    const stored = (await store.loadArtifacts('doc', 'squeezed', 1, 2))!;
    const old = stored[0].map((bytes, head) => {
      const b = Uint8Array.from(bytes);
      new DataView(b.buffer).setUint16(4, 1, true);
      return { method: 'squeezed', layer: 0, head, bytes: b };
    });
    await store.addArtifacts('doc', 'squeezed', old);
    await server.close();
    server = await startInProcess(tmp.dir);
    client = new KvrecallClient({ url: server.url });
    const { id } = await client.createSession({ model, documents: ['doc'], method: 'squeezed', budget: 64, estimate: false });
    const r = await client.attend(id, { layer: 0, q: tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim)) });
    expect(r.out.every(Number.isFinite)).toBe(true);
    expect(server.engine.documents.buildsAfterSeal).toBe(1);
    // Stored in the current format: the next attach loads it.
    const again = (await server.engine.store.loadArtifacts('doc', 'squeezed', 1, 2))!;
    expect(new DataView(again[0][0].buffer, again[0][0].byteOffset).getUint16(4, true)).not.toBe(1);
  });

  it('a wave index of the previous version (no key variances or axes) is rebuilt at attach and estimates', async () => {
    const rng = new Rng(seed + 1);
    await server.close();
    server = await startInProcess(tmp.dir);
    let client = new KvrecallClient({ url: server.url });
    await client.createDocument('waved', model, { methods: ['wave'] });
    const c = randomKv(rng, 'f16', model.kvHeads, 300, model.headDim);
    await client.uploadDocumentKv('waved', { layer: 0, start: 0, k: c.k, v: c.v });
    await client.sealDocument('waved');
    const store = server.engine.store;
    const stored = (await store.loadArtifacts('waved', 'wave', 1, 2))!;
    // Version 1 at byte 4 (the wave header's second word).
    const old = stored[0].map((bytes, head) => {
      const b = Uint8Array.from(bytes);
      new DataView(b.buffer).setUint32(4, 1, true);
      return { method: 'wave', layer: 0, head, bytes: b };
    });
    await store.addArtifacts('waved', 'wave', old);
    await server.close();
    server = await startInProcess(tmp.dir);
    client = new KvrecallClient({ url: server.url });
    const builds = server.engine.documents.buildsAfterSeal;
    const { id } = await client.createSession({ model, documents: ['waved'], method: 'wave', budget: 32 });
    const r = await client.attend(id, { layer: 0, q: tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim)) });
    expect(r.out.every(Number.isFinite)).toBe(true);
    expect(r.stats.estimated).toBeGreaterThan(0);
    expect(server.engine.documents.buildsAfterSeal).toBe(builds + 1);
    const again = (await server.engine.store.loadArtifacts('waved', 'wave', 1, 2))!;
    expect(new DataView(again[0][0].buffer, again[0][0].byteOffset).getUint32(4, true)).not.toBe(1);
  });

  it('a wave index of version 4 (key axes and variances as f16 words) attaches without a rebuild, its moments coded at load within a step of version 5', async () => {
    const rng = new Rng(seed + 2);
    await server.close();
    server = await startInProcess(tmp.dir);
    let client = new KvrecallClient({ url: server.url });
    await client.createDocument('v4', model, { methods: ['wave'] });
    const c = randomKv(rng, 'f16', model.kvHeads, 2000, model.headDim);
    await client.uploadDocumentKv('v4', { layer: 0, start: 0, k: c.k, v: c.v });
    await client.sealDocument('v4');
    const qs = Array.from({ length: 8 }, () => tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim)));
    const answers = async () => {
      const { id } = await client.createSession({ model, documents: ['v4'], method: 'wave', budget: 64 });
      const out: number[][] = [];
      for (const q of qs) out.push(Array.from((await client.attend(id, { layer: 0, q })).out));
      return out;
    };
    const restart = async (bytes: (stored: Uint8Array, head: number) => Uint8Array) => {
      const stored = (await server.engine.store.loadArtifacts('v4', 'wave', 1, 2))!;
      await server.engine.store.addArtifacts('v4', 'wave', stored[0].map((b, head) => ({ method: 'wave', layer: 0, head, bytes: bytes(b, head) })));
      await server.close();
      server = await startInProcess(tmp.dir);
      client = new KvrecallClient({ url: server.url });
    };
    // The same clusters as a version 4 build stored them: the moments as f16 words (of the values version 5 decodes to).
    const f16 = bitsOf('f16'), d = model.headDim;
    const fresh = (await server.engine.store.loadArtifacts('v4', 'wave', 1, 2))![0].map((b) => decodeClusters(b));
    await restart((b) => {
      const a = decodeClusters(b), { axes, vars } = decodeMoments(a, d);
      return encodeWordMoments(a, Uint16Array.from(vars, f16), Uint16Array.from(axes, f16));
    });
    const builds = server.engine.documents.buildsAfterSeal;
    const old = await answers();
    expect(server.engine.documents.buildsAfterSeal).toBe(builds);
    const stored = (await server.engine.store.loadArtifacts('v4', 'wave', 1, 2))![0];
    expect(new DataView(stored[0].buffer, stored[0].byteOffset).getUint32(4, true)).toBe(4);
    // Coded from f16 words, each moment decodes within one code step of the fresh build's.
    stored.forEach((b, head) => {
      const got = decodeClusters(b), was = fresh[head], g = decodeMoments(got, d), w = decodeMoments(was, d);
      for (let i = 0; i < g.axes.length; i++) {
        const c = Math.floor(i / d), step = Math.max(got.axisScales[c], was.axisScales[c]);
        expect(Math.abs(g.axes[i] - w.axes[i])).toBeLessThanOrEqual(step * 1.01);
        // A variance code k steps by (2k + 1)·scale.
        const k = Math.max(got.keyVars[i], was.keyVars[i]), vstep = (2 * k + 1) * Math.max(got.varScales[c], was.varScales[c]);
        expect(Math.abs(g.vars[i] - w.vars[i])).toBeLessThanOrEqual(vstep * 1.01);
      }
    });
    // And it answers as a version 5 artifact of the codes it loaded to, bit for bit.
    await restart((b) => encodeClusters(decodeClusters(b)));
    const coded = (await server.engine.store.loadArtifacts('v4', 'wave', 1, 2))![0][0];
    expect(new DataView(coded.buffer, coded.byteOffset).getUint32(4, true)).toBe(5);
    expect(await answers()).toEqual(old);
  });
});
