// The Redis store's worker thread: it owns the cluster connection (ioredis
// Cluster), renews the leases of the documents this server is loading, and
// does every read and write the store asks for. It runs apart from the main
// thread so that a lease is renewed even while the main thread is busy (an
// index build, a synchronous attach), and so that the main thread can block
// on a synchronous read (redis-bridge.ts).
//
// Reads and writes go one command per (layer, group) slot — MSET, MGET,
// EXISTS, UNLINK — many at once, so every master works in parallel. Writes
// are acknowledged by the replicas (WAIT) before they count; seal checks
// that every block and artifact is present before it flips the document
// ready. Every block read is checked against its checksum.
import { randomBytes } from 'node:crypto';
import { workerData, parentPort, type MessagePort } from 'node:worker_threads';
import { Cluster, type Redis } from 'ioredis';
import { KvrecallError, conflict, notFound, preconditionFailed, type ErrorKind } from '../core/errors.js';
import type { DocumentMeta } from './document-store.js';
import type { WorkerAnswer, WorkerRequest } from './redis-bridge.js';
import { RespConnection, type BulkSink } from './resp-connection.js';
import {
  artifactKey,
  checkBlock,
  artifactValue,
  blockKey,
  GROUP_BLOCKS,
  INDEX_KEY,
  keySlot,
  leaseKey,
  metaKey,
  openArtifact,
  openBlock,
  blockHeader,
  receiptKey,
  BLOCK_HEADER,
  type RedisLocation,
  type StagedArtifact,
  type StagedBlock,
} from './redis-format.js';
import { ADD_METHOD, CREATE, EXTENT, READ, REMOVE, RENEW, SEAL } from './redis-scripts.js';

const { location, owner, port, signal, loseReply = [] } = workerData as { location: RedisLocation; owner: string; port: MessagePort; signal: Int32Array; loseReply?: string[] };

/** Commands of one kind in flight at once (each one slot group of a few MiB). */
const WIDTH = 12;
/** Block bytes written between two WAITs while a document loads (seal always waits). */
const WAIT_EVERY = 128 * 2 ** 20;
let unwaited = 0;

/** ioredis's limit on one command's reply (a WAIT may take waitMs). */
const COMMAND_TIMEOUT = Math.max(location.failoverMs, location.waitMs + 5000);
/** A receipt's TTL (redis-scripts.ts): past its call's last retry, begun within failoverMs, up to 3 sends of COMMAND_TIMEOUT; a minute spare. */
const RECEIPT_MS = location.failoverMs + 3 * COMMAND_TIMEOUT + 60_000;

const cluster = new Cluster(location.seeds, {
  scaleReads: 'master',
  slotsRefreshTimeout: 2000,
  slotsRefreshInterval: 2000,
  retryDelayOnFailover: 200,
  retryDelayOnClusterDown: 200,
  retryDelayOnTryAgain: 200,
  clusterRetryStrategy: (times) => (times > 20 ? null : 250),
  redisOptions: { connectTimeout: 2000, commandTimeout: COMMAND_TIMEOUT, maxRetriesPerRequest: 2 },
});
cluster.on('error', () => undefined); // reported by the commands that fail
const SCRIPTS = { kvrRead: [2, READ], kvrCreate: [3, CREATE], kvrRenew: [1, RENEW], kvrExtent: [1, EXTENT], kvrSeal: [3, SEAL], kvrAddMethod: [1, ADD_METHOD], kvrRemove: [3, REMOVE] } as const;
for (const [name, [numberOfKeys, lua]] of Object.entries(SCRIPTS)) cluster.defineCommand(name, { numberOfKeys, lua });
/** Scripts whose first reply is dropped after they ran, as a reset connection would (tests: RedisStore.open's loseReply). */
const toLose = new Set<string>(loseReply);
async function script(name: keyof typeof SCRIPTS, keys: string[], args: (string | number)[] = []): Promise<unknown> {
  const reply = await (cluster as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>)[name](...keys, ...args);
  if (toLose.delete(name)) throw Object.assign(new Error(`read ECONNRESET (the reply to ${name} dropped after it ran)`), { code: 'ECONNRESET' });
  return reply;
}
/** A call's token: its receipt's name (redis-scripts.ts), the same for each of its retries. */
const callToken = () => randomBytes(8).toString('hex');

const unavailable = (message: string) => new KvrecallError('unavailable', message);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Errors that mean "the cluster is (re)arranging itself", worth retrying until failoverMs. */
function transient(e: Error): boolean {
  if (e.name !== 'ReplyError') return true;
  return /^(CLUSTERDOWN|TRYAGAIN|MOVED|ASK|LOADING|MASTERDOWN|READONLY|NOREPLICAS)/.test(e.message);
}

/** Runs fn, retrying through a failover; past failoverMs, a 503 that says so. */
async function retrying<T>(what: string, fn: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + location.failoverMs;
  for (let attempt = 0; ; attempt++) {
    try {
      return await fn();
    } catch (e) {
      const err = e as Error;
      if (err instanceof KvrecallError || !transient(err)) throw err;
      if (Date.now() >= deadline)
        throw unavailable(`the Redis Cluster did not answer ${what} within ${location.failoverMs} ms (${err.message}); a master may be down and not yet replaced: try again`);
      await sleep(Math.min(100 * 2 ** attempt, 1000));
      // ioredis gives the cluster up after its retries (every node down at once): connect again once it is back.
      if (cluster.status === 'end' || cluster.status === 'close') cluster.connect().catch(() => undefined);
      else cluster.refreshSlotsCache();
    }
  }
}

/** fn over items, `width` at a time; the first failure stops the rest and is thrown. */
async function inParallel<T>(items: T[], width: number, fn: (t: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failed: { e: unknown } | undefined;
  const lane = async () => {
    while (next < items.length && !failed) {
      const item = items[next++];
      try {
        await fn(item);
      } catch (e) {
        failed ??= { e };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(width, items.length) }, lane));
  if (failed) throw failed.e;
}

function groupBy<T>(items: T[], key: (t: T) => string): T[][] {
  const groups = new Map<string, T[]>();
  for (const t of items) {
    const k = key(t);
    const g = groups.get(k);
    if (g) g.push(t);
    else groups.set(k, [t]);
  }
  return [...groups.values()];
}

// ------------------------------------------------------------ replicas

/**
 * Waits until every master's replicas hold every write made to it, on the
 * ioredis connection and on the bulk connection (WAIT counts the writes of
 * the connection it is sent on).
 */
async function waitReplicas(what: string): Promise<void> {
  const wrote = [...written];
  written.clear();
  // A failed wait (the seal answers 503) leaves those writes unconfirmed: the retried seal must wait on their connections again.
  const requeue = (e: unknown) => {
    for (const c of wrote) written.add(c);
    throw e;
  };
  await retrying(what, () =>
    Promise.all(
      cluster.nodes('master').map(async (node: Redis) => {
        // Replicas connected now, still syncing included (WAIT then waits for them to catch up).
        const info = String(await node.call('INFO', 'replication'));
        const replicas = /role:master/.test(info) ? Number(/connected_slaves:(\d+)/.exec(info)?.[1] ?? 0) : 0;
        if (replicas === 0) return;
        const name = `${node.options.host}:${node.options.port}`;
        const bulk = wrote.find((c) => `${c.host}:${c.port}` === name && !c.broken);
        const waits = [node.call('WAIT', replicas, location.waitMs), ...(bulk ? [bulk.send(['WAIT', String(replicas), String(location.waitMs)])] : [])];
        for (const acked of (await Promise.all(waits)) as number[])
          if (acked < replicas) throw unavailable(`${what}: ${acked} of ${replicas} replicas of ${name} acknowledged within ${location.waitMs} ms`);
      }),
    ).then(() => undefined),
  ).catch(requeue);
}

// ------------------------------------------------------------ bulk connections

/** One bare connection per master for block traffic (resp-connection.ts), by "host:port". */
const bulkConnections = new Map<string, RespConnection>();
/** Bulk connections written to since the last WAIT. */
const written = new Set<RespConnection>();

/** The bulk connection to the master of a key's slot as ioredis last saw it, or none. */
function bulkConnection(key: string): RespConnection | undefined {
  const node = cluster.slots[keySlot(key)]?.[0];
  if (!node) return undefined;
  let c = bulkConnections.get(node);
  if (!c || c.broken) {
    const at = node.lastIndexOf(':');
    c = new RespConnection(node.slice(0, at), Number(node.slice(at + 1)), location.failoverMs);
    bulkConnections.set(node, c);
  }
  return c;
}

/**
 * Sends a command on the bulk connection of its keys' slot; false if it
 * could not (no connection, a redirection, the connection lost): the caller
 * then goes through ioredis, which follows the cluster through a failover.
 */
async function viaBulk(keys: string[], args: (string | Uint8Array | Uint8Array[])[], sink?: BulkSink): Promise<boolean> {
  const c = bulkConnection(keys[0]);
  if (!c) return false;
  try {
    await c.send(args, sink);
    if (args[0] === 'MSET') written.add(c);
    return true;
  } catch {
    return false;
  }
}

// ------------------------------------------------------------ metadata

type Hash = Record<string, string>;
const toHash = (flat: string[]): Hash => Object.fromEntries(Array.from({ length: flat.length / 2 }, (_, i) => [flat[2 * i], flat[2 * i + 1]]));

function metaOf(id: string, status: string, json: string, methods: string): DocumentMeta {
  const m = JSON.parse(json) as Omit<DocumentMeta, 'status' | 'methods'>;
  return { ...m, id, status: status as DocumentMeta['status'], methods: methods ? methods.split(',') : [], ...(status === 'incomplete' && { tokens: 0 }) };
}

/** A document's metadata and generation; marks it incomplete (and drops its keys) if its loader's lease is gone. */
async function read(id: string): Promise<{ meta: DocumentMeta; gen: string; flipped: boolean } | undefined> {
  const r = (await retrying(`reading document ${id}`, () => script('kvrRead', [metaKey(id), leaseKey(id)]))) as [string, string, string, string, number] | null;
  if (!r) return undefined;
  const [status, json, methods, gen, flipped] = r;
  if (flipped) void dropLater(id);
  return { meta: metaOf(id, status, json, methods), gen, flipped: flipped === 1 };
}

async function list(): Promise<{ metas: DocumentMeta[]; flipped: string[] }> {
  const ids = (await retrying('listing documents', () => cluster.smembers(INDEX_KEY))).sort();
  const metas: DocumentMeta[] = [], flipped: string[] = [];
  const found = new Map<string, Awaited<ReturnType<typeof read>>>();
  await inParallel(ids, 32, async (id) => void found.set(id, await read(id)));
  for (const id of ids) {
    const r = found.get(id);
    if (!r) continue;
    metas.push(r.meta);
    if (r.flipped) flipped.push(id);
  }
  return { metas, flipped };
}

// ------------------------------------------------------------ leases

/** Documents this server is loading: their generation, and why the lease was lost if it was. */
const leases = new Map<string, { gen: string; lost?: string }>();

const renewal = setInterval(() => {
  for (const [id, lease] of leases)
    if (!lease.lost)
      script('kvrRenew', [leaseKey(id)], [owner, location.leaseMs])
        .then((ok) => {
          if (ok === 0 && leases.get(id) === lease)
            lease.lost = `document ${id}: this server lost its loading lease (the document was deleted, or the server was silent past ${location.leaseMs} ms and it is incomplete); PUT it again`;
        })
        .catch(() => undefined); // a failover: the next renewal tries again
}, Math.max(50, Math.floor(location.leaseMs / 4)));

function leaseOf(id: string): { gen: string } {
  const lease = leases.get(id);
  if (!lease) throw conflict(`document ${id} is not being loaded by this server`);
  if (lease.lost) throw conflict(lease.lost);
  return lease;
}

/**
 * Documents whose ready flip landed but whose replicas did not acknowledge it
 * (the seal's last WAIT failed: 503), by generation: a seal asked again
 * waits for the replicas again instead of failing on the lease the flip
 * released.
 */
const landed = new Map<string, string>();

async function confirmSeal(id: string, gen: string): Promise<void> {
  const doc = await read(id);
  if (!doc || doc.gen !== gen) {
    landed.delete(id);
    throw conflict(`document ${id} was deleted or replaced after its seal landed`);
  }
  if (doc.meta.status !== 'ready') {
    landed.delete(id);
    throw conflict(`document ${id} lost its seal (a Redis master failed over before its replica had it) and is ${doc.meta.status}: PUT it again`);
  }
  await waitReplicas(`sealing ${id} (its ready metadata)`);
  landed.delete(id);
}

// ------------------------------------------------------------ writes

/** Writes staged blocks (headers filled here): extents first, so a removal finds every key; then one MSET per slot group. */
async function writeBlocks(id: string, gen: string, staging: ArrayBuffer | undefined, blocks: StagedBlock[], rowBytes: number): Promise<void> {
  if (blocks.length === 0) return;
  const extents = new Map<number, number>();
  for (const b of blocks) extents.set(b.layer, Math.max(extents.get(b.layer) ?? 0, b.block + 1));
  const args = [gen, ...[...extents].flatMap(([layer, n]) => [`x${layer}`, n])];
  const fresh = await retrying(`recording the blocks of ${id}`, () => script('kvrExtent', [metaKey(id)], args));
  if (fresh === 0) throw conflict(`document ${id} was deleted or replaced while its blocks were being written`);
  const groups = groupBy(blocks, (b) => `${b.layer}/${Math.floor(b.block / GROUP_BLOCKS)}`);
  await inParallel(groups, WIDTH, async (group) => {
    const keys: string[] = [];
    const values: Uint8Array[][] = [];
    for (const b of group) {
      const key = blockKey(id, gen, b.layer, b.head, b.block);
      const bytes = b.n * rowBytes;
      const k = b.k ?? new Uint8Array(staging!, b.at!, bytes);
      const v = b.v ?? new Uint8Array(staging!, b.at! + bytes, bytes);
      keys.push(key);
      values.push([blockHeader(key, k, v, b.n), k, v]);
    }
    if (await viaBulk(keys, ['MSET', ...keys.flatMap((key, i) => [key, values[i]])])) return;
    const pairs = keys.flatMap((key, i) => [key, Buffer.concat(values[i])]);
    await retrying(`writing blocks of ${id}`, () => cluster.mset(...pairs));
  });
}

async function writeArtifacts(id: string, gen: string, staging: ArrayBuffer, artifacts: StagedArtifact[]): Promise<void> {
  const groups = groupBy(artifacts, (a) => `${a.method}/${a.layer}`);
  await inParallel(groups, WIDTH, async (group) => {
    const pairs: (string | Buffer)[] = [];
    for (const a of group) {
      const key = artifactKey(id, gen, a.method, a.layer, a.head);
      pairs.push(key, artifactValue(key, new Uint8Array(staging, a.at, a.bytes)));
    }
    await retrying(`writing the index of ${id}`, () => cluster.mset(...pairs));
  });
}

/** Checks that every block of every layer and every artifact of `methods` is in the cluster. */
async function verifyPresent(id: string, gen: string, meta: DocumentMeta, methods: string[]): Promise<void> {
  const { layers, kvHeads, blockSize } = meta.model;
  const blocks = Math.ceil(meta.tokens / blockSize);
  const checks: { keys: string[]; what: string }[] = [];
  for (let layer = 0; layer < layers; layer++)
    for (let g = 0; g * GROUP_BLOCKS < blocks; g++) {
      const keys: string[] = [];
      for (let h = 0; h < kvHeads; h++) for (let b = g * GROUP_BLOCKS; b < Math.min(blocks, (g + 1) * GROUP_BLOCKS); b++) keys.push(blockKey(id, gen, layer, h, b));
      checks.push({ keys, what: `blocks ${g * GROUP_BLOCKS}.. of layer ${layer}` });
    }
  for (const method of methods)
    for (let layer = 0; layer < layers; layer++)
      checks.push({ keys: Array.from({ length: kvHeads }, (_, h) => artifactKey(id, gen, method, layer, h)), what: `the ${method} index of layer ${layer}` });
  await inParallel(checks, 32, async ({ keys, what }) => {
    const n = await retrying(`checking ${id}`, () => cluster.exists(...keys));
    if (n !== keys.length)
      throw unavailable(`document ${id}: ${keys.length - n} of ${what} are missing from the Redis Cluster after writing them (a master failed over and lost them?); it is not sealed: PUT it again`);
  });
}

// ------------------------------------------------------------ removal

/** Unlinks every key of one generation of a document, as its hash recorded them. */
async function dropKeys(id: string, hash: Hash): Promise<void> {
  if (!hash.gen || !hash.meta) return;
  const { model } = JSON.parse(hash.meta) as DocumentMeta;
  const batches: string[][] = [];
  for (let layer = 0; layer < model.layers; layer++) {
    const blocks = Number(hash[`x${layer}`] ?? 0);
    for (let g = 0; g * GROUP_BLOCKS < blocks; g++) {
      const keys: string[] = [];
      for (let h = 0; h < model.kvHeads; h++) for (let b = g * GROUP_BLOCKS; b < Math.min(blocks, (g + 1) * GROUP_BLOCKS); b++) keys.push(blockKey(id, hash.gen, layer, h, b));
      batches.push(keys);
    }
    for (const method of hash.methods ? hash.methods.split(',') : [])
      batches.push(Array.from({ length: model.kvHeads }, (_, h) => artifactKey(id, hash.gen, method, layer, h)));
  }
  await inParallel(batches, 32, async (keys) => void (await retrying(`removing ${id}`, () => cluster.unlink(...keys))));
}

/**
 * Takes a removed document's id out of the listing. The set and the
 * document's hash lie in different slots, so no one script can change both
 * on a cluster (CROSSSLOT); a PUT that lands between the removal and the
 * SREM would lose its id. So the SREM is checked after the fact: a hash
 * found after it puts the id back. Since a create SADDs after its script,
 * the last SREM is always followed by a SADD while a document lives — the
 * check's, or, when the check saw no hash, the later create's own.
 */
async function unlist(id: string): Promise<void> {
  await retrying(`removing ${id}`, () => cluster.srem(INDEX_KEY, id));
  if ((await retrying(`removing ${id}`, () => cluster.exists(metaKey(id)))) === 1) await retrying(`removing ${id}`, () => cluster.sadd(INDEX_KEY, id));
}

/** After marking a document incomplete: its blocks are of no use to anyone. */
async function dropLater(id: string): Promise<void> {
  try {
    const hash = await cluster.hgetall(metaKey(id));
    if (hash.status === 'incomplete') await dropKeys(id, hash);
  } catch (e) {
    console.error(`kvrecall: dropping the blocks of incomplete document ${id} failed: ${(e as Error).message}`);
  }
}

// ------------------------------------------------------------ operations

type Segments = { k: Uint16Array[]; v: Uint16Array[] }[];

const ops: Record<string, (args: never) => Promise<unknown>> = {
  async open() {
    await retrying('connecting', async () => {
      const info = String(await cluster.cluster('INFO'));
      if (!/cluster_state:ok/.test(info)) throw new Error('CLUSTERDOWN the cluster state is not ok');
    });
  },

  async list() {
    return (await list()).metas;
  },

  /** At start: the documents found loading with no live lease, now marked incomplete. */
  async recover() {
    return (await list()).flipped;
  },

  async get({ id }: { id: string }) {
    return (await read(id))?.meta;
  },

  async create({ meta }: { meta: DocumentMeta }) {
    const gen = randomBytes(4).toString('hex');
    const { status: _s, methods, ...rest } = meta;
    const keys = [metaKey(meta.id), leaseKey(meta.id), receiptKey(meta.id, callToken())];
    const args = [RECEIPT_MS, JSON.stringify(rest), methods.join(','), gen, owner, location.leaseMs];
    const r = (await retrying(`creating ${meta.id}`, () => script('kvrCreate', keys, args))) as [string, string | string[]];
    if (r[0] === 'exists') throw conflict(`document ${meta.id} already exists (${r[1]}); DELETE it first`);
    leases.set(meta.id, { gen });
    landed.delete(meta.id);
    await retrying(`listing ${meta.id}`, () => cluster.sadd(INDEX_KEY, meta.id));
    await dropKeys(meta.id, toHash(r[1] as string[]));
  },

  async write({ id, staging, blocks, rowBytes }: { id: string; staging?: ArrayBuffer; blocks: StagedBlock[]; rowBytes: number }) {
    const { gen } = leaseOf(id);
    await writeBlocks(id, gen, staging, blocks, rowBytes);
    // The replicas acknowledge every WAIT_EVERY bytes (and at seal): a bound on how far they lag, without a round trip per upload.
    unwaited += blocks.reduce((n, b) => n + 2 * b.n * rowBytes, 0);
    if (unwaited >= WAIT_EVERY) {
      unwaited = 0;
      await waitReplicas(`writing blocks of ${id}`);
    }
    leaseOf(id);
  },

  async seal(a: { meta: DocumentMeta; staging: ArrayBuffer; blocks: StagedBlock[]; rowBytes: number; artifacts: StagedArtifact[] }) {
    const { id } = a.meta;
    // Sealed already, all but the replicas' acknowledgement: the seal asked again only confirms (its lease is gone).
    const sealed = landed.get(id);
    if (sealed !== undefined) return confirmSeal(id, sealed);
    const { gen } = leaseOf(id);
    await writeBlocks(id, gen, a.staging, a.blocks, a.rowBytes);
    await writeArtifacts(id, gen, a.staging, a.artifacts);
    await verifyPresent(id, gen, a.meta, [...new Set(a.artifacts.map((x) => x.method))]);
    await waitReplicas(`sealing ${id}`);
    leaseOf(id);
    const { status: _s, methods: _m, ...rest } = a.meta;
    const keys = [metaKey(id), leaseKey(id), receiptKey(id, callToken())];
    const r = await retrying(`sealing ${id}`, () => script('kvrSeal', keys, [RECEIPT_MS, gen, owner, JSON.stringify(rest)]));
    leases.delete(id);
    if (r === 'gone') throw conflict(`document ${id} was deleted or replaced while it was being sealed`);
    if (r === 'lease' || r === 'incomplete')
      throw conflict(`document ${id}: this server lost its loading lease before seal (silent past ${location.leaseMs} ms); it is incomplete: PUT it again`);
    if (r !== 'ok') throw conflict(`document ${id} is ${String(r)}, not loading`);
    landed.set(id, gen);
    await waitReplicas(`sealing ${id} (its ready metadata)`);
    landed.delete(id);
  },

  async addArtifacts({ id, method, staging, artifacts }: { id: string; method: string; staging: ArrayBuffer; artifacts: StagedArtifact[] }) {
    const doc = await read(id);
    if (!doc || doc.meta.status !== 'ready') throw conflict(`document ${id} is not ready`);
    await writeArtifacts(id, doc.gen, staging, artifacts);
    await verifyPresent(id, doc.gen, { ...doc.meta, tokens: 0 }, [method]);
    await waitReplicas(`storing the ${method} index of ${id}`);
    await retrying(`storing the ${method} index of ${id}`, () => script('kvrAddMethod', [metaKey(id)], [doc.gen, method]));
  },

  async loadArtifacts({ id, method, layers, heads }: { id: string; method: string; layers: number; heads: number }) {
    const doc = await read(id);
    if (!doc || doc.meta.status !== 'ready') return undefined;
    const out: Uint8Array[][] = Array.from({ length: layers }, () => []);
    let missing = false;
    await inParallel(Array.from({ length: layers }, (_, l) => l), WIDTH, async (layer) => {
      const keys = Array.from({ length: heads }, (_, h) => artifactKey(id, doc.gen, method, layer, h));
      const values = await retrying(`reading the ${method} index of ${id}`, () => cluster.mgetBuffer(...keys));
      values.forEach((value, h) => {
        if (!value) return void (missing = true);
        const bytes = openArtifact(keys[h], value);
        if (typeof bytes === 'string')
          throw conflict(`document ${id}: the ${method} index of layer ${layer}, kv head ${h} ${bytes} on reading it from the Redis Cluster; DELETE the document and preload it again`);
        out[layer][h] = new Uint8Array(bytes); // its own ArrayBuffer, transferred
      });
    });
    return missing ? undefined : out;
  },

  async remove({ id, createdAt }: { id: string; createdAt?: string }) {
    const keys = [metaKey(id), leaseKey(id), receiptKey(id, callToken())];
    const args = createdAt === undefined ? [RECEIPT_MS] : [RECEIPT_MS, createdAt];
    const [outcome, found] = (await retrying(`removing ${id}`, () => script('kvrRemove', keys, args))) as [string, string[] | string];
    if (outcome === 'other') throw preconditionFailed(`document ${id} was created at ${String(found)}, not ${createdAt}: not deleted`);
    const old = toHash(found as string[]);
    if (createdAt !== undefined && !old.gen) throw notFound(`document ${id} does not exist`);
    leases.delete(id);
    landed.delete(id);
    await unlist(id);
    await dropKeys(id, old);
  },

  /** Reads a ready document's blocks (of `layers`, else every layer: segments[i] is layers[i]'s) straight into the segments' shared arrays, checking each. */
  async load({ meta, segments, layers: which }: { meta: DocumentMeta; segments: Segments; layers?: number[] }) {
    const { id } = meta;
    const doc = await read(id);
    if (!doc || doc.meta.status !== 'ready' || doc.meta.createdAt !== meta.createdAt) throw conflict(`document ${id} changed in the Redis Cluster while it was being attached; try again`);
    const { layers, kvHeads, headDim, blockSize } = meta.model;
    const rowBytes = headDim * 2;
    const blocks = Math.ceil(meta.tokens / blockSize);
    const views = segments.map((s) => ({ k: s.k.map((a) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength)), v: s.v.map((a) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength)) }));
    const wanted = which ?? Array.from({ length: layers }, (_, l) => l);
    const tasks: [number, number][] = [];
    for (let g = 0; g * GROUP_BLOCKS < blocks; g++) for (let at = 0; at < wanted.length; at++) tasks.push([at, g]);
    await inParallel(tasks, WIDTH, async ([slot, g]) => {
      const layer = wanted[slot];
      if (!Number.isInteger(layer) || layer < 0 || layer >= layers) throw new RangeError(`layer ${layer} of ${id} does not exist`);
      const keys: string[] = [], where: [number, number][] = [];
      for (let h = 0; h < kvHeads; h++)
        for (let b = g * GROUP_BLOCKS; b < Math.min(blocks, (g + 1) * GROUP_BLOCKS); b++) {
          keys.push(blockKey(id, doc.gen, layer, h, b));
          where.push([h, b]);
        }
      const blockBytes = (b: number) => Math.min(blockSize, meta.tokens - b * blockSize) * rowBytes;
      const dest = (i: number) => {
        const [h, b] = where[i];
        const at = b * blockSize * rowBytes;
        return { k: views[slot].k[h].subarray(at, at + blockBytes(b)), v: views[slot].v[h].subarray(at, at + blockBytes(b)) };
      };
      const wrong = (i: number, why: string) => {
        const [h, b] = where[i];
        return why === 'missing'
          ? conflict(`document ${id}: block ${b} of layer ${layer}, kv head ${h} is missing from the Redis Cluster; the document cannot be attached: DELETE it and preload it again`)
          : conflict(`document ${id}: block ${b} of layer ${layer}, kv head ${h} ${why} on reading it from the Redis Cluster; the stored copy is damaged and is not attended: DELETE the document and preload it again`);
      };
      // Fast path: the MGET's reply lands in the segments directly, each block checked where it landed.
      const headers = Buffer.allocUnsafe(keys.length * BLOCK_HEADER);
      let failure: Error | undefined;
      const sink: BulkSink = {
        target: (i, length) => {
          const d = dest(i);
          if (length !== BLOCK_HEADER + d.k.byteLength + d.v.byteLength) return undefined;
          return [headers.subarray(i * BLOCK_HEADER, (i + 1) * BLOCK_HEADER), d.k, d.v];
        },
        done: (i, length, collected) => {
          if (failure) return;
          const d = dest(i), n = d.k.byteLength / rowBytes;
          if (length < 0) failure = wrong(i, 'missing');
          else if (collected) failure = wrong(i, String(openBlock(keys[i], collected, n, rowBytes)));
          else {
            const why = checkBlock(keys[i], headers.subarray(i * BLOCK_HEADER, (i + 1) * BLOCK_HEADER), d.k, d.v, n);
            if (why) failure = wrong(i, why);
          }
        },
      };
      if (await viaBulk(keys, ['MGET', ...keys], sink)) {
        if (failure) throw failure;
        return;
      }
      const values = await retrying(`reading document ${id}`, () => cluster.mgetBuffer(...keys));
      values.forEach((value, i) => {
        const d = dest(i), n = d.k.byteLength / rowBytes;
        if (!value) throw wrong(i, 'missing');
        const kv = openBlock(keys[i], value, n, rowBytes);
        if (typeof kv === 'string') throw wrong(i, kv);
        d.k.set(kv.k);
        d.v.set(kv.v);
      });
    });
  },

  async close() {
    clearInterval(renewal);
    for (const c of bulkConnections.values()) c.close();
    await cluster.quit().catch(() => cluster.disconnect());
  },
};

const PROGRAM_ERRORS = new Set(['TypeError', 'RangeError', 'ReferenceError', 'SyntaxError']);

function answer(msg: WorkerAnswer, transfer: ArrayBuffer[] = []): void {
  port.postMessage(msg, transfer);
  Atomics.add(signal, 0, 1);
  Atomics.notify(signal, 0);
}

parentPort!.on('message', async ({ id, op, args }: WorkerRequest) => {
  try {
    const value = await ops[op](args as never);
    const transfer = op === 'loadArtifacts' && value ? (value as Uint8Array[][]).flat().map((a) => a.buffer as ArrayBuffer) : [];
    answer({ id, value }, transfer);
  } catch (e) {
    const err = e as Error;
    if (err instanceof KvrecallError) return answer({ id, error: { kind: err.kind, message: err.message } });
    console.error(`kvrecall: Redis store ${op} failed:`, err);
    // A fault of this code is internal (500); anything else came from the cluster or the connection to it: 503 unavailable.
    const kind: ErrorKind | undefined = PROGRAM_ERRORS.has(err.name) ? undefined : 'unavailable';
    answer({ id, error: { kind, message: `the Redis Cluster failed to ${op} (${err.message}); try again` } });
  }
});
