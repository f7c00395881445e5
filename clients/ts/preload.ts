// `kvrecall preload <file.safetensors> --id <doc>`: uploads a prefill's K/V
// (and optional Q) through the API with a progress bar, then seals.
//
// Tensor names in the file, one per layer L (shape [heads, tokens, headDim]):
//   k.L   keys (after RoPE), [kvHeads, tokens, headDim]
//   v.L   values,            [kvHeads, tokens, headDim]
//   q.L   prefill queries (optional), [qHeads, tokens, headDim]
// dtypes F16, BF16 or F32. Without q.*, give --q-heads (or metadata qHeads).
//
// Uploads go over the stream (GET /v1/stream), `window` of them in flight:
// the server reads the next one's bytes straight from the socket while it
// appends and stores this one (bench/results/preload-vm.md).
import { KvrecallClient, type DocumentInfo, type KvUploadBody, type KvUploadStats, type Tensor } from './client.js';
import type { KvrecallStream } from './stream.js';
import { invalid } from '../../core/errors.js';
import { SafetensorsFile } from './safetensors.js';

export interface PreloadOptions {
  file: string;
  id: string;
  url: string;
  token?: string;
  methods: string[];
  chunk: number;
  qHeads?: number;
  /** The document's storage dtype; unset: k.0's when it is F16 or BF16, else f16. */
  dtype?: 'f16' | 'bf16';
  progress: (done: number, total: number) => void;
  /** Uploads in flight on the stream (default 2). */
  window?: number;
  /** Filled with where the time went, ms (`kvrecall preload --timings`). */
  timings?: PreloadTimings;
}

/** Where a preload's time went, ms since `performance.now()`'s origin (the process start): the CLI's split. */
export interface PreloadTimings {
  /** The document created (its memory reserved). */
  created: number;
  /** The stream open too: the first upload may start. */
  ready: number;
  /** The first upload handed to the socket. */
  firstSent: number;
  /** The last upload answered (the progress bar's 100%). */
  uploaded: number;
  /** Sealed. */
  sealed: number;
  /** Summed over the uploads: waiting for a chunk's reads (the first included), waiting in `send` (the socket, the window), waiting for the last answers. */
  readWait: number;
  send: number;
  drain: number;
  /** Summed over the chunks: each chunk's reads from start to end, whether or not an upload waited on them. */
  reads: number;
}

/** Uploads in order on one stream, up to `window` answers outstanding; the first failure is thrown (by `send` or `drain`). */
export class UploadWindow {
  private readonly inflight: Promise<void>[] = [];
  private failed?: { e: unknown };

  constructor(
    private readonly stream: KvrecallStream,
    private readonly window: number,
  ) {}

  /**
   * Sends one upload, its tensors written to the socket as they are;
   * resolves once the socket has taken them (the caller may then reuse
   * them) and fewer than `window` are unanswered.
   */
  async send(doc: string, body: KvUploadBody, answered: (r: { layer: number; tokens: number; stats?: KvUploadStats }) => void): Promise<void> {
    this.throwIfFailed();
    const { written, answer } = this.stream.sendDocumentKv(doc, body);
    this.inflight.push(answer.then(answered, (e: unknown) => void (this.failed ??= { e })));
    await written.catch((e: unknown) => void (this.failed ??= { e }));
    if (this.inflight.length >= this.window) await this.inflight.shift();
    this.throwIfFailed();
  }

  /** Waits for every upload sent. */
  async drain(): Promise<void> {
    await Promise.all(this.inflight.splice(0));
    this.throwIfFailed();
  }

  private throwIfFailed(): void {
    if (this.failed) throw this.failed.e;
  }
}

export async function preload(o: PreloadOptions): Promise<{ tokens: number; layers: number }> {
  if (!Number.isInteger(o.chunk) || o.chunk < 1) throw invalid(`chunk takes a positive integer of tokens, not ${o.chunk}`);
  const f = new SafetensorsFile(o.file);
  // Settled before the file closes: no read still runs under it.
  let first: Promise<unknown> | undefined;
  try {
    const layers = [...f.tensors.keys()].filter((n) => /^k\.\d+$/.test(n)).length;
    const k0 = f.tensors.get('k.0');
    if (!k0 || layers === 0) throw invalid(`${o.file}: no tensors named k.0, k.1, ...`);
    const [kvHeads, tokens, headDim] = k0.shape;
    const q0 = f.tensors.get('q.0');
    const qHeads = q0?.shape[0] ?? o.qHeads ?? Number(f.metadata.qHeads);
    if (!Number.isInteger(qHeads) || qHeads <= 0) throw invalid('the number of q heads is unknown: add q.* tensors, metadata qHeads, or --q-heads');
    // A bf16 prefill stored as f16 lost its range (past 65504 it is infinite, refused) and no longer matched a bf16 session.
    const dtype = o.dtype ?? (k0.dtype === 'bf16' ? 'bf16' : 'f16');
    const model = { layers, qHeads, kvHeads, headDim, dtype };
    const client = new KvrecallClient({ url: o.url, token: o.token });
    const reader = chunkReader(o, f, { layers, tokens, qHeads, kvHeads, headDim });
    // The stream's handshake and the first chunk's reads need no document: they run while the server creates it
    // (its memory reserved whole: the CLI's slowest step before its first upload, bench/results/preload-vm-cli-ab.md).
    const opening = client.openStream();
    opening.catch(() => undefined);
    first = reader.chunks.length > 0 ? reader.read(0) : undefined;
    first?.catch(() => undefined);
    let made: DocumentInfo;
    try {
      // The tokens hint: the memory reserved whole now (503 at once if it does not fit), never regrown while uploading.
      made = await client.createDocument(o.id, model, { methods: o.methods, tokens });
    } catch (e) {
      await opening.then((s) => s.close(), () => undefined);
      throw e;
    }
    if (o.timings) o.timings.created = performance.now();
    try {
      return await uploadAndSeal(o, client, opening, reader, first as Promise<KvUploadBody> | undefined, layers);
    } catch (e) {
      // Left loading, the document kept its whole reservation of host memory (the tokens hint) until someone
      // DELETEd it, and a rerun got 409; as the Python client's push_document, a failed preload removes what it made.
      // Only what it made: a document made again under the id meanwhile (its uploads are what failed ours) is
      // left alone, the server checking createdAt and deleting in one step (412 then).
      await client.deleteDocument(o.id, { createdAt: made.createdAt }).catch(() => undefined);
      throw e;
    }
  } finally {
    await first?.catch(() => undefined);
    f.close();
  }
}

interface ChunkReader {
  chunks: { layer: number; start: number; end: number }[];
  /** Chunk i's tensors, read off the event loop into the buffer set i % 2. */
  read(i: number): Promise<KvUploadBody>;
}

function chunkReader(
  o: PreloadOptions,
  f: SafetensorsFile,
  { layers, tokens, qHeads, kvHeads, headDim }: { layers: number; tokens: number; qHeads: number; kvHeads: number; headDim: number },
): ChunkReader {
  const tm = o.timings;
  // Two sets of buffers, one per tensor kind each, taken in turn: chunk i+1 is read (off the event loop) into one
  // while chunk i's tensors, in the other, go into the socket. An upload's tensors are in the socket once send resolves.
  const sets = [new Map<string, Buffer>(), new Map<string, Buffer>()];
  const slice = async (set: Map<string, Buffer>, name: string, from: number, to: number, heads: number): Promise<Tensor> => {
    const kind = name.split('.')[0];
    const t = f.tensors.get(name)!;
    const bytes = heads * o.chunk * (t.end - t.begin) / (t.shape[0] * t.shape[1]);
    if (!set.has(kind) || set.get(kind)!.byteLength < bytes) set.set(kind, Buffer.allocUnsafeSlow(bytes));
    return { dtype: t.dtype, shape: [heads, to - from, headDim], data: await f.readTokensAsync(name, from, to, set.get(kind)) };
  };
  const chunks: { layer: number; start: number; end: number }[] = [];
  for (let layer = 0; layer < layers; layer++)
    for (let start = 0; start < tokens; start += o.chunk) chunks.push({ layer, start, end: Math.min(tokens, start + o.chunk) });
  const read = async (i: number): Promise<KvUploadBody> => {
    const { layer, start, end } = chunks[i], set = sets[i % 2];
    const began = tm ? performance.now() : 0;
    // All three settle before a failure is thrown (the file is closed after the last read, not under one).
    const settled = await Promise.allSettled([
      slice(set, `k.${layer}`, start, end, kvHeads),
      slice(set, `v.${layer}`, start, end, kvHeads),
      f.tensors.has(`q.${layer}`) ? slice(set, `q.${layer}`, start, end, qHeads) : Promise.resolve(undefined),
    ]);
    const failed = settled.find((r) => r.status === 'rejected');
    if (failed) throw failed.reason;
    const [k, v, q] = settled.map((r) => (r as PromiseFulfilledResult<Tensor | undefined>).value);
    if (tm) tm.reads += performance.now() - began;
    return { layer, start, k: k!, v: v!, ...(q && { q }) };
  };
  return { chunks, read };
}

async function uploadAndSeal(
  o: PreloadOptions,
  client: KvrecallClient,
  opening: Promise<KvrecallStream>,
  { chunks, read }: ChunkReader,
  first: Promise<KvUploadBody> | undefined,
  layers: number,
): Promise<{ tokens: number; layers: number }> {
  const total = chunks.reduce((n, c) => n + c.end - c.start, 0);
  let done = 0;
  const stream = await opening;
  const uploads = new UploadWindow(stream, o.window ?? 2);
  const tm = o.timings;
  if (tm) tm.ready = performance.now();
  let next = first;
  try {
    for (let i = 0; i < chunks.length; i++) {
      const t0 = tm ? performance.now() : 0;
      const body = await next!;
      const t1 = tm ? performance.now() : 0;
      // The next read may start now: its buffers are the ones the upload before this one was in, which the socket has taken.
      next = i + 1 < chunks.length ? read(i + 1) : undefined;
      // A read that fails while this upload is sent is thrown at the next await of it, not left unhandled.
      next?.catch(() => undefined);
      const { start, end } = chunks[i];
      await uploads.send(o.id, body, () => o.progress((done += end - start), total));
      if (tm) {
        const t2 = performance.now();
        tm.readWait += t1 - t0;
        tm.send += t2 - t1;
        if (i === 0) tm.firstSent = t2;
      }
    }
    const t3 = tm ? performance.now() : 0;
    await uploads.drain();
    if (tm) (tm.uploaded = performance.now()), (tm.drain = tm.uploaded - t3);
  } finally {
    stream.close();
    // A read still running when an upload failed settles before the caller closes the file under it.
    await next?.catch(() => undefined);
  }
  const sealed = await client.sealDocument(o.id);
  if (tm) tm.sealed = performance.now();
  return { tokens: sealed.tokens, layers };
}

/** A one-line progress bar on stderr. */
export function progressBar(label: string): (done: number, total: number) => void {
  const start = Date.now();
  return (done, total) => {
    const frac = total > 0 ? done / total : 1;
    const width = 30, fill = Math.round(frac * width);
    const secs = (Date.now() - start) / 1000;
    process.stderr.write(`\r${label} [${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${(frac * 100).toFixed(1)}% ${done}/${total} ${secs.toFixed(1)}s`);
    if (done >= total) process.stderr.write('\n');
  };
}
