// An index artifact written by an older build (another format version) is
// rebuilt from the keys at attach and stored once, not a failed session.
import { afterAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
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
});
