// readSocketInto with `ahead` (addon/socket-read.ts) on a real TCP
// connection: once its bytes are in, it reads on into `ahead` what has
// already come after them, as it came (the mask is the message's, not the
// next one's), and node reads on from the byte after those; with nothing
// after them it reads nothing more and node gets every later byte.
import { describe, expect, it } from 'vitest';
import { readSocketInto } from '../../addon/socket-read.js';
import { nodeReads, useSocketPairs } from '../helpers/socket-pair.js';

const linux = process.platform === 'linux';
const pair = useSocketPairs();

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe.skipIf(!linux)('readSocketInto, reading ahead', () => {
  it('reads what came after its bytes into ahead, unmasked only its own; node reads on after those', async () => {
    const { server, client } = await pair();
    const mask = Uint8Array.of(0x5a, 0xa5, 0x0f, 0xf0);
    const plain = Buffer.from(Array.from({ length: 300_000 }, (_, i) => (i * 13 + 1) & 0xff));
    const masked = Buffer.from(plain.map((b, i) => b ^ mask[i & 3]));
    const next = Buffer.from(Array.from({ length: 5000 }, (_, i) => (i * 3) & 0xff));
    const dst = new Uint8Array(plain.byteLength), ahead = new Uint8Array(1 << 16).fill(0xee);
    server.pause();
    const read = readSocketInto(server, dst, mask, 0, 5000, ahead);
    server.resume();
    // All but the last byte, then the last byte and what follows in one write: they come together.
    client.write(masked.subarray(0, masked.byteLength - 1));
    await sleep(100);
    client.write(Buffer.concat([masked.subarray(masked.byteLength - 1), next]));
    const n = await read.done;
    expect(Buffer.from(dst).equals(plain)).toBe(true);
    expect(n - dst.byteLength).toBe(next.byteLength);
    expect(Buffer.from(ahead.subarray(0, next.byteLength)).equals(next)).toBe(true);
    expect(ahead[next.byteLength]).toBe(0xee);
    const later = Buffer.from('read by node');
    client.write(later);
    expect((await nodeReads(server, later.byteLength)).equals(later)).toBe(true);
  });

  it('with nothing after its bytes, reads nothing more: node gets every later byte', async () => {
    const { server, client } = await pair();
    const dst = new Uint8Array(70_000), ahead = new Uint8Array(1 << 16);
    const bytes = Buffer.from(Array.from({ length: dst.byteLength }, (_, i) => i & 0xff));
    server.pause();
    const read = readSocketInto(server, dst, new Uint8Array(4), 0, 5000, ahead);
    server.resume();
    client.write(bytes);
    expect(await read.done).toBe(dst.byteLength);
    expect(Buffer.from(dst).equals(bytes)).toBe(true);
    await sleep(50);
    const later = Buffer.alloc(100_000, 7);
    client.write(later);
    expect((await nodeReads(server, later.byteLength)).equals(later)).toBe(true);
  });
});
