// Shared-memory segments and a raw decode stream for the stream tests
// (api/shm.ts): segment files `kvrecall-<name>` in /dev/shm written and
// read through the file (the server maps it), and a stream that sends
// msgpack frames (masked) and reads their answers in order.
import { ftruncateSync, openSync, readSync, unlinkSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { Packr, Unpackr } from 'msgpackr';
import { expect } from 'vitest';
import type { Tensor } from '../../core/tensor.js';
import { clientFrame, openRawWs, type RawWsClient } from './ws-raw.js';

export const SHM = '/dev/shm';
const packr = new Packr({ useRecords: false });
const unpackr = new Unpackr({ mapsAsObjects: true, useRecords: false });
const made: string[] = [];

/** A file the tests made in /dev/shm, unlinked by removeShmFiles. */
export function keepShmFile(path: string): void {
  made.push(path);
}

/** Unlinks every file made (those unlinked already are skipped). */
export function removeShmFiles(): void {
  for (const p of made.splice(0))
    try {
      unlinkSync(p);
    } catch {
      // unlinked by the test already
    }
}

/** A segment file kvrecall-<name> in /dev/shm, of `bytes`, written and read through the file (the server maps it). */
export class Segment {
  readonly name = `t${process.pid}-${made.length}-${Math.floor(Math.random() * 1e9)}`;
  readonly path = join(SHM, `kvrecall-${this.name}`);
  readonly fd: number;

  constructor(readonly bytes: number) {
    this.fd = openSync(this.path, 'wx+', 0o600);
    ftruncateSync(this.fd, bytes);
    made.push(this.path);
  }

  /** Writes the tensor's bytes at `at`; the tensor as a reference there. */
  put(t: Tensor, at: number): { dtype: string; shape: number[]; at: number } {
    writeSync(this.fd, t.data, 0, t.data.byteLength, at);
    return { dtype: t.dtype, shape: t.shape, at };
  }

  read(at: number, n: number): Buffer {
    const b = Buffer.alloc(n);
    readSync(this.fd, b, 0, n, at);
    return b;
  }
}

/** A raw stream: frames out (masked), answers in, in order. */
export class RawStream {
  private seen = 0;
  private id = 0;
  constructor(readonly raw: RawWsClient) {}

  static async open(port: number): Promise<RawStream> {
    return new RawStream(await openRawWs(port));
  }

  /** Sends the frames in one write (the server reads them together) and answers each, in order. */
  async calls(bodies: Record<string, unknown>[]): Promise<Record<string, unknown>[]> {
    const ids = bodies.map(() => ++this.id);
    this.raw.socket.write(Buffer.concat(bodies.map((body, i) => clientFrame(2, Buffer.from(packr.pack({ id: ids[i], ...body })), [0x11, 0x22, 0x33, 0x44]))));
    await this.raw.until(() => this.raw.frames.length >= this.seen + ids.length, 20_000);
    return ids.map((id) => {
      const answer = unpackr.unpack(this.raw.frames[this.seen++].payload) as Record<string, unknown>;
      expect(answer.id).toBe(id);
      return answer;
    });
  }

  async call(body: Record<string, unknown>): Promise<Record<string, unknown>> {
    return (await this.calls([body]))[0];
  }

  close(): void {
    this.raw.socket.destroy();
  }
}

/** An answer's error, or {code: 'ok'}. */
export const errorOf = (a: Record<string, unknown>) => (a.error as { code: string; message: string } | undefined) ?? { code: 'ok', message: '' };
