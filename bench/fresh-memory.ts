// node dist/bench/fresh-memory.js [--gib 12]
//
// What a first touch of memory costs on this machine, apart from kvrecall:
// --gib GiB of anonymous memory (Buffer.allocUnsafeSlow, 4 KiB pages
// unless THP is "always") filled GiB by GiB, then filled again; then a file
// of as many GiB written through the page cache (no sync) in 16 MiB writes,
// GiB by GiB, and removed. Seconds and system CPU per GiB. A preload of a
// 1M-token x 2-layer document touches 8.6 GB of segment memory and, without
// the LMDB write-back, as much page cache: where a first touch costs far
// more than the second (memory the host has not backed yet), a large
// preload pays it (bench/results/preload-writeback-vm.md). Prints a table;
// writes nothing under bench/results.
import { closeSync, openSync, rmSync, writeSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { machine } from './decode/machine.js';

const GIB = process.argv.includes('--gib') ? Number(process.argv[process.argv.indexOf('--gib') + 1]) : 12;
const G = 2 ** 30;

function timed(f: () => void): { s: number; sys: number } {
  const c0 = process.cpuUsage(), t0 = performance.now();
  f();
  return { s: (performance.now() - t0) / 1000, sys: process.cpuUsage(c0).system / 1e6 };
}

const m = machine();
console.log(`# First touch per GiB (${m.cpu}, ${m.cores} cores), load ${loadavg()[0].toFixed(2)}\n`);
console.log('| GiB | anonymous first s | sys s | second s | page cache write s | sys s |');
console.log('| ---: | ---: | ---: | ---: | ---: | ---: |');
const held: Buffer[] = [];
const first = Array.from({ length: GIB }, () => {
  const b = Buffer.allocUnsafeSlow(G);
  held.push(b);
  return timed(() => b.fill(1));
});
const second = held.map((b) => timed(() => b.fill(2)));
held.length = 0;
const file = join(tmpdir(), `kvr-fresh-memory-${process.pid}`);
const chunk = Buffer.alloc(2 ** 24, 7);
const fd = openSync(file, 'w');
let writes: { s: number; sys: number }[] = [];
try {
  writes = Array.from({ length: GIB }, () => timed(() => {
    for (let i = 0; i < G / chunk.length; i++) writeSync(fd, chunk);
  }));
} finally {
  closeSync(fd);
  rmSync(file, { force: true });
}
for (let i = 0; i < GIB; i++)
  console.log(`| ${i + 1} | ${first[i].s.toFixed(2)} | ${first[i].sys.toFixed(2)} | ${second[i].s.toFixed(2)} | ${writes[i].s.toFixed(2)} | ${writes[i].sys.toFixed(2)} |`);
