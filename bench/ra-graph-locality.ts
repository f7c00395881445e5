// node dist/bench/ra-graph-locality.js [--tokens 1048576 --out bench/results/ra-graph-locality-1048576.md]
//
// How far apart, in id, the graph's edges join keys: under token order (the
// graph's ids, as the code walk lays out its code rows and lists) and under a
// breadth-first numbering from the entry points (the relabelling measured in
// ra-search-1048576-vm-walk-order.md). A code row is 64 bytes at d = 128, so
// keys less than 64 apart have their codes in one 4 KB page, less than 32,768
// in one 2 MB page. Reads bench/ra-search.ts's cached graph (run it first at
// the same --tokens).
import { readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RA_GRAPH_DEFAULTS } from '../addon/ra-graph.js';
import { readCsr, type Csr } from './ra-graph-csr.js';

const argv = process.argv.slice(2);
const get = (name: string, dflt: string) => (argv.includes(`--${name}`) ? argv[argv.indexOf(`--${name}`) + 1] : dflt);
const tokens = Number(get('tokens', '1048576')), out = get('out', '');
const p = RA_GRAPH_DEFAULTS;
const file = join(tmpdir(), 'kvrecall-ra-search', `s7-${tokens}-8-${p.degree}-${p.kBuild}-${p.maxQueries}-${p.seed}-${p.positional}-${p.keyNeighbors}-${p.keyEf}.graph`);
// A copy: readCsr's slices must copy (a Buffer's slice is a view of the whole file's memory).
const g = readCsr(new Uint8Array(readFileSync(file)));

/** Breadth-first from the entry points in order (then any key not reached, in id order): walk[token] = its number. */
function bfs(c: Csr): Int32Array {
  const walk = new Int32Array(c.n).fill(-1), queue = new Int32Array(c.n);
  let tail = 0;
  const claim = (u: number) => {
    if (walk[u] < 0) (walk[u] = tail), (queue[tail++] = u);
  };
  for (const e of c.entries) claim(e);
  for (let head = 0, next = 0; ; ) {
    for (; head < tail; head++) for (let i = c.off[queue[head]]; i < c.off[queue[head] + 1]; i++) claim(c.nbr[i]);
    while (next < c.n && walk[next] >= 0) next++;
    if (next >= c.n) break;
    claim(next);
  }
  return walk;
}

const gaps = [2, 64, 1024, 32768];
function shares(number: (u: number) => number) {
  const within = gaps.map(() => 0);
  for (let u = 0; u < g.n; u++)
    for (let i = g.off[u]; i < g.off[u + 1]; i++) {
      const dist = Math.abs(number(u) - number(g.nbr[i]));
      gaps.forEach((t, j) => (within[j] += dist < t ? 1 : 0));
    }
  return within.map((w) => w / g.nbr.length);
}
const walk = bfs(g);
const rows = [
  { order: 'token (the graph ids)', shares: shares((u) => u) },
  { order: 'breadth-first from the entry points', shares: shares((u) => walk[u]) },
];
const lines = [
  `### How far apart the retrieval-attention graph's edges join keys, ${tokens.toLocaleString('en-US')} keys (bench/ra-graph-locality.ts)`,
  '',
  `bench/ra-search.ts's cached graph (seed 7, default parameters): ${g.n.toLocaleString('en-US')} keys, ${g.nbr.length.toLocaleString('en-US')} edges (${(g.nbr.length / g.n).toFixed(2)} a key). Share of edges whose two keys' numbers differ by less than: 2; 64 (the same 4 KB page of 64-byte code rows); 1,024; 32,768 (the same 2 MB page).`,
  '',
  `| numbering | ${gaps.map((t) => `< ${t.toLocaleString('en-US')}`).join(' | ')} |`,
  `| --- |${gaps.map(() => ' ---: |').join('')}`,
  ...rows.map((r) => `| ${r.order} | ${r.shares.map((s) => s.toFixed(3)).join(' | ')} |`),
  '',
];
process.stdout.write(lines.join('\n'));
if (out) {
  writeFileSync(out, lines.join('\n'));
  writeFileSync(out.replace(/\.md$/, '.json'), JSON.stringify({ tokens, keys: g.n, edges: g.nbr.length, gaps, rows }, null, 1));
}
