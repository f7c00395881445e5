// What a method's selection means as rows of the context, and how the decode
// step divides it between the GPU block pool (whole blocks of documents) and
// the host kernel (everything else). Pure functions over the parts, so the
// division is tested without a GPU: both halves attended on the host and
// merged equal the whole.
import type { AttendSegment } from '../../addon/kernels.js';
import { concat } from '../../addon/typed-concat.js';
import type { BlockList, LayerContext, Selection, SelectionPart } from '../../index/method.js';
import type { KvSegment } from '../../storage/kv-segment.js';

const range = (begin: number, end: number) => Int32Array.from({ length: Math.max(0, end - begin) }, (_, i) => begin + i);

/** How many rows a block list covers for one kv head (without listing them). */
function blockRowCount(blocks: BlockList, head: number, tokens: number): number {
  let n = 0;
  for (const b of blocks.ids[head]) n += Math.max(0, Math.min(tokens, (b + 1) * blocks.size) - b * blocks.size);
  return n;
}

/** Rows of a block list for one kv head, clamped to the segment. */
export function blockRows(blocks: BlockList, head: number, tokens: number): Int32Array {
  const ids = blocks.ids[head], size = blocks.size;
  const rows = new Int32Array(blockRowCount(blocks, head, tokens));
  let at = 0;
  for (const b of ids) for (let t = b * size, e = Math.min(tokens, (b + 1) * size); t < e; t++) rows[at++] = t;
  return rows;
}

/** Rows of a part for one kv head, local to its segment. */
export function rowsOf(p: SelectionPart, head: number): Int32Array {
  if (p.blocks) return blockRows(p.blocks, head, p.segment.tokens);
  if (p.ids) return p.ids[head];
  return range(p.begin ?? 0, p.end ?? p.segment.tokens);
}

/** A part as the host kernel takes it (block lists become row ids). */
export function toAttendSegment(p: SelectionPart): AttendSegment {
  const { k, v, tokens } = p.segment;
  const blocks = p.blocks;
  if (blocks) return { k, v, tokens, ids: blocks.ids.map((_, h) => blockRows(blocks, h, tokens)) };
  return { k, v, tokens, begin: p.begin, end: p.end, ids: p.ids };
}

/** Tokens attended per kv head, averaged over heads. */
export function attendedCount(sel: Selection, kvHeads: number): number {
  let n = 0;
  for (const p of sel.parts) {
    if (p.blocks) for (let h = 0; h < kvHeads; h++) n += blockRowCount(p.blocks, h, p.segment.tokens) / kvHeads;
    else if (p.ids) n += p.ids.reduce((a, ids) => a + ids.length, 0) / kvHeads;
    else n += (p.end ?? p.segment.tokens) - (p.begin ?? 0);
  }
  return n;
}

/** Per kv head, the context positions a selection attends. */
export function selectedPositions(sel: Selection, ctx: LayerContext): Int32Array[] {
  return Array.from({ length: ctx.kvHeads }, (_, h) => {
    const chunks = sel.parts.map((p) => {
      const base = ctx.offsets[ctx.segments.indexOf(p.segment)];
      return rowsOf(p, h).map((r) => r + base);
    });
    return concatRows(chunks);
  });
}

/** Int32 arrays back to back (the one array itself when there is one). */
export function concatRows(parts: Int32Array[]): Int32Array {
  return concat(Int32Array, parts);
}

/**
 * Whole blocks of one segment for the pool: a block list per kv head with
 * their eviction classes (a method's blocks), or blocks [first, first +
 * count) of every kv head in one class (a range part: sinks, window, a whole
 * document), which the pool keeps as a device table: no per-block work on
 * the host while it stays resident.
 */
export type PoolPart =
  | { segment: KvSegment; blocks: Int32Array[]; priority: Uint8Array[]; range?: undefined }
  | { segment: KvSegment; range: PoolRange; blocks?: undefined; priority?: undefined };

export interface PoolRange {
  first: number;
  count: number;
  priority: number;
}

/** Block ids first, first + 1, ... (count of them): a range listed block by block. */
export function rangeBlocks(first: number, count: number): Int32Array {
  const ids = new Int32Array(count);
  for (let i = 0; i < count; i++) ids[i] = first + i;
  return ids;
}

/** A part's blocks for one kv head, a range's listed (the per-block path's and tests' view). */
export function poolPartBlocks(p: PoolPart, head: number): Int32Array {
  return p.range ? rangeBlocks(p.range.first, p.range.count) : p.blocks[head];
}

export interface PoolSplit {
  pool: PoolPart[];
  host: SelectionPart[];
  /** Blocks over all pool parts and heads. */
  poolBlocks: number;
}

/**
 * Divides a selection: whole blocks (of `size` tokens) of segments the pool
 * may hold go to the pool, the rest (partial blocks, row ids, other
 * segments) stays on the host. Range parts (sinks, window, a whole
 * document) go in class `rangePriority`: they are what every step reads.
 */
export function splitForPool(parts: SelectionPart[], pooled: (s: KvSegment) => boolean, size: number, kvHeads: number, rangePriority: number): PoolSplit {
  const pool: PoolPart[] = [], host: SelectionPart[] = [];
  let poolBlocks = 0;
  for (const p of parts) {
    const segment = p.segment;
    if (!pooled(segment) || p.ids) {
      host.push(p);
      continue;
    }
    if (p.blocks) {
      if (p.blocks.size !== size) {
        host.push(p);
        continue;
      }
      const full = Math.floor(segment.tokens / size);
      const blocks: Int32Array[] = [], priority: Uint8Array[] = [], tail: Int32Array[] = [];
      let tails = 0;
      for (let h = 0; h < kvHeads; h++) {
        const ids = p.blocks.ids[h], pr = p.blocks.priority?.[h];
        // Ids ascend, so only the last one can be the partial block.
        const n = ids.length > 0 && ids[ids.length - 1] >= full ? ids.length - 1 : ids.length;
        blocks.push(ids.subarray(0, n));
        priority.push(pr ? pr.subarray(0, n) : new Uint8Array(n));
        tail.push(n < ids.length ? range(ids[n] * size, segment.tokens) : new Int32Array(0));
        tails += ids.length - n;
        poolBlocks += n;
      }
      pool.push({ segment, blocks, priority });
      if (tails > 0) host.push({ segment, ids: tail });
      continue;
    }
    const begin = p.begin ?? 0, end = Math.min(p.end ?? segment.tokens, segment.tokens);
    const first = Math.ceil(begin / size), last = Math.floor(end / size); // whole blocks [first, last)
    if (last <= first) {
      host.push(p);
      continue;
    }
    // No block listed here: a 1M-token document is one range, not 16K ids a step (the pool keeps its table).
    pool.push({ segment, range: { first, count: last - first, priority: rangePriority } });
    poolBlocks += (last - first) * kvHeads;
    if (begin < first * size) host.push({ segment, begin, end: first * size });
    if (last * size < end) host.push({ segment, begin: last * size, end });
  }
  return { pool, host, poolBlocks };
}
