// hnswlib-node inserts one point per call on the thread that calls it: on
// the event loop a 16K-key head (d=64, M 16, efConstruction 200) took ~2 s
// of the server's only thread, yielding every 4096 points, so a seal stalled
// every other request in half-second bursts. Builds run in worker threads
// instead (hnswlib-node is an N-API addon, loadable in each), a few at once:
// the document's heads side by side (buildArtifacts asks for `concurrency`).
// The graph's bytes are the same as a build on the main thread: one insert
// order, one seed.
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';

/** Builds in flight at most (workers kept): the cores but one, at most 8. */
export const HNSW_BUILD_WORKERS = Math.max(1, Math.min(8, availableParallelism() - 1));

export interface HnswBuildArgs {
  /** [tokens, d] f32, transferred to the worker (unusable here afterwards). */
  keys: Float32Array;
  tokens: number;
  d: number;
  m: number;
  efConstruction: number;
  seed: number;
}

// The worker: CommonJS evaluated from a string, so the same code runs from
// the TypeScript sources (tests) and from dist/; hnswlib-node's resolved path
// comes in workerData (an eval worker resolves modules from the cwd).
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const fs = require('node:fs'), os = require('node:os'), path = require('node:path');
const hnswlib = require(workerData.hnswlib);
parentPort.on('message', (a) => {
  try {
    const index = new hnswlib.HierarchicalNSW('ip', a.d);
    index.initIndex({ maxElements: Math.max(1, a.tokens), m: a.m, efConstruction: a.efConstruction, randomSeed: a.seed });
    const row = new Array(a.d);
    for (let i = 0; i < a.tokens; i++) {
      for (let j = 0; j < a.d; j++) row[j] = a.keys[i * a.d + j];
      index.addPoint(row, i);
    }
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvrecall-hnsw-'));
    try {
      const file = path.join(dir, 'index.bin');
      index.writeIndexSync(file);
      const bytes = new Uint8Array(fs.readFileSync(file));
      parentPort.postMessage({ bytes }, [bytes.buffer]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  } catch (e) {
    parentPort.postMessage({ error: String((e && e.message) || e) });
  }
});
`;

interface Job {
  args: HnswBuildArgs;
  resolve: (bytes: Uint8Array) => void;
  reject: (e: Error) => void;
}

class BuildPool {
  private readonly idle: Worker[] = [];
  private readonly busy = new Map<Worker, Job>();
  private readonly queue: Job[] = [];
  private readonly hnswlibPath = createRequire(import.meta.url).resolve('hnswlib-node');

  constructor(private readonly size: number) {}

  run(args: HnswBuildArgs): Promise<Uint8Array> {
    return new Promise((resolve, reject) => {
      this.queue.push({ args, resolve, reject });
      this.pump();
    });
  }

  private pump(): void {
    while (this.queue.length > 0 && (this.idle.length > 0 || this.busy.size < this.size)) {
      const worker = this.idle.pop() ?? this.spawn();
      const job = this.queue.shift()!;
      this.busy.set(worker, job);
      worker.ref();  // a build in flight keeps the process alive; an idle worker does not
      worker.postMessage(job.args, [job.args.keys.buffer as ArrayBuffer]);
    }
  }

  private spawn(): Worker {
    const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { hnswlib: this.hnswlibPath } });
    worker.on('message', (msg: { bytes?: Uint8Array; error?: string }) => {
      const job = this.busy.get(worker);
      this.busy.delete(worker);
      worker.unref();
      this.idle.push(worker);
      if (job) msg.bytes ? job.resolve(msg.bytes) : job.reject(new Error(`hnsw build: ${msg.error}`));
      this.pump();
    });
    worker.on('error', (e) => {
      const job = this.busy.get(worker);
      this.busy.delete(worker);
      const at = this.idle.indexOf(worker);
      if (at >= 0) this.idle.splice(at, 1);
      job?.reject(e);
      this.pump();
    });
    return worker;
  }
}

let pool: BuildPool | undefined;

/** The graph's bytes (hnswlib's index file) for keys already centred. */
export function buildHnswGraph(args: HnswBuildArgs): Promise<Uint8Array> {
  return (pool ??= new BuildPool(HNSW_BUILD_WORKERS)).run(args);
}
