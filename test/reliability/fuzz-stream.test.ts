// Fuzz of the WebSocket stream (GET /v1/stream) against a server process:
// valid, mutated, truncated and random frames on one connection (attends,
// batches and document uploads, a few of them large enough to be read
// straight from the socket, masked with ws's random keys). Every frame
// gets one answer frame, in order, with a documented code (never internal);
// the connection survives; the server stays up and answers 0 5xx.
import { afterAll, describe, expect, it } from 'vitest';
import { Packr, Unpackr } from 'msgpackr';
import { WebSocket } from 'ws';
import { KvrecallClient, tensor } from '../../clients/ts/client.js';
import { MsgpackError, unpackView } from '../../core/msgpack-parts-decode.js';
import { asStep, randomKv, randomQ } from '../helpers/kv-data.js';
import { freshSeed, Rng } from '../helpers/random.js';
import { startChild, tempDataDir, type ChildServer } from '../helpers/server.js';

const seed = freshSeed();
console.log(`fuzz-stream: seed ${seed}`);
const FRAMES = Number(process.env.KVRECALL_FUZZ_CASES ?? 3000) / 3;
const M = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 16, dtype: 'f16' as const, blockSize: 16 };
const packr = new Packr({ useRecords: false });
const unpackr = new Unpackr({ mapsAsObjects: true, useRecords: false });
const DOCUMENTED = new Set(['malformed', 'not_found', 'conflict', 'too_large', 'invalid', 'over_budget']);

function mutate(bytes: Uint8Array, rng: Rng): Uint8Array {
  const out = Uint8Array.from(bytes);
  const r = rng.next();
  if (r < 0.4) for (let i = 0; i < 1 + rng.int(4); i++) out[rng.int(out.length)] = rng.int(256);
  else if (r < 0.7) return out.subarray(0, rng.int(out.length));
  else return Uint8Array.from({ length: rng.int(64) }, () => rng.int(256));
  return out;
}

describe('fuzz: stream frames', () => {
  const tmp = tempDataDir();
  let server: ChildServer;
  afterAll(async () => {
    await server?.stop('SIGKILL');
    tmp.cleanup();
  });

  it(`${FRAMES} frames on one connection: each answered in order, documented codes only, the server stays up`, async () => {
    server = await startChild(tmp.dir, ['--body-limit', String(4 << 20)]);
    const client = new KvrecallClient({ url: server.url });
    const rng = new Rng(seed);
    const sessions: string[] = [];
    for (let i = 0; i < 3; i++) sessions.push((await client.createSession({ model: M })).id);
    await client.createDocument('fz-doc', M);
    const ws = new WebSocket(server.url.replace('http', 'ws') + '/v1/stream', { perMessageDeflate: false });
    await new Promise((resolve, reject) => (ws.once('open', resolve), ws.once('error', reject)));
    const answers: Record<string, unknown>[] = [];
    ws.on('message', (d: Buffer) => answers.push(unpackr.unpack(d) as Record<string, unknown>));
    const frame = (id: number) => {
      // q in f32 or 16 bits (random words: NaN and Inf among them); outDtype good or bad now and then.
      const q = () => (rng.next() < 0.6 ? tensor('f32', [4, 16], randomQ(rng, 4, 16)) : tensor(rng.next() < 0.5 ? 'f16' : 'bf16', [4, 16], Uint16Array.from({ length: 64 }, () => rng.int(0x10000))));
      const step = () => ({ session: sessions[rng.int(3)], q: q(), ...(rng.next() < 0.3 && { outDtype: ['f16', 'bf16', 'f32', 'f64', 16][rng.int(5)] }), ...(rng.next() < 0.5 && asStep(randomKv(rng, 'f16', 2, 1, 16))), ...(rng.next() < 0.3 && { position: rng.int(5) }) });
      // Uploads: 1 in 40 of 9000 tokens (1.1 MB, read directly), starts often out of order.
      const upload = () => {
        const kv = randomKv(rng, 'f16', 2, rng.next() < 0.025 ? 9000 : 1 + rng.int(40), 16);
        return { document: rng.next() < 0.9 ? 'fz-doc' : 'fz-none', start: rng.next() < 0.5 ? 0 : rng.int(20_000), k: kv.k, v: kv.v };
      };
      const r = rng.next();
      const body = r < 0.35 ? { id, layer: rng.int(3), ...step() } : r < 0.7 ? { id, layer: rng.int(3), steps: Array.from({ length: rng.int(4) }, step) } : { id, layer: rng.int(3), ...upload() };
      const bytes = packr.pack(body);
      return rng.next() < 0.5 ? bytes : mutate(bytes, rng);
    };
    // The id each frame carries as the server will read it (a mutation may change or drop it).
    const expectedId: unknown[] = [];
    for (let i = 0; i < FRAMES; i++) {
      const bytes = frame(i);
      // The server's decoder, not msgpackr's: msgpackr reads some bytes no msgpack value starts with (0xc1).
      // A frame it refuses keeps the id its map held before the bad byte.
      let id: unknown;
      try {
        const v = unpackView(bytes);
        id = v && typeof v === 'object' && !(v instanceof Uint8Array) && !Array.isArray(v) ? (v as Record<string, unknown>).id : undefined;
      } catch (e) {
        id = e instanceof MsgpackError ? e.partial?.id : undefined;
      }
      expectedId.push(id);
      ws.send(bytes);
    }
    const deadline = Date.now() + 60_000;
    while (answers.length < FRAMES && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    expect(answers.length).toBe(FRAMES);
    const codes = new Map<string, number>();
    const bad: string[] = [];
    answers.forEach((a, i) => {
      // Answers come in order, each with the id its frame carried.
      // A mutation may turn the id into a map, an array or bytes: compared by value (ids of any type are echoed as
      // read). Bytes by their bytes: the answer's decode to a Buffer, the frame's to a Uint8Array (CI seed 437883606).
      const text = (x: unknown) =>
        JSON.stringify(x, function (this: Record<string, unknown>, k: string, v: unknown) {
          const raw = this[k]; // before toJSON (a Buffer's is {type, data})
          if (ArrayBuffer.isView(raw)) return Array.from(new Uint8Array(raw.buffer, raw.byteOffset, raw.byteLength));
          return typeof v === 'bigint' ? `${v}n` : v;
        });
      const same = (x: unknown, y: unknown) => x === y || (typeof x === 'object' && x !== null && text(x) === text(y));
      if (expectedId[i] !== undefined && !Number.isNaN(expectedId[i]) && !same(a.id, expectedId[i]))
        bad.push(`answer ${i} has id ${text(a.id)}, its frame ${text(expectedId[i])}`);
      const errs = [a.error, ...((a.results as Record<string, unknown>[] | undefined) ?? []).map((r) => r.error)].filter(Boolean) as { code: string }[];
      for (const e of errs) {
        codes.set(e.code, (codes.get(e.code) ?? 0) + 1);
        if (!DOCUMENTED.has(e.code)) bad.push(`answer ${i}: ${JSON.stringify(e)}`);
      }
    });
    console.log(`fuzz-stream: ${FRAMES} frames; error codes ${JSON.stringify(Object.fromEntries(codes))}`);
    expect(bad).toEqual([]);
    expect(ws.readyState).toBe(WebSocket.OPEN);
    ws.close();
    expect((await fetch(`${server.url}/v1/health`)).status).toBe(200);
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    expect(metrics.split('\n').filter((l) => /status="5\d\d"/.test(l))).toEqual([]);
  }, 120_000);
});
