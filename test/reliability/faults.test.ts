// Faults: SIGKILL at random points of preload and seal against a server
// process over one LMDB data folder, trial after trial; and clients that
// disconnect mid-request.
//
// After every restart: the server starts cleanly (LMDB never corrupt), and
// every document ever created is either `ready` and bit-identical to what was
// uploaded (read back through an exact session: `return: ['kv']` on an attend
// with no k/v, so nothing is appended), or `incomplete` and refused to
// sessions. A seal that was answered is durable. KVRECALL_FAULT_TRIALS
// overrides the number of trials (default 24).
import { connect } from 'node:net';
import { pack } from 'msgpackr';
import { afterAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { KvrecallClient, KvrecallRequestError, tensor } from '../../clients/ts/client.js';
import { randomKv, type KvChunk } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startChild, startInProcess, tempDataDir, type ChildServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`faults: seed ${seed}`);
const TRIALS = Number(process.env.KVRECALL_FAULT_TRIALS ?? 24);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Model {
  layers: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  dtype: 'f16' | 'bf16';
  blockSize: number;
}

/** What was uploaded to a document: per layer, per kv head, K and V words in order. */
interface Uploaded {
  id: string;
  model: Model;
  k: Uint16Array[][];
  v: Uint16Array[][];
  /** A seal was answered: the document must be ready from now on. */
  sealAcked: boolean;
}

function headWords(c: KvChunk, which: 'k' | 'v', h: number): Uint16Array {
  const [, n, d] = c[which].shape;
  const words = new Uint16Array(c[which].data.buffer, c[which].data.byteOffset, c[which].data.byteLength / 2);
  return words.slice(h * n * d, (h + 1) * n * d);
}

function concatWords(parts: Uint16Array[]): Uint16Array {
  const out = new Uint16Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function words(t: { data: Uint8Array }): Uint16Array {
  const bytes = new Uint8Array(t.data); // copy: aligned
  return new Uint16Array(bytes.buffer, 0, bytes.byteLength / 2);
}

function sameWords(a: Uint16Array, b: Uint16Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Reads a ready document's K/V back through an exact session and compares every word. */
async function readBackMatches(client: KvrecallClient, doc: Uploaded): Promise<string | undefined> {
  const m = doc.model;
  const s = await client.createSession({ model: m, documents: [doc.id], method: 'exact' });
  try {
    for (let layer = 0; layer < m.layers; layer++) {
      const r = await client.attend(s.id, { layer, q: tensor('f32', [m.qHeads, m.headDim], new Float32Array(m.qHeads * m.headDim)), return: ['kv'] });
      for (let h = 0; h < m.kvHeads; h++) {
        if (!sameWords(words(r.kv!.k[h]), doc.k[layer][h])) return `layer ${layer} head ${h}: K differs`;
        if (!sameWords(words(r.kv!.v[h]), doc.v[layer][h])) return `layer ${layer} head ${h}: V differs`;
      }
    }
    return undefined;
  } finally {
    await client.deleteSession(s.id);
  }
}

describe('SIGKILL during preload and seal', () => {
  const tmp = tempDataDir();
  const children: ChildServer[] = [];
  afterAll(async () => {
    for (const c of children) await c.stop('SIGKILL');
    tmp.cleanup();
  });

  it(`${TRIALS} trials: every document is ready and bit-identical, or incomplete; restarts are clean`, async () => {
    const rng = new Rng(seed);
    const docs = new Map<string, Uploaded>();
    const tally = { killedMidUpload: 0, killedAfterUploads: 0, killedAroundSeal: 0, sealAnswered: 0, readyAfterRestart: 0, incompleteAfterRestart: 0, redone: 0 };

    /** Starts the server and checks every document known so far. */
    async function restartAndCheck(): Promise<{ server: ChildServer; client: KvrecallClient }> {
      const server = await startChild(tmp.dir); // rejects if the server cannot start (e.g. a corrupt store)
      children.push(server);
      const client = new KvrecallClient({ url: server.url });
      const listed = new Map((await client.listDocuments()).map((d) => [d.id, d]));
      for (const doc of docs.values()) {
        const info = listed.get(doc.id);
        expect(info, `document ${doc.id} vanished`).toBeDefined();
        expect(['ready', 'incomplete'], `${doc.id} is ${info!.status}`).toContain(info!.status);
        if (doc.sealAcked) expect(info!.status, `${doc.id}: an answered seal was lost`).toBe('ready');
        if (info!.status === 'ready') {
          expect(info!.tokens).toBe(doc.k[0][0].length / doc.model.headDim);
          expect(await readBackMatches(client, doc), doc.id).toBeUndefined();
          doc.sealAcked = true; // once ready, it stays ready
        } else {
          const err = await client.createSession({ model: doc.model, documents: [doc.id] }).catch((e: unknown) => e);
          expect(err).toBeInstanceOf(KvrecallRequestError);
          expect((err as KvrecallRequestError).status).toBe(409);
        }
      }
      return { server, client };
    }

    let { server, client } = await restartAndCheck();
    for (let trial = 0; trial < TRIALS; trial++) {
      // The victim: a new document, or (sometimes) an incomplete one PUT again.
      const incomplete = [...docs.values()].filter((d) => !d.sealAcked);
      const redo = incomplete.length > 0 && rng.next() < 0.3;
      const id = redo ? incomplete[rng.int(incomplete.length)].id : `doc-${trial}`;
      if (redo) tally.redone++;
      const model: Model = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 16, dtype: trial % 2 ? 'bf16' : 'f16', blockSize: 16 };
      const total = 20 + rng.int(500);
      const chunks: KvChunk[][] = [];
      for (let layer = 0; layer < model.layers; layer++) {
        const row: KvChunk[] = [];
        for (let n = 0; n < total; ) {
          const size = Math.min(total - n, 1 + rng.int(rng.next() < 0.5 ? 20 : 120));
          row.push(randomKv(rng, model.dtype, model.kvHeads, size, model.headDim));
          n += size;
        }
        chunks.push(row);
      }
      const doc: Uploaded = {
        id,
        model,
        k: chunks.map((row) => [0, 1].map((h) => concatWords(row.map((c) => headWords(c, 'k', h))))),
        v: chunks.map((row) => [0, 1].map((h) => concatWords(row.map((c) => headWords(c, 'v', h))))),
        sealAcked: false,
      };
      await client.createDocument(id, model);
      docs.set(id, doc);

      const upload = async () => {
        for (let layer = 0; layer < model.layers; layer++) {
          let start = 0;
          for (const c of chunks[layer]) {
            await client.uploadDocumentKv(id, { layer, start, k: c.k, v: c.v });
            start += c.k.shape[1];
          }
        }
      };

      // Modes by turn, timings at random: 0, 1: kill during the uploads;
      // 2: kill right after sending the seal; 3: kill 0-30 ms after sending
      // it, or once it was answered.
      const mode = trial % 4;
      if (mode < 2) {
        const uploading = upload().then(
          () => 'done',
          () => 'cut',
        );
        await sleep(rng.int(60));
        await server.stop('SIGKILL');
        if ((await uploading) === 'cut') tally.killedMidUpload++;
        else tally.killedAfterUploads++;
      } else {
        await upload();
        const sealing = client.sealDocument(id).then(
          () => true,
          () => false,
        );
        if (mode === 2) await (rng.next() < 0.5 ? new Promise((r) => setImmediate(r)) : sleep(rng.int(4)));
        else if (rng.next() < 0.5) await sleep(rng.int(30));
        else await sealing;
        await server.stop('SIGKILL');
        doc.sealAcked = await sealing;
        if (doc.sealAcked) tally.sealAnswered++;
        tally.killedAroundSeal++;
      }

      ({ server, client } = await restartAndCheck());
      const status = (await client.getDocument(id)).status;
      if (status === 'ready') tally.readyAfterRestart++;
      else tally.incompleteAfterRestart++;
      if (status === 'incomplete' && !redo && rng.next() < 0.1) {
        // The recovery report names documents cut off mid-preload.
        expect(((await client.health()) as unknown as { recovered: string[] }).recovered).toContain(id);
      }
    }
    console.log(`faults: ${TRIALS} trials, ${docs.size} documents; ${JSON.stringify(tally)}`);
    expect(tally.killedMidUpload + tally.killedAfterUploads + tally.killedAroundSeal).toBe(TRIALS);
    expect(tally.readyAfterRestart).toBeGreaterThan(0);
    expect(tally.incompleteAfterRestart).toBeGreaterThan(0);
    await server.stop('SIGTERM');
  }, 180_000);
});

describe('clients that disconnect mid-request', () => {
  const tmp = tempDataDir();
  let server: RunningServer;
  afterAll(async () => {
    await server?.close();
    tmp.cleanup();
  });

  const model = { layers: 1, qHeads: 2, kvHeads: 2, headDim: 64, dtype: 'f16' as const, blockSize: 64 };
  const BIG = 8000; // tokens: a body of about 4 MiB

  /** Sends a request whose body stops after `sent` of its bytes, then destroys the socket. */
  function cutRequest(url: string, path: string, body: Uint8Array, sent: number, lingerMs: number): Promise<void> {
    const { hostname, port } = new URL(url);
    return new Promise((resolve) => {
      const socket = connect(Number(port), hostname, () => {
        socket.write(
          `POST ${path} HTTP/1.1\r\nHost: ${hostname}:${port}\r\nContent-Type: application/msgpack\r\nContent-Length: ${body.byteLength}\r\n\r\n`,
        );
        socket.write(body.subarray(0, sent), () => {
          setTimeout(() => {
            socket.destroy();
            resolve();
          }, lingerMs);
        });
      });
      socket.on('error', () => resolve());
    });
  }

  /** Requests to a route the server has finished (any status), from /metrics. */
  async function handled(route: string): Promise<number> {
    const text = await (await fetch(`${server.url}/metrics`)).text();
    let n = 0;
    for (const line of text.split('\n')) if (line.startsWith(`kvrecall_requests_total{route="${route}",`)) n += Number(line.split(' ').pop());
    return n;
  }

  /** Waits until the server has finished `count` requests to `route`; false on timeout. */
  async function settled(route: string, count: number, timeoutMs: number): Promise<boolean> {
    for (const t0 = Date.now(); Date.now() - t0 < timeoutMs; await sleep(10)) if ((await handled(route)) >= count) return true;
    return false;
  }

  /** Words of layer 0, head h, as the server holds them (read back through a session). */
  async function readBack(client: KvrecallClient, doc: string): Promise<{ k: Uint16Array[]; v: Uint16Array[] }> {
    const s = await client.createSession({ model, documents: [doc], method: 'exact' });
    const r = await client.attend(s.id, { layer: 0, q: tensor('f32', [2, 64], new Float32Array(128)), return: ['kv'] });
    await client.deleteSession(s.id);
    return { k: r.kv!.k.map(words), v: r.kv!.v.map(words) };
  }

  it('a cut upload leaves the document unchanged, or whole; the next upload at the right start succeeds', async () => {
    const rng = new Rng(seed ^ 0x51);
    server = await startInProcess(tmp.dir);
    const client = new KvrecallClient({ url: server.url });
    await client.createDocument('cut', model);
    const applied: KvChunk[] = [];
    let tokens = 0;
    const uploadOk = async (n: number) => {
      const c = randomKv(rng, 'f16', 2, n, 64);
      const r = await client.uploadDocumentKv('cut', { layer: 0, start: tokens, k: c.k, v: c.v });
      tokens += n;
      expect(r.tokens).toBe(tokens);
      applied.push(c);
    };
    await uploadOk(100);

    // A large upload cut at several points of its body.
    const big = randomKv(rng, 'f16', 2, BIG, 64);
    const body = new Uint8Array(pack({ layer: 0, start: tokens, k: big.k, v: big.v }));
    const KV = '/v1/documents/:doc/kv';
    for (const fraction of [0, 1 / body.byteLength, 0.25, 0.5, 0.999, (body.byteLength - 1) / body.byteLength]) {
      const before = await handled(KV);
      await cutRequest(server.url, '/v1/documents/cut/kv', body, Math.floor(fraction * body.byteLength), rng.int(30));
      // The server finishes the request whose client went away (it does not hang on it).
      expect(await settled(KV, before + 1, 10_000), `cut at ${fraction}: the request never finished`).toBe(true);
      expect((await client.getDocument('cut')).tokens).toBe(tokens);
      await uploadOk(1 + rng.int(50)); // the next upload with the right start succeeds
    }

    // The whole body sent, then the socket destroyed before the answer: the
    // upload is applied whole or not at all.
    const whole = randomKv(rng, 'f16', 2, BIG, 64);
    const before = await handled(KV);
    await cutRequest(server.url, '/v1/documents/cut/kv', new Uint8Array(pack({ layer: 0, start: tokens, k: whole.k, v: whole.v })), Infinity, 0);
    expect(await settled(KV, before + 1, 10_000), 'the request never finished').toBe(true);
    const after = (await client.getDocument('cut')).tokens;
    expect([tokens, tokens + BIG]).toContain(after);
    const outcomes = [`whole body then socket destroyed: ${after === tokens ? 'not applied' : 'applied'}`];
    if (after !== tokens) {
      tokens = after;
      applied.push(whole);
    }

    // fetch aborted with an AbortController part way through a large upload.
    for (const ms of [0, 1, 3, 10]) {
      const c = randomKv(rng, 'f16', 2, BIG, 64);
      const ac = new AbortController();
      const sending = fetch(`${server.url}/v1/documents/cut/kv`, {
        method: 'POST',
        headers: { 'content-type': 'application/msgpack' },
        body: new Uint8Array(pack({ layer: 0, start: tokens, k: c.k, v: c.v })),
        signal: ac.signal,
      }).then(
        (res) => res.status,
        () => 'aborted',
      );
      const before = await handled(KV);
      setTimeout(() => ac.abort(), ms);
      const outcome = await sending;
      // If the request reached the server, wait until it is finished (an
      // abort before connecting never reaches it).
      await settled(KV, before + 1, outcome === 'aborted' ? 2000 : 10_000);
      const now = (await client.getDocument('cut')).tokens;
      expect([tokens, tokens + BIG], `abort after ${ms} ms (${outcome})`).toContain(now);
      if (outcome === 200) expect(now).toBe(tokens + BIG);
      outcomes.push(`abort after ${ms} ms: ${outcome}, ${now === tokens ? 'not applied' : 'applied'}`);
      if (now !== tokens) {
        tokens = now;
        applied.push(c);
      }
      const late = await uploadOk(1 + rng.int(50)).then(
        () => false,
        async (e: unknown) => {
          // Only acceptable failure: the aborted upload landed (whole) after we looked.
          expect(e).toMatchObject({ status: 409 });
          expect((await client.getDocument('cut')).tokens).toBe(tokens + BIG);
          return true;
        },
      );
      if (late) {
        tokens += BIG;
        applied.push(c);
        outcomes.push('(applied late)');
        await uploadOk(1 + rng.int(50));
      }
    }

    console.log(`faults: disconnects: ${outcomes.join('; ')}`);

    // Sealed, the document holds exactly the uploads that were applied, in order.
    expect(await client.sealDocument('cut')).toMatchObject({ status: 'ready', tokens });
    const got = await readBack(client, 'cut');
    for (let h = 0; h < 2; h++) {
      expect(sameWords(got.k[h], concatWords(applied.map((c) => headWords(c, 'k', h))))).toBe(true);
      expect(sameWords(got.v[h], concatWords(applied.map((c) => headWords(c, 'v', h))))).toBe(true);
    }
  });

  it("a cut session upload leaves the session's tokens unchanged", async () => {
    const rng = new Rng(seed ^ 0x52);
    const client = new KvrecallClient({ url: server.url });
    const s = await client.createSession({ model, method: 'exact' });
    const big = randomKv(rng, 'f16', 2, BIG, 64);
    const body = new Uint8Array(pack({ layer: 0, start: 0, k: big.k, v: big.v }));
    const before = await handled('/v1/sessions/:sid/kv');
    await cutRequest(server.url, `/v1/sessions/${s.id}/kv`, body, body.byteLength >> 1, 5);
    expect(await settled('/v1/sessions/:sid/kv', before + 1, 10_000), 'the request never finished').toBe(true);
    expect(((await client.getSession(s.id)) as { ownTokens: number[] }).ownTokens).toEqual([0]);
    const c = randomKv(rng, 'f16', 2, 7, 64);
    await expect(client.uploadSessionKv(s.id, { layer: 0, start: 0, k: c.k, v: c.v })).resolves.toMatchObject({ tokens: 7 });
  });
});
