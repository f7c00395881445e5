// node bench/q-alignment-cost.mjs [rounds]
//
// The server's read of an HTTP attend body (decodeMsgpack + parseAttendRequest,
// as api/fast-attend.ts does before the step) when q's f32 data lies at an
// offset of the body that is a multiple of 4 (the Python client since it
// aligns its tensors: a Float32Array over the body) and when it does not (its
// bodies before: q's data at offset 41, copied out by toF32). The bodies are
// the Python client's own bytes for a decode step (32 q / 8 kv heads, d=128,
// q f32, the token's k and v f16 with its position), written by
// clients/python (new and old kvrecall.wire) to the files named in
// KVRECALL_BODIES (aligned.bin, unaligned.bin in that folder). Each body is
// read into a fresh buffer of its length as the server does; the variants
// alternate in blocks, with caches flushed between reads (CACHE=warm: not)
// as a decode step between two requests flushes them. Needs dist/ built.
// Not a timed test: bench/results/transport-vm-python-q-aligned.md.
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';

const ROOT = resolve(import.meta.dirname, '..');
const { decodeMsgpack } = await import(join(ROOT, 'dist/api/codec.js'));
const { parseAttendRequest } = await import(join(ROOT, 'dist/engine/attend-request.js'));
const { unalignedF32Copies } = await import(join(ROOT, 'dist/core/tensor.js'));
const dir = process.env.KVRECALL_BODIES ?? '/tmp';
const bodies = { aligned: readFileSync(join(dir, 'aligned.bin')), unaligned: readFileSync(join(dir, 'unaligned.bin')) };
const model = { layers: 1, qHeads: 32, kvHeads: 8, headDim: 128, dtype: 'f16', blockSize: 64 };
const rounds = Number(process.argv[2] ?? 40), block = 250;
const big = new Float32Array(4 << 20);
let sink = 0;
const flush = process.env.CACHE === 'warm' ? () => {} : () => {
  for (let i = 0; i < big.length; i += 16) sink += big[i];
};

function read(bytes) {
  const raw = Buffer.allocUnsafeSlow(bytes.length);
  bytes.copy(raw);
  const req = parseAttendRequest(decodeMsgpack(raw), model);
  sink += req.q[5];
}

const times = { aligned: [], unaligned: [] };
const copies = { aligned: 0, unaligned: 0 };
for (let r = 0; r < rounds + 2; r++)
  for (const name of r % 2 ? ['unaligned', 'aligned'] : ['aligned', 'unaligned']) {
    let ns = 0n;
    const c0 = unalignedF32Copies();
    for (let i = 0; i < block; i++) {
      flush();
      const t0 = process.hrtime.bigint();
      read(bodies[name]);
      ns += process.hrtime.bigint() - t0;
    }
    if (r < 2) continue; // warm-up
    copies[name] += unalignedF32Copies() - c0;
    times[name].push(Number(ns) / block / 1e3);
  }
const p50 = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(JSON.stringify({ rounds, block, cache: process.env.CACHE === 'warm' ? 'warm' : 'flushed', bytes: { aligned: bodies.aligned.length, unaligned: bodies.unaligned.length }, copies, usPerRead: { aligned: p50(times.aligned), unaligned: p50(times.unaligned) }, sink: sink > 0 }));
