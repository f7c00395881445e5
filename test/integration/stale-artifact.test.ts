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

/** A fresh server over the same data, and a sealed `wave` document of `tokens` random keys (drawn from rng) on it. */
async function restartWithWaveDoc(rng: Rng, id: string, tokens: number): Promise<KvrecallClient> {
  await server.close();
  server = await startInProcess(tmp.dir);
  const client = new KvrecallClient({ url: server.url });
  await client.createDocument(id, model, { methods: ['wave'] });
  const c = randomKv(rng, 'f16', model.kvHeads, tokens, model.headDim);
  await client.uploadDocumentKv(id, { layer: 0, start: 0, k: c.k, v: c.v });
  await client.sealDocument(id);
  return client;
}

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
    let client = await restartWithWaveDoc(rng, 'waved', 300);
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

  it('a wave index of version 4 (key axes and variances as f16 words) attaches without a rebuild, its moments coded once and stored as version 5, which the next attach loads as it is', async () => {
    const rng = new Rng(seed + 2);
    let client = await restartWithWaveDoc(rng, 'v4', 2000);
    const qs = Array.from({ length: 8 }, () => tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim)));
    const answers = async () => {
      const { id } = await client.createSession({ model, documents: ['v4'], method: 'wave', budget: 64 });
      const out: number[][] = [];
      for (const q of qs) out.push(Array.from((await client.attend(id, { layer: 0, q })).out));
      return out;
    };
    const stored = async () => (await server.engine.store.loadArtifacts('v4', 'wave', 1, 2))![0];
    const versionOf = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset).getUint32(4, true);
    const restart = async () => {
      await server.close();
      server = await startInProcess(tmp.dir);
      client = new KvrecallClient({ url: server.url });
    };
    // The same clusters as a version 4 build stored them: the moments as f16 words (of the values version 5 decodes to).
    const f16 = bitsOf('f16'), d = model.headDim;
    const fresh = (await stored()).map((b) => decodeClusters(b));
    const v4 = fresh.map((a) => {
      const { axes, vars } = decodeMoments(a, d);
      return encodeWordMoments(a, Uint16Array.from(vars, f16), Uint16Array.from(axes, f16));
    });
    const storeV4 = async () => {
      await server.engine.store.addArtifacts('v4', 'wave', v4.map((bytes, head) => ({ method: 'wave', layer: 0, head, bytes })));
      await restart();
    };
    await storeV4();
    const builds = server.engine.documents.buildsAfterSeal;
    const old = await answers();
    expect(server.engine.documents.buildsAfterSeal).toBe(builds);
    // Rewritten as version 5: the codes the load made of the version 4 words, byte for byte.
    expect(server.engine.documents.artifactsUpgraded).toBe(model.kvHeads);
    const upgraded = await stored();
    upgraded.forEach((b, head) => {
      expect(versionOf(b)).toBe(5);
      expect(Buffer.from(b).equals(Buffer.from(encodeClusters(decodeClusters(v4[head]))))).toBe(true);
    });
    // Coded from f16 words, each moment decodes within one code step of the fresh build's.
    upgraded.forEach((b, head) => {
      const got = decodeClusters(b), was = fresh[head], g = decodeMoments(got, d), w = decodeMoments(was, d);
      for (let i = 0; i < g.axes.length; i++) {
        const c = Math.floor(i / d), step = Math.max(got.axisScales[c], was.axisScales[c]);
        expect(Math.abs(g.axes[i] - w.axes[i])).toBeLessThanOrEqual(step * 1.01);
        // A variance code k steps by (2k + 1)·scale.
        const k = Math.max(got.keyVars[i], was.keyVars[i]), vstep = (2 * k + 1) * Math.max(got.varScales[c], was.varScales[c]);
        expect(Math.abs(g.vars[i] - w.vars[i])).toBeLessThanOrEqual(vstep * 1.01);
      }
    });
    // The next attach loads version 5 as stored (nothing coded, nothing written) and answers as the first, bit for bit.
    await restart();
    expect(await answers()).toEqual(old);
    expect(server.engine.documents.artifactsUpgraded).toBe(0);
    expect(server.engine.documents.buildsAfterSeal).toBe(0);
    (await stored()).forEach((b, i) => expect(Buffer.from(b).equals(Buffer.from(upgraded[i]))).toBe(true));

    // Attaches at once: the document's queue converts once; each session answers as before.
    await storeV4();
    const at = await Promise.all(Array.from({ length: 4 }, () => answers()));
    for (const a of at) expect(a).toEqual(old);
    expect(server.engine.documents.artifactsUpgraded).toBe(model.kvHeads);
    (await stored()).forEach((b, i) => expect(Buffer.from(b).equals(Buffer.from(upgraded[i]))).toBe(true));
    // And a rewrite of bytes the store no longer holds (a second converter, late) writes nothing.
    const late = upgraded.map((bytes, head) => ({ method: 'wave', layer: 0, head, bytes: v4[head], was: v4[head] }));
    expect(await server.engine.store.replaceArtifacts!('v4', 'wave', late)).toBe(0);
    (await stored()).forEach((b) => expect(versionOf(b)).toBe(5));
  });

  it('a version 4 rewrite the store fails to write fails no attach: the session answers, the artifacts stay version 4, the next server converts them', async () => {
    const rng = new Rng(seed + 3);
    let client = await restartWithWaveDoc(rng, 'v4w', 600);
    const f16 = bitsOf('f16');
    const v4 = (await server.engine.store.loadArtifacts('v4w', 'wave', 1, 2))![0].map((b) => {
      const a = decodeClusters(b), { axes, vars } = decodeMoments(a, model.headDim);
      return encodeWordMoments(a, Uint16Array.from(vars, f16), Uint16Array.from(axes, f16));
    });
    await server.engine.store.addArtifacts('v4w', 'wave', v4.map((bytes, head) => ({ method: 'wave', layer: 0, head, bytes })));
    const versions = async () => (await server.engine.store.loadArtifacts('v4w', 'wave', 1, 2))![0].map((b) => new DataView(b.buffer, b.byteOffset).getUint32(4, true));
    const answer = async () => {
      const { id } = await client.createSession({ model, documents: ['v4w'], method: 'wave', budget: 64 });
      return Array.from((await client.attend(id, { layer: 0, q: tensor('f32', [model.qHeads, model.headDim], randomQ(new Rng(seed + 4), model.qHeads, model.headDim)) })).out);
    };
    await server.close();
    server = await startInProcess(tmp.dir);
    client = new KvrecallClient({ url: server.url });
    // A write the disk refuses (full, read-only): injected, as a real one cannot be made here (the tests run as root).
    const store = server.engine.store;
    store.replaceArtifacts = () => Promise.reject(new Error('ENOSPC: no space left on device'));
    const first = await answer();
    expect(first.every(Number.isFinite)).toBe(true);
    expect(server.engine.documents.artifactsUpgraded).toBe(0);
    expect(await versions()).toEqual([4, 4]);
    await server.close();
    server = await startInProcess(tmp.dir);
    client = new KvrecallClient({ url: server.url });
    expect(await answer()).toEqual(first);
    expect(server.engine.documents.artifactsUpgraded).toBe(model.kvHeads);
    expect(await versions()).toEqual([5, 5]);
  });
});
