// readSocketInto (addon/socket-read.ts) on a real TCP connection: it reads
// exactly the bytes asked for, unmasked from the frame phase given, and node
// reads what follows, from the next byte on; a read the native side refuses
// up front (here a progress limit past its bound) fails the returned promise
// and leaves node reading the socket, nothing taken from it.
import { once } from 'node:events';
import { describe, expect, it } from 'vitest';
import { canReadDirect, readSocketInto } from '../../addon/socket-read.js';
import { nodeReads, useSocketPairs } from '../helpers/socket-pair.js';

const linux = process.platform === 'linux';
const pair = useSocketPairs();

describe.skipIf(!linux)('readSocketInto', () => {
  it('reads exactly its bytes, unmasked from the phase given; node reads on from the next byte', async () => {
    const { server, client } = await pair();
    const mask = Uint8Array.of(0x11, 0x22, 0x33, 0x44), phase = 3;
    const plain = Buffer.from(Array.from({ length: 200_000 }, (_, i) => (i * 7) & 0xff));
    const masked = Buffer.from(plain.map((b, i) => b ^ mask[(i + phase) & 3]));
    const tail = Buffer.from('after the message');
    // The first byte through node, the rest straight from the descriptor, as a WebSocket message's are.
    client.write(masked.subarray(0, 1));
    const [first] = (await once(server, 'data')) as [Buffer];
    expect(first.byteLength).toBe(1);
    expect(canReadDirect(server)).toBe(true);
    const dst = new Uint8Array(plain.byteLength - 1);
    server.pause();
    const read = readSocketInto(server, dst, mask, phase + 1, 5000);
    server.resume();
    client.write(Buffer.concat([masked.subarray(1), tail]));
    expect(await read.done).toBe(dst.byteLength);
    expect(Buffer.from(dst).equals(plain.subarray(1))).toBe(true);
    expect((await nodeReads(server, tail.byteLength)).equals(tail)).toBe(true);
  });

  it('refused before reading (progress limit past its bound): the promise fails and node reads every byte', async () => {
    const { server, client } = await pair();
    server.pause();
    const read = readSocketInto(server, new Uint8Array(16), new Uint8Array(4), 0, 2 ** 31);
    await expect(read.done).rejects.toThrow();
    server.resume();
    const bytes = Buffer.from('all of these reach node');
    client.write(bytes);
    expect((await nodeReads(server, bytes.byteLength)).equals(bytes)).toBe(true);
  });
});
