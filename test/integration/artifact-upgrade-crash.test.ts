// A version 4 wave artifact is rewritten as version 5 at its first attach
// (engine/documents.ts, LmdbStore.replaceArtifacts) in one transaction: a
// server killed (SIGKILL) inside that transaction leaves every artifact of
// version 4, one killed after its commit every one of version 5, and either
// way the next server attaches the document without a rebuild and answers
// as the first attach did, bit for bit. Real LMDB files, a server process.
import { afterAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { decodeClusters, encodeWordMoments } from '../../index/wave/cluster-codec.js';
import { decodeMoments } from '../../index/wave/moment-code.js';
import { bitsOf } from '../helpers/half.js';
import { randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startChild, startInProcess, tempDataDir, type ChildServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`artifact-upgrade-crash: seed ${seed}`);
const model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' as const };
const tmp = tempDataDir();
const children: ChildServer[] = [];
afterAll(async () => {
  for (const c of children) await c.stop('SIGKILL');
  tmp.cleanup();
});

const rng = new Rng(seed);
const qs = Array.from({ length: 6 }, () => tensor('f32', [model.qHeads, model.headDim], randomQ(rng, model.qHeads, model.headDim)));

async function answers(url: string): Promise<number[][]> {
  const client = new KvrecallClient({ url });
  const { id } = await client.createSession({ model, documents: ['w'], method: 'wave', budget: 48 });
  const out: number[][] = [];
  for (let layer = 0; layer < model.layers; layer++) for (const q of qs) out.push(Array.from((await client.attend(id, { layer, q })).out));
  return out;
}

const versions = async (server: RunningServer) =>
  (await server.engine.store.loadArtifacts('w', 'wave', model.layers, model.kvHeads))!.flat().map((b) => new DataView(b.buffer, b.byteOffset).getUint32(4, true));

describe('a crash while a version 4 wave artifact is rewritten', () => {
  let v4: Uint8Array[][];
  let want: number[][];

  /** The document's artifacts written back as version 4 (the moments as f16 words). */
  const storeV4 = async (server: RunningServer) => {
    await server.engine.store.addArtifacts('w', 'wave', v4.flatMap((row, layer) => row.map((bytes, head) => ({ method: 'wave', layer, head, bytes }))));
  };

  it('a first attach of version 4 artifacts answers, and stores them as version 5', async () => {
    let server = await startInProcess(tmp.dir);
    const client = new KvrecallClient({ url: server.url });
    await client.createDocument('w', model, { methods: ['wave'] });
    for (let layer = 0; layer < model.layers; layer++) {
      const c = randomKv(rng, 'f16', model.kvHeads, 700, model.headDim);
      await client.uploadDocumentKv('w', { layer, start: 0, k: c.k, v: c.v });
    }
    await client.sealDocument('w');
    const f16 = bitsOf('f16');
    v4 = (await server.engine.store.loadArtifacts('w', 'wave', model.layers, model.kvHeads))!.map((row) =>
      row.map((b) => {
        const a = decodeClusters(b), { axes, vars } = decodeMoments(a, model.headDim);
        return encodeWordMoments(a, Uint16Array.from(vars, f16), Uint16Array.from(axes, f16));
      }),
    );
    await storeV4(server);
    await server.close();
    server = await startInProcess(tmp.dir);
    try {
      want = await answers(server.url);
      expect(await versions(server)).toEqual(new Array(model.layers * model.kvHeads).fill(5));
      expect(server.engine.documents.buildsAfterSeal).toBe(0);
      await storeV4(server);
      expect(await versions(server)).toEqual(new Array(model.layers * model.kvHeads).fill(4));
    } finally {
      await server.close();
    }
  });

  const cases: [string, number][] = [
    ['artifacts:replacing', 4],
    ['artifacts:replaced', 5],
  ];
  for (const [point, version] of cases)
    it(`killed at ${point}: every artifact of version ${version}, and the next server answers as before`, async () => {
      const child = await startChild(tmp.dir, [], { KVRECALL_CRASH_AT: point });
      children.push(child);
      expect(await answers(child.url).catch((e: unknown) => e)).toBeInstanceOf(Error);
      await child.stop('SIGKILL');
      expect(child.proc.signalCode).toBe('SIGKILL');
      const server = await startInProcess(tmp.dir);
      try {
        expect(await versions(server)).toEqual(new Array(model.layers * model.kvHeads).fill(version));
        expect(await answers(server.url)).toEqual(want);
        expect(server.engine.documents.buildsAfterSeal).toBe(0);
        expect(server.engine.documents.artifactsUpgraded).toBe(version === 4 ? model.layers * model.kvHeads : 0);
        expect(await versions(server)).toEqual(new Array(model.layers * model.kvHeads).fill(5));
        await storeV4(server);
      } finally {
        await server.close();
      }
    });
});
