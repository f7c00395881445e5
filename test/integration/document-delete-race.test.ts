// A session attaching a document while its delete (and a new document of the
// same id) is queued behind the attach: the session's index build runs after
// them, over the deleted document's keys. It must refuse (409), not store
// those keys' artifacts under the id, where the new document would load them
// as its own index (real server, real LMDB files). A session's own KV
// uploads after the delete are refused as its steps are.
import { describe, expect, it } from 'vitest';
import { KvrecallRequestError } from '../../clients/ts/client.js';
import { KvrecallError } from '../../core/errors.js';
import { randomKv } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { useServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`document-delete-race: seed ${seed}`);
const model = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' as const };
const rng = new Rng(seed);
const srv = useServer();

async function fill(id: string): Promise<void> {
  const c = randomKv(rng, 'f16', model.kvHeads, 300, model.headDim);
  await srv.client().uploadDocumentKv(id, { layer: 0, start: 0, k: c.k, v: c.v });
  await srv.client().sealDocument(id);
}

describe('a session attaching a document deleted behind the attach', () => {
  it('is refused with 409 and leaves no index of the old keys under the id', async () => {
    const { documents, sessions, store } = srv.server().engine;
    await srv.client().createDocument('doc', model);
    await fill('doc');
    // In the document's queue: the attach, the delete, the new document, then the session's index build.
    const session = sessions.create({ model, documents: ['doc'], method: 'squeezed', budget: 64, estimate: false });
    const removed = documents.remove('doc');
    const made = documents.create('doc', { model });
    const refused = await session.catch((e: unknown) => e);
    await removed;
    await made;
    expect(refused).toBeInstanceOf(KvrecallError);
    expect((refused as KvrecallError).kind).toBe('conflict');
    expect((refused as Error).message).toMatch(/document doc was deleted while a session was attaching it/);
    expect(documents.buildsAfterSeal).toBe(0);
    expect(store.loadArtifacts('doc', 'squeezed', 1, model.kvHeads)).toBeUndefined();

    // The new document is sealed without squeezed: a session asking for it builds it from the new keys.
    await fill('doc');
    expect(store.loadArtifacts('doc', 'squeezed', 1, model.kvHeads)).toBeUndefined();
    const { id } = await srv.client().createSession({ model, documents: ['doc'], method: 'squeezed', budget: 64, estimate: false });
    expect(documents.buildsAfterSeal).toBe(1);
    await srv.client().deleteSession(id);
    expect(await srv.client().getSession(id).catch((e: unknown) => (e as KvrecallRequestError).status)).toBe(404);
  });
});

describe('a session attaching two documents, one deleted while the other attaches', () => {
  it('is refused with 409 rather than made with every step refused', async () => {
    const { documents, sessions } = srv.server().engine;
    for (const id of ['first', 'second']) {
      await srv.client().createDocument(id, model);
      await fill(id);
      await documents.acquire(id); // attached and cached: the session's attaches are queued in its first turn
    }
    // The second document's queue held by a gate (the test reaches the engine's private queue for it): its
    // attach waits there while the first document's attach, then its delete, run.
    let open!: () => void;
    const gate = new Promise<void>((resolve) => (open = resolve));
    void (documents as unknown as { queue: { run(key: string, op: () => Promise<void>): Promise<void> } }).queue.run('second', () => gate);
    const session = sessions.create({ model, documents: ['first', 'second'], method: 'exact' });
    await documents.remove('first');
    open();
    const refused = await session.catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(KvrecallError);
    expect((refused as KvrecallError).kind).toBe('conflict');
    expect((refused as Error).message).toMatch(/document first was deleted while a session was attaching it/);
    expect(sessions.size).toBe(0);
  });
});

describe("a session's own KV after its document was deleted", () => {
  it('is refused with 409 as its steps are, and nothing is appended', async () => {
    await srv.client().createDocument('gone', model);
    await fill('gone');
    const { id } = await srv.client().createSession({ model, documents: ['gone'] });
    const own = () => randomKv(rng, 'f16', model.kvHeads, 5, model.headDim);
    const first = own();
    expect(await srv.client().uploadSessionKv(id, { layer: 0, start: 0, k: first.k, v: first.v })).toMatchObject({ tokens: 5 });
    await srv.client().deleteDocument('gone');
    const later = own();
    const e = await srv.client().uploadSessionKv(id, { layer: 0, start: 5, k: later.k, v: later.v }).catch((err: unknown) => err);
    expect((e as KvrecallRequestError).status).toBe(409);
    expect((e as Error).message).toMatch(/document gone was deleted.*create a new session/);
    expect(((await srv.client().getSession(id)) as unknown as { ownTokens: number[] }).ownTokens).toEqual([5]);
    await srv.client().deleteSession(id);
  });
});
