// The RetrievalAttention graph's saved blob read back as CSR adjacency and
// entry points, for the benches that walk the graph themselves
// (retrieval-reach.ts, retrieval-model.ts): the native search does not
// expose its neighbour lists.

export interface Csr {
  n: number;
  off: Int32Array;
  nbr: Int32Array;
  entries: Int32Array;
}

/** The saved blob's header, CSR and entry points (version 4 layout: header, int64 offsets, int32 neighbours, int32 entries, checksum). */
export function readCsr(blob: Uint8Array): Csr {
  const dv = new DataView(blob.buffer, blob.byteOffset, blob.byteLength);
  if (dv.getUint32(8, true) !== 4) throw new Error(`ra-graph blob version ${dv.getUint32(8, true)}: this reader knows version 4`);
  const header = dv.getUint32(12, true);
  const n = Number(dv.getBigInt64(16, true));
  const entryCount = dv.getInt32(36, true);
  const edges = Number(dv.getBigInt64(64, true));
  const off = new Int32Array(n + 1);
  for (let i = 0; i <= n; i++) off[i] = Number(dv.getBigInt64(header + 8 * i, true));
  const at = header + 8 * (n + 1);
  const nbr = new Int32Array(blob.slice(at, at + 4 * edges).buffer);
  const entries = new Int32Array(blob.slice(at + 4 * edges, at + 4 * edges + 4 * entryCount).buffer);
  return { n, off, nbr, entries };
}

/**
 * The oracle walk: a search that knew the answer. From the entry points it
 * expands only keys ranked below `reach` (rank: a key's place in the exact
 * order, 0 = best) and scores every neighbour of each. Returns the share of
 * the top `k` it expands and the share of keys it scored.
 */
export function oracleWalk(g: Csr, rank: Int32Array, k: number, reach: number): { recall: number; scanned: number } {
  const { n, off, nbr, entries } = g;
  const seen = new Uint8Array(n), stack: number[] = [];
  for (const e of entries) {
    seen[e] = 1;
    if (rank[e] < reach) stack.push(e);
  }
  let got = 0, scanned = entries.length;
  for (let u = stack.pop(); u !== undefined; u = stack.pop()) {
    if (rank[u] < k) got++;
    for (let i = off[u]; i < off[u + 1]; i++) {
      const v = nbr[i];
      if (seen[v]) continue;
      seen[v] = 1;
      scanned++;
      if (rank[v] < reach) stack.push(v);
    }
  }
  return { recall: got / k, scanned: scanned / n };
}
