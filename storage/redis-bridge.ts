// Calls into the Redis store's worker thread, asynchronously (everything the
// server does) or, for tools that read a whole document at once (load), by
// blocking this thread until the worker answers.
//
// Requests and answers are messages on one MessageChannel. After posting an
// answer the worker bumps a shared counter and notifies it; a blocked caller
// waits on the counter and takes answers off the port with
// receiveMessageOnPort, settling any other call's answer it meets on the way.
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { MessageChannel, receiveMessageOnPort, Worker, type MessagePort, type Transferable } from 'node:worker_threads';
import { KvrecallError, type ErrorKind } from '../core/errors.js';

export interface WorkerRequest {
  id: number;
  op: string;
  args: unknown;
}

export interface WorkerAnswer {
  id: number;
  value?: unknown;
  error?: { kind?: ErrorKind; message: string };
}

/** The compiled worker: beside this file when running from dist/, else dist/storage/ of the package (tests run the sources). */
function workerPath(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  const beside = join(here, 'redis-worker.js');
  if (existsSync(beside)) return beside;
  const built = join(here, '..', 'dist', 'storage', 'redis-worker.js');
  if (existsSync(built)) return built;
  throw new Error(`the Redis store's worker is not built (${built}): run npm run build`);
}

export class WorkerBridge {
  private readonly worker: Worker;
  private readonly port: MessagePort;
  private readonly signal = new Int32Array(new SharedArrayBuffer(4));
  private readonly pending = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  private seq = 0;
  private exited?: Error;

  constructor(workerData: unknown) {
    const { port1, port2 } = new MessageChannel();
    this.port = port1;
    this.worker = new Worker(workerPath(), { workerData: { ...(workerData as object), port: port2, signal: this.signal }, transferList: [port2] });
    this.worker.unref();
    this.port.unref();
    this.port.on('message', (m: WorkerAnswer) => this.settle(m));
    this.worker.on('error', (e) => this.fail(e));
    this.worker.on('exit', (code) => this.fail(new KvrecallError('unavailable', `the Redis store's worker exited (${code}); restart the server`)));
  }

  /** Calls op in the worker; the promise keeps the process alive while it is pending. */
  call<T>(op: string, args: unknown, transfer: Transferable[] = []): Promise<T> {
    if (this.exited) return Promise.reject(this.exited);
    const id = ++this.seq;
    const done = new Promise<T>((resolve, reject) => this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject }));
    this.port.ref();
    this.worker.postMessage({ id, op, args } satisfies WorkerRequest, transfer);
    return done;
  }

  /** Calls op and blocks this thread until the worker answers (or timeoutMs passes). */
  callSync<T>(op: string, args: unknown, timeoutMs: number, transfer: Transferable[] = []): T {
    if (this.exited) throw this.exited;
    const id = ++this.seq;
    this.worker.postMessage({ id, op, args } satisfies WorkerRequest, transfer);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const seen = Atomics.load(this.signal, 0);
      for (let m = receiveMessageOnPort(this.port); m; m = receiveMessageOnPort(this.port)) {
        const answer = m.message as WorkerAnswer;
        if (answer.id === id) return unwrap(answer) as T;
        this.settle(answer);
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new KvrecallError('unavailable', `the Redis store did not answer ${op} within ${Math.round(timeoutMs / 1000)} s`);
      Atomics.wait(this.signal, 0, seen, Math.min(left, 1000));
    }
  }

  async close(): Promise<void> {
    try {
      await this.call('close', undefined);
    } finally {
      await this.worker.terminate();
    }
  }

  private settle(answer: WorkerAnswer): void {
    const p = this.pending.get(answer.id);
    if (!p) return;
    this.pending.delete(answer.id);
    if (this.pending.size === 0) this.port.unref();
    try {
      p.resolve(unwrap(answer));
    } catch (e) {
      p.reject(e as Error);
    }
  }

  private fail(e: Error): void {
    this.exited ??= e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    this.port.unref();
  }
}

function unwrap(answer: WorkerAnswer): unknown {
  if (!answer.error) return answer.value;
  if (answer.error.kind) throw new KvrecallError(answer.error.kind, answer.error.message);
  throw new Error(answer.error.message);
}
