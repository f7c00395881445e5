// The layer context a block method's select sees for one document layer of
// `tokens` tokens and no tokens of the session's own: what the block
// selection benches hand nosa and topk-blocks, with a device (or replayed)
// scorer or none (the host path).
import type { BlockScorer, HeadIndex, LayerContext } from '../index/method.js';
import { summaryStride, type BlockSummary } from '../index/block-summary.js';
import { convert } from '../addon/kernels.js';
import type { Rng } from '../workload/index.js';
import type { KvSegment } from '../storage/kv-segment.js';

export interface BlockLayerShape {
  tokens: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
}

export function blockLayerContext(heads: BlockSummary[], s: BlockLayerShape, memo: Map<string, unknown>, blockScorer?: BlockScorer): LayerContext {
  return {
    layer: 0,
    segments: [{ tokens: s.tokens } as KvSegment, { tokens: 0 } as KvSegment],
    offsets: [0, s.tokens],
    indexes: [heads as HeadIndex[], undefined],
    question: () => ({ queries: new Float32Array(0), queryCount: 0 }),
    memo,
    tokens: s.tokens,
    qHeads: s.qHeads,
    kvHeads: s.kvHeads,
    headDim: s.headDim,
    ...(blockScorer && { blockScorer }),
  };
}

/**
 * A seal's summary rows for one kv head, made up: [blocks · reps,
 * summaryStride(d)] f16 words, each row a sub-centroid of unit-variance keys
 * (about N(0, 1/16) per coordinate) with a per-block drift, a radius and a
 * ln count.
 */
export function randomSummaryRows(rng: Rng, blocks: number, reps: number, d: number, blockSize: number): Uint16Array {
  const stride = summaryStride(d), f = new Float32Array(blocks * reps * stride);
  for (let b = 0; b < blocks; b++) {
    const shift = rng.normal() * 0.05;
    for (let r = 0; r < reps; r++) {
      const at = (b * reps + r) * stride;
      for (let j = 0; j < d; j++) f[at + j] = rng.normal() * 0.25 + shift;
      f[at + d] = 4 + rng.next();
      f[at + d + 1] = Math.log(1 + rng.int(blockSize / reps));
    }
  }
  const words = new Uint16Array(f.length);
  convert(new Uint8Array(f.buffer), 'f32', new Uint8Array(words.buffer), 'f16', f.length);
  return words;
}
