// The layer context a block method's select sees for one document layer of
// `tokens` tokens and no tokens of the session's own: what the block
// selection benches hand nosa and topk-blocks, with a device (or replayed)
// scorer or none (the host path).
import type { BlockScorer, HeadIndex, LayerContext } from '../index/method.js';
import type { BlockSummary } from '../index/block-summary.js';
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
